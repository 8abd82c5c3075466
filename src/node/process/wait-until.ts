/**
 * Bounded polling: every wait of the node executors for another process (a daemon to
 * listen, a parent to exit, an export to go) has a deadline, so no worker waits forever
 * on a process that never gets there.
 */
import { systemClock, type Clock } from '../../shared/clock.js';

/**
 * Real time whose timers keep the process alive (systemClock's do not): a caller that
 * awaits a wait, say `stop()` at the end of a script, must not see the process exit under it.
 */
const waitingClock: Clock = {
  now: () => systemClock.now(),
  date: () => systemClock.date(),
  setTimeout: (callback, ms) => setTimeout(callback, ms),
  clearTimeout: (handle) => clearTimeout(handle as ReturnType<typeof setTimeout>),
};

export interface WaitOptions {
  /** Give up this long after the first check. Required: there is no waiting without an end. */
  timeoutMs: number;
  /** What is awaited, for the error: "nbd-server parent 123 to exit". */
  what: string;
  /**
   * Pause between checks, or a function of the attempt number (0 first). 0 yields to the
   * event loop only (setImmediate): for the few waits where every millisecond counts.
   * Default 100 ms.
   */
  intervalMs?: number | ((attempt: number) => number);
  /** Default: real time, whose pending timers keep the process alive. */
  clock?: Clock;
}

/** A bounded wait ended without its condition. */
export class WaitTimeoutError extends Error {
  override name = 'WaitTimeoutError';
  readonly what: string;
  readonly timeoutMs: number;
  constructor(what: string, timeoutMs: number, options?: { cause?: unknown }) {
    super(`timed out after ${timeoutMs} ms waiting for ${what}`, options);
    this.what = what;
    this.timeoutMs = timeoutMs;
  }
}

/**
 * Calls `poll` until it returns a value other than undefined, and resolves with that
 * value; rejects with WaitTimeoutError once `timeoutMs` has passed without one. An error
 * `poll` throws ends the wait with that error.
 */
export async function waitFor<T>(
  poll: () => T | undefined | Promise<T | undefined>,
  options: WaitOptions,
): Promise<T> {
  const clock = options.clock ?? waitingClock;
  const deadline = clock.now() + options.timeoutMs;
  for (let attempt = 0; ; attempt++) {
    const value = await poll();
    if (value !== undefined) return value;
    if (clock.now() >= deadline) throw new WaitTimeoutError(options.what, options.timeoutMs);
    await pause(clock, intervalOf(options, attempt));
  }
}

/** Resolves once `check` returns true; rejects with WaitTimeoutError after `timeoutMs`. */
export async function waitUntil(
  check: () => boolean | Promise<boolean>,
  options: WaitOptions,
): Promise<void> {
  await waitFor(async () => ((await check()) ? true : undefined), options);
}

/** Like waitUntil, for waits whose end is not an error: resolves with whether `check` came true in time. */
export async function pollUntil(
  check: () => boolean | Promise<boolean>,
  options: WaitOptions,
): Promise<boolean> {
  try {
    await waitUntil(check, options);
    return true;
  } catch (error) {
    if (error instanceof WaitTimeoutError) return false;
    throw error;
  }
}

function intervalOf(options: WaitOptions, attempt: number): number {
  const interval = options.intervalMs ?? 100;
  return typeof interval === 'function' ? interval(attempt) : interval;
}

function pause(clock: Clock, ms: number): Promise<void> {
  if (ms <= 0) return new Promise((resolve) => setImmediate(resolve));
  return new Promise((resolve) => clock.setTimeout(resolve, ms));
}

/**
 * Resolves or rejects as `promise` does, or rejects with WaitTimeoutError once `timeoutMs`
 * has passed first (the promise itself runs on; the caller stops what it stands for).
 */
export async function withDeadline<T>(
  promise: Promise<T>,
  options: Omit<WaitOptions, 'intervalMs'>,
): Promise<T> {
  const clock = options.clock ?? waitingClock;
  let timer: unknown;
  const expired = new Promise<never>((_, reject) => {
    timer = clock.setTimeout(
      () => reject(new WaitTimeoutError(options.what, options.timeoutMs)),
      options.timeoutMs,
    );
  });
  try {
    return await Promise.race([promise, expired]);
  } finally {
    clock.clearTimeout(timer);
  }
}
