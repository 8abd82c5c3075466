import type { Logger } from 'pino';
import { KubeApiError, errorFromStatus, isKubeApiError, type KubeTransport } from './kube-client.js';
import { systemClock, type Clock } from '../shared/clock.js';

/**
 * LIST then WATCH, forever, keeping a cache of the objects the server shows us.
 *
 * client-node's informer stops on most errors, never asks for bookmarks, does not await its
 * handlers and can hang on a dead connection. This loop instead:
 * - lists in pages (limit/continue), then watches from the list's resourceVersion with
 *   bookmarks and a jittered server-side timeout;
 * - on 410 Gone (HTTP status or ERROR event) lists again and tells listeners about keys that
 *   changed or vanished meanwhile;
 * - on any other error or end of stream reconnects from the last resourceVersion after a
 *   capped, jittered exponential backoff that resets after a healthy watch;
 * - aborts a watch that has received nothing, not even a bookmark, for `idleTimeoutMs`;
 * - tells listeners every cached key every `resyncPeriodMs`.
 * The cache is replaced only by a complete listing: an unreachable API server never empties it.
 */

/** The part of an object the loop reads. */
export interface WatchedObject {
  metadata: { name: string; namespace?: string; resourceVersion?: string };
}

export interface WatchEvent<T> {
  type: 'ADDED' | 'MODIFIED' | 'DELETED' | 'BOOKMARK' | 'ERROR';
  object: T;
}

export interface WatchLoopOptions<T extends WatchedObject> {
  transport: KubeTransport;
  /** Collection path, e.g. `/apis/nbd.dev/v1alpha1/nbdexports` (all namespaces). */
  path: string;
  keyOf: (object: T) => string;
  logger: Logger;
  /** E.g. `spec.nodeName=storage-01`; needs `selectableFields` in the CRD. */
  fieldSelector?: string | undefined;
  labelSelector?: string | undefined;
  /** Page size of a LIST. Default 500. */
  pageSize?: number;
  /** Server-side watch timeout, drawn from [min, max] seconds. Default 240 to 360. */
  watchTimeoutSeconds?: { min: number; max: number };
  /** Abort a watch that received nothing for this long. Default 120 s (twice the bookmark interval). */
  idleTimeoutMs?: number;
  /** Tell listeners every cached key this often; 0 disables. Default 5 minutes. */
  resyncPeriodMs?: number;
  /** Reconnect backoff: first delay, cap, and how long a watch must last to reset it. */
  backoff?: { baseMs?: number; maxMs?: number; healthyAfterMs?: number };
  /** Timeout of one LIST page. Default 60 s. */
  listTimeoutMs?: number;
  clock?: Clock;
  random?: () => number;
}

export interface WatchLoopMetrics {
  synced: boolean;
  objects: number;
  listsTotal: number;
  watchesTotal: number;
  watchEventsTotal: number;
  bookmarksTotal: number;
  /** Relists forced by 410 Gone. */
  expiredTotal: number;
  /** Watches ended by an error, a dead stream or the idle watchdog. */
  watchErrorsTotal: number;
  idleTimeoutsTotal: number;
  resyncsTotal: number;
  /** Seconds since anything arrived on the watch (a stuck watch shows here). */
  secondsSinceLastReceive: number;
}

type WatchOutcome = 'ended' | 'expired' | 'idle';

interface ListPage<T> {
  metadata?: { resourceVersion?: string; continue?: string };
  items?: T[];
}

export class WatchLoop<T extends WatchedObject> {
  readonly #transport: KubeTransport;
  readonly #path: string;
  readonly #keyOf: (object: T) => string;
  readonly #log: Logger;
  readonly #selectors: Record<string, string | undefined>;
  readonly #pageSize: number;
  readonly #timeoutRange: { min: number; max: number };
  readonly #idleTimeoutMs: number;
  readonly #resyncPeriodMs: number;
  readonly #backoff: { baseMs: number; maxMs: number; healthyAfterMs: number };
  readonly #listTimeoutMs: number;
  readonly #clock: Clock;
  readonly #random: () => number;

  readonly #cache = new Map<string, T>();
  readonly #listeners: ((key: string) => void)[] = [];
  #resourceVersion = '';
  #synced = false;
  #stopped = true;
  #running: Promise<void> | undefined;
  #stop = new AbortController();
  #resyncTimer: unknown;
  #lastReceive = 0;
  #syncWaiters: { resolve: () => void; reject: (error: Error) => void }[] = [];
  #counters = {
    listsTotal: 0,
    watchesTotal: 0,
    watchEventsTotal: 0,
    bookmarksTotal: 0,
    expiredTotal: 0,
    watchErrorsTotal: 0,
    idleTimeoutsTotal: 0,
    resyncsTotal: 0,
  };

  constructor(options: WatchLoopOptions<T>) {
    this.#transport = options.transport;
    this.#path = options.path;
    this.#keyOf = options.keyOf;
    this.#log = options.logger;
    this.#selectors = { fieldSelector: options.fieldSelector, labelSelector: options.labelSelector };
    this.#pageSize = options.pageSize ?? 500;
    this.#timeoutRange = options.watchTimeoutSeconds ?? { min: 240, max: 360 };
    this.#idleTimeoutMs = options.idleTimeoutMs ?? 120_000;
    this.#resyncPeriodMs = options.resyncPeriodMs ?? 300_000;
    this.#backoff = {
      baseMs: options.backoff?.baseMs ?? 1000,
      maxMs: options.backoff?.maxMs ?? 30_000,
      healthyAfterMs: options.backoff?.healthyAfterMs ?? 30_000,
    };
    this.#listTimeoutMs = options.listTimeoutMs ?? 60_000;
    this.#clock = options.clock ?? systemClock;
    this.#random = options.random ?? Math.random;
    const { min, max } = this.#timeoutRange;
    if (!(min >= 1 && max >= min)) throw new TypeError(`bad watchTimeoutSeconds ${min}..${max}`);
    if (!(this.#idleTimeoutMs > 0)) throw new TypeError(`bad idleTimeoutMs ${this.#idleTimeoutMs}`);
    if (!(this.#pageSize >= 1)) throw new TypeError(`bad pageSize ${this.#pageSize}`);
  }

  /** Starts the loop; resolves once the first complete listing is in the cache. */
  start(): Promise<void> {
    if (!this.#stopped) return this.#synced ? Promise.resolve() : this.#waitForSync();
    this.#stopped = false;
    this.#stop = new AbortController();
    const synced = this.#waitForSync();
    this.#running = this.#run().catch((error: unknown) => {
      this.#log.error({ err: error }, 'watch loop crashed');
    });
    this.#scheduleResync();
    return synced;
  }

  /** Stops watching; the cache stays as it was. */
  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    this.#stop.abort();
    this.#clock.clearTimeout(this.#resyncTimer);
    const waiters = this.#syncWaiters;
    this.#syncWaiters = [];
    for (const waiter of waiters) waiter.reject(new Error('watch stopped before the first listing'));
    await this.#running;
  }

  get synced(): boolean {
    return this.#synced;
  }

  /** The resourceVersion the next watch starts from. */
  get resourceVersion(): string {
    return this.#resourceVersion;
  }

  get(key: string): T | undefined {
    return this.#cache.get(key);
  }

  list(): T[] {
    return [...this.#cache.values()];
  }

  keys(): string[] {
    return [...this.#cache.keys()];
  }

  onChange(listener: (key: string) => void): void {
    this.#listeners.push(listener);
  }

  metrics(): WatchLoopMetrics {
    return {
      synced: this.#synced,
      objects: this.#cache.size,
      ...this.#counters,
      secondsSinceLastReceive: this.#lastReceive === 0 ? 0 : (this.#clock.now() - this.#lastReceive) / 1000,
    };
  }

  #waitForSync(): Promise<void> {
    return new Promise((resolve, reject) => this.#syncWaiters.push({ resolve, reject }));
  }

  #notify(key: string): void {
    for (const listener of this.#listeners) {
      try {
        listener(key);
      } catch (error) {
        this.#log.error({ key, err: error }, 'change listener threw');
      }
    }
  }

  async #run(): Promise<void> {
    let needList = true;
    let failures = 0;
    // 410s in a row: the first one after anything else (a server that just came back after
    // an outage answers an old resourceVersion with 410) relists at once, whatever failed before.
    let expiredInARow = 0;
    while (!this.#stopped) {
      const started = this.#clock.now();
      let outcome: WatchOutcome | 'error';
      try {
        if (needList) {
          await this.#relist();
          needList = false;
        }
        outcome = await this.#watch();
      } catch (error) {
        if (this.#stopped) break;
        if (isKubeApiError(error) && error.gone) {
          outcome = 'expired';
        } else {
          outcome = 'error';
          this.#counters.watchErrorsTotal++;
          this.#log.warn({ err: error, resourceVersion: this.#resourceVersion }, 'list or watch failed');
        }
      }
      if (this.#stopped) break;
      if (this.#clock.now() - started >= this.#backoff.healthyAfterMs) failures = 0;
      if (outcome !== 'expired') expiredInARow = 0;
      if (outcome === 'expired') {
        this.#counters.expiredTotal++;
        this.#log.info({ resourceVersion: this.#resourceVersion }, 'resourceVersion expired; listing again');
        needList = true;
        failures++;
        // Relist at once the first time; a server that keeps answering 410 gets the backoff.
        if (expiredInARow++ === 0) continue;
      } else if (outcome === 'ended' && failures === 0) {
        continue; // the server's timeout ended a healthy watch: reconnect at once
      } else {
        failures++;
      }
      const delay = reconnectDelay(failures, this.#backoff, this.#random);
      this.#log.info({ delayMs: delay, failures, outcome }, 'reconnecting watch after backoff');
      await this.#sleep(delay);
    }
  }

  /** Lists everything (in pages), replaces the cache and tells listeners what changed. */
  async #relist(): Promise<void> {
    const items: T[] = [];
    let resourceVersion = '';
    let continueToken: string | undefined;
    this.#counters.listsTotal++;
    do {
      let page: ListPage<T>;
      try {
        page = await this.#transport.request<ListPage<T>>({
          method: 'GET',
          path: this.#path,
          query: { ...this.#selectors, limit: this.#pageSize, continue: continueToken },
          signal: this.#stop.signal,
          timeoutMs: this.#listTimeoutMs,
        });
      } catch (error) {
        if (continueToken !== undefined && isKubeApiError(error) && error.gone) {
          // The continue token expired between pages: start over with a fresh listing.
          this.#log.info('list continue token expired; listing from the start');
          items.length = 0;
          continueToken = undefined;
          continue;
        }
        throw error;
      }
      items.push(...(page.items ?? []));
      resourceVersion = page.metadata?.resourceVersion ?? resourceVersion;
      const next = page.metadata?.continue;
      continueToken = next === undefined || next === '' ? undefined : next;
    } while (continueToken !== undefined);

    const fresh = new Map<string, T>();
    for (const item of items) fresh.set(this.#keyOf(item), item);
    const changed: string[] = [];
    for (const [key, object] of fresh) {
      const old = this.#cache.get(key);
      if (!this.#synced || old?.metadata.resourceVersion !== object.metadata.resourceVersion)
        changed.push(key);
    }
    const vanished = [...this.#cache.keys()].filter((key) => !fresh.has(key));
    this.#cache.clear();
    for (const [key, object] of fresh) this.#cache.set(key, object);
    this.#resourceVersion = resourceVersion;
    this.#log.info(
      { objects: fresh.size, changed: changed.length, vanished: vanished.length, resourceVersion },
      'listed',
    );
    for (const key of vanished) this.#log.info({ key }, 'gone while we were not watching');
    const firstSync = !this.#synced;
    this.#synced = true;
    for (const key of [...changed, ...vanished]) this.#notify(key);
    if (firstSync) {
      const waiters = this.#syncWaiters;
      this.#syncWaiters = [];
      for (const waiter of waiters) waiter.resolve();
    }
  }

  /** One watch request, until the stream ends, expires, or goes quiet. */
  async #watch(): Promise<WatchOutcome> {
    const { min, max } = this.#timeoutRange;
    const timeoutSeconds = Math.round(min + (max - min) * this.#random());
    const abort = new AbortController();
    const signal = AbortSignal.any([this.#stop.signal, abort.signal]);
    let idle = false;
    let watchdog: unknown;
    const arm = () => {
      this.#clock.clearTimeout(watchdog);
      watchdog = this.#clock.setTimeout(() => {
        idle = true;
        abort.abort();
      }, this.#idleTimeoutMs);
    };
    this.#counters.watchesTotal++;
    arm(); // also covers a connection that never answers
    try {
      const stream = await this.#transport.stream({
        method: 'GET',
        path: this.#path,
        query: {
          ...this.#selectors,
          watch: true,
          allowWatchBookmarks: true,
          resourceVersion: this.#resourceVersion,
          timeoutSeconds,
        },
        signal,
      });
      this.#log.debug({ resourceVersion: this.#resourceVersion, timeoutSeconds }, 'watching');
      try {
        for await (const line of stream) {
          arm();
          this.#lastReceive = this.#clock.now();
          if (this.#handleLine(line) === 'expired') return 'expired';
        }
      } finally {
        stream.close();
      }
      if (idle) throw new Error('idle');
      return 'ended';
    } catch (error) {
      if (idle && !this.#stopped) {
        this.#counters.idleTimeoutsTotal++;
        this.#log.warn(
          { idleTimeoutMs: this.#idleTimeoutMs },
          'watch received nothing for too long; reconnecting',
        );
        return 'idle';
      }
      throw error;
    } finally {
      this.#clock.clearTimeout(watchdog);
    }
  }

  #handleLine(line: string): 'expired' | undefined {
    let event: WatchEvent<T>;
    try {
      event = JSON.parse(line) as WatchEvent<T>;
    } catch {
      throw new KubeApiError({
        method: 'GET',
        path: this.#path,
        reason: 'BadWatchEvent',
        message: `unparsable watch line: ${line.slice(0, 200)}`,
      });
    }
    const rv = event.object?.metadata?.resourceVersion;
    switch (event.type) {
      case 'ADDED':
      case 'MODIFIED':
      case 'DELETED': {
        this.#counters.watchEventsTotal++;
        const key = this.#keyOf(event.object);
        if (event.type === 'DELETED') this.#cache.delete(key);
        else this.#cache.set(key, event.object);
        if (rv !== undefined) this.#resourceVersion = rv;
        this.#log.debug({ key, type: event.type, resourceVersion: rv }, 'watch event');
        this.#notify(key);
        return undefined;
      }
      case 'BOOKMARK':
        this.#counters.bookmarksTotal++;
        if (rv !== undefined) this.#resourceVersion = rv;
        return undefined;
      case 'ERROR': {
        const error = errorFromStatus(event.object, 'GET', this.#path);
        if (error.gone) return 'expired';
        throw error;
      }
      default:
        this.#log.warn({ type: (event as { type?: unknown }).type }, 'unknown watch event type ignored');
        return undefined;
    }
  }

  #scheduleResync(): void {
    if (this.#resyncPeriodMs <= 0 || this.#stopped) return;
    this.#resyncTimer = this.#clock.setTimeout(() => {
      if (this.#stopped) return;
      if (this.#synced) {
        this.#counters.resyncsTotal++;
        for (const key of this.#cache.keys()) this.#notify(key);
      }
      this.#scheduleResync();
    }, this.#resyncPeriodMs);
  }

  #sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const onStop = () => {
        this.#clock.clearTimeout(handle);
        resolve();
      };
      const handle = this.#clock.setTimeout(() => {
        this.#stop.signal.removeEventListener('abort', onStop);
        resolve();
      }, ms);
      this.#stop.signal.addEventListener('abort', onStop, { once: true });
    });
  }
}

/** Delay before reconnect number `failures` (1 first): base × 2^(failures−1), capped, full ±50 % jitter. */
export function reconnectDelay(
  failures: number,
  backoff: { baseMs: number; maxMs: number },
  random: () => number,
): number {
  const raw = Math.min(backoff.maxMs, backoff.baseMs * 2 ** Math.min(Math.max(failures - 1, 0), 30));
  return Math.round(Math.min(backoff.maxMs, raw * (0.5 + random())));
}
