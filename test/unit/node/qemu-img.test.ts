/**
 * qemu-img at its boundary: the arguments it is given and how its answers are read, with a
 * fake CommandRunner and a fake /proc/locks. The real program is exercised in
 * test/integration/qemu-img.test.ts.
 */
import { mkdtemp, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { QemuCommandError, isLockError, type CommandRunner } from '../../../src/node/qemu-error.js';
import {
  createQemuImg,
  ImageExistsError,
  isTemporaryImageName,
  parseProcLocks,
} from '../../../src/node/qemu-img.js';

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'nbdx-qemu-img-unit-'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

interface Call {
  command: string;
  args: readonly string[];
}

function fakeRunner(
  answer: (call: Call) => Promise<{ exitCode: number; stdout?: string; stderr?: string }>,
): {
  run: CommandRunner;
  calls: Call[];
} {
  const calls: Call[] = [];
  const run: CommandRunner = async (command, args) => {
    calls.push({ command, args });
    const { exitCode, stdout = '', stderr = '' } = await answer({ command, args });
    return { exitCode, stdout, stderr };
  };
  return { run, calls };
}

async function procLocksFile(path: string, bytes: number[]): Promise<string> {
  const info = await stat(path);
  // Test files live on one file system; major/minor as the kernel prints them.
  const major = Math.floor(info.dev / 256) & 0xfff;
  const minor = info.dev & 0xff;
  const id = `${major.toString(16).padStart(2, '0')}:${minor.toString(16).padStart(2, '0')}:${info.ino}`;
  const lines = bytes.map((b, i) => `${i + 1}: OFDLCK ADVISORY  READ -1 ${id} ${b} ${b}`);
  const file = join(dir, 'locks');
  await writeFile(file, `${lines.join('\n')}\n`);
  return file;
}

describe('parseProcLocks', () => {
  it('reads holders and skips waiters', () => {
    const locks = parseProcLocks(
      [
        '1: OFDLCK ADVISORY  READ -1 fe:00:42 100 101',
        '1: -> OFDLCK ADVISORY  WRITE -1 fe:00:42 101 101',
        '2: POSIX  ADVISORY  WRITE 345 08:01:7 0 EOF',
      ].join('\n'),
    );
    expect(locks).toEqual([
      { kind: 'OFDLCK', fileId: 'fe:00:42', start: 100n, end: 101n },
      { kind: 'POSIX', fileId: '08:01:7', start: 0n, end: undefined },
    ]);
  });
});

describe('probeImageLock', () => {
  it('answers from the lock table alone, running no program', async () => {
    const image = join(dir, 'a.qcow2');
    await writeFile(image, '');
    const { run, calls } = fakeRunner(() => Promise.resolve({ exitCode: 0, stdout: '{}' }));
    const free = createQemuImg({ run, procLocksPath: await procLocksFile(image, [100, 201]) });
    expect(await free.probeImageLock(image)).toEqual({ locked: false });
    const held = createQemuImg({ run, procLocksPath: await procLocksFile(image, [100, 101, 201]) });
    expect(await held.probeImageLock(image)).toMatchObject({
      locked: true,
      message: expect.stringMatching(/open for writing/) as unknown,
    });
    expect(calls).toEqual([]);
  });
});

describe('createImage', () => {
  it('creates under a temporary name, links, and cleans up', async () => {
    const path = join(dir, 'incr.qcow2');
    const { run, calls } = fakeRunner(async ({ args }) => {
      await writeFile(args.at(-2) ?? '', 'image');
      return { exitCode: 0 };
    });
    await createQemuImg({ run }).createImage({
      path,
      format: 'qcow2',
      backingFile: '/images/full.qcow2',
      backingFormat: 'qcow2',
      sizeBytes: 8,
      preallocation: 'metadata',
    });
    // One run of qemu-img, and it never opens the backing file (-u).
    expect(calls.map((c) => c.args[0])).toEqual(['create']);
    const create = calls[0];
    const temporary = create?.args.at(-2) ?? '';
    expect(create?.args.slice(0, -2)).toEqual([
      'create',
      '-q',
      '-f',
      'qcow2',
      '-o',
      'preallocation=metadata',
      '-u',
      '-b',
      '/images/full.qcow2',
      '-F',
      'qcow2',
    ]);
    expect(create?.args.at(-1)).toBe('8');
    expect(temporary.startsWith(join(dir, '.incr.qcow2.nbdx-tmp-'))).toBe(true);
    expect(await readdir(dir)).toEqual(['incr.qcow2']);
  });

  it('does not run qemu-img for an existing path', async () => {
    const path = join(dir, 'exists.raw');
    await writeFile(path, 'data');
    const { run, calls } = fakeRunner(() => Promise.resolve({ exitCode: 0 }));
    await expect(
      createQemuImg({ run }).createImage({ path, format: 'raw', sizeBytes: 512 }),
    ).rejects.toBeInstanceOf(ImageExistsError);
    expect(calls).toEqual([]);
  });

  it('refuses a path that appears while it creates, keeping that file', async () => {
    const path = join(dir, 'race.raw');
    const { run } = fakeRunner(async ({ args }) => {
      await writeFile(args.at(-2) ?? '', 'ours');
      await writeFile(path, 'theirs');
      return { exitCode: 0 };
    });
    await expect(
      createQemuImg({ run }).createImage({ path, format: 'raw', sizeBytes: 512 }),
    ).rejects.toBeInstanceOf(ImageExistsError);
    expect(await readdir(dir)).toEqual(['race.raw']);
  });

  it('throws a TypeError naming a bad request', async () => {
    const qemuImg = createQemuImg({ run: () => Promise.reject(new Error('not called')) });
    await expect(qemuImg.createImage({ path: 'rel.raw', format: 'raw', sizeBytes: 1 })).rejects.toThrow(
      /absolute/,
    );
    await expect(qemuImg.createImage({ path: '/a.raw', format: 'raw' })).rejects.toThrow(/sizeBytes/);
    await expect(qemuImg.createImage({ path: '/a.raw', format: 'raw', backingFile: '/b' })).rejects.toThrow(
      /qcow2/,
    );
    await expect(
      qemuImg.createImage({ path: '/a.qcow2', format: 'qcow2', backingFile: '/b', sizeBytes: 1 }),
    ).rejects.toThrow(/backingFormat/);
  });
});

describe('names and errors', () => {
  it('recognises only our temporaries', () => {
    expect(isTemporaryImageName('.disk.qcow2.nbdx-tmp-0123456789ab')).toBe(true);
    expect(isTemporaryImageName('disk.qcow2.nbdx-tmp-0123456789ab')).toBe(false);
    expect(isTemporaryImageName('.disk.qcow2.nbdx-tmp-0123')).toBe(false);
  });

  it('classifies lock errors', () => {
    expect(isLockError(new QemuCommandError('qemu-img', [], 1, 'Failed to get "write" lock'))).toBe(true);
    expect(isLockError('Is another process using the image [x]?')).toBe(true);
    expect(isLockError(new Error('Permission denied'))).toBe(false);
  });
});
