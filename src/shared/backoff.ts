/**
 * The one retry-delay formula of the controller: exponential from a base, capped, with
 * symmetric jitter. The work queue, the watch loop and the nbd-server watchdog each pick
 * their own base, cap and jitter; none carries a formula of its own.
 */

export interface BackoffPolicy {
  /** Delay after the first failure. */
  baseMs: number;
  /** Upper bound of any delay, jitter included. */
  maxMs: number;
  /** Fraction of the delay randomised either way, 0 to 1 (0.2: ±20 %). 0 makes the delay exact. */
  jitter: number;
}

/** Beyond this exponent every finite base is past any useful cap; keeps 2 ** n finite. */
const MAX_EXPONENT = 52;

/**
 * The delay before retry number `failures` (1 for the first failure; 0 counts as 1):
 * base × 2^(failures−1), capped, then jittered by ±jitter and capped again, rounded to
 * whole milliseconds. `random` returns a number in [0, 1) (injectable so tests choose it).
 */
export function exponentialBackoff(failures: number, policy: BackoffPolicy, random: () => number): number {
  const exponent = Math.min(Math.max(failures - 1, 0), MAX_EXPONENT);
  const raw = Math.min(policy.maxMs, policy.baseMs * 2 ** exponent);
  const jittered = raw * (1 + policy.jitter * (2 * random() - 1));
  return Math.max(0, Math.min(policy.maxMs, Math.round(jittered)));
}
