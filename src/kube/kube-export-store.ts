/**
 * The ExportStore backed by the Kubernetes API: a watch of this node's NbdExports, status
 * writes, finalizers and events.
 *
 * RBAC, least privilege (everything this file and watch-loop.ts send):
 *   apiGroups: [nbd.dev]          resources: [nbdexports]         verbs: [get, list, watch, patch]
 *   apiGroups: [nbd.dev]          resources: [nbdexports/status]  verbs: [patch]
 *   apiGroups: [events.k8s.io]    resources: [events]             verbs: [create]
 * (list and watch are cluster-wide unless `namespace` is set; get and patch serve the finalizer
 * with its 409 retry; events are created in the resource's namespace.)
 */
import type { Logger } from 'pino';
import {
  API_GROUP,
  API_GROUP_VERSION,
  API_VERSION,
  FINALIZER,
  KIND,
  PLURAL,
  keyOf,
  type NbdExport,
  type NbdExportStatus,
  type ResourceKey,
} from '../api/types.js';
// Type-only: the contract this class implements (the one import of controller/ that kube/ may make).
import type { ExportEvent, ExportStore } from '../controller/export-store.js';
import { CONTENT_TYPE_MERGE_PATCH, isKubeApiError, type KubeTransport } from './kube-client.js';
import { WatchLoop, type WatchLoopMetrics, type WatchLoopOptions } from './watch-loop.js';

export const REPORTING_CONTROLLER = 'nbd.dev/nbd-export-controller';
/** The `action` of the events we create (required by events.k8s.io/v1). */
export const EVENT_ACTION = 'Reconcile';

export interface KubeExportStoreOptions {
  transport: KubeTransport;
  /** This node: the watch sees only NbdExports whose spec.nodeName is this. */
  nodeName: string;
  logger: Logger;
  /** Watch one namespace only; default every namespace. */
  namespace?: string | undefined;
  /** Tuning of the watch (defaults in watch-loop.ts). */
  watch?: Omit<WatchLoopOptions<NbdExport>, 'transport' | 'path' | 'keyOf' | 'logger' | 'fieldSelector'>;
  /** An event equal to one sent (same key, type, reason, message) this recently is dropped. Default 10 min. */
  eventDedupeWindowMs?: number;
  /** Attempts of a finalizer patch that meets 409 Conflict. Default 5. */
  maxConflictAttempts?: number;
  /** Wall clock, for event times and the dedupe window. Default Date.now. */
  now?: () => number;
}

export interface KubeExportStoreMetrics extends WatchLoopMetrics {
  statusPatchesTotal: number;
  statusPatchesSkippedTotal: number;
  /** Status patches that failed (a resource already gone is not a failure). */
  statusPatchFailuresTotal: number;
  finalizerPatchesTotal: number;
  finalizerConflictsTotal: number;
  /** Finalizer patches that failed for good: another error, or conflicts beyond the attempts. */
  finalizerPatchFailuresTotal: number;
  eventsCreatedTotal: number;
  eventsDedupedTotal: number;
  eventsFailedTotal: number;
}

export class KubeExportStore implements ExportStore {
  readonly #transport: KubeTransport;
  readonly #nodeName: string;
  readonly #log: Logger;
  readonly #watch: WatchLoop<NbdExport>;
  readonly #dedupeWindowMs: number;
  readonly #maxConflictAttempts: number;
  readonly #now: () => number;
  /** Dedupe key of an event → when it was last sent (wall ms). */
  readonly #recentEvents = new Map<string, number>();
  #counters = {
    statusPatchesTotal: 0,
    statusPatchesSkippedTotal: 0,
    statusPatchFailuresTotal: 0,
    finalizerPatchesTotal: 0,
    finalizerConflictsTotal: 0,
    finalizerPatchFailuresTotal: 0,
    eventsCreatedTotal: 0,
    eventsDedupedTotal: 0,
    eventsFailedTotal: 0,
  };

  constructor(options: KubeExportStoreOptions) {
    if (options.nodeName === '' || /[,=!\s]/.test(options.nodeName)) {
      throw new TypeError(`nodeName must be a node's name, got ${JSON.stringify(options.nodeName)}`);
    }
    this.#transport = options.transport;
    this.#nodeName = options.nodeName;
    this.#log = options.logger;
    this.#dedupeWindowMs = options.eventDedupeWindowMs ?? 600_000;
    this.#maxConflictAttempts = options.maxConflictAttempts ?? 5;
    this.#now = options.now ?? Date.now;
    const path =
      options.namespace === undefined
        ? `/apis/${API_GROUP}/${API_VERSION}/${PLURAL}`
        : `/apis/${API_GROUP}/${API_VERSION}/namespaces/${encodeURIComponent(options.namespace)}/${PLURAL}`;
    this.#watch = new WatchLoop<NbdExport>({
      ...options.watch,
      transport: options.transport,
      path,
      keyOf: (object) => keyOf({ namespace: object.metadata.namespace, name: object.metadata.name }),
      logger: options.logger,
      fieldSelector: `spec.nodeName=${options.nodeName}`,
    });
  }

  start(): Promise<void> {
    return this.#watch.start();
  }

  stop(): Promise<void> {
    return this.#watch.stop();
  }

  get synced(): boolean {
    return this.#watch.synced;
  }

  list(): NbdExport[] {
    return this.#watch.list();
  }

  get(key: ResourceKey): NbdExport | undefined {
    return this.#watch.get(key);
  }

  onChange(listener: (key: ResourceKey) => void): void {
    this.#watch.onChange(listener);
  }

  metrics(): KubeExportStoreMetrics {
    return { ...this.#watch.metrics(), ...this.#counters };
  }

  /**
   * Merge-patches the status subresource with `status`; fields the stored status has and
   * `status` lacks are removed. Nothing is sent when the cached status already equals it.
   */
  async updateStatus(key: ResourceKey, status: NbdExportStatus): Promise<void> {
    const cached = this.#watch.get(key);
    if (cached === undefined) {
      this.#log.debug({ key }, 'status not written: resource not in cache');
      return;
    }
    if (jsonEqual(cached.status ?? {}, status)) {
      this.#counters.statusPatchesSkippedTotal++;
      return;
    }
    const patch: Record<string, unknown> = {};
    for (const field of Object.keys(cached.status ?? {})) patch[field] = null;
    for (const [field, value] of Object.entries(status)) {
      if (value !== undefined) patch[field] = value;
    }
    this.#counters.statusPatchesTotal++;
    try {
      await this.#transport.request({
        method: 'PATCH',
        path: `${objectPath(key)}/status`,
        body: { status: patch },
        contentType: CONTENT_TYPE_MERGE_PATCH,
      });
      this.#log.debug({ key }, 'status written');
    } catch (error) {
      if (isKubeApiError(error) && error.notFound) {
        this.#log.debug({ key }, 'status not written: resource gone');
        return;
      }
      this.#counters.statusPatchFailuresTotal++;
      throw error;
    }
  }

  /** Adds FINALIZER; nothing to do when present, or when the resource is being deleted (the API forbids it). */
  addFinalizer(key: ResourceKey): Promise<void> {
    return this.#patchFinalizers(key, (finalizers, object) =>
      finalizers.includes(FINALIZER) || object.metadata.deletionTimestamp !== undefined
        ? undefined
        : [...finalizers, FINALIZER],
    );
  }

  removeFinalizer(key: ResourceKey): Promise<void> {
    return this.#patchFinalizers(key, (finalizers) =>
      finalizers.includes(FINALIZER) ? finalizers.filter((f) => f !== FINALIZER) : undefined,
    );
  }

  /** Creates an events.k8s.io/v1 Event. Never throws: a lost event is logged, not fatal. */
  async recordEvent(key: ResourceKey, event: ExportEvent): Promise<void> {
    const now = this.#now();
    const dedupeKey = JSON.stringify([key, event.type, event.reason, event.message]);
    const last = this.#recentEvents.get(dedupeKey);
    if (last !== undefined && now - last < this.#dedupeWindowMs) {
      this.#counters.eventsDedupedTotal++;
      return;
    }
    this.#recentEvents.set(dedupeKey, now);
    this.#pruneRecentEvents(now);
    const { namespace, name } = splitKey(key);
    const object = this.#watch.get(key);
    try {
      await this.#transport.request({
        method: 'POST',
        path: `/apis/events.k8s.io/v1/namespaces/${encodeURIComponent(namespace)}/events`,
        body: {
          apiVersion: 'events.k8s.io/v1',
          kind: 'Event',
          // Named as client-go names events; generateName would need a name ending in [a-z0-9].
          metadata: { name: eventName(name, now), namespace },
          eventTime: microTime(now),
          reportingController: REPORTING_CONTROLLER,
          reportingInstance: this.#nodeName.slice(0, 128),
          action: EVENT_ACTION,
          reason: event.reason.slice(0, 128),
          note: truncateUtf8(event.message, 1024),
          type: event.type,
          regarding: {
            apiVersion: API_GROUP_VERSION,
            kind: KIND,
            namespace,
            name,
            ...(object?.metadata.uid !== undefined && { uid: object.metadata.uid }),
            ...(object?.metadata.resourceVersion !== undefined && {
              resourceVersion: object.metadata.resourceVersion,
            }),
          },
        },
      });
      this.#counters.eventsCreatedTotal++;
    } catch (error) {
      this.#counters.eventsFailedTotal++;
      this.#recentEvents.delete(dedupeKey); // let the next attempt through
      this.#log.warn({ key, err: error, reason: event.reason }, 'event not recorded');
    }
  }

  /**
   * Sets metadata.finalizers with a merge patch that carries the resourceVersion it was
   * computed from, so that a concurrent change gives 409 Conflict; then reads afresh and
   * tries again. `change` returns undefined when nothing needs to change.
   */
  async #patchFinalizers(
    key: ResourceKey,
    change: (finalizers: string[], object: NbdExport) => string[] | undefined,
  ): Promise<void> {
    let object: NbdExport | undefined = this.#watch.get(key) ?? (await this.#read(key));
    for (let attempt = 1; ; attempt++) {
      if (object === undefined) return; // gone: nothing to add to or remove from
      const finalizers = change(object.metadata.finalizers ?? [], object);
      if (finalizers === undefined) return;
      this.#counters.finalizerPatchesTotal++;
      try {
        await this.#transport.request({
          method: 'PATCH',
          path: objectPath(key),
          body: { metadata: { resourceVersion: object.metadata.resourceVersion, finalizers } },
          contentType: CONTENT_TYPE_MERGE_PATCH,
        });
        this.#log.debug({ key, finalizers }, 'finalizers written');
        return;
      } catch (error) {
        if (isKubeApiError(error) && error.notFound) return;
        if (!isKubeApiError(error) || !error.conflict || attempt >= this.#maxConflictAttempts) {
          this.#counters.finalizerPatchFailuresTotal++;
          throw error;
        }
        this.#counters.finalizerConflictsTotal++;
        this.#log.debug({ key, attempt }, 'finalizer patch conflicted; reading afresh');
        object = await this.#read(key);
      }
    }
  }

  /** A fresh GET; undefined when the resource no longer exists. */
  async #read(key: ResourceKey): Promise<NbdExport | undefined> {
    try {
      return await this.#transport.request<NbdExport>({ method: 'GET', path: objectPath(key) });
    } catch (error) {
      if (isKubeApiError(error) && error.notFound) return undefined;
      throw error;
    }
  }

  #pruneRecentEvents(now: number): void {
    if (this.#recentEvents.size < 1000) return;
    for (const [dedupeKey, sent] of this.#recentEvents) {
      if (now - sent >= this.#dedupeWindowMs) this.#recentEvents.delete(dedupeKey);
    }
  }
}

function splitKey(key: ResourceKey): { namespace: string; name: string } {
  const slash = key.indexOf('/');
  if (slash <= 0 || slash === key.length - 1) throw new TypeError(`not a namespace/name key: ${key}`);
  return { namespace: key.slice(0, slash), name: key.slice(slash + 1) };
}

function objectPath(key: ResourceKey): string {
  const { namespace, name } = splitKey(key);
  return `/apis/${API_GROUP}/${API_VERSION}/namespaces/${encodeURIComponent(namespace)}/${PLURAL}/${encodeURIComponent(name)}`;
}

/** Equality of JSON values, ignoring key order and properties that are undefined. */
export function jsonEqual(a: unknown, b: unknown): boolean {
  if (a === b) return true;
  if (Array.isArray(a) || Array.isArray(b)) {
    if (!Array.isArray(a) || !Array.isArray(b) || a.length !== b.length) return false;
    return a.every((item, i) => jsonEqual(item, b[i]));
  }
  if (typeof a !== 'object' || typeof b !== 'object' || a === null || b === null) return false;
  const left = Object.entries(a).filter(([, v]) => v !== undefined);
  const right = new Map(Object.entries(b).filter(([, v]) => v !== undefined));
  return left.length === right.size && left.every(([k, v]) => right.has(k) && jsonEqual(v, right.get(k)));
}

/** `<object name>.<hex time and random>`: unique, and a valid DNS subdomain. */
function eventName(objectName: string, now: number): string {
  const suffix = (
    BigInt(Math.round(now)) * 1_000_000n +
    BigInt(Math.floor(Math.random() * 1_000_000))
  ).toString(16);
  return `${objectName.slice(0, 253 - suffix.length - 1)}.${suffix}`;
}

/** metav1.MicroTime: RFC 3339 with six fractional digits. */
function microTime(ms: number): string {
  return new Date(ms).toISOString().replace(/\.(\d{3})Z$/, '.$1000Z');
}

function truncateUtf8(text: string, maxBytes: number): string {
  if (Buffer.byteLength(text) <= maxBytes) return text;
  let cut = text.slice(0, maxBytes);
  while (Buffer.byteLength(cut) > maxBytes - 3) cut = cut.slice(0, -1);
  return `${cut}...`;
}
