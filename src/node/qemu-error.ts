/**
 * Errors of the QEMU tools (qemu-img, qemu-storage-daemon). Their processes run through
 * the one runner with a deadline, process/run-command.ts; its names are re-exported here
 * for the callers that import them from this module.
 */
import { CommandError, failureMessage } from './process/command-error.js';
import type { CommandResult } from './process/run-command.js';

export { runCommand, type CommandResult, type CommandRunner } from './process/run-command.js';

/** A QEMU tool failed (src/node/process/command-error.ts). */
export class QemuCommandError extends CommandError {
  override name = 'QemuCommandError';

  static fromResult(command: string, args: readonly string[], result: CommandResult): QemuCommandError {
    return new QemuCommandError(command, args, result.exitCode, result.stderr, {
      cause: result.spawnError,
      message: failureMessage(command, args, result, 'qemu-utils / qemu-system-common'),
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
