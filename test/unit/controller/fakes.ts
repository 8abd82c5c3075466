/**
 * Fakes at the controller's boundary (the ExportStore and the node services), for unit
 * tests of the glue. The real programs are exercised by the integration tests.
 */
import { ExportBusyError, ImageLockedError } from '../../../src/node/qemu-storage-daemon/errors.js';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fingerprintOf, type ExportConfig } from '../../../src/api/export-config.js';
import { keyOf, type NbdExport, type NbdExportStatus, FINALIZER } from '../../../src/api/types.js';
import type { ExportEvent, ExportStore } from '../../../src/controller/export-store.js';
import type { CreateImageRequest, NodeServices } from '../../../src/controller/node-services.js';
import type { ProbeResult, ProbeTarget } from '../../../src/node/nbd-probe.js';
import { OwnershipLedger } from '../../../src/node/ownership-ledger.js';
import type {
  ChecksumJob,
  ChecksumRequest,
  ImageInfo,
  ImageObservation,
  LockObservation,
  PathObservation,
} from '../../../src/plan/observed-state.js';

export class FakeStore implements ExportStore {
  readonly objects = new Map<string, NbdExport>();
  readonly events: (ExportEvent & { key: string })[] = [];
  statusWrites = 0;
  synced = true;
  #listeners: ((key: string) => void)[] = [];

  put(object: NbdExport): void {
    this.objects.set(keyOf(object.metadata), structuredClone(object));
    for (const l of this.#listeners) l(keyOf(object.metadata));
  }
  start = () => Promise.resolve();
  stop = () => Promise.resolve();
  list = () => [...this.objects.values()];
  get = (key: string) => this.objects.get(key);
  onChange(listener: (key: string) => void): void {
    this.#listeners.push(listener);
  }
  updateStatus(key: string, status: NbdExportStatus): Promise<void> {
    const object = this.objects.get(key);
    if (object && JSON.stringify(object.status ?? {}) !== JSON.stringify(status)) {
      this.statusWrites++;
      object.status = structuredClone(status);
    }
    return Promise.resolve();
  }
  addFinalizer(key: string): Promise<void> {
    const object = this.objects.get(key);
    if (object && !object.metadata.finalizers?.includes(FINALIZER))
      object.metadata.finalizers = [...(object.metadata.finalizers ?? []), FINALIZER];
    return Promise.resolve();
  }
  removeFinalizer(key: string): Promise<void> {
    const object = this.objects.get(key);
    if (!object) return Promise.resolve();
    object.metadata.finalizers = (object.metadata.finalizers ?? []).filter((f) => f !== FINALIZER);
    if (object.metadata.deletionTimestamp && object.metadata.finalizers.length === 0)
      this.objects.delete(key);
    return Promise.resolve();
  }
  recordEvent(key: string, event: ExportEvent): Promise<void> {
    this.events.push({ key, ...event });
    return Promise.resolve();
  }
}

/** A node in memory: files, an nbd-server that applies on request, a qemu daemon, a probe. */
export class FakeNode {
  readonly files = new Map<string, ImageInfo>();
  readonly locks = new Map<string, string>();
  readonly nbdConfigured = new Map<string, ExportConfig>();
  nbdLoaded = new Map<string, string>();
  nbdApplies = 0;
  readonly qemuServed = new Map<string, ExportConfig>();
  /** Ports of the exports served by a daemon of their own. */
  readonly qemuPorts = new Map<string, number>();
  /** updateAccess calls: a change of client rules alone. */
  accessUpdates = 0;
  /** Export names whose qemu removal fails as busy (a client is connected). */
  readonly busy = new Set<string>();
  readonly created: CreateImageRequest[] = [];
  /** When set, creating an image fails with this error (after nothing was published). */
  createFailure: Error | undefined;
  /** Background checksums: started ones run until the test finishes them with `finishChecksum`. */
  readonly checksums = new FakeChecksums();
  /** NBD handshakes made. */
  probes = 0;
  ledger!: OwnershipLedger;
  #appliedListeners: ((names: string[]) => void)[] = [];

  #dir = '';

  async init(): Promise<this> {
    this.#dir = await mkdtemp(join(tmpdir(), 'ledger-'));
    this.ledger = new OwnershipLedger(join(this.#dir, 'ledger'));
    await this.ledger.load();
    return this;
  }

  async dispose(): Promise<void> {
    await rm(this.#dir, { recursive: true, force: true });
  }

  /** What the coalesced restart does, run by the test when it wants. */
  applyNbd(): void {
    this.nbdApplies++;
    this.nbdLoaded = new Map([...this.nbdConfigured].map(([name, config]) => [name, fingerprintOf(config)]));
    for (const l of this.#appliedListeners) l([...this.nbdLoaded.keys()]);
  }

  services(): NodeServices {
    let applyRequested = false;
    return {
      ledger: this.ledger,
      checksums: this.checksums,
      nbdServer: {
        writeExport: (config) => {
          const changed =
            fingerprintOf(config) !== fingerprintOfOrUndefined(this.nbdConfigured.get(config.exportName));
          this.nbdConfigured.set(config.exportName, config);
          return Promise.resolve(changed);
        },
        removeExport: (name) => Promise.resolve(this.nbdConfigured.delete(name)),
        configured: () =>
          Promise.resolve(
            new Map([...this.nbdConfigured].map(([n, c]) => [n, fingerprintOf(c)] as [string, string])),
          ),
        loaded: () => this.nbdLoaded,
        requestApply: () => {
          if (applyRequested) return;
          applyRequested = true;
          queueMicrotask(() => {
            applyRequested = false;
            this.applyNbd();
          });
        },
        connections: () => Promise.resolve(new Map()),
        disconnect: () => Promise.resolve(0),
        staleConnections: () => Promise.resolve(new Map<string, number>()),
        status: () => ({ running: true, lastError: null }),
        onApplied: (listener) => void this.#appliedListeners.push(listener),
      },
      qemu: {
        exports: () =>
          Promise.resolve(
            new Map(
              [...this.qemuServed].map(([n, c]) => {
                const port = this.qemuPorts.get(n);
                return [
                  n,
                  { fingerprint: fingerprintOf(c), config: c, ...(port === undefined ? {} : { port }) },
                ];
              }),
            ),
          ),
        addExport: (config) => {
          const lock = this.locks.get(config.path);
          if (lock) return Promise.reject(new ImageLockedError(config.path, lock));
          this.qemuServed.set(config.exportName, config);
          if (config.dedicatedDaemon === true && !this.qemuPorts.has(config.exportName))
            this.qemuPorts.set(config.exportName, 10900 + this.qemuPorts.size);
          return Promise.resolve();
        },
        updateAccess: (config) => {
          this.qemuServed.set(config.exportName, config);
          this.accessUpdates++;
          return Promise.resolve();
        },
        removeExport: (name, { force }) => {
          if (this.busy.has(name) && !force) return Promise.reject(new ExportBusyError(name));
          this.qemuServed.delete(name);
          this.qemuPorts.delete(name);
          return Promise.resolve();
        },
        assigned: () => new Set(this.qemuPorts.keys()),
        status: () => ({ running: true }),
      },
      images: {
        inspect: (path): Promise<ImageObservation> => {
          const info = this.files.get(path);
          return Promise.resolve(info ? { kind: 'present', info } : { kind: 'missing' });
        },
        probeLock: (path): Promise<LockObservation> => {
          const message = this.locks.get(path);
          return Promise.resolve(message ? { locked: true, message } : { locked: false });
        },
        create: async (request, beforePublish) => {
          if (this.createFailure) throw this.createFailure;
          this.created.push(request);
          await beforePublish(this.created.length);
          this.files.set(request.path, {
            format: request.format,
            virtualSize: request.sizeBytes ?? this.files.get(request.backingFile ?? '')?.virtualSize ?? 0,
            actualSize: 196608,
            backingChain: request.backingFile ? [request.backingFile] : [],
          });
        },
        makeParentDirectories: () => Promise.resolve(),
        remove: (path) => Promise.resolve(this.files.delete(path) ? 'deleted' : 'missing'),
      },
      resolvePath: (path): Promise<PathObservation> =>
        Promise.resolve({
          kind: 'resolved',
          realPath: path,
          exists: this.files.has(path),
          parentExists: true,
          isFile: this.files.has(path),
          isBlockDevice: false,
        }),
      probe: (target: ProbeTarget): Promise<ProbeResult> => {
        this.probes++;
        const served =
          [...this.qemuServed.values()].find((c) => c.exportName === target.exportName) ??
          (this.nbdLoaded.has(target.exportName) ? this.nbdConfigured.get(target.exportName) : undefined);
        const info = served ? this.files.get(served.path) : undefined;
        return Promise.resolve(
          info
            ? { ok: true, size: info.virtualSize, readOnly: served?.readOnly ?? false }
            : { ok: false, message: 'unknown export' },
        );
      },
    };
  }
}

function fingerprintOfOrUndefined(config: ExportConfig | undefined): string | undefined {
  return config ? fingerprintOf(config) : undefined;
}

/** Checksum jobs that end when a test says, with the digest it names. */
export class FakeChecksums {
  readonly jobs = new Map<string, ChecksumJob>();
  readonly started: { key: string; request: ChecksumRequest; uri: string }[] = [];
  start(key: string, request: ChecksumRequest, uri: string): void {
    this.started.push({ key, request, uri });
    this.jobs.set(key, { ...request, state: 'running', bytesRead: 0 });
  }
  get(key: string): ChecksumJob | undefined {
    return this.jobs.get(key);
  }
  forget(key: string): void {
    this.jobs.delete(key);
  }
  onChange(): void {}
  finish(key: string, digest: string): void {
    const job = this.jobs.get(key);
    if (!job) throw new Error(`no checksum job for ${key}`);
    this.jobs.set(key, {
      ...job,
      state: 'done',
      digest,
      bytesRead: job.totalBytes,
      completedAt: '2026-11-25T10:05:00.000Z',
    });
  }
}
