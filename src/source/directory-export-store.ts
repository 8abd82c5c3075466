/**
 * Desired state from a directory of NbdExport YAML files, for plain hosts without
 * Kubernetes. Behaves like the API server where the engine can tell:
 *
 * - Each resource gets a UID, a creation time and a generation, kept in its status file
 *   (see status-file-name.ts; the whole object with its status). The generation grows when
 *   the spec changes.
 * - Finalizers work: when a document disappears from the directory while its status
 *   file carries our finalizer, the resource stays visible with a deletionTimestamp
 *   (and its last spec) until the engine has cleaned up and removed the finalizer.
 * - A resource counts as deleted only after readings of the directory have shown it
 *   missing for the grace period. A file that is refused (does not parse, too large, not a
 *   regular file, …) protects the resources it last defined: those of its last good version,
 *   and those whose status file names it as their source (the annotation below), which is
 *   how a file broken at start-up protects its own. It protects nothing else.
 *
 * The directory is written by people and tools, not by us: every file is read with bounds
 * (read-regular-file.ts, parse-bounded-yaml.ts), and only when it changed.
 */
import { randomUUID } from 'node:crypto';
import { watch, type FSWatcher } from 'node:fs';
import { mkdir, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { dump } from 'js-yaml';
import type { Logger } from 'pino';
import { formatTime } from '../api/conditions.js';
import { isValidNamespace, isValidObjectName } from '../api/object-name.js';
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
import { removeTemporaryFiles, writeFileAtomic } from '../shared/atomic-file.js';
import { systemClock, type Clock, type TimerHandle } from '../shared/clock.js';
import { DEFAULT_YAML_LIMITS, parseBoundedYaml, type YamlLimits } from './parse-bounded-yaml.js';
import { readRegularFile } from './read-regular-file.js';
import { SourceDirectoryReader } from './source-directory-reader.js';
import { REFUSAL_REASONS, SourceFileRefusal } from './source-file-refusal.js';
import { isStatusFileName, statusFileName } from './status-file-name.js';

export interface DirectoryExportStoreOptions {
  /** Directory of `*.yaml` / `*.yml` files, several documents per file allowed. */
  sourceDir: string;
  /** Where each resource's object-with-status is written. */
  statusDir: string;
  /** Only resources for this node are kept (a missing nodeName is kept, to report it). */
  nodeName: string;
  logger: Logger;
  /** Timers, grace windows and timestamps. Default: the system clock. */
  clock?: Clock;
  /** Rescan at least this often, in case a file-system event was missed. Default 1 s. */
  pollIntervalMs?: number;
  /** A resource must stay missing this long before it counts as deleted. Default 2 s. */
  deletionGraceMs?: number;
  /** Every key is reported changed, and every file read again, this often. Default 5 min. */
  resyncIntervalMs?: number;
  /** Source and status files larger than this are refused unread. Default 1 MiB. */
  maxFileBytes?: number;
  /** Bounds on the YAML in each file. Default DEFAULT_YAML_LIMITS. */
  yamlLimits?: YamlLimits;
}

/** The source file that last defined a resource, kept in its status file across restarts. */
export const SOURCE_FILE_ANNOTATION = 'nbd.dev/source-file';

/** One figure for /metrics, in the shape the health server takes. */
export interface DirectorySourceMetric {
  name: string;
  help: string;
  type: 'gauge' | 'counter';
  value: number;
}

const DEFAULT_NAMESPACE = 'default';
const DEFAULT_MAX_STATUS_FILE_BYTES = 1024 * 1024;
/** What the previous implementation named its temporaries (`<file>.yaml.tmp-<pid>`). */
const LEGACY_TEMPORARY_NAME = /\.yaml\.tmp-\d+$/;

export class DirectoryExportStore {
  readonly #options: DirectoryExportStoreOptions;
  readonly #log: Logger;
  readonly #clock: Clock;
  readonly #reader: SourceDirectoryReader;
  readonly #objects = new Map<ResourceKey, NbdExport>();
  readonly #listeners: ((key: ResourceKey) => void)[] = [];
  /** When each resource was first found missing from the directory (clock.now()). */
  readonly #missingSince = new Map<ResourceKey, number>();
  /** Writes to one resource (memory and file) happen one after another, in order. */
  readonly #keyQueues = new Map<ResourceKey, Promise<void>>();
  /** Problems reported by the previous scan: each is logged when it appears, not every second. */
  #reportedProblems = new Set<string>();
  #watcher: FSWatcher | undefined;
  /** undefined when not armed. */
  #pollTimer: TimerHandle = undefined;
  #resyncTimer: TimerHandle = undefined;
  #confirmTimer: TimerHandle = undefined;
  #running = false;
  #currentScan: Promise<void> | undefined;
  #nextScan: Promise<void> | undefined;
  #synced = false;
  #startedAt: number | undefined;
  #lastCompleteScanAt: number | undefined;
  /** When a scan of the directory last finished, usable files or not. */
  #lastScanAt: number | undefined;
  #refusedFiles = 0;

  constructor(options: DirectoryExportStoreOptions) {
    this.#options = options;
    this.#log = options.logger.child({ source: `dir:${options.sourceDir}` });
    this.#clock = options.clock ?? systemClock;
    this.#reader = new SourceDirectoryReader({
      dir: options.sourceDir,
      log: this.#log,
      ...(options.maxFileBytes === undefined ? {} : { maxFileBytes: options.maxFileBytes }),
      ...(options.yamlLimits === undefined ? {} : { yamlLimits: options.yamlLimits }),
    });
  }

  get synced(): boolean {
    return this.#synced;
  }

  async start(): Promise<void> {
    this.#running = true;
    this.#startedAt = this.#clock.now();
    await mkdir(this.#options.statusDir, { recursive: true });
    await this.#removeLeftoverTemporaries();
    await this.#loadStatusFiles();
    await this.scanNow();
    this.#synced = true;
    try {
      this.#watcher = watch(this.#options.sourceDir, () => this.#requestScan());
      this.#watcher.on('error', (error) =>
        this.#log.warn({ error: error.message }, 'directory watch failed; polling'),
      );
    } catch (error) {
      this.#log.warn({ error: String(error) }, 'cannot watch the directory; polling only');
    }
    this.#armPoll();
    this.#armResync();
  }

  async stop(): Promise<void> {
    this.#running = false;
    this.#watcher?.close();
    this.#watcher = undefined;
    for (const timer of [this.#pollTimer, this.#resyncTimer, this.#confirmTimer])
      if (timer !== undefined) this.#clock.clearTimeout(timer);
    this.#pollTimer = this.#resyncTimer = this.#confirmTimer = undefined;
    await this.#nextScan?.catch(() => undefined);
    await this.#currentScan;
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

  updateStatus(key: ResourceKey, status: NbdExportStatus): Promise<void> {
    return this.#exclusive(key, async () => {
      const object = this.#objects.get(key);
      if (!object || JSON.stringify(object.status ?? {}) === JSON.stringify(status)) return;
      await this.#store({ ...object, status });
    });
  }

  addFinalizer(key: ResourceKey): Promise<void> {
    return this.#exclusive(key, async () => {
      const object = this.#objects.get(key);
      if (!object || object.metadata.finalizers?.includes(FINALIZER)) return;
      await this.#store({
        ...object,
        metadata: { ...object.metadata, finalizers: [...(object.metadata.finalizers ?? []), FINALIZER] },
      });
    });
  }

  /** The last finalizer gone on a deleted resource: it disappears, status file and all. */
  removeFinalizer(key: ResourceKey): Promise<void> {
    return this.#exclusive(key, async () => {
      const object = this.#objects.get(key);
      if (!object) return;
      const finalizers = (object.metadata.finalizers ?? []).filter((f) => f !== FINALIZER);
      if (object.metadata.deletionTimestamp !== undefined && finalizers.length === 0) {
        await this.#forget(object);
        return;
      }
      await this.#store({ ...object, metadata: { ...object.metadata, finalizers } });
    });
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

  /**
   * Reads the directory now (after any scan already running) and applies what it finds.
   * Resolves when a scan that started after this call has finished; rejects if the
   * directory could not be listed. File-system events and the poll timer call it too.
   */
  scanNow(): Promise<void> {
    this.#nextScan ??= (this.#currentScan ?? Promise.resolve()).then(() => {
      this.#nextScan = undefined;
      const scan = this.#scan();
      const settled = scan.then(
        () => undefined,
        () => undefined,
      );
      this.#currentScan = settled;
      void settled.then(() => {
        if (this.#currentScan === settled) this.#currentScan = undefined;
      });
      return scan;
    });
    return this.#nextScan;
  }

  /**
   * Figures worth watching, in the health server's /metrics shape: files read (each
   * version once), refusals by reason, files currently refused, and the seconds since the
   * last complete scan (the directory listed and every file usable; since start if none).
   */
  /** Seconds since the directory was last read (for /readyz: a source that stopped being read). */
  secondsSinceRead(): number {
    const since = this.#lastScanAt ?? this.#startedAt;
    return since === undefined ? 0 : (this.#clock.now() - since) / 1000;
  }

  metrics(): DirectorySourceMetric[] {
    const { filesRead, refusals } = this.#reader.counters;
    const since = this.#lastCompleteScanAt ?? this.#startedAt;
    return [
      {
        name: 'nbdx_source_files_read_total',
        help: 'Source files opened, read and parsed (each version of a file once)',
        type: 'counter',
        value: filesRead,
      },
      ...REFUSAL_REASONS.map((reason) => ({
        name: `nbdx_source_refused_${reason.replaceAll('-', '_')}_total`,
        help: `Source file versions refused: ${reason}`,
        type: 'counter' as const,
        value: refusals[reason],
      })),
      {
        name: 'nbdx_source_files_refused',
        help: 'Source files whose current version is refused (they protect their last good resources)',
        type: 'gauge',
        value: this.#refusedFiles,
      },
      {
        name: 'nbdx_source_seconds_since_complete_scan',
        help: 'Seconds since the directory was last read with every file usable',
        type: 'gauge',
        value: since === undefined ? 0 : (this.#clock.now() - since) / 1000,
      },
    ];
  }

  #requestScan(): void {
    if (!this.#running) return;
    this.scanNow().catch((error: unknown) =>
      this.#log.error({ error: String(error) }, 'scan failed; nothing was decided from it'),
    );
  }

  #armPoll(): void {
    if (!this.#running) return;
    this.#pollTimer = this.#clock.setTimeout(() => {
      this.#pollTimer = undefined;
      // Re-armed only once the scan is over, so that slow scans never pile up.
      this.scanNow()
        .catch((error: unknown) =>
          this.#log.error({ error: String(error) }, 'scan failed; nothing was decided from it'),
        )
        .finally(() => this.#armPoll());
    }, this.#options.pollIntervalMs ?? 1_000);
  }

  #armResync(): void {
    if (!this.#running) return;
    this.#resyncTimer = this.#clock.setTimeout(() => {
      // Timestamps can be coarser than two quick writes of the same size: read everything
      // once in a while rather than trust the identity forever.
      this.#reader.forgetIdentities();
      for (const key of this.#objects.keys()) this.#notify(key);
      this.#armResync();
    }, this.#options.resyncIntervalMs ?? 300_000);
  }

  /** Another scan when the earliest absence being confirmed has lasted the grace period. */
  #armConfirmation(delayMs: number | undefined): void {
    if (this.#confirmTimer !== undefined) this.#clock.clearTimeout(this.#confirmTimer);
    this.#confirmTimer = undefined;
    if (delayMs === undefined || !this.#running) return;
    this.#confirmTimer = this.#clock.setTimeout(() => {
      this.#confirmTimer = undefined;
      this.#requestScan();
    }, delayMs);
  }

  async #removeLeftoverTemporaries(): Promise<void> {
    // A write the last run did not live to finish: the file it was replacing is intact.
    const removed = await removeTemporaryFiles(this.#options.statusDir);
    for (const name of await readdir(this.#options.statusDir))
      if (LEGACY_TEMPORARY_NAME.test(name)) {
        await rm(join(this.#options.statusDir, name), { force: true });
        removed.push(name);
      }
    if (removed.length > 0) this.#log.info({ files: removed }, 'removed unfinished status writes');
  }

  /**
   * Status files are the store's memory: UIDs, generations, finalizers and status. Any
   * `*.yaml` is accepted whatever its name (the readable form, the hashed form, or one an
   * earlier version wrote); one not under its current name is moved there.
   */
  async #loadStatusFiles(): Promise<void> {
    const statusDir = this.#options.statusDir;
    const found = new Map<ResourceKey, { fileName: string; object: NbdExport }[]>();
    for (const fileName of (await readdir(statusDir)).filter(isStatusFileName).sort()) {
      try {
        const { text } = await readRegularFile(
          join(statusDir, fileName),
          fileName,
          this.#options.maxFileBytes ?? DEFAULT_MAX_STATUS_FILE_BYTES,
        );
        const [object] = parseBoundedYaml(text, fileName, this.#options.yamlLimits ?? DEFAULT_YAML_LIMITS);
        if (!isStoredNbdExport(object)) {
          this.#log.warn({ file: fileName }, 'ignoring a status file that holds no valid NbdExport');
          continue;
        }
        const key = keyOf(object.metadata);
        found.set(key, [...(found.get(key) ?? []), { fileName, object }]);
      } catch (error) {
        const detail = error instanceof SourceFileRefusal ? error.message : String(error);
        this.#log.warn({ file: fileName, error: detail }, 'ignoring unreadable status file');
      }
    }
    for (const [key, copies] of found) {
      const canonical = statusFileName(copies[0]!.object.metadata.namespace, copies[0]!.object.metadata.name);
      const chosen = copies.find((c) => c.fileName === canonical) ?? copies[0]!;
      this.#objects.set(key, chosen.object);
      if (chosen.fileName !== canonical) await this.#persist(chosen.object);
      for (const copy of copies)
        if (copy.fileName !== canonical) {
          this.#log.info(
            { key, from: copy.fileName, to: canonical },
            'status file moved to its current name',
          );
          await rm(join(statusDir, copy.fileName), { force: true });
        }
    }
  }

  async #scan(): Promise<void> {
    const readings = await this.#reader.read();
    const problems = new Set<string>();
    const report = (problem: string, log: () => void) => {
      problems.add(problem);
      if (!this.#reportedProblems.has(problem)) log();
    };
    const seen = new Set<ResourceKey>();
    const refusedFiles = new Set<string>();
    for (const { file, documents, refusal } of readings) {
      if (refusal) refusedFiles.add(file);
      for (const document of documents) {
        const parsed = this.#toResource(file, document, report);
        if (!parsed) continue;
        const key = keyOf(parsed.metadata);
        if (seen.has(key)) {
          report(`twice:${key}:${file}`, () =>
            this.#log.warn({ key, file }, 'resource defined twice; the first definition wins'),
          );
          continue;
        }
        seen.add(key);
        if (typeof parsed.spec.nodeName === 'string' && parsed.spec.nodeName !== this.#options.nodeName) {
          // As on Kubernetes, nodeName cannot change: a resource of this node that now names
          // another one keeps its last spec here (and is not deleted) until it is removed.
          if (this.#objects.has(key))
            report(`node:${key}`, () =>
              this.#log.error(
                { key, file },
                'spec.nodeName cannot change; keeping the last spec for this node',
              ),
            );
          continue;
        }
        await this.#upsert(key, parsed, file);
      }
    }
    this.#reportedProblems = problems;
    this.#refusedFiles = refusedFiles.size;
    const now = this.#clock.now();
    this.#lastScanAt = now;
    if (refusedFiles.size === 0) this.#lastCompleteScanAt = now;

    // Deletion needs the resource missing for the whole grace period, and not protected
    // by a refused file that may still define it.
    const graceMs = this.#options.deletionGraceMs ?? 2_000;
    let nextConfirmationMs: number | undefined;
    for (const [key, object] of [...this.#objects]) {
      if (
        seen.has(key) ||
        object.metadata.deletionTimestamp !== undefined ||
        isProtected(object, refusedFiles)
      ) {
        this.#missingSince.delete(key);
        continue;
      }
      const since = this.#missingSince.get(key) ?? now;
      this.#missingSince.set(key, since);
      const remainingMs = since + graceMs - now;
      if (remainingMs > 0) {
        nextConfirmationMs = Math.min(nextConfirmationMs ?? remainingMs, remainingMs);
        continue;
      }
      this.#missingSince.delete(key);
      await this.#markDeleted(key);
    }
    this.#armConfirmation(nextConfirmationMs);
  }

  /** A resource gone from the directory: deleted like on Kubernetes (finalizers honoured). */
  #markDeleted(key: ResourceKey): Promise<void> {
    return this.#exclusive(key, async () => {
      const object = this.#objects.get(key);
      if (!object || object.metadata.deletionTimestamp !== undefined) return;
      if (object.metadata.finalizers?.length) {
        await this.#store({
          ...object,
          metadata: { ...object.metadata, deletionTimestamp: formatTime(this.#clock.date()) },
        });
      } else {
        await this.#forget(object);
      }
      this.#notify(key);
    });
  }

  #toResource(
    file: string,
    document: unknown,
    report: (problem: string, log: () => void) => void,
  ): NbdExport | undefined {
    if (typeof document !== 'object' || document === null) return undefined;
    const doc = document as Record<string, unknown>;
    if (doc['kind'] !== KIND) return undefined;
    const metadata = (doc['metadata'] ?? {}) as Record<string, unknown>;
    const name = metadata['name'];
    const namespace = metadata['namespace'] ?? DEFAULT_NAMESPACE;
    if (doc['apiVersion'] !== API_GROUP_VERSION) {
      report(`apiVersion:${JSON.stringify([file, name])}`, () =>
        this.#log.error(
          { file, name, apiVersion: doc['apiVersion'] },
          `NbdExport must have apiVersion ${API_GROUP_VERSION}`,
        ),
      );
      return undefined;
    }
    if (!isValidObjectName(name) || !isValidNamespace(namespace)) {
      report(`name:${JSON.stringify([file, namespace, name])}`, () =>
        this.#log.error(
          { file, name, namespace },
          'NbdExport needs a valid metadata.name (and namespace, if given)',
        ),
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
        ...(isStringMap(metadata['annotations']) ? { annotations: metadata['annotations'] } : {}),
      },
      spec: (doc['spec'] ?? {}) as NbdExportSpec,
    };
  }

  #upsert(key: ResourceKey, incoming: NbdExport, file: string): Promise<void> {
    return this.#exclusive(key, async () => {
      const existing = this.#objects.get(key);
      if (existing && existing.metadata.deletionTimestamp === undefined) {
        const specChanged = JSON.stringify(existing.spec) !== JSON.stringify(incoming.spec);
        // Annotations are the user's too (nbd.dev/verify-seal asks for work): a change of
        // them is a change of the resource, but, as on Kubernetes, not of its generation.
        const annotations = { ...incoming.metadata.annotations, [SOURCE_FILE_ANNOTATION]: file };
        const annotationsChanged =
          JSON.stringify(existing.metadata.annotations ?? {}) !== JSON.stringify(annotations);
        if (!specChanged && !annotationsChanged) return;
        await this.#store({
          ...existing,
          metadata: {
            ...existing.metadata,
            annotations,
            ...(specChanged ? { generation: (existing.metadata.generation ?? 1) + 1 } : {}),
          },
          spec: incoming.spec,
        });
        if (specChanged || annotationsChanged) this.#notify(key);
        return;
      }
      if (existing) return; // being deleted: a document with the same name waits for cleanup to finish
      await this.#store({
        ...incoming,
        metadata: {
          ...incoming.metadata,
          annotations: { ...incoming.metadata.annotations, [SOURCE_FILE_ANNOTATION]: file },
          uid: randomUUID(),
          generation: 1,
          creationTimestamp: formatTime(this.#clock.date()),
        },
      });
      this.#notify(key);
    });
  }

  /** Runs `change` after every earlier change of the same resource has finished. */
  #exclusive(key: ResourceKey, change: () => Promise<void>): Promise<void> {
    const previous = this.#keyQueues.get(key) ?? Promise.resolve();
    const result = previous.then(change);
    const settled = result.then(
      () => undefined,
      () => undefined,
    );
    this.#keyQueues.set(key, settled);
    void settled.then(() => {
      if (this.#keyQueues.get(key) === settled) this.#keyQueues.delete(key);
    });
    return result;
  }

  /** Writes the object's status file, then makes it the current one. */
  async #store(object: NbdExport): Promise<void> {
    await this.#persist(object);
    this.#objects.set(keyOf(object.metadata), object);
  }

  async #persist(object: NbdExport): Promise<void> {
    await writeFileAtomic(this.#statusPath(object), dump(object, { lineWidth: 120, noRefs: true }));
  }

  async #forget(object: NbdExport): Promise<void> {
    await rm(this.#statusPath(object), { force: true });
    this.#objects.delete(keyOf(object.metadata));
  }

  #statusPath(object: NbdExport): string {
    return join(this.#options.statusDir, statusFileName(object.metadata.namespace, object.metadata.name));
  }

  #notify(key: ResourceKey): void {
    for (const listener of this.#listeners) listener(key);
  }
}

function sourceFileOf(object: NbdExport): string | undefined {
  return object.metadata.annotations?.[SOURCE_FILE_ANNOTATION];
}

/**
 * Whether a refused file may still define this resource: the file it last came from is
 * refused now, or it has no recorded source file (written by an earlier version) and some
 * file is refused.
 */
function isProtected(object: NbdExport, refusedFiles: ReadonlySet<string>): boolean {
  const source = sourceFileOf(object);
  return source === undefined ? refusedFiles.size > 0 : refusedFiles.has(source);
}

function isStoredNbdExport(value: unknown): value is NbdExport {
  const v = value as NbdExport | undefined;
  return (
    typeof v === 'object' &&
    v !== null &&
    typeof v.metadata === 'object' &&
    v.metadata !== null &&
    isValidObjectName(v.metadata.name) &&
    isValidNamespace(v.metadata.namespace) &&
    typeof v.spec === 'object' &&
    v.spec !== null
  );
}

function isStringMap(value: unknown): value is Record<string, string> {
  return (
    typeof value === 'object' && value !== null && Object.values(value).every((v) => typeof v === 'string')
  );
}
