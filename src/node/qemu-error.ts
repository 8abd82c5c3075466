/**
 * Errors of the QEMU tools (qemu-img, qemu-storage-daemon). Their processes run through
 * the one runner with a deadline, process/run-command.ts; its names are re-exported here
 * for the callers that import them from this module.
 */
import { describeTimeout, type CommandResult } from './process/run-command.js';

export { runCommand, type CommandResult, type CommandRunner } from './process/run-command.js';

/** A QEMU tool failed: carries what a person needs to understand it. */
export class QemuCommandError extends Error {
  override name = 'QemuCommandError';
  readonly command: string;
  readonly args: readonly string[];
  /** Undefined when the program did not start or was killed by a signal. */
  readonly exitCode: number | undefined;
  readonly stderr: string;

  constructor(
    command: string,
    args: readonly string[],
    exitCode: number | undefined,
    stderr: string,
    options?: { cause?: unknown; message?: string },
  ) {
    const detail = stderr.trim() || (exitCode === undefined ? 'did not run' : `exit code ${exitCode}`);
    super(options?.message ?? `${command} ${args.join(' ')}: ${detail}`, { cause: options?.cause });
    this.command = command;
    this.args = args;
    this.exitCode = exitCode;
    this.stderr = stderr;
  }

  /**
   * Builds the error for a failed CommandResult; a program that is not installed, or was
   * killed at its deadline, says so.
   */
  static fromResult(command: string, args: readonly string[], result: CommandResult): QemuCommandError {
    const code = (result.spawnError as NodeJS.ErrnoException | undefined)?.code;
    const message =
      code === 'ENOENT'
        ? `${command} is not installed or not on PATH (Debian: qemu-utils / qemu-system-common)`
        : result.timedOut !== undefined
          ? `${command} ${args.join(' ')}: ${describeTimeout(result.timedOut)}${result.stderr.trim() ? `: ${result.stderr.trim()}` : ''}`
          : undefined;
    return new QemuCommandError(command, args, result.exitCode, result.stderr, {
      cause: result.spawnError,
      ...(message === undefined ? {} : { message }),
    });
  }
}

const LOCK_PATTERNS = [/Failed to get (shared )?"[a-z -]+" lock/i, /Is another process using the image/i];

/** True when a QEMU error message (or error carrying one) is about an image lock held by another process. */
export function isLockError(error: unknown): boolean {
  const text =
    error instanceof QemuCommandError
      ? error.stderr
      : error instanceof Error
        ? error.message
        : typeof error === 'string'
          ? error
          : '';
  return LOCK_PATTERNS.some((pattern) => pattern.test(text));
}

/** A QEMU error text as one line without the program prefix: the message to show users. */
export function qemuMessage(stderr: string): string {
  return stderr
    .trim()
    .split('\n')
    .map((line) => line.replace(/^qemu-(img|storage-daemon|nbd): /, ''))
    .join(' ');
}
