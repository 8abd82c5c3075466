/**
 * Time, as every part of the controller reads it. One interface, injected everywhere
 * (queue, watch loop, probe cache, directory source, reconciler), so that tests move time
 * forward instead of sleeping, and no part reads the global clock behind the others' backs.
 */

/** What setTimeout returned; opaque to callers. */
export type TimerHandle = unknown;

export interface Clock {
  /** Milliseconds on a monotonic scale: for durations, deadlines and freshness windows. */
  now(): number;
  /** The wall-clock time: for timestamps that people and the API server read. */
  date(): Date;
  setTimeout(callback: () => void, ms: number): TimerHandle;
  clearTimeout(handle: TimerHandle): void;
}

/**
 * Real time. Looks the globals up on every call, so that vitest's fake timers apply, and
 * unrefs its timers: a pending timer never keeps the process alive on its own.
 */
export const systemClock: Clock = {
  now: () => performance.now(),
  date: () => new Date(),
  setTimeout: (callback, ms) => {
    const handle = setTimeout(callback, ms);
    handle.unref?.();
    return handle;
  },
  clearTimeout: (handle) => clearTimeout(handle as ReturnType<typeof setTimeout>),
};

/** Resolves after `ms` on `clock` (a test clock resolves it when time is advanced past it). */
export function sleepOn(clock: Clock, ms: number): Promise<void> {
  return new Promise((resolve) => clock.setTimeout(resolve, ms));
}
