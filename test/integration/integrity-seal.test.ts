/**
 * The integrity seal with the real controller, servers and clients: a read-only export is
 * read through its server and its SHA-256 kept in status; the verify-seal annotation reads it
 * again and says Match, or Mismatch when the bytes changed underneath.
 */
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { describe, expect, it } from 'vitest';
import type { NbdExport } from '../../src/api/types.js';
import { nbdcopy, sha256File, writeRandomFile } from '../support/nbd.js';
import { waitFor } from '../support/poll.js';
import type { PlainHostNode } from './harness/plain-host-controller.js';
import { nbdExport } from './harness/plain-host-controller.js';
import { useStartedNode } from './harness/started-node.js';

const MiB = 1024 * 1024;

describe('integrity seal', () => {
  let node: PlainHostNode;
  useStartedNode((started) => (node = started));

  async function sealOf(name: string): Promise<NonNullable<NbdExport['status']>['seal']> {
    return waitFor(`${name} to be sealed`, async () => {
      const seal = (await node.object(name))?.status?.seal;
      if (seal?.state === 'Failed') throw new Error(`seal failed: ${seal.message ?? ''}`);
      return seal?.state === 'Sealed' ? seal : undefined;
    });
  }

  async function verification(name: string, token: string) {
    return waitFor(`${name} verification ${token}`, async () => {
      const answer = (await node.object(name))?.status?.verification;
      return answer?.token === token && answer.state !== 'Verifying' ? answer : undefined;
    });
  }

  it('seals a read-only QCOW2 export with the digest a client reads, and verifies it on request', async () => {
    const disk = join(node.root, 'disk.bin');
    await writeRandomFile(disk, 24 * MiB);
    const path = join(node.images, 'sealed.qcow2');
    await execa('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', disk, path]);
    const spec = { source: { file: { path, format: 'qcow2' } }, readOnly: true };
    await node.writeExports('sealed.yaml', [nbdExport('sealed', spec)]);
    const uri = node.uri(await node.waitForReady('sealed'));

    const seal = await sealOf('sealed');
    const read = join(node.root, 'read.bin');
    await nbdcopy(uri, read);
    expect(seal).toMatchObject({
      algorithm: 'sha256',
      digest: await sha256File(read),
      bytes: 24 * MiB,
      generation: 1,
    });
    expect(await sha256File(read)).toBe(await sha256File(disk));

    const asked = {
      ...nbdExport('sealed', spec),
      metadata: { name: 'sealed', namespace: 'it', annotations: { 'nbd.dev/verify-seal': 'restore-1' } },
    };
    await node.writeExports('sealed.yaml', [asked]);
    expect(await verification('sealed', 'restore-1')).toMatchObject({ state: 'Match', digest: seal?.digest });
  });

  it('a writable export carries no seal; bytes changed under a sealed raw export verify as Mismatch', async () => {
    const path = join(node.images, 'tampered.raw');
    await writeRandomFile(path, 8 * MiB);
    const spec = (readOnly: boolean) => ({ source: { file: { path, format: 'raw' } }, readOnly });
    await node.writeExports('tampered.yaml', [nbdExport('tampered', spec(false))]);
    await node.waitForReady('tampered');
    expect((await node.object('tampered'))?.status?.seal).toBeUndefined();

    await node.writeExports('tampered.yaml', [nbdExport('tampered', spec(true))]);
    const seal = await sealOf('tampered');
    expect(seal?.digest).toBe(await sha256File(path));

    // Someone writes into the file behind the server's back.
    const file = await open(path, 'r+');
    await file.write(Buffer.from('tampered'), 0, 8, 4 * MiB);
    await file.close();
    const asked = {
      ...nbdExport('tampered', spec(true)),
      metadata: { name: 'tampered', namespace: 'it', annotations: { 'nbd.dev/verify-seal': 'audit-1' } },
    };
    await node.writeExports('tampered.yaml', [asked]);
    const answer = await verification('tampered', 'audit-1');
    expect(answer).toMatchObject({ state: 'Mismatch', digest: await sha256File(path) });
    expect(answer.message).toContain(seal?.digest ?? 'no seal');
  });
});
