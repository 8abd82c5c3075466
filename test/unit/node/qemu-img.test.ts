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
  parseInfoChain,
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

describe('parseInfoChain', () => {
  it('reads sizes, flags and the backing chain nearest first', async () => {
    const info = await parseInfoChain('/images/incr.qcow2', [
      {
        filename: '/images/incr.qcow2',
        format: 'qcow2',
        'virtual-size': 1024,
        'actual-size': 512,
        'backing-filename': 'full.qcow2',
        'full-backing-filename': '/images/full.qcow2',
        'backing-filename-format': 'qcow2',
        'dirty-flag': false,
        'format-specific': { type: 'qcow2', data: { corrupt: false } },
      },
      {
        filename: '/images/full.qcow2',
        format: 'qcow2',
        'virtual-size': 1024,
        'backing-filename': 'base.raw',
      },
      { filename: '/images/base.raw', format: 'raw', 'virtual-size': 1024 },
    ]);
    expect(info).toEqual({
      format: 'qcow2',
      virtualSize: 1024,
      actualSize: 512,
      backingChain: ['/images/full.qcow2', '/images/base.raw'],
      backingFormat: 'qcow2',
      corrupt: false,
      dirty: false,
    });
  });

  it('rejects output without format or size', async () => {
    await expect(parseInfoChain('/x', [{}])).rejects.toThrow(TypeError);
  });
});

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
  it('answers from the lock table alone when nobody holds the write byte', async () => {
    const image = join(dir, 'a.qcow2');
    await writeFile(image, '');
    const { run, calls } = fakeRunner(() => Promise.resolve({ exitCode: 0, stdout: '{}' }));
    const qemuImg = createQemuImg({ run, procLocksPath: await procLocksFile(image, [100, 201]) });
    expect(await qemuImg.probeImageLock(image)).toEqual({ locked: false });
    expect(calls).toEqual([]);
  });

  it("reports qemu's own message for a held qcow2", async () => {
    const image = join(dir, 'a.qcow2');
    await writeFile(image, '');
    const stderr = `qemu-img: Could not open '${image}': Failed to get shared "write" lock\nIs another process using the image [${image}]?\n`;
    const { run, calls } = fakeRunner(() => Promise.resolve({ exitCode: 1, stderr }));
    const qemuImg = createQemuImg({ run, procLocksPath: await procLocksFile(image, [100, 101, 201]) });
    expect(await qemuImg.probeImageLock(image)).toEqual({
      locked: true,
      message: `Could not open '${image}': Failed to get shared "write" lock Is another process using the image [${image}]?`,
    });
    expect(calls[0]?.args).toEqual(['info', '--output=json', image]);
  });

  it('reports a raw writer that qemu-img does not complain about', async () => {
    const image = join(dir, 'a.raw');
    await writeFile(image, '');
    const { run } = fakeRunner(() => Promise.resolve({ exitCode: 0, stdout: '{}' }));
    const qemuImg = createQemuImg({ run, procLocksPath: await procLocksFile(image, [100, 101, 203]) });
    const probe = await qemuImg.probeImageLock(image);
    expect(probe).toMatchObject({
      locked: true,
      message: expect.stringMatching(/open for writing/) as unknown,
    });
  });

  it('falls back to qemu-img when there is no lock table', async () => {
    const image = join(dir, 'a.raw');
    await writeFile(image, '');
    const { run, calls } = fakeRunner(() => Promise.resolve({ exitCode: 0, stdout: '{}' }));
    const qemuImg = createQemuImg({ run, procLocksPath: join(dir, 'no-proc-locks') });
    expect(await qemuImg.probeImageLock(image)).toEqual({ locked: false });
    expect(calls).toHaveLength(1);
  });
});

describe('inspectImage', () => {
  it('passes -U and -f raw, and wraps failures with command, exit code and stderr', async () => {
    const image = join(dir, 'disk.raw');
    await writeFile(image, Buffer.alloc(4096));
    const { run, calls } = fakeRunner(() =>
      Promise.resolve({ exitCode: 1, stderr: "qemu-img: Could not open 'disk.raw': Permission denied\n" }),
    );
    const error = await createQemuImg({ run })
      .inspectImage(image, { forceShare: true, format: 'raw' })
      .catch((e: unknown) => e);
    expect(calls[0]?.args).toEqual(['info', '--output=json', '--backing-chain', '-U', '-f', 'raw', image]);
    expect(error).toBeInstanceOf(QemuCommandError);
    expect(error).toMatchObject({
      command: 'qemu-img',
      exitCode: 1,
      stderr: expect.stringMatching(/Permission/) as unknown,
    });
  });

  it('lets qemu-img detect the format when a "raw" file starts with a QCOW2 header', async () => {
    const image = join(dir, 'disk.raw');
    await writeFile(image, Buffer.concat([Buffer.from('QFI\xfb', 'latin1'), Buffer.alloc(100)]));
    const { run, calls } = fakeRunner(() =>
      Promise.resolve({ exitCode: 0, stdout: JSON.stringify([{ format: 'qcow2', 'virtual-size': 8 }]) }),
    );
    const info = await createQemuImg({ run }).inspectImage(image, { format: 'raw' });
    expect(info.format).toBe('qcow2');
    expect(calls[0]?.args).not.toContain('-f');
  });
});

describe('createImage', () => {
  it('creates under a temporary name, links, and cleans up', async () => {
    const path = join(dir, 'incr.qcow2');
    const { run, calls } = fakeRunner(async ({ args }) => {
      if (args[0] === 'info')
        return { exitCode: 0, stdout: JSON.stringify([{ format: 'qcow2', 'virtual-size': 8 }]) };
      await writeFile(args.at(-1) ?? '', 'image');
      return { exitCode: 0 };
    });
    await createQemuImg({ run }).createImage({
      path,
      format: 'qcow2',
      backingFile: '/images/full.qcow2',
      preallocation: 'metadata',
    });
    const create = calls.find((c) => c.args[0] === 'create');
    const temporary = create?.args.at(-1) ?? '';
    expect(create?.args.slice(0, -1)).toEqual([
      'create',
      '-q',
      '-f',
      'qcow2',
      '-o',
      'preallocation=metadata',
      '-b',
      '/images/full.qcow2',
      '-F',
      'qcow2',
    ]);
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
