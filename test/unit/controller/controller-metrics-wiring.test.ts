import { pino } from 'pino';
import { afterEach, describe, expect, it, vi } from 'vitest';
import type { NbdExport, NbdExportStatus } from '../../../src/api/types.js';
import { Controller } from '../../../src/controller/controller.js';
import { ControllerMetrics } from '../../../src/controller/metrics/controller-metrics.js';
import type { NodePolicy } from '../../../src/plan/node-policy.js';
import { parseExposition, samplesOf, valueOf } from '../../support/prometheus-text.js';
import { FakeNode, FakeStore } from './fakes.js';

const policy: NodePolicy = {
  nodeName: 'n1',
  allowedRoots: ['/data'],
  allowedDevices: [],
  advertiseHost: '127.0.0.1',
  probeHost: '127.0.0.1',
  nbdServerPort: 10809,
  qemuPort: 10810,
  rawServer: 'nbd-server',
  maxBackingDepth: 16,
  allowRawOverForeignHeader: false,
};
const eventually = { timeout: 15_000, interval: 10 };

function resource(name: string, format: 'qcow2' | 'raw'): NbdExport {
  return {
    apiVersion: 'nbd.dev/v1alpha1',
    kind: 'NbdExport',
    metadata: {
      name,
      namespace: 'ns',
      uid: `uid-${name}`,
      generation: 1,
      creationTimestamp: '2026-11-25T10:00:00Z',
    },
    spec: {
      nodeName: 'n1',
      source: { file: { path: `/data/${name}.img`, format, create: { size: '1Gi' } } },
    },
  };
}

/** A store whose status writes for one key fail like a full disk. */
class FailingStatusStore extends FakeStore {
  override updateStatus(key: string, status: NbdExportStatus): Promise<void> {
    if (key === 'ns/broken')
      return Promise.reject(Object.assign(new Error('no space left on device'), { code: 'ENOSPC' }));
    return super.updateStatus(key, status);
  }
}

let node: FakeNode | undefined;
let controller: Controller | undefined;

afterEach(async () => {
  await controller?.stop();
  await node?.dispose();
});

describe('Controller → metrics', () => {
  it('times every reconcile by result and every probe by server, and counts errors by reason', async () => {
    node = await new FakeNode().init();
    const store = new FailingStatusStore();
    store.put(resource('disk', 'qcow2'));
    store.put(resource('scratch', 'raw'));
    store.put(resource('broken', 'qcow2'));
    const services = node.services();
    const metrics = new ControllerMetrics({
      ready: () => controller?.ready ?? false,
      workQueue: () => controller!.metrics(),
      servers: () => ({
        nbdServer: { running: true, restarts: 0, failing: false, loadedExports: 0, lastRestartAt: null },
        qemuStorageDaemon: { running: true, dedicated: { assigned: 0, running: 0 } },
        ownedExports: 0,
      }),
      exports: () => Promise.resolve([]),
      qemuStorageDaemonIo: () => Promise.resolve(undefined),
    });
    controller = new Controller({ store, services, policy, logger: pino({ level: 'silent' }), metrics });
    await controller.start();

    await vi.waitFor(async () => {
      const exposition = parseExposition(await metrics.render());
      expect(
        valueOf(exposition, 'nbdx_probe_duration_seconds_count', {
          server: 'qemu-storage-daemon',
          result: 'ok',
        }),
      ).toBeGreaterThanOrEqual(2);
      expect(
        valueOf(exposition, 'nbdx_probe_duration_seconds_count', { server: 'nbd-server', result: 'ok' }),
      ).toBeGreaterThanOrEqual(1);
      expect(valueOf(exposition, 'nbdx_reconcile_errors_total', { reason: 'ENOSPC' })).toBeGreaterThanOrEqual(
        1,
      );
      // A served export is looked at again in a minute: its run ends in a requeue, not a bare success.
      expect(
        valueOf(exposition, 'nbdx_reconcile_duration_seconds_count', { result: 'requeue' }),
      ).toBeGreaterThanOrEqual(1);
    }, eventually);
    await controller.stop(); // waits for the runs in flight: nothing changes from here on
    const exposition = parseExposition(await metrics.render());
    const byResult = (result: string) =>
      samplesOf(exposition, 'nbdx_reconcile_duration_seconds_count', { result }).reduce(
        (n, s) => n + s.value,
        0,
      );
    // Every run the queue made was timed once, with one of the results.
    expect(['success', 'requeue', 'error', 'permanent_error'].map(byResult).reduce((a, b) => a + b)).toBe(
      valueOf(exposition, 'nbdx_reconciles_total'),
    );
    expect(byResult('error')).toBe(valueOf(exposition, 'nbdx_reconcile_errors_total', { reason: 'ENOSPC' }));
  });
});
