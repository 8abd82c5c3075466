import { describe, expect, it } from 'vitest';
import {
  ControllerMetrics,
  errorReason,
  type ExportFigures,
  type MetricsSources,
  type ServerFigures,
} from '../../../../src/controller/metrics/controller-metrics.js';
import type { WorkQueueMetrics } from '../../../../src/controller/work-queue.js';
import type { KubeExportStoreMetrics } from '../../../../src/kube/kube-export-store.js';
import { parseProcessIo, type ProcessIo } from '../../../../src/controller/metrics/process-io.js';
import { PermanentError } from '../../../../src/controller/work-queue.js';
import { parseExposition, samplesOf, valueOf, type Exposition } from '../../../support/prometheus-text.js';

function queueFigures(overrides: Partial<WorkQueueMetrics> = {}): WorkQueueMetrics {
  return {
    depth: 3,
    delayed: 2,
    inFlight: 1,
    addsTotal: 40,
    runsTotal: 30,
    successesTotal: 25,
    retriesTotal: 4,
    permanentFailuresTotal: 1,
    runDurationSecondsSum: 12,
    runDurationSecondsCount: 30,
    runDurationSecondsMax: 5,
    longestRunningSeconds: 7.5,
    allWorkersBusySeconds: 0,
    ...overrides,
  };
}

function kubeFigures(overrides: Partial<KubeExportStoreMetrics> = {}): KubeExportStoreMetrics {
  return {
    synced: true,
    objects: 5,
    listsTotal: 2,
    watchesTotal: 4,
    watchEventsTotal: 9,
    watchEventsByType: { ADDED: 5, MODIFIED: 3, DELETED: 1 },
    bookmarksTotal: 6,
    expiredTotal: 1,
    watchErrorsTotal: 2,
    idleTimeoutsTotal: 1,
    reconnectsTotal: 3,
    resyncsTotal: 8,
    secondsSinceLastReceive: 42,
    statusPatchesTotal: 11,
    statusPatchesSkippedTotal: 12,
    statusPatchFailuresTotal: 13,
    finalizerPatchesTotal: 14,
    finalizerConflictsTotal: 15,
    finalizerPatchFailuresTotal: 16,
    eventsCreatedTotal: 17,
    eventsDedupedTotal: 18,
    eventsFailedTotal: 19,
    ...overrides,
  };
}

/** Sources whose figures a test changes between scrapes. */
function fakeSources(kube?: () => KubeExportStoreMetrics) {
  const state = {
    ready: true,
    queue: queueFigures(),
    servers: {
      nbdServer: {
        running: true,
        restarts: 6,
        failing: false,
        loadedExports: 2,
        lastRestartAt: null as Date | null,
      },
      qemuStorageDaemon: { running: false, dedicated: { assigned: 3, running: 2 } },
      clientFirewall: true,
      ownedExports: 3,
    } as ServerFigures,
    exports: [] as ExportFigures[],
    exportReads: 0,
    qemuIo: undefined as ProcessIo | undefined,
    qemuIoReads: 0,
  };
  const sources: MetricsSources = {
    ready: () => state.ready,
    workQueue: () => state.queue,
    servers: () => state.servers,
    exports: () => {
      state.exportReads++;
      return Promise.resolve(state.exports);
    },
    qemuStorageDaemonIo: () => {
      state.qemuIoReads++;
      return Promise.resolve(state.qemuIo);
    },
    kubeStore: kube,
  };
  return { state, sources };
}

async function scrape(metrics: ControllerMetrics): Promise<Exposition> {
  return parseExposition(await metrics.render());
}

const raw: ExportFigures = {
  namespace: 'backups',
  name: 'scratch',
  export: 'backups.scratch',
  server: 'nbd-server',
  connectedClients: 2,
  staleClients: 1,
};
const qcow2: ExportFigures = {
  namespace: 'backups',
  name: 'vm-1-incr',
  export: 'backup-1-disk0-incr',
  server: 'qemu-storage-daemon',
  highestWrittenOffsetBytes: 4 << 20,
};

describe('ControllerMetrics', () => {
  it('exposes the Node process and runtime metrics', async () => {
    const exposition = await scrape(new ControllerMetrics(fakeSources().sources));
    expect(exposition.types.get('process_cpu_seconds_total')).toBe('counter');
    expect(valueOf(exposition, 'process_resident_memory_bytes')).toBeGreaterThan(0);
    expect(samplesOf(exposition, 'nodejs_heap_size_used_bytes')).toHaveLength(1);
    expect(samplesOf(exposition, 'nodejs_eventloop_lag_seconds')).toHaveLength(1);
  });

  it('shows the queue and server figures as the sources have them at each scrape', async () => {
    const { state, sources } = fakeSources();
    const metrics = new ControllerMetrics(sources);
    let exposition = await scrape(metrics);
    expect(valueOf(exposition, 'nbdx_ready')).toBe(1);
    expect(valueOf(exposition, 'nbdx_workqueue_depth')).toBe(3);
    expect(valueOf(exposition, 'nbdx_workqueue_delayed')).toBe(2);
    expect(valueOf(exposition, 'nbdx_workqueue_in_flight')).toBe(1);
    expect(valueOf(exposition, 'nbdx_workqueue_longest_running_seconds')).toBe(7.5);
    expect(valueOf(exposition, 'nbdx_workqueue_adds_total')).toBe(40);
    expect(valueOf(exposition, 'nbdx_reconciles_total')).toBe(30);
    expect(valueOf(exposition, 'nbdx_reconcile_retries_total')).toBe(4);
    expect(valueOf(exposition, 'nbdx_reconcile_permanent_failures_total')).toBe(1);
    expect(exposition.types.get('nbdx_reconciles_total')).toBe('counter');
    expect(exposition.types.get('nbdx_workqueue_depth')).toBe('gauge');
    expect(valueOf(exposition, 'nbdx_nbd_server_up')).toBe(1);
    expect(valueOf(exposition, 'nbdx_nbd_server_restarts_total')).toBe(6);
    expect(valueOf(exposition, 'nbdx_nbd_server_start_failing')).toBe(0);
    expect(valueOf(exposition, 'nbdx_nbd_server_loaded_exports')).toBe(2);
    expect(valueOf(exposition, 'nbdx_qemu_storage_daemon_up')).toBe(0);
    expect(valueOf(exposition, 'nbdx_dedicated_qemu_daemons')).toBe(3);
    expect(valueOf(exposition, 'nbdx_dedicated_qemu_daemons_up')).toBe(2);
    expect(valueOf(exposition, 'nbdx_client_firewall_enabled')).toBe(1);
    expect(valueOf(exposition, 'nbdx_owned_exports')).toBe(3);
    expect(samplesOf(exposition, 'nbdx_nbd_server_last_restart_timestamp_seconds')).toEqual([]);

    state.ready = false;
    state.queue = queueFigures({ depth: 0, runsTotal: 31 });
    state.servers = {
      ...state.servers,
      nbdServer: {
        ...state.servers.nbdServer,
        failing: true,
        restarts: 7,
        lastRestartAt: new Date('2026-11-30T10:00:00.500Z'),
      },
    };
    exposition = await scrape(metrics);
    expect(valueOf(exposition, 'nbdx_ready')).toBe(0);
    expect(valueOf(exposition, 'nbdx_workqueue_depth')).toBe(0);
    expect(valueOf(exposition, 'nbdx_reconciles_total')).toBe(31);
    expect(valueOf(exposition, 'nbdx_nbd_server_restarts_total')).toBe(7);
    expect(valueOf(exposition, 'nbdx_nbd_server_start_failing')).toBe(1);
    expect(valueOf(exposition, 'nbdx_nbd_server_last_restart_timestamp_seconds')).toBe(
      Date.parse('2026-11-30T10:00:00.500Z') / 1000,
    );
  });

  it("shows the state directory's condition, one series per condition, and the corrupt files moved aside", async () => {
    const { state, sources } = fakeSources();
    const metrics = new ControllerMetrics(sources);
    let exposition = await scrape(metrics);
    expect(samplesOf(exposition, 'nbdx_state_directory_condition')).toEqual([]);
    expect(valueOf(exposition, 'nbdx_state_files_moved_aside_total')).toBe(0);

    state.servers = { ...state.servers, stateDirectory: { condition: 'full', corruptFilesMovedAside: 2 } };
    exposition = await scrape(metrics);
    const conditions = ['ok', 'missing', 'read_only', 'full', 'error'];
    expect(
      conditions.map((condition) => valueOf(exposition, 'nbdx_state_directory_condition', { condition })),
    ).toEqual([0, 0, 0, 1, 0]);
    expect(valueOf(exposition, 'nbdx_state_files_moved_aside_total')).toBe(2);

    state.servers = { ...state.servers, stateDirectory: { condition: 'ok', corruptFilesMovedAside: 2 } };
    exposition = await scrape(metrics);
    expect(valueOf(exposition, 'nbdx_state_directory_condition', { condition: 'ok' })).toBe(1);
    expect(valueOf(exposition, 'nbdx_state_directory_condition', { condition: 'full' })).toBe(0);
  });

  it("shows qemu-storage-daemon's I/O counters while it runs, and no series while it does not", async () => {
    const { state, sources } = fakeSources();
    const metrics = new ControllerMetrics(sources);
    state.qemuIo = { readBytes: 1000, writtenBytes: 8_520_606, readCalls: 43, writeCalls: 150 };
    let exposition = await scrape(metrics);
    expect(valueOf(exposition, 'nbdx_qemu_storage_daemon_read_bytes_total')).toBe(1000);
    expect(valueOf(exposition, 'nbdx_qemu_storage_daemon_written_bytes_total')).toBe(8_520_606);
    expect(valueOf(exposition, 'nbdx_qemu_storage_daemon_read_syscalls_total')).toBe(43);
    expect(valueOf(exposition, 'nbdx_qemu_storage_daemon_write_syscalls_total')).toBe(150);
    expect(state.qemuIoReads).toBe(1); // one read of /proc for the four counters

    state.qemuIo = undefined;
    exposition = await scrape(metrics);
    expect(
      exposition.samples.filter(
        (s) => s.name.startsWith('nbdx_qemu_storage_daemon_') && s.name !== 'nbdx_qemu_storage_daemon_up',
      ),
    ).toEqual([]);
    expect(exposition.types.get('nbdx_qemu_storage_daemon_written_bytes_total')).toBe('counter');
  });

  it('reads /proc/<pid>/io, and nothing from text that lacks its fields', () => {
    const text =
      'rchar: 8548307\nwchar: 8525726\nsyscr: 643\nsyscw: 790\nread_bytes: 0\nwrite_bytes: 8531968\ncancelled_write_bytes: 0\n';
    expect(parseProcessIo(text)).toEqual({
      readBytes: 8548307,
      writtenBytes: 8525726,
      readCalls: 643,
      writeCalls: 790,
    });
    expect(parseProcessIo('rchar: 1\nwchar: 2\n')).toBeUndefined();
    expect(parseProcessIo('')).toBeUndefined();
  });

  it('answers the rest of /metrics when a source fails, and counts and reports the failure', async () => {
    const { state, sources } = fakeSources();
    const failures: [string, unknown][] = [];
    const metrics = new ControllerMetrics(
      {
        ...sources,
        exports: () => Promise.reject(new Error('query-blockstats: timed out')),
        qemuStorageDaemonIo: () => Promise.reject(new Error('EACCES')),
      },
      { onSourceError: (source, error) => failures.push([source, error]) },
    );
    state.exports = [raw];
    const exposition = await scrape(metrics);
    expect(samplesOf(exposition, 'nbdx_export_connected_clients')).toEqual([]);
    expect(samplesOf(exposition, 'nbdx_qemu_storage_daemon_written_bytes_total')).toEqual([]);
    expect(valueOf(exposition, 'nbdx_metrics_source_errors_total', { source: 'exports' })).toBe(1);
    expect(
      valueOf(exposition, 'nbdx_metrics_source_errors_total', { source: 'qemu_storage_daemon_io' }),
    ).toBe(1);
    expect(valueOf(exposition, 'nbdx_workqueue_depth')).toBe(3);
    expect(failures.map(([source, error]) => [source, (error as Error).message])).toEqual([
      ['exports', 'query-blockstats: timed out'],
      ['qemu_storage_daemon_io', 'EACCES'],
    ]);
  });

  it('histograms reconciles by result and probes by server and result, and counts errors by reason', async () => {
    const metrics = new ControllerMetrics(fakeSources().sources);
    metrics.observeReconcile('success', 0.02);
    metrics.observeReconcile('success', 3);
    metrics.observeReconcile('requeue', 0.2);
    metrics.observeReconcile('error', 0.1, Object.assign(new Error('denied'), { code: 'EACCES' }));
    metrics.observeReconcile('permanent_error', 0.1, new PermanentError('bad spec'));
    metrics.observeProbe('nbd-server', true, 0.004);
    metrics.observeProbe('qemu-storage-daemon', false, 10);
    const exposition = await scrape(metrics);

    expect(exposition.types.get('nbdx_reconcile_duration_seconds')).toBe('histogram');
    expect(valueOf(exposition, 'nbdx_reconcile_duration_seconds_count', { result: 'success' })).toBe(2);
    expect(valueOf(exposition, 'nbdx_reconcile_duration_seconds_sum', { result: 'success' })).toBeCloseTo(
      3.02,
    );
    expect(
      valueOf(exposition, 'nbdx_reconcile_duration_seconds_bucket', { result: 'success', le: '0.025' }),
    ).toBe(1);
    expect(
      valueOf(exposition, 'nbdx_reconcile_duration_seconds_bucket', { result: 'success', le: '+Inf' }),
    ).toBe(2);
    expect(valueOf(exposition, 'nbdx_reconcile_duration_seconds_count', { result: 'requeue' })).toBe(1);
    expect(valueOf(exposition, 'nbdx_reconcile_errors_total', { reason: 'EACCES' })).toBe(1);
    expect(valueOf(exposition, 'nbdx_reconcile_errors_total', { reason: 'PermanentError' })).toBe(1);
    expect(samplesOf(exposition, 'nbdx_reconcile_errors_total')).toHaveLength(2);

    expect(exposition.types.get('nbdx_probe_duration_seconds')).toBe('histogram');
    const okProbes = { server: 'nbd-server', result: 'ok' };
    expect(valueOf(exposition, 'nbdx_probe_duration_seconds_count', okProbes)).toBe(1);
    expect(valueOf(exposition, 'nbdx_probe_duration_seconds_bucket', { ...okProbes, le: '0.005' })).toBe(1);
    const failedProbes = { server: 'qemu-storage-daemon', result: 'failed' };
    expect(valueOf(exposition, 'nbdx_probe_duration_seconds_bucket', { ...failedProbes, le: '5' })).toBe(0);
    expect(valueOf(exposition, 'nbdx_probe_duration_seconds_bucket', { ...failedProbes, le: '10' })).toBe(1);
  });

  it('labels per-export series by resource, export and server, and drops those of exports no longer served', async () => {
    const { state, sources } = fakeSources();
    const metrics = new ControllerMetrics(sources);
    state.exports = [raw, qcow2];
    let exposition = await scrape(metrics);
    expect(samplesOf(exposition, 'nbdx_export_connected_clients')).toEqual([
      {
        name: 'nbdx_export_connected_clients',
        labels: { namespace: 'backups', name: 'scratch', export: 'backups.scratch', server: 'nbd-server' },
        value: 2,
      },
    ]);
    expect(valueOf(exposition, 'nbdx_export_stale_clients', { name: 'scratch' })).toBe(1);
    expect(samplesOf(exposition, 'nbdx_export_stale_clients')).toHaveLength(1);
    expect(samplesOf(exposition, 'nbdx_export_written_highest_offset_bytes')).toEqual([
      {
        name: 'nbdx_export_written_highest_offset_bytes',
        labels: {
          namespace: 'backups',
          name: 'vm-1-incr',
          export: 'backup-1-disk0-incr',
          server: 'qemu-storage-daemon',
        },
        value: 4 << 20,
      },
    ]);
    // Both per-export gauges come from one read of the servers.
    expect(state.exportReads).toBe(1);
    expect(exposition.help.get('nbdx_export_written_highest_offset_bytes')).toMatch(
      /nbd-server 3\.24 keeps no such counts/,
    );

    state.exports = [{ ...qcow2, highestWrittenOffsetBytes: 8 << 20 }];
    exposition = await scrape(metrics);
    expect(samplesOf(exposition, 'nbdx_export_connected_clients')).toEqual([]);
    expect(samplesOf(exposition, 'nbdx_export_stale_clients')).toEqual([]);
    expect(valueOf(exposition, 'nbdx_export_written_highest_offset_bytes', { name: 'vm-1-incr' })).toBe(
      8 << 20,
    );

    state.exports = [];
    exposition = await scrape(metrics);
    expect(samplesOf(exposition, 'nbdx_export_written_highest_offset_bytes')).toEqual([]);
  });

  it('shows the watch and the API writes only in Kubernetes mode', async () => {
    expect(
      (await scrape(new ControllerMetrics(fakeSources().sources))).samples.filter((s) =>
        s.name.startsWith('nbdx_kube_'),
      ),
    ).toEqual([]);

    let figures = kubeFigures();
    const exposition = await scrape(new ControllerMetrics(fakeSources(() => figures).sources));
    expect(valueOf(exposition, 'nbdx_kube_watch_synced')).toBe(1);
    expect(valueOf(exposition, 'nbdx_kube_watch_objects')).toBe(5);
    expect(valueOf(exposition, 'nbdx_kube_watch_seconds_since_last_event')).toBe(42);
    expect(valueOf(exposition, 'nbdx_kube_watch_events_total', { type: 'ADDED' })).toBe(5);
    expect(valueOf(exposition, 'nbdx_kube_watch_events_total', { type: 'MODIFIED' })).toBe(3);
    expect(valueOf(exposition, 'nbdx_kube_watch_events_total', { type: 'DELETED' })).toBe(1);
    expect(valueOf(exposition, 'nbdx_kube_watch_events_total', { type: 'BOOKMARK' })).toBe(6);
    expect(valueOf(exposition, 'nbdx_kube_lists_total')).toBe(2);
    expect(valueOf(exposition, 'nbdx_kube_watch_expired_total')).toBe(1);
    expect(valueOf(exposition, 'nbdx_kube_watch_errors_total')).toBe(2);
    expect(valueOf(exposition, 'nbdx_kube_watch_idle_timeouts_total')).toBe(1);
    expect(valueOf(exposition, 'nbdx_kube_watch_reconnects_total')).toBe(3);
    expect(valueOf(exposition, 'nbdx_kube_resyncs_total')).toBe(8);
    expect(valueOf(exposition, 'nbdx_kube_status_patches_total')).toBe(11);
    expect(valueOf(exposition, 'nbdx_kube_status_patches_skipped_total')).toBe(12);
    expect(valueOf(exposition, 'nbdx_kube_status_patch_failures_total')).toBe(13);
    expect(valueOf(exposition, 'nbdx_kube_finalizer_patches_total')).toBe(14);
    expect(valueOf(exposition, 'nbdx_kube_finalizer_conflicts_total')).toBe(15);
    expect(valueOf(exposition, 'nbdx_kube_finalizer_patch_failures_total')).toBe(16);
    expect(valueOf(exposition, 'nbdx_kube_events_created_total')).toBe(17);
    expect(valueOf(exposition, 'nbdx_kube_events_deduplicated_total')).toBe(18);
    expect(valueOf(exposition, 'nbdx_kube_event_failures_total')).toBe(19);

    figures = kubeFigures({ synced: false, secondsSinceLastReceive: 300 });
    const metrics = new ControllerMetrics(fakeSources(() => figures).sources);
    const later = await scrape(metrics);
    expect(valueOf(later, 'nbdx_kube_watch_synced')).toBe(0);
    expect(valueOf(later, 'nbdx_kube_watch_seconds_since_last_event')).toBe(300);
  });

  it('names every metric of its own nbdx_* with units, and types counters *_total', async () => {
    const metrics = new ControllerMetrics(fakeSources(() => kubeFigures()).sources);
    const exposition = await scrape(metrics);
    const ours = [...exposition.types].filter(([name]) => name.startsWith('nbdx_'));
    expect(ours.length).toBeGreaterThan(35);
    for (const [name, type] of ours) {
      if (type === 'counter') expect(name).toMatch(/_total$/);
      else expect(name).not.toMatch(/_total$/);
      expect(exposition.help.get(name)).not.toBe('');
    }
  });

  it('turns errors into label values of few values', () => {
    expect(errorReason(Object.assign(new Error('x'), { code: 'ENOENT' }))).toBe('ENOENT');
    expect(errorReason(Object.assign(new Error('x'), { name: 'KubeApiError', reason: 'Conflict' }))).toBe(
      'KubeApiError/Conflict',
    );
    expect(errorReason(Object.assign(new Error('x'), { name: 'QmpError' }))).toBe('QmpError');
    expect(errorReason(Object.assign(new Error('x'), { name: 'has spaces and: a message' }))).toBe('Error');
    expect(errorReason(Object.assign(new Error('x'), { code: 'lower-case code' }))).toBe('Error');
    expect(errorReason('a string')).toBe('NonError');
  });
});
