/**
 * Refusing means retiring, with the real controller, servers and clients: a resource that
 * becomes disallowed stops being served at once, on both servers, and its connected
 * clients are cut (the one case where cutting clients is right).
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { describe, expect, it } from 'vitest';
import { HeldTransfer, isServed, writeRandomFile } from '../support/nbd.js';
import { waitFor } from '../support/poll.js';
import { allPids, descriptorTargetsOf } from '../../src/node/process/proc-scan.js';
import type { PlainHostNode } from './harness/plain-host-controller.js';
import { nbdExport } from './harness/plain-host-controller.js';
import { useStartedNode } from './harness/started-node.js';

const MiB = 1024 * 1024;

describe('refusing means retiring', () => {
  let node: PlainHostNode;
  useStartedNode((started) => (node = started));

  it('a raw export moved outside the roots is taken down and its connected client is cut', async () => {
    const outside = join(node.root, 'outside');
    await mkdir(outside);
    await writeFile(join(outside, 'secret.raw'), Buffer.alloc(MiB, 7));
    const spec = (path: string) => ({ source: { file: { path, format: 'raw', create: { size: '64Mi' } } } });
    await node.writeExports('moved.yaml', [nbdExport('moved', spec(join(node.images, 'moved.raw')))]);
    const served = await node.waitForReady('moved');
    const uri = node.uri(served);

    const payload = join(node.root, 'moved-payload.bin');
    await writeRandomFile(payload, 64 * MiB);
    const transfer = new HeldTransfer(payload, uri, 32 * MiB);
    await transfer.firstHalfWritten();

    await node.writeExports('moved.yaml', [nbdExport('moved', spec(join(outside, 'secret.raw')))]);
    const refused = await node.waitForReady('moved', 'False', 'PathNotAllowed');
    expect(refused.status?.conditions?.[0]?.message).toMatch(/taken down/);
    await waitFor('the old export to be refused to new clients', async () =>
      (await isServed(uri)) ? undefined : true,
    );
    // The held client is cut: no process serves the old file any more (its client notices at
    // its next write, so the rest of its data cannot land).
    const oldFile = join(node.images, 'moved.raw');
    await waitFor('no process to serve the old file', async () => {
      for (const pid of allPids()) if ((await descriptorTargetsOf(pid)).includes(oldFile)) return undefined;
      return true;
    });
    expect((await transfer.finish()).exitCode).not.toBe(0);
  });

  it('a QCOW2 export whose spec turns invalid is taken down', async () => {
    const path = join(node.images, 'turns-invalid.qcow2');
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', path, '16M']);
    await node.writeExports('invalid.yaml', [
      nbdExport('turns-invalid', { source: { file: { path, format: 'qcow2' } } }),
    ]);
    const uri = node.uri(await node.waitForReady('turns-invalid'));
    await node.writeExports('invalid.yaml', [
      nbdExport('turns-invalid', { source: { file: { path, format: 'qcow2' } }, maxConnections: 0 }),
    ]);
    await node.waitForReady('turns-invalid', 'False', 'InvalidSpec');
    await waitFor('the QCOW2 export to be refused to new clients', async () =>
      (await isServed(uri)) ? undefined : true,
    );
  });

  it('narrowing --allowed-root and restarting retires what now lies outside', async () => {
    const kept = join(node.images, 'kept');
    await mkdir(kept);
    await node.writeExports('narrow.yaml', [
      nbdExport('inside-narrow', {
        source: { file: { path: join(kept, 'a.raw'), format: 'raw', create: { size: '8Mi' } } },
      }),
      nbdExport('outside-narrow', {
        source: { file: { path: join(node.images, 'b.raw'), format: 'raw', create: { size: '8Mi' } } },
      }),
    ]);
    const inside = node.uri(await node.waitForReady('inside-narrow'));
    const outside = node.uri(await node.waitForReady('outside-narrow'));

    await node.stop('SIGTERM');
    await node.start([], { allowedRoot: kept });
    await node.waitForReady('outside-narrow', 'False', 'PathNotAllowed');
    // Both in one look: during a hand-over every export is refused for a moment, so "outside
    // is refused" alone can be seen at an instant when "inside" is refused too.
    await waitFor(
      'the export outside the narrowed root to be refused while the one inside is served',
      async () => (!(await isServed(outside)) && (await isServed(inside)) ? true : undefined),
    );
  });
});
