import { Writable } from 'node:stream';
import { pino } from 'pino';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { FINALIZER, type NbdExport, type NbdExportStatus } from '../../../src/api/types.js';
import { KubeClient } from '../../../src/kube/kube-client.js';
import { KubeExportStore, jsonEqual } from '../../../src/kube/kube-export-store.js';
import { FakeApiServer, makeExport } from './fake-apiserver.js';

const eventually = { timeout: 15_000, interval: 10 };

let server: FakeApiServer;
let store: KubeExportStore | undefined;

afterEach(async () => {
  await store?.stop();
  store = undefined;
  await server.close();
});

function capturingLogger() {
  const lines: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      for (const line of chunk.toString().split('\n')) {
        if (line !== '') lines.push(JSON.parse(line) as Record<string, unknown>);
      }
      done();
    },
  });
  return { logger: pino({ level: 'debug' }, sink), lines };
}

async function startStore(objects: NbdExport[], now?: () => number) {
  server = await new FakeApiServer().start();
  for (const object of objects) server.put(object);
  const { logger, lines } = capturingLogger();
  store = new KubeExportStore({
    transport: new KubeClient(server.kubeConfig()),
    nodeName: 'node-a',
    logger,
    watch: { backoff: { baseMs: 10, maxMs: 100 }, resyncPeriodMs: 0 },
    ...(now !== undefined && { now }),
  });
  await store.start();
  return { store, lines };
}

const ready: NbdExportStatus = {
  observedGeneration: 1,
  exportName: 'a',
  conditions: [
    {
      type: 'Ready',
      status: 'True',
      reason: 'Exported',
      message: 'served',
      lastTransitionTime: '2026-11-25T10:00:00Z',
    },
  ],
};

describe('KubeExportStore', { timeout: 30_000 }, () => {
  it('serves the NbdExports of its node only, and reports changes', async () => {
    const { store } = await startStore([makeExport('ns', 'a'), makeExport('ns', 'b', 'node-b')]);
    expect(store.synced).toBe(true);
    expect(store.list().map((o) => o.metadata.name)).toEqual(['a']);
    expect(store.get('ns/a')?.spec.nodeName).toBe('node-a');
    const seen: string[] = [];
    store.onChange((key) => seen.push(key));
    server.put(makeExport('ns', 'c'));
    await vi.waitFor(() => expect(seen).toContain('ns/c'), eventually);
    expect(server.lists()[0]?.query.get('fieldSelector')).toBe('spec.nodeName=node-a');
  });

  it('writes status with a merge patch on /status, removing fields no longer set', async () => {
    const withStatus = makeExport('ns', 'a');
    withStatus.status = { ...ready, uri: 'nbd://old' };
    const { store } = await startStore([withStatus]);
    const next: NbdExportStatus = { ...ready, observedGeneration: 2 };
    await store.updateStatus('ns/a', next);

    const patches = server.requestsOf('PATCH');
    expect(patches).toHaveLength(1);
    expect(patches[0]?.path).toBe('/apis/nbd.dev/v1alpha1/namespaces/ns/nbdexports/a/status');
    expect(patches[0]?.contentType).toBe('application/merge-patch+json');
    expect(patches[0]?.body).toEqual({ status: { ...next, uri: null } });
    expect(server.objects.get('ns/a')?.status).toEqual(next);
  });

  it.each([
    { name: 'equal', stored: ready, written: ready, patches: 0 },
    {
      name: 'equal, keys in another order and undefined fields',
      stored: ready,
      written: { conditions: ready.conditions, exportName: 'a', observedGeneration: 1, uri: undefined },
      patches: 0,
    },
    { name: 'a changed field', stored: ready, written: { ...ready, exportName: 'b' }, patches: 1 },
    {
      name: 'a changed lastTransitionTime',
      stored: ready,
      written: {
        ...ready,
        conditions: [{ ...ready.conditions![0]!, lastTransitionTime: '2026-11-25T11:00:00Z' }],
      },
      patches: 1,
    },
    { name: 'no status stored yet', stored: undefined, written: ready, patches: 1 },
    { name: 'empty written over none', stored: undefined, written: {}, patches: 0 },
  ])('status write when $name: $patches patch(es)', async ({ stored, written, patches }) => {
    const object = makeExport('ns', 'a');
    if (stored !== undefined) object.status = stored;
    const { store } = await startStore([object]);
    await store.updateStatus('ns/a', written as NbdExportStatus);
    expect(server.requestsOf('PATCH')).toHaveLength(patches);
    expect(store.metrics().statusPatchesSkippedTotal).toBe(1 - patches);
  });

  it('skips the status of a resource not in the cache, and one that vanished', async () => {
    const { store } = await startStore([makeExport('ns', 'a')]);
    await store.updateStatus('ns/missing', ready);
    expect(server.requestsOf('PATCH')).toHaveLength(0);
    server.objects.delete('ns/a'); // gone, and the watch has not said so yet
    await expect(store.updateStatus('ns/a', ready)).resolves.toBeUndefined();
  });

  it('adds the finalizer with the cached resourceVersion as precondition', async () => {
    const { store } = await startStore([makeExport('ns', 'a')]);
    const rv = store.get('ns/a')?.metadata.resourceVersion;
    await store.addFinalizer('ns/a');
    expect(server.objects.get('ns/a')?.metadata.finalizers).toEqual([FINALIZER]);
    const patch = server.requestsOf('PATCH')[0];
    expect(patch?.path).toBe('/apis/nbd.dev/v1alpha1/namespaces/ns/nbdexports/a');
    expect(patch?.contentType).toBe('application/merge-patch+json');
    expect(patch?.body).toEqual({ metadata: { resourceVersion: rv, finalizers: [FINALIZER] } });
  });

  it('adds no finalizer to a resource being deleted', async () => {
    const object = makeExport('ns', 'a');
    object.metadata.deletionTimestamp = '2026-11-25T10:00:00Z';
    object.metadata.finalizers = ['someone.else/keep'];
    const { store } = await startStore([object]);
    await store.addFinalizer('ns/a');
    expect(server.requestsOf('PATCH')).toHaveLength(0);
  });

  it('retries a finalizer patch that meets 409 Conflict with a fresh read', async () => {
    const object = makeExport('ns', 'a');
    object.metadata.finalizers = ['someone.else/keep'];
    const { store } = await startStore([object]);
    server.conflictPatches = 2;
    await store.addFinalizer('ns/a');
    expect(server.objects.get('ns/a')?.metadata.finalizers).toEqual(['someone.else/keep', FINALIZER]);
    expect(server.objects.get('ns/a')?.metadata.labels).toEqual({ touched: 'yes' }); // the other writer's change stays
    expect(server.requestsOf('PATCH')).toHaveLength(3);
    expect(server.requestsOf('GET', (r) => r.path.endsWith('/nbdexports/a'))).toHaveLength(2);
    expect(store.metrics().finalizerConflictsTotal).toBe(2);
  });

  it('gives up after the configured conflicts, with a retryable error', async () => {
    const { store } = await startStore([makeExport('ns', 'a')]);
    server.conflictPatches = 100;
    await expect(store.addFinalizer('ns/a')).rejects.toMatchObject({ statusCode: 409, retryable: true });
    expect(server.requestsOf('PATCH')).toHaveLength(5);
  });

  it('counts finalizer patches that fail for good, and status patches that fail', async () => {
    const { store } = await startStore([makeExport('ns', 'a')]);
    server.conflictPatches = 100;
    await expect(store.addFinalizer('ns/a')).rejects.toMatchObject({ statusCode: 409 });
    expect(store.metrics()).toMatchObject({ finalizerConflictsTotal: 4, finalizerPatchFailuresTotal: 1 });
    server.conflictPatches = 0;
    await store.addFinalizer('ns/a');
    // A success after conflicts (the cache may still hold the old resourceVersion) is no failure.
    expect(server.objects.get('ns/a')?.metadata.finalizers).toEqual([FINALIZER]);
    expect(store.metrics().finalizerPatchFailuresTotal).toBe(1);

    const ready: NbdExportStatus = { exportName: 'ns.a' };
    await server.close(); // the API server is gone: the status patch cannot complete
    await expect(store.updateStatus('ns/a', ready)).rejects.toThrow();
    expect(store.metrics()).toMatchObject({ statusPatchesTotal: 1, statusPatchFailuresTotal: 1 });
  });

  it('removes only its own finalizer, and does nothing when there is nothing to do', async () => {
    const object = makeExport('ns', 'a');
    object.metadata.finalizers = ['someone.else/keep', FINALIZER];
    const { store } = await startStore([object, makeExport('ns', 'plain')]);
    await store.removeFinalizer('ns/a');
    expect(server.objects.get('ns/a')?.metadata.finalizers).toEqual(['someone.else/keep']);
    await store.removeFinalizer('ns/plain');
    await vi.waitFor(
      () => expect(store.get('ns/a')?.metadata.finalizers).toEqual(['someone.else/keep']),
      eventually,
    );
    await store.removeFinalizer('ns/a');
    await store.removeFinalizer('ns/never-existed');
    expect(server.requestsOf('PATCH')).toHaveLength(1);
  });

  it('creates an events.k8s.io/v1 Event about the resource', async () => {
    const { store } = await startStore([makeExport('ns', 'a')], () => Date.parse('2026-11-25T10:00:00.123Z'));
    await store.recordEvent('ns/a', { type: 'Warning', reason: 'ImageInUse', message: 'locked by pid 7' });
    expect(server.requestsOf('POST')[0]?.path).toBe('/apis/events.k8s.io/v1/namespaces/ns/events');
    expect(server.events).toEqual([
      {
        apiVersion: 'events.k8s.io/v1',
        kind: 'Event',
        metadata: { name: expect.stringMatching(/^a\.[0-9a-f]+$/) as unknown, namespace: 'ns' },
        eventTime: '2026-11-25T10:00:00.123000Z',
        reportingController: 'nbd.dev/nbd-export-controller',
        reportingInstance: 'node-a',
        action: 'Reconcile',
        reason: 'ImageInUse',
        note: 'locked by pid 7',
        type: 'Warning',
        regarding: {
          apiVersion: 'nbd.dev/v1alpha1',
          kind: 'NbdExport',
          namespace: 'ns',
          name: 'a',
          uid: 'uid-ns-a',
          resourceVersion: store.get('ns/a')?.metadata.resourceVersion,
        },
      },
    ]);
  });

  it('drops a repeat of the same event within the window', async () => {
    let now = Date.parse('2026-11-25T10:00:00Z');
    const { store } = await startStore([makeExport('ns', 'a')], () => now);
    const event = { type: 'Normal', reason: 'Exported', message: 'served' } as const;
    await store.recordEvent('ns/a', event);
    now += 9 * 60_000;
    await store.recordEvent('ns/a', event);
    await store.recordEvent('ns/a', { ...event, message: 'served again' });
    now += 60_000;
    await store.recordEvent('ns/a', event);
    expect(server.events).toHaveLength(3);
    expect(store.metrics()).toMatchObject({ eventsCreatedTotal: 3, eventsDedupedTotal: 1 });
  });

  it('logs a failed event with the key, never throws, and lets the next one through', async () => {
    const { store, lines } = await startStore([makeExport('ns', 'a')]);
    server.eventStatus = 403;
    const event = { type: 'Normal', reason: 'Exported', message: 'served' } as const;
    await expect(store.recordEvent('ns/a', event)).resolves.toBeUndefined();
    expect(lines.find((l) => l.msg === 'event not recorded')).toMatchObject({ key: 'ns/a', level: 40 });
    server.eventStatus = undefined;
    await store.recordEvent('ns/a', event);
    expect(server.events).toHaveLength(1);
    expect(store.metrics().eventsFailedTotal).toBe(1);
  });

  it('rejects a node name that would break the field selector', () => {
    server = new FakeApiServer();
    expect(
      () =>
        new KubeExportStore({
          transport: {
            request: () => Promise.reject(new Error('x')),
            stream: () => Promise.reject(new Error('x')),
          },
          nodeName: 'a,b',
          logger: pino({ level: 'silent' }),
        }),
    ).toThrow(TypeError);
  });
});

describe('jsonEqual', () => {
  it.each([
    { a: { x: 1, y: [1, 2] }, b: { y: [1, 2], x: 1 }, equal: true },
    { a: { x: 1, z: undefined }, b: { x: 1 }, equal: true },
    { a: [1, 2], b: [2, 1], equal: false },
    { a: { x: { y: 1 } }, b: { x: { y: 2 } }, equal: false },
    { a: { x: 1 }, b: { x: 1, y: 2 }, equal: false },
    { a: null, b: {}, equal: false },
    { a: [], b: {}, equal: false },
  ])('$a vs $b → $equal', ({ a, b, equal }) => {
    expect(jsonEqual(a, b)).toBe(equal);
  });
});
