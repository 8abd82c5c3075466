/**
 * Everything /metrics shows, on prom-client: the Node process and runtime, the reconciles
 * and probes (histograms), the work queue, both NBD servers, per-export figures and, in
 * Kubernetes mode, the watch and the API writes. docs/metrics.md lists every metric.
 *
 * Figures that other parts already count (the queue's, the servers', the kube store's) are
 * read from them at scrape time, so no counting is duplicated and a deleted export's series
 * disappear with it. Reconciles, probes and errors are recorded here as they happen.
 */
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { DirectorySourceMetric } from '../../source/directory-export-store.js';
import type { KubeExportStoreMetrics } from '../../kube/kube-export-store.js';
import type { WorkQueueMetrics } from '../work-queue.js';
import type { ProcessIo } from './process-io.js';

export type ServerName = 'nbd-server' | 'qemu-storage-daemon';

/** How one reconcile ended, as the work queue sees it. */
export type ReconcileResult = 'success' | 'requeue' | 'error' | 'permanent_error';

export interface ServerFigures {
  nbdServer: {
    running: boolean;
    restarts: number;
    failing: boolean;
    loadedExports: number;
    /** When this controller last started or restarted it; null when it has not. */
    lastRestartAt: Date | null;
  };
  qemuStorageDaemon: {
    running: boolean;
    /** Daemons of one export (exports with client rules): assigned, and of those connected now. */
    dedicated: { assigned: number; running: number };
  };
  /** The node's firewall enforces client rules on exports' own ports (absent: false). */
  clientFirewall?: boolean;
  /** Resources this node serves or cleans up (the ownership ledger). */
  ownedExports: number;
  /** Whether the state directory can hold the controller's state (absent: not checked). */
  stateDirectory?: {
    condition: StateDirectoryCondition;
    /** Corrupt state files moved aside (`<name>.corrupt-<time>`) since the controller started. */
    corruptFilesMovedAside: number;
  };
}

export type StateDirectoryCondition = 'ok' | 'missing' | 'read_only' | 'full' | 'error';
const STATE_DIRECTORY_CONDITIONS: StateDirectoryCondition[] = ['ok', 'missing', 'read_only', 'full', 'error'];

/** One export this node serves, with what its server can tell about it. */
export interface ExportFigures {
  namespace: string;
  name: string;
  export: string;
  server: ServerName;
  /** Clients connected now; only nbd-server can tell (one process per client). */
  connectedClients?: number;
  /** Of those, clients still served an older configuration of the export (nbd-server). */
  staleClients?: number;
  /** Highest guest offset written through the export; only qemu-storage-daemon can tell. */
  highestWrittenOffsetBytes?: number;
}

/** Where the scrape-time figures come from. */
export interface MetricsSources {
  ready(): boolean;
  workQueue(): WorkQueueMetrics;
  servers(): ServerFigures;
  exports(): Promise<ExportFigures[]>;
  /** qemu-storage-daemon's I/O counters; undefined while it does not run. */
  qemuStorageDaemonIo(): Promise<ProcessIo | undefined>;
  /** Only in Kubernetes mode. */
  kubeStore?: (() => KubeExportStoreMetrics) | undefined;
  /** Only in plain-host mode: the directory source's own figures (names fixed at start). */
  directorySource?: (() => DirectorySourceMetric[]) | undefined;
}

/** What the controller reports as it works. */
export interface ReconcileRecorder {
  observeReconcile(result: ReconcileResult, seconds: number, error?: unknown): void;
  observeProbe(server: ServerName, ok: boolean, seconds: number): void;
}

interface ScrapeSnapshot {
  exports: Promise<ExportFigures[]>;
  qemuIo: Promise<ProcessIo | undefined>;
}

const EXPORT_LABELS = ['namespace', 'name', 'export', 'server'] as const;

/** Reconciles take milliseconds when converged and up to minutes when they create images. */
const RECONCILE_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300];
/** A probe is one handshake on loopback, or a timeout (10 s). */
const PROBE_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

export class ControllerMetrics implements ReconcileRecorder {
  readonly registry = new Registry();
  readonly #reconcileDuration: Histogram<'result'>;
  readonly #reconcileErrors: Counter<'reason'>;
  readonly #probeDuration: Histogram<'server' | 'result'>;
  readonly #sourceErrors: Counter<'source'>;

  readonly #sources: MetricsSources;
  #snapshot: ScrapeSnapshot | undefined;
  readonly #onSourceError: ((source: string, error: unknown) => void) | undefined;

  /** `onSourceError` is told why a source failed (its series are left out of that scrape). */
  constructor(
    sources: MetricsSources,
    options: { onSourceError?: (source: string, error: unknown) => void } = {},
  ) {
    this.#onSourceError = options.onSourceError;
    this.#sources = sources;
    const registers = [this.registry];
    collectDefaultMetrics({ register: this.registry });

    this.#reconcileDuration = new Histogram({
      name: 'nbdx_reconcile_duration_seconds',
      help: 'Duration of reconciles, by result (success, requeue: success with a known wait, error: retried, permanent_error: not retried)',
      labelNames: ['result'],
      buckets: RECONCILE_BUCKETS,
      registers,
    });
    this.#reconcileErrors = new Counter({
      name: 'nbdx_reconcile_errors_total',
      help: 'Reconciles that failed, by reason (the error code, such as EACCES, or else the error class, such as QmpError)',
      labelNames: ['reason'],
      registers,
    });
    this.#probeDuration = new Histogram({
      name: 'nbdx_probe_duration_seconds',
      help: 'Duration of NBD handshake probes of exports, by server and result (ok, failed)',
      labelNames: ['server', 'result'],
      buckets: PROBE_BUCKETS,
      registers,
    });

    this.#sourceErrors = new Counter({
      name: 'nbdx_metrics_source_errors_total',
      help: 'Scrapes that could not read a source of figures (exports: the servers per export; qemu_storage_daemon_io: /proc of the daemon); its series are left out of that scrape',
      labelNames: ['source'],
      registers,
    });
    gauge(registers, 'nbdx_ready', 'Whether the source has synced (1) or not (0)', () =>
      Number(sources.ready()),
    );
    this.#registerWorkQueue(registers, sources);
    this.#registerServers(registers, sources);
    this.#registerExports(registers);
    if (sources.kubeStore) this.#registerKube(registers, sources.kubeStore);
    if (sources.directorySource) this.#registerDirectorySource(registers, sources.directorySource);
  }

  #registerDirectorySource(registers: Registry[], figures: () => DirectorySourceMetric[]): void {
    for (const { name, help, type } of figures()) {
      const read = () => figures().find((f) => f.name === name)?.value ?? 0;
      (type === 'counter' ? counter : gauge)(registers, name, help, read);
    }
  }

  observeReconcile(result: ReconcileResult, seconds: number, error?: unknown): void {
    this.#reconcileDuration.observe({ result }, seconds);
    if (result === 'error' || result === 'permanent_error')
      this.#reconcileErrors.inc({ reason: errorReason(error) });
  }

  observeProbe(server: ServerName, ok: boolean, seconds: number): void {
    this.#probeDuration.observe({ server, result: ok ? 'ok' : 'failed' }, seconds);
  }

  /** The exposition in Prometheus' text format. */
  async render(): Promise<string> {
    // The slow sources are read first, so that a failure is counted in this very scrape.
    const snapshot = this.#scrape();
    await Promise.all([snapshot.exports, snapshot.qemuIo]);
    this.#snapshot = snapshot;
    try {
      return await this.registry.metrics();
    } finally {
      if (this.#snapshot === snapshot) this.#snapshot = undefined;
    }
  }

  /**
   * The figures that cost a read of the servers or of /proc, read once per scrape (and once
   * for all the metrics a bare `registry.metrics()` collects at the same time).
   */
  #scrape(): ScrapeSnapshot {
    if (this.#snapshot) return this.#snapshot;
    const snapshot: ScrapeSnapshot = {
      exports: this.#tolerant('exports', () => this.#sources.exports(), []),
      qemuIo: this.#tolerant('qemu_storage_daemon_io', () => this.#sources.qemuStorageDaemonIo(), undefined),
    };
    this.#snapshot = snapshot;
    queueMicrotask(() => {
      if (this.#snapshot === snapshot) this.#snapshot = undefined;
    });
    return snapshot;
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  /**
   * A source that fails (a QMP query timing out, say) costs its own series in that scrape, and
   * counts here; the rest of /metrics is still answered.
   */
  async #tolerant<T>(source: string, read: () => Promise<T>, fallback: T): Promise<T> {
    try {
      return await read();
    } catch (error) {
      this.#sourceErrors.inc({ source });
      this.#onSourceError?.(source, error);
      return fallback;
    }
  }

  #registerWorkQueue(registers: Registry[], sources: MetricsSources): void {
    const queue = (figure: keyof WorkQueueMetrics) => () => sources.workQueue()[figure];
    gauge(registers, 'nbdx_workqueue_depth', 'Keys waiting to reconcile', queue('depth'));
    gauge(
      registers,
      'nbdx_workqueue_delayed',
      'Keys waiting for a delay (a requeue, a backoff or addAfter)',
      queue('delayed'),
    );
    gauge(registers, 'nbdx_workqueue_in_flight', 'Reconciles running now', queue('inFlight'));
    gauge(
      registers,
      'nbdx_workqueue_longest_running_seconds',
      'How long the oldest reconcile still running has been running (0 when idle)',
      queue('longestRunningSeconds'),
    );
    counter(registers, 'nbdx_workqueue_adds_total', 'Keys added to the work queue', queue('addsTotal'));
    counter(registers, 'nbdx_reconciles_total', 'Reconciles run', queue('runsTotal'));
    counter(
      registers,
      'nbdx_reconcile_retries_total',
      'Failed reconciles scheduled for a retry with backoff',
      queue('retriesTotal'),
    );
    counter(
      registers,
      'nbdx_reconcile_permanent_failures_total',
      'Reconciles that failed in a way retrying cannot fix (not retried until the resource changes)',
      queue('permanentFailuresTotal'),
    );
  }

  #registerServers(registers: Registry[], sources: MetricsSources): void {
    gauge(registers, 'nbdx_nbd_server_up', 'Whether nbd-server runs', () =>
      Number(sources.servers().nbdServer.running),
    );
    counter(
      registers,
      'nbdx_nbd_server_restarts_total',
      'Starts and hand-over restarts of nbd-server by this controller process',
      () => sources.servers().nbdServer.restarts,
    );
    gauge(
      registers,
      'nbdx_nbd_server_start_failing',
      'Whether the last start or restart of nbd-server failed (the watchdog retries it)',
      () => Number(sources.servers().nbdServer.failing),
    );
    new Gauge({
      name: 'nbdx_nbd_server_last_restart_timestamp_seconds',
      help: 'When this controller process last started or restarted nbd-server (Unix time); no series before it has. Each restart closes the port for a few milliseconds',
      registers,
      collect() {
        const at = sources.servers().nbdServer.lastRestartAt;
        this.reset();
        if (at === null) this.remove();
        else this.set(at.getTime() / 1000);
      },
    });
    gauge(
      registers,
      'nbdx_nbd_server_loaded_exports',
      'Exports the running nbd-server serves',
      () => sources.servers().nbdServer.loadedExports,
    );
    gauge(
      registers,
      'nbdx_qemu_storage_daemon_up',
      'Whether qemu-storage-daemon runs and the controller is connected to its QMP socket',
      () => Number(sources.servers().qemuStorageDaemon.running),
    );
    gauge(
      registers,
      'nbdx_dedicated_qemu_daemons',
      'qemu-storage-daemons of one export (an export with allowedClients or maxConnections) that the node has assigned a port',
      () => sources.servers().qemuStorageDaemon.dedicated.assigned,
    );
    gauge(
      registers,
      'nbdx_dedicated_qemu_daemons_up',
      'Of those, the ones that run with the controller connected to their QMP socket (one started again on demand counts once it answers)',
      () => sources.servers().qemuStorageDaemon.dedicated.running,
    );
    gauge(
      registers,
      'nbdx_client_firewall_enabled',
      "Whether the node's firewall enforces client rules on exports' own ports (run --client-firewall, and iptables usable)",
      () => Number(sources.servers().clientFirewall ?? false),
    );
    this.#registerQemuIo(registers);
    gauge(
      registers,
      'nbdx_owned_exports',
      'Resources this node serves or cleans up (entries of the ownership ledger)',
      () => sources.servers().ownedExports,
    );
    new Gauge({
      name: 'nbdx_state_directory_condition',
      help: "The state directory's condition: 1 for the current one of ok, missing, read_only, full, error (checked every few seconds; a missing directory is created again)",
      labelNames: ['condition'],
      registers,
      collect() {
        const state = sources.servers().stateDirectory;
        this.reset();
        if (state === undefined) return;
        for (const condition of STATE_DIRECTORY_CONDITIONS)
          this.set({ condition }, Number(state.condition === condition));
      },
    });
    counter(
      registers,
      'nbdx_state_files_moved_aside_total',
      'Corrupt state files (ledger records, exports.json, loaded.json) moved aside as <name>.corrupt-<time> and rebuilt',
      () => sources.servers().stateDirectory?.corruptFilesMovedAside ?? 0,
    );
  }

  /**
   * qemu-storage-daemon's own counters, for all its exports together (QEMU counts nothing per
   * NBD export). They start from 0 when the daemon restarts, which rate() takes as a reset.
   */
  #registerQemuIo(registers: Registry[]): void {
    // collect() runs with the metric as `this`; this arrow keeps ours.
    const scrape = () => this.#scrape();
    const figures: [string, string, keyof ProcessIo][] = [
      [
        'nbdx_qemu_storage_daemon_read_bytes_total',
        'Bytes qemu-storage-daemon read with read system calls, nearly all from its images, for all its exports together (rchar of /proc/<pid>/io; NBD traffic is not counted)',
        'readBytes',
      ],
      [
        'nbdx_qemu_storage_daemon_written_bytes_total',
        'Bytes qemu-storage-daemon wrote with write system calls, nearly all to its images (data and qcow2 metadata), for all its exports together (wchar of /proc/<pid>/io)',
        'writtenBytes',
      ],
      [
        'nbdx_qemu_storage_daemon_read_syscalls_total',
        'Read system calls of qemu-storage-daemon (syscr of /proc/<pid>/io)',
        'readCalls',
      ],
      [
        'nbdx_qemu_storage_daemon_write_syscalls_total',
        'Write system calls of qemu-storage-daemon (syscw of /proc/<pid>/io)',
        'writeCalls',
      ],
    ];
    for (const [name, help, figure] of figures)
      new Counter({
        name,
        help,
        registers,
        async collect() {
          const io = await scrape().qemuIo;
          this.reset();
          // No series while the daemon does not run, rather than a 0 that looks like a reset.
          if (io !== undefined) this.inc(io[figure]);
          else this.remove();
        },
      });
  }

  /**
   * Per-export series are rebuilt on every scrape from what is served now, so those of a
   * deleted export are gone at the next scrape. One read of the servers serves both gauges.
   */
  #registerExports(registers: Registry[]): void {
    // collect() runs with the metric as `this`; this arrow keeps ours.
    const scrape = () => this.#scrape();
    exportGauge(
      registers,
      'nbdx_export_connected_clients',
      'Clients connected to an export now. Only nbd-server exports have this series (one process per client); qemu-storage-daemon 7.2 reports no clients per export over QMP',
      scrape,
      (figure) => figure.connectedClients,
    );
    exportGauge(
      registers,
      'nbdx_export_stale_clients',
      'Clients of an nbd-server export still served the configuration they connected under, from before a change (the resource shows RestartPending until they leave). Only nbd-server exports have this series',
      scrape,
      (figure) => figure.staleClients,
    );
    exportGauge(
      registers,
      'nbdx_export_written_highest_offset_bytes',
      "Highest guest offset written through an export since qemu-storage-daemon opened it (QMP query-blockstats wr_highest_offset of the export's format node). Only qemu-storage-daemon exports have this series. Bytes and operations read and written are not reported for any export: nbd-server 3.24 keeps no such counts, and qemu-storage-daemon 7.2 does no block accounting for NBD exports (its query-blockstats shows 0 however much is moved)",
      scrape,
      (figure) => figure.highestWrittenOffsetBytes,
    );
  }

  #registerKube(registers: Registry[], kubeStore: () => KubeExportStoreMetrics): void {
    const kube = (figure: keyof KubeExportStoreMetrics) => () => Number(kubeStore()[figure]);
    gauge(registers, 'nbdx_kube_watch_synced', 'Whether the watch has listed once', kube('synced'));
    gauge(
      registers,
      'nbdx_kube_watch_objects',
      'NbdExports of this node in the watch cache',
      kube('objects'),
    );
    gauge(
      registers,
      'nbdx_kube_watch_seconds_since_last_event',
      'Seconds since the watch last received anything: an event, a bookmark, or a complete listing. The API server sends a bookmark about every minute, so a value well above 60 means a stuck watch',
      kube('secondsSinceLastReceive'),
    );
    new Counter({
      name: 'nbdx_kube_watch_events_total',
      help: 'Watch events received, by type (ADDED, MODIFIED, DELETED, BOOKMARK)',
      labelNames: ['type'],
      registers,
      collect() {
        const figures = kubeStore();
        this.reset();
        for (const [type, count] of Object.entries(figures.watchEventsByType)) this.inc({ type }, count);
        this.inc({ type: 'BOOKMARK' }, figures.bookmarksTotal);
      },
    });
    counter(
      registers,
      'nbdx_kube_lists_total',
      'Complete listings (the first, and every relist)',
      kube('listsTotal'),
    );
    counter(
      registers,
      'nbdx_kube_watch_expired_total',
      'Relists forced by 410 Gone (the resourceVersion expired)',
      kube('expiredTotal'),
    );
    counter(
      registers,
      'nbdx_kube_watch_errors_total',
      'Lists or watches that failed with an error or a broken stream',
      kube('watchErrorsTotal'),
    );
    counter(
      registers,
      'nbdx_kube_watch_idle_timeouts_total',
      'Watches aborted because nothing arrived, not even a bookmark, for the idle timeout',
      kube('idleTimeoutsTotal'),
    );
    counter(
      registers,
      'nbdx_kube_watch_reconnects_total',
      'Times the watch loop started over after a watch ended, for whatever reason',
      kube('reconnectsTotal'),
    );
    counter(
      registers,
      'nbdx_kube_resyncs_total',
      'Periodic resyncs (every cached key reconciled again)',
      kube('resyncsTotal'),
    );
    counter(registers, 'nbdx_kube_status_patches_total', 'Status patches sent', kube('statusPatchesTotal'));
    counter(
      registers,
      'nbdx_kube_status_patches_skipped_total',
      'Status writes not sent because the cached status already equalled them',
      kube('statusPatchesSkippedTotal'),
    );
    counter(
      registers,
      'nbdx_kube_status_patch_failures_total',
      'Status patches the API server refused or that did not complete (not counting a resource already gone)',
      kube('statusPatchFailuresTotal'),
    );
    counter(
      registers,
      'nbdx_kube_finalizer_patches_total',
      'Finalizer patches sent',
      kube('finalizerPatchesTotal'),
    );
    counter(
      registers,
      'nbdx_kube_finalizer_conflicts_total',
      'Finalizer patches answered 409 Conflict (read afresh and tried again)',
      kube('finalizerConflictsTotal'),
    );
    counter(
      registers,
      'nbdx_kube_finalizer_patch_failures_total',
      'Finalizer patches that failed for good (after the conflict retries, or another error)',
      kube('finalizerPatchFailuresTotal'),
    );
    counter(registers, 'nbdx_kube_events_created_total', 'Events written', kube('eventsCreatedTotal'));
    counter(
      registers,
      'nbdx_kube_events_deduplicated_total',
      'Events not written because the same one was written within the dedupe window',
      kube('eventsDedupedTotal'),
    );
    counter(
      registers,
      'nbdx_kube_event_failures_total',
      'Events the API server refused or that did not complete (logged, never fatal)',
      kube('eventsFailedTotal'),
    );
  }
}

/** A gauge per export, from one read of the servers a scrape; an export without the figure has no series. */
function exportGauge(
  registers: Registry[],
  name: string,
  help: string,
  scrape: () => ScrapeSnapshot,
  pick: (figure: ExportFigures) => number | undefined,
): void {
  new Gauge({
    name,
    help,
    labelNames: EXPORT_LABELS,
    registers,
    async collect() {
      const figures = await scrape().exports;
      this.reset();
      for (const figure of figures) {
        const value = pick(figure);
        if (value !== undefined) this.set(labelsOf(figure), value);
      }
    },
  });
}

function gauge(registers: Registry[], name: string, help: string, read: () => number): void {
  new Gauge({
    name,
    help,
    registers,
    collect() {
      this.set(read());
    },
  });
}

/** A counter kept elsewhere (it only grows there): shown as it is at scrape time. */
function counter(registers: Registry[], name: string, help: string, read: () => number): void {
  new Counter({
    name,
    help,
    registers,
    collect() {
      this.reset();
      this.inc(read());
    },
  });
}

function labelsOf(figure: ExportFigures): Record<(typeof EXPORT_LABELS)[number], string> {
  return { namespace: figure.namespace, name: figure.name, export: figure.export, server: figure.server };
}

/**
 * A label value of few values: an errno-style code when there is one (EACCES), else the
 * error's class with the reason it carries, if any (KubeApiError/Conflict, QmpError).
 */
export function errorReason(error: unknown): string {
  if (!(error instanceof Error)) return 'NonError';
  const { code, reason } = error as { code?: unknown; reason?: unknown };
  if (typeof code === 'string' && /^[A-Z][A-Z0-9_]{1,31}$/.test(code)) return code;
  const name = /^[A-Za-z][A-Za-z0-9]{0,63}$/.test(error.name) ? error.name : 'Error';
  return typeof reason === 'string' && /^[A-Z][A-Za-z]{0,63}$/.test(reason) ? `${name}/${reason}` : name;
}
