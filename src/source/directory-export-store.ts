/**
 * Desired state from a directory of NbdExport YAML files, for plain hosts without
 * Kubernetes. Behaves like the API server where the engine can tell:
 *
 * - Each resource gets a UID, a creation time and a generation, kept in its status
 *   file (`<status-dir>/<namespace>_<name>.yaml`, the whole object with its status).
 *   The generation grows when the spec changes.
 * - Finalizers work: when a document disappears from the directory while its status
 *   file carries our finalizer, the resource stays visible with a deletionTimestamp
 *   (and its last spec) until the engine has cleaned up and removed the finalizer.
 * - A file that does not parse is reported in the log and changes nothing: its
 *   resources keep their last known spec rather than being treated as deleted.
 */
import { randomUUID } from 'node:crypto';
import { watch, type FSWatcher } from 'node:fs';
import { mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { dump, loadAll } from 'js-yaml';
import type { Logger } from 'pino';
import { formatTime } from '../api/conditions.js';
import {
  API_GROUP_VERSION,
  FINALIZER,
  KIND,
  keyOf,
  type NbdExport,
  type NbdExportSpec,
  type NbdExportStatus,
  type ResourceKey,
} from '../api/types.js';

export interface DirectoryExportStoreOptions {
  /** Directory of `*.yaml` / `*.yml` files, several documents per file allowed. */
  sourceDir: string;
  /** Where each resource's object-with-status is written. */
  statusDir: string;
  /** Only resources for this node are kept (a missing nodeName is kept, to report it). */
  nodeName: string;
  logger: Logger;
  /** Rescan at least this often, in case a file-system event was missed. Default 1 s. */
  pollIntervalMs?: number;
  /** A resource must stay missing this long before it counts as deleted. Default 2 s. */
  deletionGraceMs?: number;
  /** Every key is reported changed this often. Default 5 min. */
  resyncIntervalMs?: number;
  /** Injected so that tests control time. */
  now?: () => Date;
}

const DEFAULT_NAMESPACE = 'default';
const NAME_PATTERN = /^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$/;
const NAMESPACE_PATTERN = /^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/;

export class DirectoryExportStore {
  readonly #options: DirectoryExportStoreOptions;
  readonly #log: Logger;
  readonly #now: () => Date;
  readonly #objects = new Map<ResourceKey, NbdExport>();
  readonly #listeners: ((key: ResourceKey) => void)[] = [];
  /** Last good parse of each source file, so a broken edit deletes nothing. */
  readonly #lastGoodDocuments = new Map<string, unknown[]>();
  /** When each resource was first found missing from the directory. */
  readonly #missingSince = new Map<ResourceKey, number>();
  #watcher: FSWatcher | undefined;
  #timers: NodeJS.Timeout[] = [];
  #scanning: Promise<void> | undefined;
  #rescanRequested = false;
  #synced = false;

  constructor(options: DirectoryExportStoreOptions) {
    this.#options = options;
    this.#log = options.logger.child({ source: `dir:${options.sourceDir}` });
    this.#now = options.now ?? (() => new Date());
  }

  get synced(): boolean {
    return this.#synced;
  }

  async start(): Promise<void> {
    await mkdir(this.#options.statusDir, { recursive: true });
    await this.#loadStatusFiles();
    await this.#scan();
    this.#synced = true;
    try {
      this.#watcher = watch(this.#options.sourceDir, () => this.#requestScan());
      this.#watcher.on('error', (error) =>
        this.#log.warn({ error: error.message }, 'directory watch failed; polling'),
      );
    } catch (error) {
      this.#log.warn({ error: String(error) }, 'cannot watch the directory; polling only');
    }
    this.#timers.push(setInterval(() => this.#requestScan(), this.#options.pollIntervalMs ?? 1_000));
    this.#timers.push(
      setInterval(() => {
        for (const key of this.#objects.keys()) this.#notify(key);
      }, this.#options.resyncIntervalMs ?? 300_000),
    );
  }

  async stop(): Promise<void> {
    this.#watcher?.close();
    for (const timer of this.#timers) clearInterval(timer);
    this.#timers = [];
    await this.#scanning;
  }

  list(): NbdExport[] {
    return [...this.#objects.values()];
  }

  get(key: ResourceKey): NbdExport | undefined {
    return this.#objects.get(key);
  }

  onChange(listener: (key: ResourceKey) => void): void {
    this.#listeners.push(listener);
  }

  async updateStatus(key: ResourceKey, status: NbdExportStatus): Promise<void> {
    const object = this.#objects.get(key);
    if (!object || JSON.stringify(object.status ?? {}) === JSON.stringify(status)) return;
    const next = { ...object, status };
    await this.#persist(next);
    this.#objects.set(key, next);
  }

  async addFinalizer(key: ResourceKey): Promise<void> {
    const object = this.#objects.get(key);
    if (!object || object.metadata.finalizers?.includes(FINALIZER)) return;
    const next = {
      ...object,
      metadata: { ...object.metadata, finalizers: [...(object.metadata.finalizers ?? []), FINALIZER] },
    };
    await this.#persist(next);
    this.#objects.set(key, next);
  }

  /** The last finalizer gone on a deleted resource: it disappears, status file and all. */
  async removeFinalizer(key: ResourceKey): Promise<void> {
    const object = this.#objects.get(key);
    if (!object) return;
    const finalizers = (object.metadata.finalizers ?? []).filter((f) => f !== FINALIZER);
    if (object.metadata.deletionTimestamp !== undefined && finalizers.length === 0) {
      await rm(this.#statusPath(object), { force: true });
      this.#objects.delete(key);
      return;
    }
    const next = { ...object, metadata: { ...object.metadata, finalizers } };
    await this.#persist(next);
    this.#objects.set(key, next);
  }

  async recordEvent(
    key: ResourceKey,
    event: { type: string; reason: string; message: string },
  ): Promise<void> {
    const log = this.#log.child({ key, event: event.reason });
    if (event.type === 'Warning') log.warn(event.message);
    else log.info(event.message);
    return Promise.resolve();
  }

  #requestScan(): void {
    if (this.#scanning) {
      this.#rescanRequested = true;
      return;
    }
    this.#scanning = this.#scan()
      .catch((error: unknown) => this.#log.error({ error: String(error) }, 'scan failed'))
      .finally(() => {
        this.#scanning = undefined;
        if (this.#rescanRequested) {
          this.#rescanRequested = false;
          this.#requestScan();
        }
      });
  }

  /** Status files are the store's memory: UIDs, generations, finalizers and status. */
  async #loadStatusFiles(): Promise<void> {
    for (const name of await readdir(this.#options.statusDir)) {
      if (/\.yaml\.tmp-\d+$/.test(name)) {
        // A write the last run did not live to finish: the file it was replacing is intact.
        await rm(join(this.#options.statusDir, name), { force: true });
        continue;
      }
      if (!name.endsWith('.yaml')) continue;
      try {
        const [object] = loadAll(await readFile(join(this.#options.statusDir, name), 'utf8'));
        if (isNbdExport(object)) this.#objects.set(keyOf(object.metadata), object);
      } catch (error) {
        this.#log.warn({ file: name, error: String(error) }, 'ignoring unreadable status file');
      }
    }
  }

  async #scan(): Promise<void> {
    const { documents, complete } = await this.#readSourceDocuments();
    const seen = new Set<ResourceKey>();
    for (const { file, document } of documents) {
      const parsed = this.#toResource(file, document);
      if (!parsed) continue;
      const key = keyOf(parsed.metadata);
      if (seen.has(key)) {
        this.#log.warn({ key, file }, 'resource defined twice; the first definition wins');
        continue;
      }
      seen.add(key);
      if (typeof parsed.spec.nodeName === 'string' && parsed.spec.nodeName !== this.#options.nodeName) {
        // As on Kubernetes, nodeName cannot change: a resource of this node that now names
        // another one keeps its last spec here (and is not deleted) until it is removed.
        if (this.#objects.has(key))
          this.#log.error({ key, file }, 'spec.nodeName cannot change; keeping the last spec for this node');
        continue;
      }
      await this.#upsert(key, parsed);
    }
    // Deletion is decided only from a complete reading, and only for a resource missing for
    // a while: a file that does not parse, or one caught half-written, deletes nothing.
    const now = Date.now();
    for (const [key, object] of this.#objects) {
      if (seen.has(key) || object.metadata.deletionTimestamp !== undefined || !complete) {
        this.#missingSince.delete(key);
        continue;
      }
      const since = this.#missingSince.get(key) ?? now;
      this.#missingSince.set(key, since);
      if (now - since < (this.#options.deletionGraceMs ?? 2_000)) {
        this.#requestScanSoon();
        continue;
      }
      this.#missingSince.delete(key);
      if (object.metadata.finalizers?.length) {
        const next = {
          ...object,
          metadata: { ...object.metadata, deletionTimestamp: formatTime(this.#now()) },
        };
        await this.#persist(next);
        this.#objects.set(key, next);
      } else {
        await rm(this.#statusPath(object), { force: true });
        this.#objects.delete(key);
      }
      this.#notify(key);
    }
  }

  /** Another look soon, for a resource whose absence is being confirmed. */
  #requestScanSoon(): void {
    if (this.#timers.length === 0) return; // not started yet, or stopped
    setTimeout(() => this.#requestScan(), 500).unref();
  }

  async #readSourceDocuments(): Promise<{
    documents: { file: string; document: unknown }[];
    complete: boolean;
  }> {
    const files = (await readdir(this.#options.sourceDir))
      .filter((n) => /\.ya?ml$/.test(n) && !n.startsWith('.'))
      .sort();
    const result: { file: string; document: unknown }[] = [];
    let complete = true;
    for (const file of files) {
      let documents: unknown[];
      try {
        documents = loadAll(await readFile(join(this.#options.sourceDir, file), 'utf8'));
        this.#lastGoodDocuments.set(file, documents);
      } catch (error) {
        const kept = this.#lastGoodDocuments.get(file);
        this.#log.error(
          { file, error: error instanceof Error ? error.message.split('\n')[0] : String(error) },
          kept ? 'file does not parse; keeping its last good contents' : 'file does not parse; ignored',
        );
        documents = kept ?? [];
        if (!kept) complete = false;
      }
      for (const document of documents)
        if (document !== null && document !== undefined) result.push({ file, document });
    }
    for (const file of this.#lastGoodDocuments.keys())
      if (!files.includes(file)) this.#lastGoodDocuments.delete(file);
    return { documents: result, complete };
  }

  #toResource(file: string, document: unknown): NbdExport | undefined {
    if (typeof document !== 'object' || document === null) return undefined;
    const doc = document as Record<string, unknown>;
    if (doc['kind'] !== KIND) return undefined;
    const metadata = (doc['metadata'] ?? {}) as Record<string, unknown>;
    const name = metadata['name'];
    const namespace = metadata['namespace'] ?? DEFAULT_NAMESPACE;
    if (doc['apiVersion'] !== API_GROUP_VERSION) {
      this.#log.error(
        { file, apiVersion: doc['apiVersion'] },
        `NbdExport must have apiVersion ${API_GROUP_VERSION}`,
      );
      return undefined;
    }
    if (
      typeof name !== 'string' ||
      !NAME_PATTERN.test(name) ||
      typeof namespace !== 'string' ||
      !NAMESPACE_PATTERN.test(namespace)
    ) {
      this.#log.error(
        { file, name, namespace },
        'NbdExport needs a valid metadata.name (and namespace, if given)',
      );
      return undefined;
    }
    return {
      apiVersion: API_GROUP_VERSION,
      kind: KIND,
      metadata: {
        name,
        namespace,
        ...(isStringMap(metadata['labels']) ? { labels: metadata['labels'] } : {}),
      },
      spec: (doc['spec'] ?? {}) as NbdExportSpec,
    };
  }

  async #upsert(key: ResourceKey, incoming: NbdExport): Promise<void> {
    const existing = this.#objects.get(key);
    if (existing && existing.metadata.deletionTimestamp === undefined) {
      if (JSON.stringify(existing.spec) === JSON.stringify(incoming.spec)) return;
      const next: NbdExport = {
        ...existing,
        metadata: { ...existing.metadata, generation: (existing.metadata.generation ?? 1) + 1 },
        spec: incoming.spec,
      };
      await this.#persist(next);
      this.#objects.set(key, next);
      this.#notify(key);
      return;
    }
    if (existing) return; // being deleted: a document with the same name waits for cleanup to finish
    const created: NbdExport = {
      ...incoming,
      metadata: {
        ...incoming.metadata,
        uid: randomUUID(),
        generation: 1,
        creationTimestamp: formatTime(this.#now()),
      },
    };
    await this.#persist(created);
    this.#objects.set(key, created);
    this.#notify(key);
  }

  async #persist(object: NbdExport): Promise<void> {
    const path = this.#statusPath(object);
    const temporary = `${path}.tmp-${process.pid}`;
    await writeFile(temporary, dump(object, { lineWidth: 120, noRefs: true }), { mode: 0o644 });
    await rename(temporary, path);
  }

  #statusPath(object: NbdExport): string {
    return join(this.#options.statusDir, `${object.metadata.namespace}_${object.metadata.name}.yaml`);
  }

  #notify(key: ResourceKey): void {
    for (const listener of this.#listeners) listener(key);
  }
}

function isNbdExport(value: unknown): value is NbdExport {
  const v = value as NbdExport | undefined;
  return (
    typeof v?.metadata?.name === 'string' &&
    typeof v.metadata.namespace === 'string' &&
    typeof v.spec === 'object'
  );
}

function isStringMap(value: unknown): value is Record<string, string> {
  return (
    typeof value === 'object' && value !== null && Object.values(value).every((v) => typeof v === 'string')
  );
}
