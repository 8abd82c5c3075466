/**
 * What went wrong with nbd-server, with what a person needs to act on it: the command
 * that ran, its exit code (null when it did not exit, or exited as a daemon we cannot
 * wait for), and what it printed (nbd-server's own stderr before it daemonized).
 */
export class NbdServerError extends Error {
  override readonly name = 'NbdServerError';
  readonly command: readonly string[];
  readonly exitCode: number | null;
  readonly stderr: string;
  /** The launcher succeeded but the daemon exited before listening (typically: the port was taken). */
  readonly diedAfterDaemonizing: boolean;

  constructor(
    message: string,
    details: {
      command: readonly string[];
      exitCode?: number | null;
      stderr?: string;
      cause?: unknown;
      diedAfterDaemonizing?: boolean;
    },
  ) {
    const stderr = details.stderr?.trim() ?? '';
    super(stderr === '' ? message : `${message}: ${stderr}`, { cause: details.cause });
    this.command = details.command;
    this.exitCode = details.exitCode ?? null;
    this.stderr = stderr;
    this.diedAfterDaemonizing = details.diedAfterDaemonizing ?? false;
  }
}
