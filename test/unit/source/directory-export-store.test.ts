import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, readFile, readdir, rename, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { dump, load } from 'js-yaml';
import { pino } from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { FINALIZER, type NbdExport } from '../../../src/api/types.js';
import {
  DirectoryExportStore,
  SOURCE_FILE_ANNOTATION,
  type DirectoryExportStoreOptions,
} from '../../../src/source/directory-export-store.js';
import { MAX_STATUS_FILE_NAME_BYTES, statusFileName } from '../../../src/source/status-file-name.js';
import { ManualClock } from '../../support/manual-clock.js';
import { waitFor } from '../../support/poll.js';
import { aliasBomb } from './hostile-yaml.js';

const GRACE_MS = 2_000;
const BROKEN_YAML = 'spec: [unclosed\n  - : :';

const doc = (name: string, node = 'n1', path = `/data/${name}.qcow2`) => `apiVersion: nbd.dev/v1alpha1
kind: NbdExport
metadata:
  name: ${name}
  namespace: backups
spec:
  nodeName: ${node}
  source:
    file: { path: ${path}, format: qcow2, create: { size: 1Gi } }
`;

/** pino lines, parsed, for asserting what a person would read in the log. */
class LogCapture extends Writable {
  readonly lines: Record<string, unknown>[] = [];
  override _write(chunk: Buffer, _encoding: string, done: () => void): void {
    for (const line of chunk.toString().split('\n').filter(Boolean))
      this.lines.push(JSON.parse(line) as Record<string, unknown>);
    done();
  }
}

// Waits are for real file-system work: generous, so that a loaded machine is only slower.
describe('DirectoryExportStore', { timeout: 60_000 }, () => {
  let root: string;
  let sourceDir: string;
  let statusDir: string;
  let clock: ManualClock;
  let log: LogCapture;
  let store: DirectoryExportStore;
  const changed: string[] = [];

  const open = async (options: Partial<DirectoryExportStoreOptions> = {}) => {
    store = new DirectoryExportStore({
      sourceDir,
      statusDir,
      nodeName: 'n1',
      logger: pino({ level: 'info' }, log),
      clock,
      deletionGraceMs: GRACE_MS,
      ...options,
    });
    store.onChange((key) => changed.push(key));
    await store.start();
  };
  const reopen = async (options: Partial<DirectoryExportStoreOptions> = {}) => {
    await store.stop();
    await open(options);
  };
  /** Moves time by `ms`, then reads the directory once more. */
  const advanceAndScan = async (ms: number) => {
    await clock.advance(ms);
    await store.scanNow();
  };
  const metric = (name: string) => store.metrics().find((m) => m.name === name)?.value;
  const statusFiles = async () => (await readdir(statusDir)).sort();

  beforeEach(async () => {
    root = await mkdtemp(join(tmpdir(), 'dir-store-'));
    sourceDir = join(root, 'exports');
    statusDir = join(root, 'status');
    await mkdir(sourceDir);
    clock = new ManualClock(new Date('2026-01-01T00:00:00Z'));
    log = new LogCapture();
    changed.length = 0;
  });

  afterEach(async () => {
    await store.stop();
    await rm(root, { recursive: true, force: true });
  });

  it('loads several documents per file, only for its node, with uid, generation, creation time and source file', async () => {
    await writeFile(
      join(sourceDir, 'a.yaml'),
      `${doc('one')}---\n${doc('two')}---\n${doc('elsewhere', 'n2')}`,
    );
    await open();
    expect(store.synced).toBe(true);
    expect(
      store
        .list()
        .map((o) => o.metadata.name)
        .sort(),
    ).toEqual(['one', 'two']);
    const one = store.get('backups/one');
    expect(one?.metadata.uid).toMatch(/^[0-9a-f-]{36}$/);
    expect(one?.metadata.generation).toBe(1);
    expect(one?.metadata.creationTimestamp).toBe('2026-01-01T00:00:00Z');
    expect(one?.metadata.annotations?.[SOURCE_FILE_ANNOTATION]).toBe('a.yaml');
  });

  it('its timers are timeouts on the injected clock, all gone after stop', async () => {
    await open({ pollIntervalMs: 1_000, resyncIntervalMs: 300_000 });
    expect(clock.pending()).toEqual([1_000, 300_000]);
    await store.stop();
    expect(clock.pending()).toEqual([]);
  });

  it('notices a new file on the next poll, and a spec change bumps the generation', async () => {
    await open();
    await writeFile(join(sourceDir, 'b.yml'), doc('late'));
    await clock.advance(1_000);
    await waitFor('the new file to be read', () => store.get('backups/late'), {
      timeoutMs: 30_000,
      intervalMs: 20,
    });
    expect(changed).toContain('backups/late');
    await writeFile(join(sourceDir, 'b.yml'), doc('late', 'n1', '/data/other.qcow2'));
    await store.scanNow();
    expect(store.get('backups/late')?.metadata.generation).toBe(2);
    expect(store.get('backups/late')?.spec.source.file?.path).toBe('/data/other.qcow2');
  });

  it('keeps a removed resource with a deletionTimestamp while it carries the finalizer, once the grace period is over', async () => {
    await writeFile(join(sourceDir, 'a.yaml'), doc('one'));
    await open();
    await store.addFinalizer('backups/one');
    await rm(join(sourceDir, 'a.yaml'));
    await store.scanNow();
    await advanceAndScan(GRACE_MS - 1);
    expect(store.get('backups/one')?.metadata.deletionTimestamp).toBeUndefined();
    // No explicit scan: the store's own timer confirms the absence when the grace period ends.
    await clock.advance(1);
    const deleting = await waitFor(
      'the deletionTimestamp',
      () => store.get('backups/one')?.metadata.deletionTimestamp,
      { timeoutMs: 30_000, intervalMs: 20 },
    );
    expect(deleting).toBe('2026-01-01T00:00:02Z');
    expect(changed.filter((k) => k === 'backups/one').length).toBeGreaterThanOrEqual(2);
    await store.removeFinalizer('backups/one');
    expect(store.get('backups/one')).toBeUndefined();
    expect(await statusFiles()).toEqual([]);
  });

  it('drops a removed resource without finalizer once the grace period is over, not before', async () => {
    await writeFile(join(sourceDir, 'a.yaml'), doc('one'));
    await open();
    await rm(join(sourceDir, 'a.yaml'));
    await store.scanNow();
    await advanceAndScan(GRACE_MS - 1);
    expect(store.get('backups/one')).toBeDefined();
    expect(await statusFiles()).toEqual(['backups_one.yaml']);
    await advanceAndScan(1);
    expect(store.get('backups/one')).toBeUndefined();
    expect(await statusFiles()).toEqual([]);
  });

  it('a resource that comes back within the grace period starts a new one', async () => {
    await writeFile(join(sourceDir, 'a.yaml'), doc('one'));
    await open();
    await rm(join(sourceDir, 'a.yaml'));
    await store.scanNow();
    await advanceAndScan(GRACE_MS - 500);
    await writeFile(join(sourceDir, 'a.yaml'), doc('one'));
    await store.scanNow();
    await rm(join(sourceDir, 'a.yaml'));
    await store.scanNow();
    await advanceAndScan(1_000); // 2.5 s after the first absence, 1 s into the second
    expect(store.get('backups/one')).toBeDefined();
    await advanceAndScan(GRACE_MS - 1_000);
    expect(store.get('backups/one')).toBeUndefined();
  });

  it('writes status files holding the whole object, and only when the status changes', async () => {
    await writeFile(join(sourceDir, 'a.yaml'), doc('one'));
    await open();
    const status = { observedGeneration: 1, exportName: 'backups.one' };
    await store.updateStatus('backups/one', status);
    const file = join(statusDir, 'backups_one.yaml');
    const written = load(await readFile(file, 'utf8')) as NbdExport;
    expect(written.status).toEqual(status);
    expect(written.spec.nodeName).toBe('n1');
    const before = await stat(file);
    await store.updateStatus('backups/one', { ...status });
    const after = await stat(file);
    expect([after.ino, after.mtimeMs]).toEqual([before.ino, before.mtimeMs]);
  });

  it('concurrent status writes leave the last one on disk and no temporaries behind', async () => {
    await writeFile(join(sourceDir, 'a.yaml'), doc('one'));
    await open();
    await Promise.all([
      ...Array.from({ length: 25 }, (_, i) =>
        store.updateStatus('backups/one', { observedGeneration: 1, exportName: `e${i}` }),
      ),
      store.addFinalizer('backups/one'),
      store.scanNow(),
    ]);
    const onDisk = load(await readFile(join(statusDir, 'backups_one.yaml'), 'utf8')) as NbdExport;
    expect(onDisk.status?.exportName).toBe('e24');
    expect(onDisk).toEqual(store.get('backups/one'));
    expect(onDisk.metadata.finalizers).toEqual([FINALIZER]);
    expect(await statusFiles()).toEqual(['backups_one.yaml']);
  });

  it('removes the temporaries of interrupted writes when it starts', async () => {
    await mkdir(statusDir);
    await writeFile(join(statusDir, '.backups_one.yaml.0123abcd.tmp'), 'half');
    await writeFile(join(statusDir, 'backups_one.yaml.tmp-4242'), 'half, older style');
    await open();
    expect(await statusFiles()).toEqual([]);
  });

  it('remembers uid, finalizers and status across a restart', async () => {
    await writeFile(join(sourceDir, 'a.yaml'), doc('one'));
    await open();
    await store.addFinalizer('backups/one');
    const uid = store.get('backups/one')?.metadata.uid;
    await reopen();
    expect(store.get('backups/one')?.metadata.uid).toBe(uid);
    expect(store.get('backups/one')?.metadata.finalizers).toEqual([FINALIZER]);
  });

  it('gives a 250-character name a status file within NAME_MAX, and finds it again after a restart', async () => {
    const name = `vm-${'a'.repeat(246)}z`;
    expect(name).toHaveLength(250);
    await writeFile(join(sourceDir, 'a.yaml'), doc(name));
    await open();
    const key = `backups/${name}`;
    await store.addFinalizer(key);
    const [fileName, ...others] = await statusFiles();
    expect(others).toEqual([]);
    expect(fileName).toBe(statusFileName('backups', name));
    expect(Buffer.byteLength(fileName!)).toBeLessThanOrEqual(MAX_STATUS_FILE_NAME_BYTES);
    const uid = store.get(key)?.metadata.uid;
    await reopen();
    expect(store.get(key)?.metadata.uid).toBe(uid);
    await rm(join(sourceDir, 'a.yaml'));
    await store.scanNow();
    await advanceAndScan(GRACE_MS);
    expect(store.get(key)?.metadata.deletionTimestamp).toBeDefined();
    await store.removeFinalizer(key);
    expect(await statusFiles()).toEqual([]);
  });

  it('accepts a status file under the name an earlier version gave it, and moves it to the current name', async () => {
    const name = 'b'.repeat(240); // "backups_<240>.yaml" is 253 bytes: too long for today's rule
    const legacyName = `backups_${name}.yaml`;
    const object: NbdExport = {
      apiVersion: 'nbd.dev/v1alpha1',
      kind: 'NbdExport',
      metadata: { name, namespace: 'backups', uid: 'old-uid', generation: 3, finalizers: [FINALIZER] },
      spec: { nodeName: 'n1', source: { file: { path: '/data/x.qcow2', format: 'qcow2' } } },
    };
    await mkdir(statusDir);
    await writeFile(join(statusDir, legacyName), dump(object));
    await writeFile(join(sourceDir, 'a.yaml'), doc(name));
    await open();
    expect(store.get(`backups/${name}`)?.metadata.uid).toBe('old-uid');
    expect(await statusFiles()).toEqual([statusFileName('backups', name)]);
  });

  it('a file that stops parsing deletes nothing, however long it stays broken', async () => {
    await writeFile(join(sourceDir, 'a.yaml'), doc('one'));
    await open();
    await store.addFinalizer('backups/one');
    await writeFile(join(sourceDir, 'a.yaml'), BROKEN_YAML);
    await store.scanNow();
    for (let i = 0; i < 5; i++) await advanceAndScan(GRACE_MS);
    expect(store.get('backups/one')?.metadata.deletionTimestamp).toBeUndefined();
    expect(metric('nbdx_source_refused_syntax_total')).toBe(1); // one version, one refusal
    const refusals = log.lines.filter((l) => l['file'] === 'a.yaml' && l['reason'] === 'syntax');
    expect(refusals).toHaveLength(1);
    expect(metric('nbdx_source_seconds_since_complete_scan')).toBe((5 * GRACE_MS) / 1000);
  });

  it('a file that does not parse when the controller starts deletes nothing, however long it stays broken', async () => {
    await writeFile(join(sourceDir, 'a.yaml'), doc('one'));
    await open();
    await store.addFinalizer('backups/one');
    await store.stop();
    await writeFile(join(sourceDir, 'a.yaml'), BROKEN_YAML);
    await open();
    for (let i = 0; i < 5; i++) await advanceAndScan(GRACE_MS);
    expect(store.get('backups/one')?.metadata.deletionTimestamp).toBeUndefined();
  });

  it('a broken file protects only what it last defined: resources of other files are deleted after the grace period', async () => {
    await writeFile(join(sourceDir, 'a.yaml'), doc('one'));
    await writeFile(join(sourceDir, 'b.yaml'), `${doc('two')}---\n${doc('three')}`);
    await open();
    for (const name of ['one', 'two', 'three']) await store.addFinalizer(`backups/${name}`);
    await writeFile(join(sourceDir, 'a.yaml'), BROKEN_YAML);
    await writeFile(join(sourceDir, 'b.yaml'), doc('three'));
    await store.scanNow();
    await advanceAndScan(GRACE_MS - 1);
    expect(store.get('backups/two')?.metadata.deletionTimestamp).toBeUndefined();
    await advanceAndScan(1);
    expect(store.get('backups/two')?.metadata.deletionTimestamp).toBeDefined();
    expect(store.get('backups/one')?.metadata.deletionTimestamp).toBeUndefined();
    expect(store.get('backups/three')?.metadata.deletionTimestamp).toBeUndefined();

    // The same after a restart, when the broken file's last good version is known only
    // from the status files.
    await store.stop();
    await rm(join(sourceDir, 'b.yaml'));
    await open();
    await advanceAndScan(GRACE_MS);
    expect(store.get('backups/three')?.metadata.deletionTimestamp).toBeDefined();
    expect(store.get('backups/one')?.metadata.deletionTimestamp).toBeUndefined();
  });

  it('a FIFO and a directory named *.yaml neither wedge it nor block deletions', async () => {
    execFileSync('mkfifo', [join(sourceDir, 'x.yaml')]);
    await mkdir(join(sourceDir, 'd.yaml'));
    await writeFile(join(sourceDir, 'a.yaml'), doc('one'));
    await open(); // a FIFO opened the plain way blocks here forever
    expect(store.get('backups/one')).toBeDefined();
    await store.addFinalizer('backups/one');
    await rm(join(sourceDir, 'a.yaml'));
    await store.scanNow();
    await advanceAndScan(GRACE_MS);
    expect(store.get('backups/one')?.metadata.deletionTimestamp).toBeDefined();
    expect(metric('nbdx_source_refused_not_a_regular_file_total')).toBe(2);
    expect(metric('nbdx_source_files_refused')).toBe(2);
    expect(log.lines.filter((l) => l['reason'] === 'not-a-regular-file').map((l) => l['file'])).toEqual([
      'd.yaml',
      'x.yaml',
    ]);
  });

  it('refuses an alias bomb with a reason naming the file, and it deletes nothing', async () => {
    await writeFile(join(sourceDir, 'a.yaml'), doc('one'));
    await writeFile(join(sourceDir, 'b.yaml'), doc('two'));
    await open();
    await store.addFinalizer('backups/two');
    await writeFile(join(sourceDir, 'b.yaml'), aliasBomb()); // the file that defined "two"
    await writeFile(join(sourceDir, 'c.yaml'), aliasBomb(6, 9)); // few aliases, huge when expanded
    await store.scanNow();
    for (let i = 0; i < 3; i++) await advanceAndScan(GRACE_MS);
    expect(store.get('backups/two')?.metadata.deletionTimestamp).toBeUndefined();
    expect(store.get('backups/one')).toBeDefined();
    expect(metric('nbdx_source_refused_too_many_aliases_total')).toBe(1);
    expect(metric('nbdx_source_refused_too_many_nodes_total')).toBe(1);
    const refusal = log.lines.find((l) => l['file'] === 'b.yaml');
    expect(refusal?.['error']).toMatch(/^b\.yaml: too-many-aliases: /);
  });

  it('reads a file only when it changed, and refuses one over the size limit unread', async () => {
    const padding = `# ${'x'.repeat(1_000)}\n`.repeat(900); // about 900 KB: under the 1 MiB limit
    await writeFile(join(sourceDir, 'big.yaml'), `${doc('one')}${padding}`);
    await open({ resyncIntervalMs: 60_000 });
    expect(store.get('backups/one')).toBeDefined();
    expect(metric('nbdx_source_files_read_total')).toBe(1);
    for (let i = 0; i < 5; i++) await advanceAndScan(1_000);
    expect(metric('nbdx_source_files_read_total')).toBe(1);

    await writeFile(join(sourceDir, 'big.yaml'), `${doc('one', 'n1', '/data/moved.qcow2')}${padding}`);
    await store.scanNow();
    await store.scanNow();
    expect(metric('nbdx_source_files_read_total')).toBe(2);
    expect(store.get('backups/one')?.spec.source.file?.path).toBe('/data/moved.qcow2');

    // Made elsewhere and renamed in, so that no scan can catch it empty.
    await writeFile(join(root, 'huge.yaml'), '');
    await truncate(join(root, 'huge.yaml'), 64 * 1024 * 1024); // sparse, 64 MiB
    await rename(join(root, 'huge.yaml'), join(sourceDir, 'huge.yaml'));
    for (let i = 0; i < 3; i++) await store.scanNow();
    expect(metric('nbdx_source_files_read_total')).toBe(2);
    expect(metric('nbdx_source_refused_too_large_total')).toBe(1);

    // The periodic resync reads everything once more, in case a timestamp was too coarse.
    await clock.advance(60_000);
    await store.scanNow();
    expect(metric('nbdx_source_files_read_total')).toBe(3);
  });

  it('a resource that now names another node is kept, not deleted (nodeName cannot change)', async () => {
    await writeFile(join(sourceDir, 'a.yaml'), doc('one'));
    await open();
    await store.addFinalizer('backups/one');
    await writeFile(join(sourceDir, 'a.yaml'), doc('one', 'n2'));
    await store.scanNow();
    await advanceAndScan(GRACE_MS * 3);
    expect(store.get('backups/one')?.metadata.deletionTimestamp).toBeUndefined();
    expect(store.get('backups/one')?.spec.nodeName).toBe('n1');
  });

  it('ignores documents without a valid name or with another apiVersion', async () => {
    await writeFile(
      join(sourceDir, 'a.yaml'),
      `${doc('Bad_Name')}---\n${doc('good').replace('nbd.dev/v1alpha1', 'nbd.dev/v9')}---\n${doc('fine')}`,
    );
    await open();
    expect(store.list().map((o) => o.metadata.name)).toEqual(['fine']);
  });
});
