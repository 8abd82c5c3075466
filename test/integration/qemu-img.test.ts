/**
 * qemu-img against real files: creation (full, incremental, raw, preallocated), the
 * never-overwrite rule, stale temporaries, format detection and lock detection with a
 * real qemu-nbd holding the image.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtemp, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  createImage,
  ImageExistsError,
  probeImageLock,
  removeStaleTemporaryImages,
} from '../../src/node/qemu-img.js';
import { QemuCommandError } from '../../src/node/qemu-error.js';
import { sha256File } from '../support/nbd.js';
import { qemuImageInfo as inspectImage } from '../support/qemu-img-info.js';
import { stopChild } from '../support/child-process.js';
import { waitFor } from '../support/poll.js';

const MiB = 1024 * 1024;
let dir: string;
const children: ChildProcess[] = [];

function requireBinary(name: string): void {
  const found = spawnSync('sh', ['-c', `command -v ${name}`]).status === 0;
  if (!found) throw new Error(`${name} is required for these tests (Debian: qemu-utils / libnbd-bin)`);
}

beforeAll(async () => {
  for (const name of ['qemu-img', 'qemu-nbd', 'qemu-io']) requireBinary(name);
  dir = await mkdtemp(join(tmpdir(), 'nbdx-qemu-img-'));
});

afterAll(async () => {
  for (const child of children)
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
  await rm(dir, { recursive: true, force: true });
});

function qemuIo(args: string[]): void {
  const result = spawnSync('qemu-io', args, { encoding: 'utf8', timeout: 60_000 });
  if (result.status !== 0) throw new Error(`qemu-io ${args.join(' ')}: ${result.stderr}`);
}

/** qemu-nbd serving the image read-write on a UNIX socket, until stopped. */
function startQemuNbd(path: string, format: 'qcow2' | 'raw'): ChildProcess {
  const socket = join(dir, `nbd-${children.length}.sock`);
  const child = spawn('qemu-nbd', ['--persistent', '-f', format, '-k', socket, path], { stdio: 'ignore' });
  children.push(child);
  return child;
}

const stop = (child: ChildProcess) => stopChild(child);

describe('createImage', () => {
  it('creates a full qcow2 image of the given virtual size', async () => {
    const path = join(dir, 'full.qcow2');
    await createImage({ path, format: 'qcow2', sizeBytes: 64 * MiB });
    const info = await inspectImage(path);
    expect(info).toMatchObject({ format: 'qcow2', virtualSize: 64 * MiB, backingChain: [] });
    expect(info.actualSize).toBeLessThan(MiB);
    expect(info.corrupt).toBe(false);
  });

  it('creates an incremental over a backing file without opening it (-u): size and format are given', async () => {
    const base = join(dir, 'base.qcow2');
    await createImage({ path: base, format: 'qcow2', sizeBytes: 48 * MiB });
    const incremental = join(dir, 'incr.qcow2');
    await createImage({
      path: incremental,
      format: 'qcow2',
      backingFile: base,
      backingFormat: 'qcow2',
      sizeBytes: 48 * MiB,
    });
    const info = await inspectImage(incremental);
    expect(info).toMatchObject({
      format: 'qcow2',
      virtualSize: 48 * MiB,
      backingChain: [base],
      backingFormat: 'qcow2',
    });

    const second = join(dir, 'incr2.qcow2');
    await createImage({
      path: second,
      format: 'qcow2',
      backingFile: incremental,
      backingFormat: 'qcow2',
      sizeBytes: 48 * MiB,
    });

    // The backing file is never opened: a backing name that would make QEMU connect somewhere
    // is written as given, and nothing is read from it.
    await expect(
      createImage({
        path: join(dir, 'over-missing.qcow2'),
        format: 'qcow2',
        backingFile: join(dir, 'absent.qcow2'),
      }),
    ).rejects.toThrow(TypeError);
    expect((await inspectImage(second)).backingChain).toEqual([incremental, base]);
  });

  it('creates a raw image, sparse unless preallocated', async () => {
    const sparse = join(dir, 'sparse.raw');
    await createImage({ path: sparse, format: 'raw', sizeBytes: 16 * MiB });
    expect(await inspectImage(sparse, { format: 'raw' })).toMatchObject({
      format: 'raw',
      virtualSize: 16 * MiB,
    });
    expect((await stat(sparse)).blocks * 512).toBeLessThan(MiB);

    const full = join(dir, 'full.raw');
    await createImage({ path: full, format: 'raw', sizeBytes: 16 * MiB, preallocation: 'full' });
    expect((await stat(full)).blocks * 512).toBeGreaterThanOrEqual(16 * MiB);
  });

  it('preallocates qcow2 metadata and data', async () => {
    const metadata = join(dir, 'meta.qcow2');
    await createImage({ path: metadata, format: 'qcow2', sizeBytes: 32 * MiB, preallocation: 'metadata' });
    const falloc = join(dir, 'falloc.qcow2');
    await createImage({ path: falloc, format: 'qcow2', sizeBytes: 32 * MiB, preallocation: 'falloc' });
    expect((await inspectImage(metadata)).virtualSize).toBe(32 * MiB);
    expect((await inspectImage(falloc)).actualSize).toBeGreaterThanOrEqual(32 * MiB);
  });

  it('hands over the inode before the image appears at its path: the published file keeps it', async () => {
    const path = join(dir, 'published.raw');
    let seen: { inode: number; existedYet: boolean } | undefined;
    const inode = await createImage(
      { path, format: 'raw', sizeBytes: MiB },
      {
        beforePublish: async (ino) => {
          const existedYet = await stat(path).then(
            () => true,
            () => false,
          );
          seen = { inode: ino, existedYet };
        },
      },
    );
    expect(seen).toEqual({ inode, existedYet: false });
    expect((await stat(path)).ino).toBe(inode);
  });

  it('never overwrites an existing file, and leaves no temporary behind', async () => {
    const path = join(dir, 'precious.qcow2');
    await writeFile(path, 'not an image, but precious data\n');
    const before = await sha256File(path);
    const error = await createImage({ path, format: 'qcow2', sizeBytes: MiB }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(ImageExistsError);
    expect(await sha256File(path)).toBe(before);

    const existingImage = join(dir, 'full.qcow2');
    const imageBefore = await sha256File(existingImage);
    await expect(createImage({ path: existingImage, format: 'raw', sizeBytes: MiB })).rejects.toBeInstanceOf(
      ImageExistsError,
    );
    expect(await sha256File(existingImage)).toBe(imageBefore);
    expect((await readdir(dir)).filter((name) => name.includes('nbdx-tmp'))).toEqual([]);
  });

  it('removes its temporary when qemu-img fails', async () => {
    const path = join(dir, 'refused-option.qcow2');
    const error = await createImage({
      path,
      format: 'qcow2',
      sizeBytes: MiB,
      // A value qemu-img itself refuses (the type system would not let a caller say it).
      preallocation: 'bogus' as 'off',
    }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(QemuCommandError);
    expect((error as QemuCommandError).stderr).toMatch(/bogus/);
    expect((await readdir(dir)).filter((name) => name.includes('refused-option'))).toEqual([]);
  });

  it('removes only its own stale temporaries', async () => {
    const sub = join(dir, 'stale');
    await import('node:fs/promises').then((fs) => fs.mkdir(sub));
    const ours = join(sub, '.disk.qcow2.nbdx-tmp-0123456789ab');
    const notOurs = ['.disk.qcow2.tmp', 'disk.qcow2', '.disk.qcow2.nbdx-tmp-XYZ', 'x.nbdx-tmp-0123456789ab'];
    await writeFile(ours, 'half-created');
    for (const name of notOurs) await writeFile(join(sub, name), 'keep');
    expect(await removeStaleTemporaryImages(sub)).toEqual([ours]);
    expect((await readdir(sub)).sort()).toEqual([...notOurs].sort());
  });
});

describe('probeImageLock', () => {
  for (const format of ['qcow2', 'raw'] as const) {
    it(`sees a qemu-nbd writer on a ${format} image, and its end`, async () => {
      const path = join(dir, `locked.${format}`);
      await createImage({ path, format, sizeBytes: 8 * MiB });
      expect(await probeImageLock(path)).toEqual({ locked: false });

      const server = startQemuNbd(path, format);
      const probe = await waitFor('the lock', async () => {
        const result = await probeImageLock(path);
        if (server.exitCode !== null) throw new Error(`qemu-nbd exited with ${server.exitCode}`);
        return result.locked ? result : undefined;
      });
      // From the kernel's lock table alone: no QEMU tool opens the image to find out.
      expect(probe.message).toMatch(/"write" permission lock/);
      // -U still reads the header while it is held.
      expect((await inspectImage(path, { forceShare: true })).virtualSize).toBe(8 * MiB);
      if (format === 'qcow2')
        await expect(inspectImage(path)).rejects.toThrow(/Failed to get shared "write" lock/);

      await stop(server);
      await waitFor('the lock to go', async () => ((await probeImageLock(path)).locked ? undefined : true));
      expect(await probeImageLock(path)).toEqual({ locked: false });
    });
  }

  it('does not mistake a reader for a writer', async () => {
    const path = join(dir, 'read-only.qcow2');
    await createImage({ path, format: 'qcow2', sizeBytes: 8 * MiB });
    qemuIo(['-f', 'qcow2', '-c', 'write -P 0x5a 0 64k', path]);
    const socket = join(dir, 'ro.sock');
    const reader = spawn('qemu-nbd', ['--persistent', '-r', '-f', 'qcow2', '-k', socket, path], {
      stdio: 'ignore',
    });
    children.push(reader);
    await waitFor('the reader', async () => ((await stat(socket).catch(() => undefined)) ? true : undefined));
    expect(await probeImageLock(path)).toEqual({ locked: false });
    await stop(reader);
  });
});
