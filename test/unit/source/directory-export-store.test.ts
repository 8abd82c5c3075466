import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { load } from 'js-yaml';
import { pino } from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { FINALIZER, type NbdExport } from '../../../src/api/types.js';
import { DirectoryExportStore } from '../../../src/source/directory-export-store.js';

const logger = pino({ level: 'silent' });

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

async function waitFor<T>(probe: () => T | undefined, timeoutMs = 10_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = probe();
    if (value !== undefined && value !== false) return value;
    if (Date.now() > deadline) throw new Error('condition not reached in time');
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('DirectoryExportStore', () => {
  let root: string;
  let sourceDir: string;
  let statusDir: string;
  let store: DirectoryExportStore;
  const changed: string[] = [];

  const open = async () => {
    store = new DirectoryExportStore({ sourceDir, statusDir, nodeName: 'n1', logger, pollIntervalMs: 100 });
    store.onChange((key) => changed.push(key));
    await store.start();
  };

  beforeEach(async () => {
    root = await mkdtemp(join(tmpdir(), 'dir-store-'));
    sourceDir = join(root, 'exports');
    statusDir = join(root, 'status');
    await rm(sourceDir, { recursive: true, force: true });
    await import('node:fs/promises').then((fs) => fs.mkdir(sourceDir));
    changed.length = 0;
  });

  afterEach(async () => {
    await store.stop();
    await rm(root, { recursive: true, force: true });
  });

  it('loads several documents per file, only for its node, with uid, generation and creation time', async () => {
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
    expect(one?.metadata.creationTimestamp).toMatch(/Z$/);
  });

  it('notices a new file within a second, and a spec change bumps the generation', async () => {
    await open();
    await writeFile(join(sourceDir, 'b.yml'), doc('late'));
    await waitFor(() => store.get('backups/late'), 1_500);
    expect(changed).toContain('backups/late');
    await writeFile(join(sourceDir, 'b.yml'), doc('late', 'n1', '/data/other.qcow2'));
    const updated = await waitFor(() =>
      store.get('backups/late')?.metadata.generation === 2 ? store.get('backups/late') : undefined,
    );
    expect(updated.spec.source.file?.path).toBe('/data/other.qcow2');
  });

  it('keeps a removed resource with a deletionTimestamp while it carries the finalizer', async () => {
    await writeFile(join(sourceDir, 'a.yaml'), doc('one'));
    await open();
    await store.addFinalizer('backups/one');
    await rm(join(sourceDir, 'a.yaml'));
    const deleting = await waitFor(() => store.get('backups/one')?.metadata.deletionTimestamp);
    expect(deleting).toMatch(/Z$/);
    await store.removeFinalizer('backups/one');
    expect(store.get('backups/one')).toBeUndefined();
    expect(await readdir(statusDir)).toEqual([]);
  });

  it('drops a removed resource without finalizer at once', async () => {
    await writeFile(join(sourceDir, 'a.yaml'), doc('one'));
    await open();
    await rm(join(sourceDir, 'a.yaml'));
    await waitFor(() => store.get('backups/one') === undefined);
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
    const before = (await import('node:fs/promises').then((fs) => fs.stat(file))).mtimeMs;
    await new Promise((r) => setTimeout(r, 20));
    await store.updateStatus('backups/one', { ...status });
    const after = (await import('node:fs/promises').then((fs) => fs.stat(file))).mtimeMs;
    expect(after).toBe(before);
  });

  it('remembers uid, finalizers and status across a restart', async () => {
    await writeFile(join(sourceDir, 'a.yaml'), doc('one'));
    await open();
    await store.addFinalizer('backups/one');
    const uid = store.get('backups/one')?.metadata.uid;
    await store.stop();
    await open();
    expect(store.get('backups/one')?.metadata.uid).toBe(uid);
    expect(store.get('backups/one')?.metadata.finalizers).toEqual([FINALIZER]);
  });

  it('a file that stops parsing deletes nothing', async () => {
    await writeFile(join(sourceDir, 'a.yaml'), doc('one'));
    await open();
    await store.addFinalizer('backups/one');
    await writeFile(join(sourceDir, 'a.yaml'), 'spec: [unclosed\n  - : :');
    await new Promise((r) => setTimeout(r, 400));
    expect(store.get('backups/one')?.metadata.deletionTimestamp).toBeUndefined();
  });

  it('a file that does not parse when the controller starts deletes nothing, however long it stays broken', async () => {
    await writeFile(join(sourceDir, 'a.yaml'), doc('one'));
    await open();
    await store.addFinalizer('backups/one');
    await store.stop();
    await writeFile(join(sourceDir, 'a.yaml'), 'spec: [unclosed\n  - : :');
    store = new DirectoryExportStore({
      sourceDir,
      statusDir,
      nodeName: 'n1',
      logger,
      pollIntervalMs: 50,
      deletionGraceMs: 100,
    });
    await store.start();
    await new Promise((r) => setTimeout(r, 500));
    expect(store.get('backups/one')?.metadata.deletionTimestamp).toBeUndefined();
  });

  it('a resource that now names another node is kept, not deleted (nodeName cannot change)', async () => {
    await writeFile(join(sourceDir, 'a.yaml'), doc('one'));
    await open();
    await store.addFinalizer('backups/one');
    await writeFile(join(sourceDir, 'a.yaml'), doc('one', 'n2'));
    await new Promise((r) => setTimeout(r, 600));
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
