/**
 * readImageHeader on real files in a temporary directory: what it refuses to read, and the
 * facts it reports from the descriptor it read.
 */
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { link, mkdir, mkdtemp, open, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readImageHeader } from '../../../../src/node/image-header/read-image-header.js';
import { qcow2, withMagic } from './image-bytes.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'nbdx-read-header-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('readImageHeader', () => {
  it('reads a regular file and reports the facts of the descriptor it read', async () => {
    const path = join(dir, 'a.qcow2');
    await writeFile(path, qcow2({ backingName: 'base.qcow2' }));
    const info = await stat(path, { bigint: true });
    const read = await readImageHeader(path, { allowBlockDevice: true });
    expect(read).toMatchObject({
      kind: 'read',
      openedPath: path,
      file: {
        type: 'file',
        fileId: `${info.dev}:${info.ino}`,
        nlink: 1,
        size: Number(info.size),
        allocatedBytes: Number(info.blocks) * 512,
      },
      header: { kind: 'qcow2', header: { backingFileName: 'base.qcow2' } },
    });
  });

  it('reports hard links', async () => {
    const path = join(dir, 'linked.raw');
    await writeFile(path, new Uint8Array(4096));
    await link(path, join(dir, 'linked-too.raw'));
    expect(await readImageHeader(path, { allowBlockDevice: true })).toMatchObject({
      kind: 'read',
      file: { nlink: 2 },
    });
  });

  it('reads at most 64 KiB from the start: a qcow2 whose backing name lies beyond is invalid', async () => {
    const path = join(dir, 'far-name.qcow2');
    const bytes = qcow2({ clusterBits: 20, backingOffset: 70_000n, backingSize: 4, totalLength: 70_004 });
    bytes.set([0x62, 0x61, 0x73, 0x65], 70_000); // "base"
    await writeFile(path, bytes);
    expect(await readImageHeader(path, { allowBlockDevice: true })).toMatchObject({
      kind: 'read',
      header: { kind: 'invalid', problem: expect.stringMatching(/beyond the 65536 bytes read/) as unknown },
    });
  });

  it('reads the footer of a large sparse file', async () => {
    const path = join(dir, 'fixed.vhd');
    const handle = await open(path, 'w');
    await handle.write(withMagic('conectix', 0, 512), 0, 512, 10 * 2 ** 30 - 512);
    await handle.close();
    expect(await readImageHeader(path, { allowBlockDevice: true })).toMatchObject({
      kind: 'read',
      file: { size: 10 * 2 ** 30 },
      header: { kind: 'foreign', format: 'vpc' },
    });
  });

  it('refuses a FIFO without blocking on it', async () => {
    const path = join(dir, 'fifo');
    execFileSync('mkfifo', [path]);
    expect(await readImageHeader(path, { allowBlockDevice: true })).toEqual({
      kind: 'not-an-image-file',
      fileType: 'FIFO',
    });
  });

  it('refuses a socket, a directory, a character device and a symlink', async () => {
    const socketPath = join(dir, 'sock');
    const server: Server = createServer();
    await new Promise<void>((resolve) => server.listen(socketPath, resolve));
    try {
      expect(await readImageHeader(socketPath, { allowBlockDevice: true })).toEqual({
        kind: 'not-an-image-file',
        fileType: 'socket',
      });
    } finally {
      server.close();
    }
    await mkdir(join(dir, 'sub'));
    expect(await readImageHeader(join(dir, 'sub'), { allowBlockDevice: true })).toEqual({
      kind: 'not-an-image-file',
      fileType: 'directory',
    });
    expect(await readImageHeader('/dev/null', { allowBlockDevice: true })).toEqual({
      kind: 'not-an-image-file',
      fileType: 'character device',
    });
    await symlink(join(dir, 'a.qcow2'), join(dir, 'link.qcow2'));
    expect(await readImageHeader(join(dir, 'link.qcow2'), { allowBlockDevice: true })).toEqual({
      kind: 'not-an-image-file',
      fileType: 'symlink',
    });
  });

  it('reads a block device only when asked to', async () => {
    // Any block device the kernel has will do; the smallest (often an unused loop device, 0
    // bytes) so that the test reads as little of the machine's disks as possible.
    const sizeOf = (name: string): number =>
      Number(readFileSync(`/sys/dev/block/${name}/size`, 'utf8').trim());
    const [majorMinor] = readdirSync('/sys/dev/block').sort((a, b) => sizeOf(a) - sizeOf(b));
    if (majorMinor === undefined) throw new Error('this machine has no block device to test with');
    const [major = '', minor = ''] = majorMinor.split(':');
    const device = join(dir, 'block-device');
    execFileSync('mknod', [device, 'b', major, minor]);
    expect(await readImageHeader(device, { allowBlockDevice: false })).toEqual({
      kind: 'not-an-image-file',
      fileType: 'block-device',
    });
    const read = await readImageHeader(device, { allowBlockDevice: true });
    if (read.kind !== 'read') throw new Error(`expected the device to be read: ${JSON.stringify(read)}`);
    expect(read.file.type).toBe('block-device');
    expect(read.file.size).toBe(
      Number(readFileSync(`/sys/dev/block/${majorMinor}/size`, 'utf8').trim()) * 512,
    );
  });

  it('reports a missing file', async () => {
    expect(await readImageHeader(join(dir, 'nothing-here'), { allowBlockDevice: true })).toEqual({
      kind: 'missing',
    });
    expect(await readImageHeader(join(dir, 'a.qcow2', 'below-a-file'), { allowBlockDevice: true })).toEqual({
      kind: 'missing',
    });
  });
});
