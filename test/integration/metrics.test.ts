/**
 * /metrics of the real controller on a plain host: real nbd-server and qemu-storage-daemon,
 * data moved with nbdcopy, the exposition scraped over HTTP and parsed back.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HeldTransfer, nbdcopy, requireNbdClients, writeRandomFile } from '../support/nbd.js';
import { waitFor } from '../support/poll.js';
import { parseExposition, samplesOf, valueOf, type Exposition } from '../support/prometheus-text.js';
import { nbdExport, PlainHostNode } from './harness/plain-host-controller.js';

const MiB = 1024 * 1024;

describe('/metrics on a plain host', () => {
  let node: PlainHostNode;
  let contentType: string | null = null;

  async function scrape(): Promise<Exposition> {
    const response = await fetch(`http://127.0.0.1:${node.healthPort}/metrics`, {
      signal: AbortSignal.timeout(30_000),
    });
    expect(response.status).toBe(200);
    contentType = response.headers.get('content-type');
    return parseExposition(await response.text());
  }

  const exportLabels = (name: string) => ({ namespace: 'it', name });

  beforeAll(async () => {
    await requireNbdClients();
    node = await PlainHostNode.create();
    await node.start();
  });

  afterAll(async () => {
    await node?.destroy();
  });

  it('reports per-export figures, histograms, server and process metrics, and drops a deleted export', async () => {
    await node.writeExports('metrics.yaml', [
      nbdExport('disk', {
        source: {
          file: { path: join(node.images, 'disk.qcow2'), format: 'qcow2', create: { size: '32Mi' } },
        },
        deletionPolicy: 'Delete',
      }),
      nbdExport('scratch', {
        source: { file: { path: join(node.images, 'scratch.raw'), format: 'raw', create: { size: '32Mi' } } },
        deletionPolicy: 'Delete',
      }),
    ]);
    const disk = await node.waitForReady('disk');
    const scratch = await node.waitForReady('scratch');
    expect(disk.status?.server).toBe('qemu-storage-daemon');
    expect(scratch.status?.server).toBe('nbd-server');

    // Both exports are listed before any data moves; the qcow2 one has written nothing yet.
    let exposition = await scrape();
    expect(contentType).toMatch(/^text\/plain; version=0\.0\.4/);
    const diskLabels = { ...exportLabels('disk'), export: 'it.disk', server: 'qemu-storage-daemon' };
    const scratchLabels = { ...exportLabels('scratch'), export: 'it.scratch', server: 'nbd-server' };
    expect(valueOf(exposition, 'nbdx_export_written_highest_offset_bytes', diskLabels)).toBe(0);
    expect(valueOf(exposition, 'nbdx_export_connected_clients', scratchLabels)).toBe(0);
    const qemuWrittenBefore = valueOf(exposition, 'nbdx_qemu_storage_daemon_written_bytes_total');

    // 12 MiB written into the qcow2 export from offset 0.
    const payload = join(node.root, 'payload.bin');
    await writeRandomFile(payload, 12 * MiB);
    await nbdcopy(payload, node.uri(disk));
    exposition = await scrape();
    expect(
      valueOf(exposition, 'nbdx_export_written_highest_offset_bytes', diskLabels),
    ).toBeGreaterThanOrEqual(12 * MiB);
    // The daemon's own write counter grew by at least the data (plus qcow2 metadata).
    const qemuWritten =
      valueOf(exposition, 'nbdx_qemu_storage_daemon_written_bytes_total') - qemuWrittenBefore;
    expect(qemuWritten).toBeGreaterThanOrEqual(12 * MiB);

    // A client holds its connection to the raw export: it is counted while connected, then not.
    const transfer = new HeldTransfer(payload, node.uri(scratch), 4 * MiB);
    try {
      await transfer.firstHalfWritten();
      await waitFor(
        'the held client to be counted',
        async () =>
          valueOf(await scrape(), 'nbdx_export_connected_clients', scratchLabels) === 1 ? true : undefined,
        { timeoutMs: 60_000, intervalMs: 200 },
      );
      expect(await transfer.finish()).toMatchObject({ exitCode: 0 });
    } finally {
      transfer.kill();
    }
    await waitFor(
      'the client to be gone from the count',
      async () =>
        valueOf(await scrape(), 'nbdx_export_connected_clients', scratchLabels) === 0 ? true : undefined,
      { timeoutMs: 60_000, intervalMs: 200 },
    );

    exposition = await scrape();
    // Histograms: reconciles by result, probes by server and result.
    expect(exposition.types.get('nbdx_reconcile_duration_seconds')).toBe('histogram');
    const reconciles = samplesOf(exposition, 'nbdx_reconcile_duration_seconds_count');
    expect(reconciles.reduce((sum, s) => sum + s.value, 0)).toBeGreaterThan(0);
    expect(
      valueOf(exposition, 'nbdx_reconcile_duration_seconds_count', { result: 'requeue' }),
    ).toBeGreaterThan(0);
    for (const server of ['nbd-server', 'qemu-storage-daemon']) {
      expect(
        valueOf(exposition, 'nbdx_probe_duration_seconds_count', { server, result: 'ok' }),
      ).toBeGreaterThan(0);
      expect(
        valueOf(exposition, 'nbdx_probe_duration_seconds_sum', { server, result: 'ok' }),
      ).toBeGreaterThan(0);
    }
    // The queue and the servers, as before the move to prom-client.
    expect(valueOf(exposition, 'nbdx_ready')).toBe(1);
    expect(valueOf(exposition, 'nbdx_reconciles_total')).toBeGreaterThanOrEqual(2);
    expect(valueOf(exposition, 'nbdx_nbd_server_up')).toBe(1);
    expect(valueOf(exposition, 'nbdx_nbd_server_restarts_total')).toBeGreaterThanOrEqual(1);
    expect(valueOf(exposition, 'nbdx_nbd_server_loaded_exports')).toBe(1);
    expect(valueOf(exposition, 'nbdx_nbd_server_last_restart_timestamp_seconds')).toBeGreaterThan(
      valueOf(exposition, 'process_start_time_seconds') - 1,
    );
    expect(valueOf(exposition, 'nbdx_export_stale_clients', scratchLabels)).toBe(0);
    expect(valueOf(exposition, 'nbdx_qemu_storage_daemon_up')).toBe(1);
    expect(valueOf(exposition, 'nbdx_owned_exports')).toBe(2);
    // The Node process and runtime.
    expect(valueOf(exposition, 'process_cpu_seconds_total')).toBeGreaterThan(0);
    expect(valueOf(exposition, 'process_resident_memory_bytes')).toBeGreaterThan(0);
    expect(valueOf(exposition, 'nodejs_heap_size_used_bytes')).toBeGreaterThan(0);
    // No kube figures on a plain host.
    expect(exposition.samples.filter((s) => s.name.startsWith('nbdx_kube_'))).toEqual([]);

    // Deleted: their series go.
    await node.removeExports('metrics.yaml');
    await node.waitForGone('disk');
    await node.waitForGone('scratch');
    await waitFor(
      'the deleted exports to leave /metrics',
      async () => {
        const after = await scrape();
        const left = after.samples.filter((s) => s.name.startsWith('nbdx_export_'));
        return left.length === 0 && valueOf(after, 'nbdx_owned_exports') === 0 ? true : undefined;
      },
      { timeoutMs: 60_000, intervalMs: 200 },
    );
  });
});
