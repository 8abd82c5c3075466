/**
 * The platform's backup workflow end to end, through the controller's own interface (plain
 * host mode), with real servers and clients:
 *   a full QCOW2 created and written with patterned, partly sparse data → sealed read-only
 *   by a spec change → an incremental created on it and a delta written → the incremental
 *   reads full + delta bit-exact → a restore reads it all back → removal leaves the node as
 *   deletionPolicy says; and a client that drops in the middle of a write leaves nothing stuck.
 */
import { randomBytes } from 'node:crypto';
import { open, readdir, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { describe, expect, it } from 'vitest';
import { canWrite, HeldTransfer, isServed, nbdcopy, sha256File, writeRandomFile } from '../support/nbd.js';
import { waitFor } from '../support/poll.js';
import type { PlainHostNode } from './harness/plain-host-controller.js';
import { nbdExport } from './harness/plain-host-controller.js';
import { useStartedNode } from './harness/started-node.js';

const MiB = 1024 * 1024;
const DISK = 64 * MiB;

/** A disk image with data in every fourth MiB and holes elsewhere (a partly sparse disk). */
async function writePatternedSparse(path: string): Promise<void> {
  const file = await open(path, 'w');
  try {
    await file.truncate(DISK);
    for (let offset = 0; offset < DISK; offset += 4 * MiB) await file.write(randomBytes(MiB), 0, MiB, offset);
  } finally {
    await file.close();
  }
}

/** Writes `bytes` of `pattern` at `offset`, through NBD (qemu-io is a real NBD client). */
async function writeThroughNbd(uri: string, offset: number, bytes: number, pattern: number): Promise<void> {
  await execa('qemu-io', ['-f', 'raw', uri, '-c', `write -P ${pattern} ${offset} ${bytes}`]);
}

/** Applies the same write to a local copy, so the expected disk is known byte for byte. */
async function writeLocally(path: string, offset: number, bytes: number, pattern: number): Promise<void> {
  const file = await open(path, 'r+');
  try {
    await file.write(Buffer.alloc(bytes, pattern), 0, bytes, offset);
  } finally {
    await file.close();
  }
}

async function files(dir: string): Promise<string[]> {
  return (await readdir(dir).catch(() => [])).sort();
}

describe('the backup workflow', () => {
  let node: PlainHostNode;
  useStartedNode((started) => (node = started));

  it('full → sealed → incremental with a delta → restore → removal, bit-exact', async () => {
    const dir = join(node.images, 'vm-42');
    const fullPath = join(dir, 'disk0-full.qcow2');
    const incrPath = join(dir, 'disk0-incr.qcow2');
    const full = (readOnly: boolean) =>
      nbdExport('vm-42-full', {
        source: { file: { path: fullPath, format: 'qcow2', create: { size: `${DISK}` } } },
        readOnly,
        deletionPolicy: 'Retain',
      });
    const incr = nbdExport('vm-42-incr', {
      source: { file: { path: incrPath, format: 'qcow2', create: { backingFile: fullPath } } },
      deletionPolicy: 'Delete',
    });

    // 1. The capture agent writes the full backup into a new image.
    await node.writeExports('full.yaml', [full(false)]);
    const fullUri = node.uri(await node.waitForReady('vm-42-full'));
    const disk = join(node.root, 'disk.img');
    await writePatternedSparse(disk);
    await execa('nbdcopy', ['--flush', '--connections=1', disk, fullUri]);

    // 2. While it is still writable, an incremental on it is refused, naming the writer.
    await node.writeExports('incr.yaml', [incr]);
    const waiting = await node.waitForReady('vm-42-incr', 'False', 'ImageInUse');
    expect(waiting.status?.conditions?.[0]?.message).toMatch(/it\/vm-42-full.*readOnly: true/);
    expect(await files(dir)).toEqual(['disk0-full.qcow2']);

    // 3. Sealed read-only by a spec change: the incremental follows by itself.
    const generation = (await node.object('vm-42-full'))?.metadata.generation ?? 0;
    await node.writeExports('full.yaml', [full(true)]);
    await waitFor('the spec change to be seen', async () =>
      ((await node.object('vm-42-full'))?.metadata.generation ?? 0) > generation ? true : undefined,
    );
    await node.waitForReady('vm-42-full');
    expect(await canWrite(fullUri)).toBe(false);
    const incrUri = node.uri(await node.waitForReady('vm-42-incr'));
    expect((await node.object('vm-42-incr'))?.status?.backingChain).toEqual([fullPath]);

    // 4. A delta written into the incremental: the incremental reads full + delta.
    const expected = join(node.root, 'expected.img');
    await execa('cp', ['--sparse=always', disk, expected]);
    for (const [offset, pattern] of [
      [0, 0x11],
      [5 * MiB, 0x22],
      [DISK - MiB, 0x33],
    ] as const) {
      await writeThroughNbd(incrUri, offset, MiB, pattern);
      await writeLocally(expected, offset, MiB, pattern);
    }
    // The full backup itself did not change.
    const fullBack = join(node.root, 'full-back.img');
    await nbdcopy(fullUri, fullBack);
    expect(await sha256File(fullBack)).toBe(await sha256File(disk));
    // The incremental holds only the delta (a few MiB of a 64 MiB disk).
    expect((await stat(incrPath)).blocks * 512).toBeLessThan(16 * MiB);

    // 5. A restore reads it all back, bit-exact.
    const restored = join(node.root, 'restored.img');
    await nbdcopy(incrUri, restored);
    expect(await sha256File(restored)).toBe(await sha256File(expected));

    // 6. Removal: the incremental (Delete) goes, the full backup (Retain) stays, nothing is served.
    await node.removeExports('incr.yaml');
    await node.waitForGone('vm-42-incr');
    await node.removeExports('full.yaml');
    await node.waitForGone('vm-42-full');
    expect(await files(dir)).toEqual(['disk0-full.qcow2']);
    expect(await isServed(fullUri)).toBe(false);
    expect(await isServed(incrUri)).toBe(false);
    expect(await files(join(node.stateDir, 'ledger'))).toEqual([]);
    const qemuState = JSON.parse(
      await readFile(join(node.stateDir, 'qemu-storage-daemon', 'exports.json'), 'utf8').catch(() => '{}'),
    ) as Record<string, unknown>;
    expect(Object.keys((qemuState.exports as object | undefined) ?? {})).toEqual([]);
  });

  it('a client that drops in the middle of a write leaves no export stuck and no lock held', async () => {
    for (const format of ['raw', 'qcow2'] as const) {
      const name = `dropped-${format}`;
      await node.writeExports(`${name}.yaml`, [
        nbdExport(name, {
          source: {
            file: { path: join(node.images, `${name}.img`), format, create: { size: '64Mi' } },
          },
          deletionPolicy: 'Delete',
        }),
      ]);
      const uri = node.uri(await node.waitForReady(name));
      const payload = join(node.root, `${name}.bin`);
      await writeRandomFile(payload, 64 * MiB);
      const transfer = new HeldTransfer(payload, uri, 32 * MiB);
      await transfer.firstHalfWritten();
      if (transfer.pid !== undefined) process.kill(transfer.pid, 'SIGKILL');
      await transfer.finish();

      // A new writer gets in and its data lands whole: nothing of the dropped one is held.
      await waitFor(`${name} to take a new writer`, async () => ((await canWrite(uri)) ? true : undefined));
      await execa('nbdcopy', ['--flush', '--connections=1', payload, uri]);
      const back = join(node.root, `${name}-back.bin`);
      await nbdcopy(uri, back);
      expect(await sha256File(back)).toBe(await sha256File(payload));
      expect((await node.condition(name))?.status).toBe('True');
      await node.removeExports(`${name}.yaml`);
      await node.waitForGone(name);
    }
  });
});
