/**
 * Our own header reading against real images made by qemu-img: on every benign image the
 * inspector and judge agree with `qemu-img info --backing-chain` (format, sizes, chain,
 * backing format, dirty, corrupt); every hostile one is refused, without following what its
 * header names (an nbd:// backing file gets no TCP connection, a FIFO is never opened).
 * The last test measures inspection time per image against qemu-img info.
 */
import { execFile, execFileSync } from 'node:child_process';
import {
  copyFile,
  link,
  mkdir,
  mkdtemp,
  open,
  readFile,
  realpath,
  rm,
  symlink,
  writeFile,
} from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ImageFormat } from '../../src/api/types.js';
import { inspectImageChain } from '../../src/node/image-header/inspect-image-chain.js';
import { parseInfoChain, type QemuImageInfo as ImageInfo } from '../support/qemu-img-info.js';
import {
  createBackingGate,
  DEFAULT_MAX_BACKING_DEPTH,
  judgeImageChain,
  type ImageChainInspection,
  type ImageVerdict,
} from '../../src/plan/image-header.js';
import { createImage } from '../support/hostile-images.js';
import { waitFor } from '../support/poll.js';
import { requireBinary } from '../support/repo.js';

const execFileAsync = promisify(execFile);
let base: string;
let root: string;
let outside: string;

beforeAll(async () => {
  await requireBinary('qemu-img', 'Debian package qemu-utils; run hack/setup.sh');
  await requireBinary('mkfifo');
  await requireBinary('mknod');
  base = await realpath(await mkdtemp(join(tmpdir(), 'nbdx-image-header-')));
  root = join(base, 'root');
  outside = join(base, 'outside');
  await mkdir(root);
  await mkdir(outside);
});

afterAll(async () => {
  await rm(base, { recursive: true, force: true });
});

function qemuImg(...args: string[]): void {
  execFileSync('qemu-img', args, { stdio: 'pipe' });
}

/** Records `name` as the backing file without opening anything (qemu-img rebase -u). */
function rebaseUnsafe(path: string, name: string, format: string): void {
  qemuImg('rebase', '-u', '-b', name, '-F', format, path);
}

async function qemuInfo(path: string, format?: ImageFormat): Promise<ImageInfo> {
  const { stdout } = await execFileAsync(
    'qemu-img',
    ['info', '--output=json', '--backing-chain', '-U', ...(format ? ['-f', format] : []), path],
    { timeout: 60_000 },
  );
  return parseInfoChain(path, JSON.parse(stdout));
}

interface Judged {
  inspection: ImageChainInspection;
  verdict: ImageVerdict;
}

async function judge(
  path: string,
  declaredFormat: ImageFormat,
  overrides: { maxBackingDepth?: number; allowRawOverForeignHeader?: boolean } = {},
): Promise<Judged> {
  const policy = {
    allowedRoots: [root],
    maxBackingDepth: overrides.maxBackingDepth ?? DEFAULT_MAX_BACKING_DEPTH,
    allowRawOverForeignHeader: overrides.allowRawOverForeignHeader ?? false,
  };
  const inspection = await inspectImageChain(path, { declaredFormat, gate: createBackingGate(policy) });
  return { inspection, verdict: judgeImageChain(inspection, { ...policy, declaredFormat }) };
}

/** Both views of a benign image must be the same. */
async function expectAgreement(path: string, declaredFormat: ImageFormat): Promise<void> {
  const { verdict } = await judge(path, declaredFormat);
  if (!verdict.ok) throw new Error(`${path} was refused: ${verdict.code}: ${verdict.message}`);
  const theirs = await qemuInfo(path, declaredFormat === 'raw' ? 'raw' : undefined);
  const ours = verdict.image;
  expect({
    format: ours.format,
    virtualSize: ours.virtualSize,
    actualSize: ours.actualSize,
    backingChain: ours.backingChain,
    backingFormat: ours.backingFormat,
  }).toEqual({
    format: theirs.format,
    virtualSize: theirs.virtualSize,
    actualSize: theirs.actualSize,
    backingChain: theirs.backingChain,
    backingFormat: theirs.backingFormat,
  });
  if (declaredFormat === 'qcow2') {
    expect(ours.corrupt).toBe(theirs.corrupt ?? false);
    expect(ours.dirty).toBe(theirs.dirty ?? false);
  }
}

async function expectRefused(path: string, declaredFormat: ImageFormat, code: string): Promise<Judged> {
  const judged = await judge(path, declaredFormat);
  if (judged.verdict.ok) throw new Error(`${path} was accepted: ${JSON.stringify(judged.verdict.image)}`);
  expect(judged.verdict.code, judged.verdict.message).toBe(code);
  return judged;
}

/** Sets bits in a qcow2 v3 header's incompatible_features (big-endian u64 at offset 72). */
/** `depth` QCOW2 images in a new `dir`, each backed by the one before (relative names); returns the top. */
async function qcow2Chain(dir: string, depth: number): Promise<string> {
  await mkdir(dir);
  let previous = await createImage('qcow2', join(dir, '0.qcow2'), '8M');
  for (let i = 1; i <= depth; i++)
    previous = await createImage(
      'qcow2',
      join(dir, `${i}.qcow2`),
      undefined,
      '-b',
      `${i - 1}.qcow2`,
      '-F',
      'qcow2',
    );
  return previous;
}

async function setIncompatibleBits(path: string, bits: bigint): Promise<void> {
  const handle = await open(path, 'r+');
  try {
    const field = Buffer.alloc(8);
    await handle.read(field, 0, 8, 72);
    field.writeBigUInt64BE(field.readBigUInt64BE(0) | bits);
    await handle.write(field, 0, 8, 72);
  } finally {
    await handle.close();
  }
}

/** Turns the backing format extension into an unknown one, so QEMU (and we) probe the backing file. */
async function dropBackingFormat(path: string): Promise<void> {
  const bytes = await readFile(path);
  const at = bytes.indexOf(Buffer.from([0xe2, 0x79, 0x2a, 0xca]));
  if (at < 0 || at > 4096) throw new Error(`${path} has no backing format extension`);
  bytes.writeUInt32BE(0x7e570001, at);
  await writeFile(path, bytes);
}

describe('benign images: we agree with qemu-img info', () => {
  it.each([
    ['qcow2 v2 (compat=0.10)', ['-o', 'compat=0.10'], '64M'],
    ['qcow2 v3', ['-o', 'compat=1.1'], '1G'],
    ['512-byte clusters', ['-o', 'cluster_size=512'], '8M'],
    ['2 MiB clusters', ['-o', 'cluster_size=2M'], '3G'],
    ['lazy refcounts', ['-o', 'lazy_refcounts=on'], '16M'],
    ['extended L2', ['-o', 'extended_l2=on'], '16M'],
    ['zstd compression', ['-o', 'compression_type=zstd'], '16M'],
    ['1-bit refcounts', ['-o', 'refcount_bits=1'], '16M'],
    ['preallocated metadata', ['-o', 'preallocation=metadata'], '32M'],
    ['an odd size', [], '1000448'],
  ])('%s', async (name, options, size) => {
    const path = await createImage(
      'qcow2',
      join(root, `${name.replace(/\W+/g, '-')}.qcow2`),
      size,
      ...options,
    );
    await expectAgreement(path, 'qcow2');
  });

  it('a qcow2 with a persistent bitmap', async () => {
    const path = await createImage('qcow2', join(root, 'bitmap.qcow2'), '16M');
    qemuImg('bitmap', '--add', path, 'b0');
    await expectAgreement(path, 'qcow2');
    const { inspection } = await judge(path, 'qcow2');
    expect(inspection.images[0]?.header).toMatchObject({ kind: 'qcow2', header: { bitmapsExtension: true } });
  });

  it('a raw file, declared raw', async () => {
    await expectAgreement(await createImage('raw', join(root, 'disk.raw'), '16M'), 'raw');
  });

  it('a chain: raw base ← full (absolute name) ← incremental (relative) ← incremental (probed format)', async () => {
    const dir = join(root, 'chain');
    await mkdir(dir);
    const raw = await createImage('raw', join(dir, 'base.raw'), '32M');
    const full = await createImage('qcow2', join(dir, 'full.qcow2'), undefined, '-b', raw, '-F', 'raw');
    const incr = await createImage(
      'qcow2',
      join(dir, 'incr.qcow2'),
      undefined,
      '-b',
      'full.qcow2',
      '-F',
      'qcow2',
    );
    const top = await createImage(
      'qcow2',
      join(dir, 'top.qcow2'),
      undefined,
      '-b',
      'incr.qcow2',
      '-F',
      'qcow2',
    );
    await dropBackingFormat(top);
    for (const path of [full, incr, top]) await expectAgreement(path, 'qcow2');
    const { verdict } = await judge(top, 'qcow2');
    expect(verdict).toMatchObject({ ok: true, image: { backingChain: [incr, full, raw] } });
  });

  it('a chain of exactly the limit, 16 backing files', async () => {
    const top = await qcow2Chain(join(root, 'sixteen'), DEFAULT_MAX_BACKING_DEPTH);
    await expectAgreement(top, 'qcow2');
  });

  it('a dirty image (lazy refcounts, unclean shutdown) is served and reported dirty', async () => {
    const path = await createImage('qcow2', join(root, 'dirty.qcow2'), '16M', '-o', 'lazy_refcounts=on');
    await setIncompatibleBits(path, 1n);
    await expectAgreement(path, 'qcow2');
    expect((await judge(path, 'qcow2')).verdict).toMatchObject({ ok: true, image: { dirty: true } });
  });
});

describe('hostile images are refused', () => {
  it('an external data file, inside or outside the roots, and the raw-data variant', async () => {
    await expectRefused(
      await createImage(
        'qcow2',
        join(root, 'data-in.qcow2'),
        '16M',
        '-o',
        `data_file=${join(root, 'data-in.raw')}`,
      ),
      'qcow2',
      'external-data-file',
    );
    await expectRefused(
      await createImage(
        'qcow2',
        join(root, 'data-out.qcow2'),
        '16M',
        '-o',
        `data_file=${join(outside, 'data-out.raw')}`,
      ),
      'qcow2',
      'external-data-file',
    );
    const raw = await createImage(
      'qcow2',
      join(root, 'data-raw.qcow2'),
      '16M',
      '-o',
      `data_file=${join(root, 'data-raw.raw')},data_file_raw=on`,
    );
    const { inspection } = await expectRefused(raw, 'qcow2', 'external-data-file');
    expect(inspection.images[0]?.header).toMatchObject({
      kind: 'qcow2',
      header: { autoclearRawExternalData: true, incompatible: { externalDataFile: true } },
    });
  });

  it('a json: backing name', async () => {
    const path = await createImage('qcow2', join(root, 'json.qcow2'), '1M');
    const secret = join(outside, 'secret');
    await writeFile(secret, 'secret\n');
    rebaseUnsafe(path, `json:{"driver":"raw","file":{"driver":"file","filename":"${secret}"}}`, 'raw');
    await expectRefused(path, 'qcow2', 'backing-name-not-a-path');
  });

  it('an nbd:// backing name: we make no TCP connection, qemu-img does', async () => {
    let accepted = 0;
    const listener: Server = createServer((socket) => {
      accepted++;
      socket.destroy();
    });
    await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', resolve));
    try {
      const address = listener.address();
      if (address === null || typeof address === 'string') throw new Error('no TCP address');
      const path = await createImage('qcow2', join(root, 'nbd.qcow2'), '1M');
      rebaseUnsafe(path, `nbd://127.0.0.1:${address.port}/x`, 'raw');
      const { inspection } = await expectRefused(path, 'qcow2', 'backing-name-not-a-path');
      expect(inspection.images).toHaveLength(1);
      expect(accepted).toBe(0);
      // The control: qemu-img info follows the name and connects, so the counter does count.
      await execFileAsync('qemu-img', ['info', '--backing-chain', '-U', path], { timeout: 60_000 }).catch(
        () => undefined,
      );
      await waitFor('qemu-img to connect to the nbd:// backing file', () =>
        accepted > 0 ? true : undefined,
      );
    } finally {
      listener.close();
    }
  });

  it.each([
    ['vmdk', []],
    ['qed', []],
    ['vdi', []],
    ['vpc', []],
    ['vhdx', []],
    ['parallels', []],
    ['luks', ['--object', 'secret,id=sec0,data=abc', '-o', 'key-secret=sec0,iter-time=100']],
  ])(
    'a %s container declared raw or qcow2, recognised as qemu-img recognises it',
    async (format, options) => {
      const path = await createImage(format, join(root, `container.${format}`), '1M', ...options);
      const { inspection } = await expectRefused(path, 'raw', 'foreign-header-as-raw');
      expect(inspection.images[0]?.header).toMatchObject({ kind: 'foreign', format });
      await expectRefused(path, 'qcow2', 'format-mismatch');
      // qemu-img's own probe says the same format.
      expect((await qemuInfo(path)).format).toBe(format);
    },
  );

  it('a vmdk backing file, recorded or probed', async () => {
    const vmdk = await createImage('vmdk', join(root, 'backing.vmdk'), '1M');
    const recorded = await createImage(
      'qcow2',
      join(root, 'vmdk-backed.qcow2'),
      undefined,
      '-b',
      vmdk,
      '-F',
      'vmdk',
    );
    await expectRefused(recorded, 'qcow2', 'backing-format-unsupported');
    const probed = await createImage(
      'qcow2',
      join(root, 'vmdk-probed.qcow2'),
      undefined,
      '-b',
      vmdk,
      '-F',
      'vmdk',
    );
    await dropBackingFormat(probed);
    const { inspection } = await expectRefused(probed, 'qcow2', 'backing-format-unsupported');
    expect(inspection.images[1]).toMatchObject({ openAs: 'vmdk', formatSource: 'probed' });
  });

  it('an encrypted qcow2', async () => {
    const path = await createImage(
      'qcow2',
      join(root, 'encrypted.qcow2'),
      '1M',
      '--object',
      'secret,id=sec0,data=abc',
      '-o',
      'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100',
    );
    await expectRefused(path, 'qcow2', 'encrypted');
  });

  it('a qcow2 declared raw', async () => {
    await expectRefused(
      await createImage('qcow2', join(root, 'qcow2-as-raw.img'), '1M'),
      'raw',
      'foreign-header-as-raw',
    );
  });

  it('a corrupt image, and one with an unknown incompatible feature (qemu-img refuses it too)', async () => {
    const corrupt = await createImage('qcow2', join(root, 'corrupt.qcow2'), '1M');
    await setIncompatibleBits(corrupt, 2n);
    await expectRefused(corrupt, 'qcow2', 'corrupt');
    expect((await qemuInfo(corrupt)).corrupt).toBe(true);

    const future = await createImage('qcow2', join(root, 'future.qcow2'), '1M');
    await setIncompatibleBits(future, 1n << 20n);
    await expectRefused(future, 'qcow2', 'unknown-incompatible-features');
    await expect(qemuInfo(future)).rejects.toThrow(/Unsupported qcow2 feature/);
  });

  it('a hard-linked image, and a hard-linked backing file', async () => {
    const path = await createImage('qcow2', join(root, 'linked.qcow2'), '1M');
    await link(path, join(root, 'linked-elsewhere.qcow2'));
    await expectRefused(path, 'qcow2', 'hard-linked');

    const secret = await createImage('raw', join(outside, 'hard-secret.raw'), '1M');
    await link(secret, join(root, 'hard-link.raw')); // same file system in this test
    const top = await createImage(
      'qcow2',
      join(root, 'hard-backed.qcow2'),
      undefined,
      '-b',
      'hard-link.raw',
      '-F',
      'raw',
    );
    await expectRefused(top, 'qcow2', 'hard-linked');
  });

  it('symlink escapes and absolute names outside the roots', async () => {
    const secret = await createImage('qcow2', join(outside, 'secret.qcow2'), '1M');
    await symlink(secret, join(root, 'escape.qcow2'));
    const viaLink = await createImage('qcow2', join(root, 'via-link.qcow2'), '1M');
    rebaseUnsafe(viaLink, 'escape.qcow2', 'qcow2');
    const { inspection } = await expectRefused(viaLink, 'qcow2', 'outside-allowed-roots');
    expect(inspection.images).toHaveLength(1);

    const absolute = await createImage('qcow2', join(root, 'absolute-out.qcow2'), '1M');
    rebaseUnsafe(absolute, secret, 'qcow2');
    await expectRefused(absolute, 'qcow2', 'outside-allowed-roots');

    const dotdot = await createImage('qcow2', join(root, 'dotdot.qcow2'), '1M');
    rebaseUnsafe(dotdot, '../outside/secret.qcow2', 'qcow2');
    await expectRefused(dotdot, 'qcow2', 'outside-allowed-roots');
  });

  it('a FIFO, a character device and a block device as backing files (none is opened)', async () => {
    execFileSync('mkfifo', [join(root, 'fifo')]);
    execFileSync('mknod', [join(root, 'null-device'), 'c', '1', '3']);
    const [blockDevice] = (await readFile('/proc/partitions', 'utf8'))
      .split('\n')
      .slice(2)
      .map((line) => line.trim().split(/\s+/))
      .filter((fields) => fields.length === 4);
    if (blockDevice === undefined) throw new Error('no block device listed in /proc/partitions');
    execFileSync('mknod', [join(root, 'block-device'), 'b', blockDevice[0]!, blockDevice[1]!]);

    for (const [name, fileType] of [
      ['fifo', 'FIFO'],
      ['null-device', 'character device'],
      ['block-device', 'block-device'],
    ] as const) {
      const top = await createImage('qcow2', join(root, `backed-by-${name}.qcow2`), '1M');
      rebaseUnsafe(top, name, 'raw');
      const { inspection } = await expectRefused(top, 'qcow2', 'not-a-regular-file');
      expect(inspection.end).toMatchObject({ kind: 'not-an-image-file', fileType });
    }
    // And as the top image of a raw spec: a FIFO or character device is never read.
    await expectRefused(join(root, 'fifo'), 'raw', 'not-a-regular-file');
    await expectRefused(join(root, 'null-device'), 'raw', 'not-a-regular-file');
  });

  it('a loop a → b → a', async () => {
    const a = await createImage('qcow2', join(root, 'loop-a.qcow2'), '1M');
    const b = await createImage('qcow2', join(root, 'loop-b.qcow2'), '1M');
    rebaseUnsafe(a, 'loop-b.qcow2', 'qcow2');
    rebaseUnsafe(b, 'loop-a.qcow2', 'qcow2');
    await expectRefused(a, 'qcow2', 'chain-loop');
  });

  it('a chain deeper than the limit', async () => {
    const top = await qcow2Chain(join(root, 'deep'), DEFAULT_MAX_BACKING_DEPTH + 4);
    const { inspection } = await expectRefused(top, 'qcow2', 'chain-too-deep');
    expect(inspection.images).toHaveLength(DEFAULT_MAX_BACKING_DEPTH + 1);
  });
});

describe('inspection time', () => {
  it('per image, median over 200 two-image chains: ours against qemu-img info', async () => {
    const dir = join(root, 'bench');
    await mkdir(dir);
    const baseImage = await createImage('qcow2', join(dir, 'base.qcow2'), '64M');
    const template = await createImage(
      'qcow2',
      join(dir, 'template.qcow2'),
      undefined,
      '-b',
      'base.qcow2',
      '-F',
      'qcow2',
    );
    const paths: string[] = [];
    for (let i = 0; i < 200; i++) {
      const path = join(dir, `image-${i}.qcow2`);
      await copyFile(template, path);
      paths.push(path);
    }

    // Two passes, so that neither pays for the other's cache misses; qemu-img runs as the
    // controller runs it (a child process per image).
    const ours: number[] = [];
    const verdicts: ImageVerdict[] = [];
    for (const path of paths) {
      const started = performance.now();
      verdicts.push((await judge(path, 'qcow2')).verdict);
      ours.push(performance.now() - started);
    }
    const theirs: number[] = [];
    const infos: ImageInfo[] = [];
    for (const path of paths) {
      const started = performance.now();
      infos.push(await qemuInfo(path));
      theirs.push(performance.now() - started);
    }
    for (const [i, verdict] of verdicts.entries())
      expect(verdict).toMatchObject({
        ok: true,
        image: { virtualSize: infos[i]?.virtualSize, backingChain: [baseImage] },
      });
    const percentile = (values: number[], p: number): string =>
      ([...values].sort((a, b) => a - b)[Math.floor((values.length - 1) * p)] ?? NaN).toFixed(2);
    console.log(
      `image-header inspection of 200 two-image qcow2 chains (ms, median / p90): ` +
        `inspectImageChain+judge ${percentile(ours, 0.5)} / ${percentile(ours, 0.9)}, ` +
        `qemu-img info --backing-chain ${percentile(theirs, 0.5)} / ${percentile(theirs, 0.9)}`,
    );
    expect(ours).toHaveLength(200);
  });
});
