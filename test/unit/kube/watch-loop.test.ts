import { pino } from 'pino';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { keyOf, type NbdExport } from '../../../src/api/types.js';
import { KubeClient } from '../../../src/kube/kube-client.js';
import { WatchLoop, reconnectDelay, type WatchLoopOptions } from '../../../src/kube/watch-loop.js';
import { FakeApiServer, makeExport } from './fake-apiserver.js';
import { ManualClock } from '../../support/manual-clock.js';

// Real sockets on loopback, small intervals, and assertions that wait generously for what
// must eventually happen; nothing asserts on speed.
const eventually = { timeout: 15_000, interval: 10 };
const logger = pino({ level: process.env.TEST_LOG_LEVEL ?? 'silent' });

let server: FakeApiServer;
let loop: WatchLoop<NbdExport> | undefined;

afterEach(async () => {
  await loop?.stop();
  loop = undefined;
  await server.close();
});

async function startLoop(
  options: Partial<WatchLoopOptions<NbdExport>> = {},
): Promise<{ loop: WatchLoop<NbdExport>; seen: string[] }> {
  const seen: string[] = [];
  loop = new WatchLoop<NbdExport>({
    transport: new KubeClient(server.kubeConfig()),
    path: '/apis/nbd.dev/v1alpha1/nbdexports',
    keyOf: (o) => keyOf(o.metadata),
    logger,
    fieldSelector: 'spec.nodeName=node-a',
    pageSize: 2,
    watchTimeoutSeconds: { min: 240, max: 360 },
    idleTimeoutMs: 30_000,
    resyncPeriodMs: 0,
    backoff: { baseMs: 10, maxMs: 100, healthyAfterMs: 60_000 },
    ...options,
  });
  loop.onChange((key) => seen.push(key));
  await loop.start();
  return { loop, seen };
}

describe('WatchLoop', { timeout: 30_000 }, () => {
  it('lists in pages with the field selector, then watches from the list with bookmarks', async () => {
    server = await new FakeApiServer().start();
    for (const name of ['a', 'b', 'c', 'd', 'e']) server.put(makeExport('ns', name));
    server.put(makeExport('ns', 'elsewhere', 'node-b'));
    const { loop, seen } = await startLoop();

    expect(loop.synced).toBe(true);
    expect(loop.keys().sort()).toEqual(['ns/a', 'ns/b', 'ns/c', 'ns/d', 'ns/e']);
    expect(seen.sort()).toEqual(['ns/a', 'ns/b', 'ns/c', 'ns/d', 'ns/e']);
    const lists = server.lists();
    expect(lists.map((r) => r.query.get('continue'))).toEqual([null, '2', '4']);
    expect(lists.every((r) => r.query.get('fieldSelector') === 'spec.nodeName=node-a')).toBe(true);
    expect(lists.every((r) => r.query.get('limit') === '2')).toBe(true);

    await vi.waitFor(() => expect(server.watches.size).toBe(1), eventually);
    const watch = server.watchRequests()[0]?.query;
    expect(watch?.get('allowWatchBookmarks')).toBe('true');
    expect(watch?.get('resourceVersion')).toBe(server.resourceVersion);
    expect(watch?.get('fieldSelector')).toBe('spec.nodeName=node-a');
    const timeout = Number(watch?.get('timeoutSeconds'));
    expect(timeout).toBeGreaterThanOrEqual(240);
    expect(timeout).toBeLessThanOrEqual(360);
  });

  it('applies ADDED, MODIFIED and DELETED to the cache and tells listeners the key', async () => {
    server = await new FakeApiServer().start();
    server.put(makeExport('ns', 'a'));
    const { loop, seen } = await startLoop();
    await vi.waitFor(() => expect(server.watches.size).toBe(1), eventually);
    seen.length = 0;

    server.put(makeExport('ns', 'b'));
    await vi.waitFor(() => expect(loop.get('ns/b')).toBeDefined(), eventually);
    const changed = makeExport('ns', 'a');
    changed.spec.readOnly = true;
    server.put(changed);
    await vi.waitFor(() => expect(loop.get('ns/a')?.spec.readOnly).toBe(true), eventually);
    server.remove('ns/b');
    await vi.waitFor(() => expect(loop.get('ns/b')).toBeUndefined(), eventually);
    server.put(makeExport('ns', 'other', 'node-b'));
    server.put(makeExport('ns', 'c'));
    await vi.waitFor(() => expect(loop.get('ns/c')).toBeDefined(), eventually);

    expect(seen).toEqual(['ns/b', 'ns/a', 'ns/b', 'ns/c']);
    expect(loop.resourceVersion).toBe(server.resourceVersion);
    expect(loop.metrics()).toMatchObject({ listsTotal: 1, watchEventsTotal: 4, objects: 2 });
  });

  it('takes the resourceVersion of a bookmark, and resumes from it after the stream ends', async () => {
    server = await new FakeApiServer().start();
    server.put(makeExport('ns', 'a'));
    const { loop, seen } = await startLoop();
    await vi.waitFor(() => expect(server.watches.size).toBe(1), eventually);
    seen.length = 0;

    const rv = server.bumpResourceVersion();
    server.bookmark();
    await vi.waitFor(() => expect(loop.resourceVersion).toBe(rv), eventually);
    expect(seen).toEqual([]);

    server.closeWatches();
    await vi.waitFor(() => expect(server.watchRequests()).toHaveLength(2), eventually);
    expect(server.watchRequests()[1]?.query.get('resourceVersion')).toBe(rv);
    expect(server.lists()).toHaveLength(1); // reconnect, no relist
    expect(loop.metrics().bookmarksTotal).toBe(1);
  });

  it('reconnects with backoff through an outage and keeps serving its cache meanwhile', async () => {
    server = await new FakeApiServer().start();
    server.put(makeExport('ns', 'a'));
    const { loop } = await startLoop();
    await vi.waitFor(() => expect(server.watches.size).toBe(1), eventually);

    server.unavailable = true;
    server.closeWatches();
    await vi.waitFor(() => expect(server.watchRequests().length).toBeGreaterThanOrEqual(4), eventually);
    expect(loop.keys()).toEqual(['ns/a']);
    // The server records a request before the client has handled its failure: wait for the count.
    await vi.waitFor(() => expect(loop.metrics().watchErrorsTotal).toBeGreaterThanOrEqual(3), eventually);

    server.unavailable = false;
    await vi.waitFor(() => expect(server.watches.size).toBe(1), eventually);
    server.put(makeExport('ns', 'b'));
    await vi.waitFor(() => expect(loop.get('ns/b')).toBeDefined(), eventually);
    expect(server.lists()).toHaveLength(1);
  });

  it.each(['event', 'http'] as const)(
    'relists on 410 Gone (as %s) and tells listeners about keys changed or deleted meanwhile',
    async (goneAs) => {
      server = await new FakeApiServer().start();
      server.goneAs = goneAs;
      for (const name of ['keep', 'change', 'delete']) server.put(makeExport('ns', name));
      const { loop, seen } = await startLoop();
      await vi.waitFor(() => expect(server.watches.size).toBe(1), eventually);

      // Changes while we are not watching, then the server forgets the history.
      server.unavailable = true;
      server.closeWatches();
      await vi.waitFor(() => expect(server.watchRequests().length).toBeGreaterThanOrEqual(2), eventually);
      seen.length = 0;
      const changed = makeExport('ns', 'change');
      changed.spec.readOnly = true;
      server.put(changed);
      server.remove('ns/delete');
      server.put(makeExport('ns', 'new'));
      server.compact();
      server.unavailable = false;

      await vi.waitFor(() => expect(loop.get('ns/new')).toBeDefined(), eventually);
      expect(loop.get('ns/delete')).toBeUndefined();
      expect(loop.get('ns/change')?.spec.readOnly).toBe(true);
      expect(seen.sort()).toEqual(['ns/change', 'ns/delete', 'ns/new']);
      expect(server.lists().length).toBeGreaterThanOrEqual(3); // two pages first, then the relist
      expect(loop.metrics().expiredTotal).toBeGreaterThanOrEqual(1);
    },
  );

  it('after an outage, the first 410 relists at once instead of waiting out the backoff', async () => {
    server = await new FakeApiServer().start();
    server.put(makeExport('ns', 'a'));
    const lines: { msg?: string; outcome?: string }[] = [];
    const recording = pino(
      { level: 'info' },
      { write: (line: string) => void lines.push(JSON.parse(line) as never) },
    );
    const { loop } = await startLoop({ logger: recording });
    await vi.waitFor(() => expect(server.watches.size).toBe(1), eventually);

    // Several failures build up a backoff; meanwhile the server forgets the history.
    server.unavailable = true;
    server.closeWatches();
    await vi.waitFor(() => expect(server.watchRequests().length).toBeGreaterThanOrEqual(4), eventually);
    server.put(makeExport('ns', 'b'));
    server.compact();
    server.unavailable = false;

    await vi.waitFor(() => expect(loop.get('ns/b')).toBeDefined(), eventually);
    expect(loop.metrics().expiredTotal).toBe(1);
    const expired = lines.findIndex((l) => l.msg === 'resourceVersion expired; listing again');
    expect(expired).toBeGreaterThanOrEqual(0);
    expect(lines.slice(expired).filter((l) => l.msg === 'reconnecting watch after backoff')).toEqual([]);
  });

  it('relists when a running watch gets an ERROR event with code 410', async () => {
    server = await new FakeApiServer().start();
    server.put(makeExport('ns', 'a'));
    const { loop } = await startLoop();
    await vi.waitFor(() => expect(server.watches.size).toBe(1), eventually);
    server.expireWatches();
    await vi.waitFor(() => expect(server.lists()).toHaveLength(2), eventually);
    await vi.waitFor(() => expect(server.watches.size).toBe(1), eventually);
    server.put(makeExport('ns', 'b'));
    await vi.waitFor(() => expect(loop.get('ns/b')).toBeDefined(), eventually);
  });

  it('aborts a watch that receives nothing and reconnects', async () => {
    server = await new FakeApiServer().start();
    server.put(makeExport('ns', 'a'));
    server.hangWatches = 1;
    const { loop } = await startLoop({ idleTimeoutMs: 300 });
    await vi.waitFor(() => expect(loop.metrics().idleTimeoutsTotal).toBeGreaterThanOrEqual(1), eventually);
    await vi.waitFor(() => expect(server.watchRequests().length).toBeGreaterThanOrEqual(2), eventually);
    await vi.waitFor(() => expect([...server.watches].some((w) => !w.silent)).toBe(true), eventually);
    server.put(makeExport('ns', 'b'));
    await vi.waitFor(() => expect(loop.get('ns/b')).toBeDefined(), eventually);
    expect(server.lists()).toHaveLength(1);
    expect(loop.keys().sort()).toEqual(['ns/a', 'ns/b']);
  });

  it('keeps a watch that hears bookmarks in time', async () => {
    server = await new FakeApiServer().start();
    server.put(makeExport('ns', 'a'));
    const { loop } = await startLoop({ idleTimeoutMs: 5000 });
    await vi.waitFor(() => expect(server.watches.size).toBe(1), eventually);
    for (let i = 0; i < 6; i++) {
      server.bookmark();
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    expect(loop.metrics().idleTimeoutsTotal).toBe(0);
  });

  it('counts watch events by type, and the loop starting over as reconnects', async () => {
    server = await new FakeApiServer().start();
    server.put(makeExport('ns', 'a'));
    const { loop } = await startLoop();
    await vi.waitFor(() => expect(server.watches.size).toBe(1), eventually);
    expect(loop.metrics().reconnectsTotal).toBe(0);

    server.put(makeExport('ns', 'b'));
    server.put(makeExport('ns', 'c'));
    const changed = makeExport('ns', 'a');
    changed.spec.readOnly = true;
    server.put(changed);
    server.remove('ns/b');
    server.bookmark();
    await vi.waitFor(() => expect(loop.metrics().bookmarksTotal).toBe(1), eventually);
    expect(loop.metrics().watchEventsByType).toEqual({ ADDED: 2, MODIFIED: 1, DELETED: 1 });
    expect(loop.metrics().watchEventsTotal).toBe(4);

    server.closeWatches();
    await vi.waitFor(() => expect(server.watchRequests()).toHaveLength(2), eventually);
    await vi.waitFor(() => expect(loop.metrics().reconnectsTotal).toBe(1), eventually);
    server.expireWatches();
    await vi.waitFor(() => expect(server.lists()).toHaveLength(2), eventually);
    await vi.waitFor(() => expect(loop.metrics().reconnectsTotal).toBe(2), eventually);
  });

  it('tells the seconds since anything last arrived: a listing, an event or a bookmark', async () => {
    server = await new FakeApiServer().start();
    server.put(makeExport('ns', 'a'));
    const clock = new ManualClock();
    const { loop } = await startLoop({ clock, idleTimeoutMs: 60_000 });
    await vi.waitFor(() => expect(server.watches.size).toBe(1), eventually);
    expect(loop.metrics().secondsSinceLastReceive).toBe(0); // the listing just arrived

    await clock.advance(20_000);
    expect(loop.metrics().secondsSinceLastReceive).toBe(20);
    server.bookmark();
    await vi.waitFor(() => expect(loop.metrics().secondsSinceLastReceive).toBe(0), eventually);
    await clock.advance(5_000);
    server.put(makeExport('ns', 'b'));
    await vi.waitFor(() => expect(loop.get('ns/b')).toBeDefined(), eventually);
    expect(loop.metrics().secondsSinceLastReceive).toBe(0);
    await clock.advance(45_500);
    expect(loop.metrics().secondsSinceLastReceive).toBe(45.5);
  });

  it('resyncs: tells listeners every cached key periodically', async () => {
    server = await new FakeApiServer().start();
    server.put(makeExport('ns', 'a'));
    server.put(makeExport('ns', 'b'));
    const { loop, seen } = await startLoop({ resyncPeriodMs: 50 });
    await vi.waitFor(() => expect(loop.metrics().resyncsTotal).toBeGreaterThanOrEqual(2), eventually);
    expect(seen.filter((k) => k === 'ns/a').length).toBeGreaterThanOrEqual(3);
    expect(seen.filter((k) => k === 'ns/b').length).toBeGreaterThanOrEqual(3);
  });

  it('stops: the watch connection closes and the cache stays', async () => {
    server = await new FakeApiServer().start();
    server.put(makeExport('ns', 'a'));
    const { loop } = await startLoop();
    await vi.waitFor(() => expect(server.watches.size).toBe(1), eventually);
    await loop.stop();
    await vi.waitFor(() => expect(server.watches.size).toBe(0), eventually);
    expect(loop.keys()).toEqual(['ns/a']);
  });

  it('keeps trying the first listing, and start() waits for it', async () => {
    server = await new FakeApiServer().start();
    server.put(makeExport('ns', 'a'));
    server.unavailable = true;
    let started = false;
    const starting = startLoop().then(() => (started = true));
    await vi.waitFor(() => expect(server.lists().length).toBeGreaterThanOrEqual(3), eventually);
    expect(started).toBe(false);
    expect(loop?.synced).toBe(false);
    server.unavailable = false;
    await starting;
    expect(loop?.keys()).toEqual(['ns/a']);
  });

  it('survives a listener that throws', async () => {
    server = await new FakeApiServer().start();
    server.put(makeExport('ns', 'a'));
    const { loop } = await startLoop();
    loop.onChange(() => {
      throw new Error('bad listener');
    });
    await vi.waitFor(() => expect(server.watches.size).toBe(1), eventually);
    server.put(makeExport('ns', 'b'));
    server.put(makeExport('ns', 'c'));
    await vi.waitFor(() => expect(loop.get('ns/c')).toBeDefined(), eventually);
  });
});

describe('reconnectDelay', () => {
  const backoff = { baseMs: 1000, maxMs: 30_000 };
  it.each([
    { failures: 1, random: 0.5, expected: 1000 },
    { failures: 2, random: 0.5, expected: 2000 },
    { failures: 5, random: 0.5, expected: 16_000 },
    { failures: 6, random: 0.5, expected: 30_000 },
    { failures: 50, random: 0.5, expected: 30_000 },
    { failures: 1, random: 0, expected: 500 },
    { failures: 1, random: 0.999, expected: 1499 },
    { failures: 10, random: 0.999, expected: 30_000 },
  ])('failure $failures, random $random → $expected ms', ({ failures, random, expected }) => {
    expect(reconnectDelay(failures, backoff, () => random)).toBe(expected);
  });
});
