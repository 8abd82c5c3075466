/**
 * The one way the controller runs an external program to completion (qemu-img, `nbd-server
 * -V`): with a deadline, always. A FIFO given as an image path, a hung NFS mount or a
 * wedged device would otherwise hold a worker for ever. At the deadline the program's
 * whole process group gets SIGTERM, and SIGKILL after a grace period (a helper it forked
 * dies with it); the result says it timed out and after how long.
 *
 * Long-lived daemons (nbd-server's parent, qemu-storage-daemon) are not run through here:
 * their supervisors start them and bound each wait on them (wait-until.ts).
 *
 * `CommandRunner` is the boundary unit tests fake.
 */
import { spawn } from 'node:child_process';
import { basename } from 'node:path';
import { systemClock } from '../../shared/clock.js';
import { signalGroup } from './signal-group.js';

/** The program was stopped at its deadline, or because it made no progress. */
export interface CommandTimeout {
  /** How long it had run when it was stopped: the deadline, or less when it stalled. */
  afterMs: number;
  /** Set when it was stopped for making no progress this long (RunOptions.progress). */
  stalledMs?: number;
  /** SIGKILL when it outlived SIGTERM by the grace period. */
  lastSignal: 'SIGTERM' | 'SIGKILL';
}

/**
 * How a long-running program shows that it gets on (qemu-img create writing a fully
 * preallocated image: the bytes allocated so far). It is stopped when the measure has not
 * changed for `stallMs`, long before a deadline sized for the largest image.
 */
export interface ProgressWatch {
  /** Any value that changes while the program works; a measure that fails counts as no change. */
  measure: () => Promise<number>;
  /** Default DEFAULT_STALL_MS. */
  stallMs?: number;
  /** How often to measure. Default a quarter of stallMs, at most 5 s. */
  everyMs?: number;
}

/** How one finished command went. `spawnError` is set when the program could not be started at all. */
export interface CommandResult {
  /** Undefined when the program did not start or was killed by a signal. */
  exitCode: number | undefined;
  stdout: string;
  stderr: string;
  spawnError?: Error;
  /** Set when the program was killed at its deadline. */
  timedOut?: CommandTimeout;
}

export interface RunOptions {
  /** Kill the program after this long. Default: `defaultTimeoutMs(command, args)`. */
  timeoutMs?: number;
  /** Between SIGTERM and SIGKILL. Default 2 s. */
  killGraceMs?: number;
  /** Also stop the program when this stops changing. */
  progress?: ProgressWatch;
}

/** Runs a program to completion or its deadline; never rejects for a failing command, only reports it. */
export type CommandRunner = (
  command: string,
  args: readonly string[],
  options?: RunOptions,
) => Promise<CommandResult>;

/**
 * Deadlines by program and subcommand, for callers that give none. Reading metadata is
 * quick and a slow answer means something is wrong (a FIFO, a hung mount); writing a
 * whole image (`create` with preallocation=full, or `convert`) takes as long as the disk
 * needs. Keys are the program's base name, then `<program> <subcommand>`.
 */
export const DEFAULT_TIMEOUTS_MS: Readonly<Record<string, number>> = {
  /** Reads the headers of an image and its backing chain. */
  'qemu-img info': 30_000,
  /** Walks every metadata table (refcounts, L2 tables) of a QCOW2 image: longer on a large image. */
  'qemu-img check': 120_000,
  /**
   * With preallocation=full writes every byte of the image: hours for the largest disks.
   * createImage also watches the image grow (ProgressWatch), so a hung create ends after
   * DEFAULT_STALL_MS, not this.
   */
  'qemu-img create': 4 * 60 * 60_000,
  /** Copies a whole image. */
  'qemu-img convert': 60 * 60_000,
  /** Other qemu-img subcommands (resize, snapshot, ...) touch metadata only. */
  'qemu-img': 120_000,
  /** `nbd-server -V` prints its version and exits. */
  'nbd-server': 10_000,
};

/** Any program the table does not name. */
export const FALLBACK_TIMEOUT_MS = 60_000;
export const DEFAULT_KILL_GRACE_MS = 2_000;
/** A program under a ProgressWatch that shows no progress this long is stopped. */
export const DEFAULT_STALL_MS = 120_000;
/** Output kept per stream; the rest is dropped (qemu-img's JSON is a few KiB). */
const OUTPUT_LIMIT = 16 << 20;

/** The deadline `runCommand` applies when the caller gives none (see DEFAULT_TIMEOUTS_MS). */
export function defaultTimeoutMs(command: string, args: readonly string[]): number {
  const program = basename(command);
  const subcommand = args.find((arg) => !arg.startsWith('-'));
  return (
    (subcommand === undefined ? undefined : DEFAULT_TIMEOUTS_MS[`${program} ${subcommand}`]) ??
    DEFAULT_TIMEOUTS_MS[program] ??
    FALLBACK_TIMEOUT_MS
  );
}

/**
 * "timed out after 30000 ms (killed with SIGTERM)", or for a stall "timed out: no progress
 * for 120000 ms, stopped after 300000 ms (...)": what a person reads in an error.
 */
export function describeTimeout(timeout: CommandTimeout): string {
  const killed = `killed with ${timeout.lastSignal === 'SIGKILL' ? 'SIGTERM, then SIGKILL' : 'SIGTERM'}`;
  return timeout.stalledMs === undefined
    ? `timed out after ${timeout.afterMs} ms (${killed})`
    : `timed out: no progress for ${timeout.stalledMs} ms, stopped after ${timeout.afterMs} ms (${killed})`;
}

export const runCommand: CommandRunner = (command, args, options = {}) => {
  const timeoutMs = options.timeoutMs ?? defaultTimeoutMs(command, args);
  const killGraceMs = options.killGraceMs ?? DEFAULT_KILL_GRACE_MS;
  if (!(timeoutMs > 0)) throw new TypeError(`timeoutMs must be positive, got ${timeoutMs}`);
  const clock = systemClock;
  return new Promise<CommandResult>((resolve) => {
    // Its own process group (detached), so that the deadline reaches whatever it forked.
    const child = spawn(command, args, {
      detached: true,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, LC_ALL: 'C' },
    });
    const stdout = new OutputBuffer();
    const stderr = new OutputBuffer();
    child.stdout.on('data', (chunk: Buffer) => stdout.add(chunk));
    child.stderr.on('data', (chunk: Buffer) => stderr.add(chunk));

    let timedOut: CommandTimeout | undefined;
    let settled = false;
    const timers: unknown[] = [];
    /** The next progress measurement: one at a time, replaced rather than accumulated. */
    let progressTimer: unknown;
    const finish = (exitCode: number | undefined, spawnError?: Error) => {
      if (settled) return;
      settled = true;
      for (const timer of timers) clock.clearTimeout(timer);
      clock.clearTimeout(progressTimer);
      resolve({
        exitCode,
        stdout: stdout.text(),
        stderr: stderr.text(),
        ...(spawnError === undefined ? {} : { spawnError }),
        ...(timedOut === undefined ? {} : { timedOut }),
      });
    };
    const signal = (name: 'SIGTERM' | 'SIGKILL') => {
      if (child.pid !== undefined) signalGroup(child.pid, name);
    };

    /** SIGTERM to the group, SIGKILL after the grace, then stop waiting for the pipes. */
    const stop = (reason: { afterMs: number; stalledMs?: number }) => {
      if (timedOut !== undefined || settled) return;
      timedOut = { ...reason, lastSignal: 'SIGTERM' };
      signal('SIGTERM');
      timers.push(
        clock.setTimeout(() => {
          if (timedOut !== undefined) timedOut.lastSignal = 'SIGKILL';
          signal('SIGKILL');
          // A process that left the group (a daemon) may still hold the pipes: stop waiting for them.
          timers.push(
            clock.setTimeout(() => {
              child.stdout.destroy();
              child.stderr.destroy();
              finish(child.exitCode ?? undefined);
            }, killGraceMs),
          );
        }, killGraceMs),
      );
    };

    child.once('error', (error) => finish(undefined, error));
    // 'close' waits for the output pipes too; a helper that kept them open is killed at the deadline.
    child.once('close', (code) => finish(code ?? undefined));
    timers.push(clock.setTimeout(() => stop({ afterMs: timeoutMs }), timeoutMs));
    if (options.progress !== undefined) watchProgress(options.progress, stop);

    function watchProgress(watch: ProgressWatch, stopStalled: typeof stop): void {
      const stallMs = watch.stallMs ?? DEFAULT_STALL_MS;
      const everyMs = watch.everyMs ?? Math.min(5_000, stallMs / 4);
      const started = clock.now();
      let last: number | undefined;
      let changedAt = started;
      const check = async () => {
        const value = await watch.measure().catch(() => last);
        if (settled || timedOut !== undefined) return;
        const now = clock.now();
        if (value !== last) {
          last = value;
          changedAt = now;
        } else if (now - changedAt >= stallMs) {
          stopStalled({ afterMs: Math.round(now - started), stalledMs: stallMs });
          return;
        }
        progressTimer = clock.setTimeout(() => void check(), everyMs);
      };
      progressTimer = clock.setTimeout(() => void check(), everyMs);
    }
  });
};

/** Collects a stream's output up to OUTPUT_LIMIT bytes. */
class OutputBuffer {
  readonly #chunks: Buffer[] = [];
  #length = 0;

  add(chunk: Buffer): void {
    if (this.#length >= OUTPUT_LIMIT) return;
    const kept = chunk.subarray(0, OUTPUT_LIMIT - this.#length);
    this.#chunks.push(kept);
    this.#length += kept.length;
  }

  /** The text without its final newline, as callers have always compared it. */
  text(): string {
    return Buffer.concat(this.#chunks)
      .toString('utf8')
      .replace(/\r?\n$/, '');
  }
}
