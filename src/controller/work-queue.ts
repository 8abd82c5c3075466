import PQueue from 'p-queue';
import { exponentialBackoff } from '../shared/backoff.js';
import { systemClock, type Clock } from '../shared/clock.js';

/**
 * The controller's one work queue, with the semantics of client-go's rate-limited workqueue:
 *
 * - `add(key)` dedupes: a key waits in the queue at most once, however often it is added.
 * - A key never runs twice at once: added while it runs, it is marked dirty and runs again
 *   after the current run ends.
 * - `addAfter(key, ms)` adds later; of several pending delays for one key the earliest wins.
 * - A run that throws is retried after a per-key exponential backoff with jitter; a run that
 *   succeeds resets the key's backoff (`forget`). A `PermanentError` is reported and not retried.
 * - Total concurrency is bounded (p-queue does the bounding; dedupe and in-flight tracking are ours).
 */

/** What a handler asks of the queue after a successful run. */
export interface WorkResult {
  /** Run the key again after this many milliseconds (a known wait, not a failure). */
  requeueAfterMs?: number;
}

export interface WorkContext {
  /** Aborted when the queue shuts down; long handlers may stop early. */
  signal: AbortSignal;
  /** How many times this key has failed in a row before this run (0 after a success). */
  failures: number;
}

export type WorkHandler = (key: string, context: WorkContext) => Promise<WorkResult | void>;

/** Thrown by a handler for a failure that retrying cannot fix (an invalid spec, say). */
export class PermanentError extends Error {
  override readonly name = 'PermanentError';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

export function isPermanentError(error: unknown): error is PermanentError {
  return error instanceof PermanentError;
}

export interface BackoffOptions {
  /** Delay after the first failure. Default 500 ms. */
  baseDelayMs?: number;
  /** Upper bound of any delay. Default 5 minutes. */
  maxDelayMs?: number;
  /** Fraction of the delay randomised either way (0 to 1). Default 0.2, so ±20 %. */
  jitter?: number;
}

/**
 * The queue's retry delay: the shared exponential backoff with the queue's defaults
 * (500 ms, doubling, at most 5 minutes, ±20 %). `random` returns a number in [0, 1).
 */
export function backoffDelay(failures: number, options: BackoffOptions, random: () => number): number {
  const policy = {
    baseMs: options.baseDelayMs ?? 500,
    maxMs: options.maxDelayMs ?? 300_000,
    jitter: options.jitter ?? 0.2,
  };
  return exponentialBackoff(failures, policy, random);
}

export interface WorkQueueOptions extends BackoffOptions {
  handler: WorkHandler;
  /** Keys run at the same time, at most. Default 4. */
  concurrency?: number;
  clock?: Clock;
  /** Source of jitter, in [0, 1). Default Math.random. */
  random?: () => number;
  /** Told about a failure that will be retried, with the delay chosen (for logs). */
  onRetry?: (key: string, error: unknown, delayMs: number, failures: number) => void;
  /** Told about a `PermanentError`: the key is not retried until it is added again. */
  onPermanentError?: (key: string, error: PermanentError) => void;
}

/** Numbers for /metrics; counters only ever grow. */
export interface WorkQueueMetrics {
  /** Keys waiting to run (including keys that wait for their own run to end). */
  depth: number;
  /** Keys waiting for a delay (addAfter, requeueAfter or backoff). */
  delayed: number;
  /** Keys running now. */
  inFlight: number;
  addsTotal: number;
  runsTotal: number;
  successesTotal: number;
  /** Failures that were scheduled for retry. */
  retriesTotal: number;
  permanentFailuresTotal: number;
  /** Sum and count of run durations, in seconds. */
  runDurationSecondsSum: number;
  runDurationSecondsCount: number;
  runDurationSecondsMax: number;
  /** How long the oldest run still going has been running, in seconds (0 when idle). */
  longestRunningSeconds: number;
  /** How long every worker has been busy without a break, in seconds (0 while one is free). */
  allWorkersBusySeconds: number;
}

interface Delayed {
  at: number;
  handle: unknown;
  /** Scheduled by the queue's own backoff; moot once the key succeeds. */
  retry: boolean;
}

export class WorkQueue {
  readonly #handler: WorkHandler;
  readonly #clock: Clock;
  readonly #concurrency: number;
  readonly #random: () => number;
  readonly #backoff: BackoffOptions;
  readonly #onRetry: WorkQueueOptions['onRetry'];
  readonly #onPermanentError: WorkQueueOptions['onPermanentError'];
  readonly #pool: PQueue;
  /** Keys that must run (again): waiting in the pool, or waiting for their current run to end. */
  readonly #dirty = new Set<string>();
  /** Keys running now, with their start time. */
  readonly #running = new Map<string, number>();
  readonly #delayed = new Map<string, Delayed>();
  readonly #failures = new Map<string, number>();
  readonly #abort = new AbortController();
  #shuttingDown = false;
  #idleWaiters: (() => void)[] = [];
  #counters = {
    addsTotal: 0,
    runsTotal: 0,
    successesTotal: 0,
    retriesTotal: 0,
    permanentFailuresTotal: 0,
    runDurationSecondsSum: 0,
    runDurationSecondsCount: 0,
    runDurationSecondsMax: 0,
  };

  constructor(options: WorkQueueOptions) {
    if (typeof options.handler !== 'function') {
      throw new TypeError(`handler must be a function, got ${typeof options.handler}`);
    }
    const concurrency = options.concurrency ?? 4;
    if (!Number.isInteger(concurrency) || concurrency < 1) {
      throw new TypeError(`concurrency must be a positive integer, got ${String(concurrency)}`);
    }
    for (const name of ['baseDelayMs', 'maxDelayMs'] as const) {
      const value = options[name];
      if (value !== undefined && (!Number.isFinite(value) || value < 0)) {
        throw new TypeError(`${name} must be a non-negative number, got ${String(value)}`);
      }
    }
    if (options.jitter !== undefined && !(options.jitter >= 0 && options.jitter <= 1)) {
      throw new TypeError(`jitter must be between 0 and 1, got ${String(options.jitter)}`);
    }
    this.#handler = options.handler;
    this.#clock = options.clock ?? systemClock;
    this.#random = options.random ?? Math.random;
    this.#backoff = {
      ...(options.baseDelayMs !== undefined && { baseDelayMs: options.baseDelayMs }),
      ...(options.maxDelayMs !== undefined && { maxDelayMs: options.maxDelayMs }),
      ...(options.jitter !== undefined && { jitter: options.jitter }),
    };
    this.#onRetry = options.onRetry;
    this.#onPermanentError = options.onPermanentError;
    this.#pool = new PQueue({ concurrency });
    this.#concurrency = concurrency;
  }

  /** Queues `key` unless it already waits. Ignored after shutdown. */
  add(key: string): void {
    if (this.#shuttingDown) return;
    this.#counters.addsTotal++;
    if (this.#dirty.has(key)) return;
    this.#dirty.add(key);
    if (this.#running.has(key)) return; // runs again when the current run ends
    this.#dispatch(key);
  }

  /** Adds `key` after `ms` milliseconds; an earlier pending delay for the key wins. */
  addAfter(key: string, ms: number): void {
    this.#addAfter(key, ms, false);
  }

  /** Resets the key's failure count, so its next failure backs off from the base delay. */
  forget(key: string): void {
    this.#failures.delete(key);
  }

  /** Failures in a row of one key. */
  failures(key: string): number {
    return this.#failures.get(key) ?? 0;
  }

  get depth(): number {
    return this.#dirty.size;
  }

  get inFlight(): number {
    return this.#running.size;
  }

  get shuttingDown(): boolean {
    return this.#shuttingDown;
  }

  metrics(): WorkQueueMetrics {
    const now = this.#clock.now();
    let oldest = now;
    let youngest = -Infinity;
    for (const started of this.#running.values()) {
      oldest = Math.min(oldest, started);
      youngest = Math.max(youngest, started);
    }
    // Every worker busy: the queue can take nothing new until the youngest run ends.
    const allBusy = this.#running.size >= this.#concurrency && youngest > -Infinity;
    return {
      depth: this.#dirty.size,
      delayed: this.#delayed.size,
      inFlight: this.#running.size,
      ...this.#counters,
      longestRunningSeconds: (now - oldest) / 1000,
      allWorkersBusySeconds: allBusy ? (now - youngest) / 1000 : 0,
    };
  }

  /** Resolves when nothing waits to run and nothing runs (delayed keys may remain). */
  drain(): Promise<void> {
    if (this.#idle()) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  /**
   * Stops the queue: later adds are ignored, delayed keys and keys that have not started are
   * dropped, handlers see their signal aborted, and this resolves when the runs in flight end.
   */
  async shutdown(): Promise<void> {
    this.#shuttingDown = true;
    for (const delayed of this.#delayed.values()) this.#clock.clearTimeout(delayed.handle);
    this.#delayed.clear();
    this.#pool.clear();
    this.#dirty.clear();
    this.#abort.abort(new Error('work queue shut down'));
    this.#wakeIdleWaiters();
    await this.drain();
  }

  #addAfter(key: string, ms: number, retry: boolean): void {
    if (this.#shuttingDown) return;
    if (!(ms > 0)) {
      this.add(key);
      return;
    }
    const at = this.#clock.now() + ms;
    const pending = this.#delayed.get(key);
    if (pending !== undefined) {
      if (pending.at <= at) {
        pending.retry &&= retry;
        return;
      }
      this.#clock.clearTimeout(pending.handle);
      retry &&= pending.retry;
    }
    const handle = this.#clock.setTimeout(() => {
      if (this.#delayed.get(key)?.handle !== handle) return;
      this.#delayed.delete(key);
      this.add(key);
    }, ms);
    this.#delayed.set(key, { at, handle, retry });
  }

  #dispatch(key: string): void {
    this.#pool
      .add(() => this.#run(key))
      .catch(() => {
        // #run never rejects; p-queue's clear() on shutdown drops tasks without settling them.
      });
  }

  async #run(key: string): Promise<void> {
    if (this.#shuttingDown || !this.#dirty.has(key)) return;
    this.#dirty.delete(key);
    const started = this.#clock.now();
    this.#running.set(key, started);
    this.#counters.runsTotal++;
    const failures = this.failures(key);
    try {
      const result = await this.#handler(key, { signal: this.#abort.signal, failures });
      this.#succeeded(key, result ?? {});
    } catch (error) {
      this.#failed(key, error);
    } finally {
      const seconds = (this.#clock.now() - started) / 1000;
      this.#counters.runDurationSecondsSum += seconds;
      this.#counters.runDurationSecondsCount++;
      this.#counters.runDurationSecondsMax = Math.max(this.#counters.runDurationSecondsMax, seconds);
      this.#running.delete(key);
      if (this.#dirty.has(key) && !this.#shuttingDown) this.#dispatch(key);
      this.#wakeIdleWaiters();
    }
  }

  #succeeded(key: string, result: WorkResult): void {
    this.#counters.successesTotal++;
    this.forget(key);
    const pending = this.#delayed.get(key);
    if (pending?.retry) {
      this.#clock.clearTimeout(pending.handle);
      this.#delayed.delete(key);
    }
    if (result.requeueAfterMs !== undefined) this.#addAfter(key, result.requeueAfterMs, false);
  }

  #failed(key: string, error: unknown): void {
    if (this.#shuttingDown) return;
    if (isPermanentError(error)) {
      this.#counters.permanentFailuresTotal++;
      this.forget(key);
      notify(() => this.#onPermanentError?.(key, error));
      return;
    }
    const failures = this.failures(key) + 1;
    this.#failures.set(key, failures);
    const delayMs = backoffDelay(failures, this.#backoff, this.#random);
    this.#counters.retriesTotal++;
    this.#addAfter(key, delayMs, true);
    notify(() => this.#onRetry?.(key, error, delayMs, failures));
  }

  #idle(): boolean {
    return this.#running.size === 0 && (this.#dirty.size === 0 || this.#shuttingDown);
  }

  #wakeIdleWaiters(): void {
    if (!this.#idle()) return;
    const waiters = this.#idleWaiters;
    this.#idleWaiters = [];
    for (const resolve of waiters) resolve();
  }
}

/** Runs a caller's callback; its failure must not break the queue's bookkeeping. */
function notify(callback: () => void): void {
  try {
    callback();
  } catch {
    // A callback that throws loses only its own report.
  }
}
