/**
 * Polling with generous deadlines: the tests wait for a state, never for a time. A slow, shared
 * two-core machine only makes them slower, never red.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { inspect } from 'node:util';

export interface PollOptions {
  /** Give up after this long. Default 120 s. */
  timeoutMs?: number;
  /** Pause between attempts. Default 500 ms. */
  intervalMs?: number;
}

/**
 * Calls `attempt` until it returns something other than undefined, and returns that. An
 * attempt that throws counts as "not yet"; the last error is in the timeout's message.
 */
export async function waitFor<T>(
  description: string,
  attempt: () => Promise<T | undefined> | T | undefined,
  { timeoutMs = 120_000, intervalMs = 500 }: PollOptions = {},
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  for (;;) {
    try {
      const value = await attempt();
      if (value !== undefined) return value;
      lastError = undefined;
    } catch (error) {
      lastError = error;
    }
    if (Date.now() >= deadline) {
      const why =
        lastError === undefined
          ? ''
          : `; last error: ${lastError instanceof Error ? lastError.message : inspect(lastError)}`;
      throw new Error(`timed out after ${timeoutMs / 1000}s waiting for ${description}${why}`, {
        cause: lastError,
      });
    }
    await sleep(intervalMs);
  }
}
