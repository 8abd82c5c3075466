import { pino } from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { FINALIZER, type NbdExport } from '../../../src/api/types.js';
import { Reconciler } from '../../../src/controller/reconciler.js';
import { PermanentError } from '../../../src/controller/work-queue.js';
import type { NodePolicy } from '../../../src/plan/node-policy.js';
import { FakeNode, FakeStore } from './fakes.js';
import { ManualClock } from '../../support/manual-clock.js';

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
const GiB = 1024 ** 3;

function resource(
  name: string,
  spec: Partial<NbdExport['spec']> = {},
  created = '2026-11-25T10:00:00Z',
): NbdExport {
  return {
    apiVersion: 'nbd.dev/v1alpha1',
    kind: 'NbdExport',
    metadata: { name, namespace: 'ns', uid: `uid-${name}`, generation: 1, creationTimestamp: created },
    spec: {
      nodeName: 'n1',
      source: { file: { path: `/data/${name}.qcow2`, format: 'qcow2', create: { size: '1Gi' } } },
      ...spec,
    },
  };
}

/** What `kubectl delete` does to an object that has a finalizer. */
function markDeleted(store: FakeStore, key: string): void {
  const deleting = structuredClone(store.get(key));
  if (!deleting) throw new Error(`${key} is not in the store`);
  deleting.metadata.deletionTimestamp = '2026-11-25T11:00:00Z';
  store.put(deleting);
}

const condition = (store: FakeStore, key: string, type = 'Ready') =>
  store.get(key)?.status?.conditions?.find((c) => c.type === type);

describe('Reconciler (fakes at the node boundary)', () => {
  let store: FakeStore;
  let node: FakeNode;
  let reconciler: Reconciler;
  let clock: ManualClock;

  afterEach(async () => {
    await node.dispose();
  });

  beforeEach(async () => {
    store = new FakeStore();
    node = await new FakeNode().init();
    clock = new ManualClock(new Date('2026-11-25T10:00:00Z'));
    reconciler = new Reconciler({
      store,
      services: node.services(),
      policy,
      logger: pino({ level: 'silent' }),
      clock,
    });
  });

  it('converges a new qcow2 export in one run: finalizer, image, export, probe, Ready', async () => {
    store.put(resource('a'));
    expect(await reconciler.reconcile('ns/a')).toEqual({ requeueAfterMs: 60_000 });
    const object = store.get('ns/a');
    expect(object?.metadata.finalizers).toEqual([FINALIZER]);
    expect(node.created).toEqual([{ path: '/data/a.qcow2', format: 'qcow2', sizeBytes: GiB }]);
    expect(node.qemuServed.has('ns.a')).toBe(true);
    expect(condition(store, 'ns/a')).toMatchObject({
      status: 'True',
      reason: 'Served',
      observedGeneration: 1,
    });
    expect(object?.status).toMatchObject({
      observedGeneration: 1,
      uri: 'nbd://127.0.0.1:10810/ns.a',
      server: 'qemu-storage-daemon',
      virtualSize: GiB,
    });
    expect(node.ledger.get('uid-a')).toMatchObject({
      exportName: 'ns.a',
      createdImage: { path: '/data/a.qcow2' },
    });
    expect(store.events.map((e) => e.reason)).toEqual(['ImageCreated', 'Served']);
  });

  it('is idempotent: a second run changes nothing and writes no status', async () => {
    store.put(resource('a'));
    await reconciler.reconcile('ns/a');
    const writes = store.statusWrites;
    const created = node.created.length;
    await reconciler.reconcile('ns/a');
    expect(store.statusWrites).toBe(writes);
    expect(node.created.length).toBe(created);
  });

  it('raw exports go to nbd-server and become Ready after the coalesced restart', async () => {
    store.put(
      resource('r', { source: { file: { path: '/data/r.raw', format: 'raw', create: { size: '1Gi' } } } }),
    );
    await reconciler.reconcile('ns/r');
    // The restart is requested, not awaited; the run reports the wait.
    await Promise.resolve();
    expect(node.nbdApplies).toBe(1);
    await reconciler.reconcile('ns/r');
    expect(condition(store, 'ns/r')).toMatchObject({ status: 'True', reason: 'Served' });
    expect(store.get('ns/r')?.status?.uri).toBe('nbd://127.0.0.1:10809/ns.r');
  });

  it('a foreign lock becomes ImageInUse, with nothing served', async () => {
    node.files.set('/data/l.qcow2', { format: 'qcow2', virtualSize: GiB, actualSize: 1, backingChain: [] });
    node.locks.set('/data/l.qcow2', 'Failed to get "write" lock');
    store.put(resource('l'));
    const result = await reconciler.reconcile('ns/l');
    expect(condition(store, 'ns/l')).toMatchObject({ status: 'False', reason: 'ImageInUse' });
    expect(condition(store, 'ns/l')?.message).toContain('Failed to get "write" lock');
    expect(node.qemuServed.size).toBe(0);
    expect(result.requeueAfterMs).toBeGreaterThan(0);
  });

  it('the older resource keeps an export name; the newer gets ExportNameConflict and touches nothing', async () => {
    store.put(resource('old', { exportName: 'shared' }, '2026-11-25T09:00:00Z'));
    store.put(resource('new', { exportName: 'shared' }, '2026-11-25T10:00:00Z'));
    await reconciler.reconcile('ns/new');
    expect(condition(store, 'ns/new')).toMatchObject({ status: 'False', reason: 'ExportNameConflict' });
    expect(node.created).toEqual([]);
    await reconciler.reconcile('ns/old');
    expect(condition(store, 'ns/old')?.status).toBe('True');
  });

  it('an invalid spec is reported with its field and nothing happens on the node', async () => {
    store.put(resource('bad', { exportName: 'x]\n[generic' }));
    await reconciler.reconcile('ns/bad');
    expect(condition(store, 'ns/bad')).toMatchObject({ status: 'False', reason: 'InvalidSpec' });
    expect(condition(store, 'ns/bad')?.message).toMatch(/spec\.exportName/);
    expect(store.get('ns/bad')?.metadata.finalizers).toBeUndefined();
    expect(node.created).toEqual([]);
  });

  it('a spec change is applied and observedGeneration follows', async () => {
    store.put(resource('a'));
    await reconciler.reconcile('ns/a');
    const changed = structuredClone(store.get('ns/a')!);
    changed.spec.readOnly = true;
    changed.metadata.generation = 2;
    store.put(changed);
    await reconciler.reconcile('ns/a');
    expect(node.qemuServed.get('ns.a')?.readOnly).toBe(true);
    expect(store.get('ns/a')?.status?.observedGeneration).toBe(2);
    expect(condition(store, 'ns/a')).toMatchObject({ status: 'True', observedGeneration: 2 });
  });

  it('a change waits while a client is connected, and says so', async () => {
    store.put(resource('a'));
    await reconciler.reconcile('ns/a');
    node.busy.add('ns.a');
    const changed = structuredClone(store.get('ns/a')!);
    changed.spec.readOnly = true;
    changed.metadata.generation = 2;
    store.put(changed);
    const result = await reconciler.reconcile('ns/a');
    expect(condition(store, 'ns/a')).toMatchObject({ status: 'False', reason: 'RestartPending' });
    expect(node.qemuServed.get('ns.a')?.readOnly).toBe(false);
    expect(result.requeueAfterMs).toBeGreaterThan(0);
  });

  it('deletion with Delete removes the export, the created file, the ledger entry and the finalizer', async () => {
    store.put(resource('a', { deletionPolicy: 'Delete' }));
    await reconciler.reconcile('ns/a');
    markDeleted(store, 'ns/a');
    await reconciler.reconcile('ns/a');
    expect(store.get('ns/a')).toBeUndefined();
    expect(node.qemuServed.size).toBe(0);
    expect(node.files.has('/data/a.qcow2')).toBe(false);
    expect(node.ledger.get('uid-a')).toBeUndefined();
  });

  it('deletion with Retain keeps the file', async () => {
    store.put(resource('a'));
    await reconciler.reconcile('ns/a');
    markDeleted(store, 'ns/a');
    await reconciler.reconcile('ns/a');
    expect(store.get('ns/a')).toBeUndefined();
    expect(node.files.has('/data/a.qcow2')).toBe(true);
  });

  it('never deletes a file it did not create', async () => {
    node.files.set('/data/mine.qcow2', {
      format: 'qcow2',
      virtualSize: GiB,
      actualSize: 1,
      backingChain: [],
    });
    store.put(resource('mine', { deletionPolicy: 'Delete' }));
    await reconciler.reconcile('ns/mine');
    expect(condition(store, 'ns/mine')?.status).toBe('True');
    markDeleted(store, 'ns/mine');
    await reconciler.reconcile('ns/mine');
    expect(store.get('ns/mine')).toBeUndefined();
    expect(node.files.has('/data/mine.qcow2')).toBe(true);
  });

  it('a failed action reaches status with its reason and cause, and the run fails so the queue backs off', async () => {
    node.createFailure = new Error('qemu-img: No space left on device');
    store.put(resource('a'));
    const error = await reconciler.reconcile('ns/a').catch((e: unknown) => e);
    expect(error).toBeInstanceOf(Error);
    expect(error).not.toBeInstanceOf(PermanentError);
    expect(condition(store, 'ns/a')).toMatchObject({
      status: 'False',
      reason: 'ImageCreateFailed',
      message: expect.stringContaining('No space left on device') as unknown,
    });
    expect(store.events.map((e) => e.reason)).toContain('Failed');
    // Nothing is left claiming the image: a later success creates and records it afresh.
    expect(node.ledger.get('uid-a')?.createdImage).toBeUndefined();
    node.createFailure = undefined;
    expect(await reconciler.reconcile('ns/a')).toEqual({ requeueAfterMs: 60_000 });
    expect(condition(store, 'ns/a')).toMatchObject({ status: 'True', reason: 'Served' });
  });

  it('a failure retrying cannot fix is permanent: the queue stops retrying', async () => {
    node.createFailure = new TypeError('backing file has format "vmdk", expected qcow2 or raw');
    store.put(resource('a'));
    await expect(reconciler.reconcile('ns/a')).rejects.toBeInstanceOf(PermanentError);
    expect(condition(store, 'ns/a')).toMatchObject({ reason: 'ImageCreateFailed' });
  });

  it('trusts a handshake for a minute by the injected clock, then probes again', async () => {
    store.put(resource('a'));
    await reconciler.reconcile('ns/a');
    const probes = node.probes;
    await clock.advance(59_000);
    await reconciler.reconcile('ns/a');
    expect(node.probes).toBe(probes);
    await clock.advance(1_000);
    await reconciler.reconcile('ns/a');
    expect(node.probes).toBe(probes + 1);
    expect(condition(store, 'ns/a')).toMatchObject({ status: 'True' });
  });

  it('an incremental on a backing file another resource exports read-write names that resource', async () => {
    store.put(resource('full'));
    await reconciler.reconcile('ns/full');
    store.put(
      resource(
        'incr',
        {
          source: {
            file: { path: '/data/incr.qcow2', format: 'qcow2', create: { backingFile: '/data/full.qcow2' } },
          },
        },
        '2026-11-25T10:01:00Z',
      ),
    );
    await reconciler.reconcile('ns/incr');
    expect(condition(store, 'ns/incr')).toMatchObject({
      status: 'False',
      reason: 'ImageInUse',
      message: expect.stringMatching(/exported read-write by ns\/full.*readOnly: true/) as unknown,
    });
    expect(node.created.map((c) => c.path)).not.toContain('/data/incr.qcow2');

    // Sealed: the incremental follows.
    const sealed = structuredClone(store.get('ns/full')!);
    sealed.spec.readOnly = true;
    sealed.metadata.generation = 2;
    store.put(sealed);
    await reconciler.reconcile('ns/full');
    await reconciler.reconcile('ns/incr');
    expect(condition(store, 'ns/incr')).toMatchObject({ status: 'True' });
  });
});
