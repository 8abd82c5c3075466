import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { OwnershipLedger } from '../../../src/node/ownership-ledger.js';

describe('OwnershipLedger', () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'nbdx-ledger-'));
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('moves a corrupt record aside, keeps the good ones, and starts', async () => {
    const ledger = new OwnershipLedger(dir);
    await ledger.load();
    await ledger.record('good', 'ns/good', { createdImage: { path: '/data/g.raw', inode: 3 } });
    await writeFile(join(dir, 'torn.json'), '{"uid": "torn", "key": "ns/t');
    await writeFile(join(dir, 'other.json'), JSON.stringify({ uid: 'someone-else', key: 'ns/x' }));
    const again = new OwnershipLedger(dir);
    await again.load();
    expect(again.all().map((r) => r.uid)).toEqual(['good']);
    const names = (await readdir(dir)).sort();
    expect(names).toHaveLength(3);
    expect(names[0]).toBe('good.json');
    expect(names[1]).toMatch(/^other\.json\.corrupt-\d{8}T\d{9}Z$/);
    expect(names[2]).toMatch(/^torn\.json\.corrupt-\d{8}T\d{9}Z$/);
  });

  it('writes again after its directory was deleted', async () => {
    const ledger = new OwnershipLedger(join(dir, 'ledger'));
    await ledger.load();
    await rm(join(dir, 'ledger'), { recursive: true });
    await ledger.claimExport('u1', 'ns/a', 'nbd-server', 'ns.a');
    const again = new OwnershipLedger(join(dir, 'ledger'));
    await again.load();
    expect(again.get('u1')?.exportName).toBe('ns.a');
  });

  it('persists records and reloads them', async () => {
    const ledger = new OwnershipLedger(dir);
    await ledger.load();
    await ledger.record('u1', 'ns/a', { createdImage: { path: '/data/a.qcow2', inode: 7 } });
    await ledger.claimExport('u1', 'ns/a', 'qemu-storage-daemon', 'ns.a');
    const again = new OwnershipLedger(dir);
    await again.load();
    expect(again.get('u1')).toEqual({
      uid: 'u1',
      key: 'ns/a',
      createdImage: { path: '/data/a.qcow2', inode: 7 },
      server: 'qemu-storage-daemon',
      exportName: 'ns.a',
    });
  });

  it('gives an export one owner: a new claim takes it from the old owner, who keeps its image', async () => {
    const ledger = new OwnershipLedger(dir);
    await ledger.load();
    await ledger.record('old', 'ns/b', { createdImage: { path: '/data/b.raw', inode: 9 } });
    await ledger.claimExport('old', 'ns/b', 'nbd-server', 'x');
    await ledger.claimExport('new', 'ns/a', 'nbd-server', 'x');
    expect(ledger.get('old')).toEqual({
      uid: 'old',
      key: 'ns/b',
      createdImage: { path: '/data/b.raw', inode: 9 },
    });
    expect(ledger.get('new')).toMatchObject({ exportName: 'x', server: 'nbd-server' });
    // The same name on the other server is another export.
    await ledger.claimExport('third', 'ns/c', 'qemu-storage-daemon', 'x');
    expect(ledger.get('new')).toMatchObject({ exportName: 'x' });
  });

  it('releases claims and forgets created images on request', async () => {
    const ledger = new OwnershipLedger(dir);
    await ledger.load();
    await ledger.record('u1', 'ns/a', { createdImage: { path: '/data/a.raw', inode: 1 } });
    await ledger.claimExport('u1', 'ns/a', 'nbd-server', 'a');
    await ledger.releaseExport('u1');
    expect(ledger.get('u1')).toEqual({
      uid: 'u1',
      key: 'ns/a',
      createdImage: { path: '/data/a.raw', inode: 1 },
    });
    await ledger.forgetCreatedImage('u1');
    expect(ledger.get('u1')).toEqual({ uid: 'u1', key: 'ns/a' });
  });

  it('removes temporaries of an interrupted write when it loads', async () => {
    await writeFile(join(dir, '.u1.json.0123abcd.tmp'), '{"half":');
    const ledger = new OwnershipLedger(dir);
    await ledger.load();
    expect(await readdir(dir)).toEqual([]);
  });
});
