/**
 * A program run through run-command.ts failed: the one shape of such an error, carrying what a
 * person needs to understand it. Each family of programs (the QEMU tools, iptables) subclasses
 * it to be told apart, and names the Debian package that installs it.
 */
import { describeTimeout, type CommandResult } from './run-command.js';

export class CommandError extends Error {
  override name = 'CommandError';
  readonly command: string;
  readonly args: readonly string[];
  /** Undefined when the program did not start or was killed by a signal. */
  readonly exitCode: number | undefined;
  /** What it printed on stderr, trimmed. */
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
    this.stderr = stderr.trim();
  }
}

/**
 * The message for a failed run, on one line: a program that is not installed names the
 * Debian package that has it, one stopped at its deadline says so (with what it printed), any
 * other says what it printed, or how it ended.
 */
export function failureMessage(
  command: string,
  args: readonly string[],
  result: CommandResult,
  debianPackage: string,
): string {
  if ((result.spawnError as NodeJS.ErrnoException | undefined)?.code === 'ENOENT')
    return `${command} is not installed or not on PATH (Debian: ${debianPackage})`;
  // Tools print their version or a hint on a line of their own: one line for a log field or a status.
  const said = result.stderr.trim().replace(/\s*\n\s*/g, ' ');
  const detail =
    result.timedOut !== undefined
      ? `${describeTimeout(result.timedOut)}${said === '' ? '' : `: ${said}`}`
      : said ||
        (result.spawnError?.message ??
          (result.exitCode === undefined ? 'killed by a signal' : `exit code ${result.exitCode}`));
  return `${command} ${args.join(' ')}: ${detail}`;
}
