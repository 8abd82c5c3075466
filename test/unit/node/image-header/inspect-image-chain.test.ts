/**
 * inspectImageChain on hand-built chains in a temporary directory: how names are resolved,
 * where the walk stops, and that what it stops at is what the judge refuses.
 */
import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, realpath, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { combineLikeQemu, inspectImageChain } from '../../../../src/node/image-header/inspect-image-chain.js';
import {
  createBackingGate,
  judgeImageChain,
  type BackingGate,
  type ImageChainInspection,
} from '../../../../src/plan/image-header.js';
import { Ext, qcow2, utf8 } from './image-bytes.js';

let base: string;
let root: string;
let outside: string;
let gate: BackingGate;

beforeAll(async () => {
  base = await realpath(await mkdtemp(join(tmpdir(), 'nbdx-chain-')));
  root = join(base, 'root');
  outside = join(base, 'outside');
  await mkdir(root);
  await mkdir(outside);
  gate = createBackingGate({ allowedRoots: [root], maxBackingDepth: 4 });
});
afterAll(async () => {
  await rm(base, { recursive: true, force: true });
});

/** A qcow2 file naming `backing` (with `format` recorded when given). */
async function writeQcow2(path: string, backing?: string, format?: string): Promise<string> {
  await writeFile(
    path,
    qcow2({
      ...(backing !== undefined ? { backingName: backing } : {}),
      ...(format !== undefined ? { extensions: [{ type: Ext.BackingFormat, data: utf8(format) }] } : {}),
    }),
  );
  return path;
}

/** `probe`: no declared format. */
const inspect = (
  path: string,
  declared: 'raw' | 'qcow2' | 'probe' = 'qcow2',
): Promise<ImageChainInspection> =>
  inspectImageChain(path, { declaredFormat: declared === 'probe' ? undefined : declared, gate });

const judge = (inspection: ImageChainInspection) =>
  judgeImageChain(inspection, {
    allowedRoots: [root],
    maxBackingDepth: gate.maxBackingDepth,
    allowRawOverForeignHeader: false,
    declaredFormat: 'qcow2',
  });

describe('inspectImageChain', () => {
  it('walks relative and absolute names, recorded and probed formats, to a raw base', async () => {
    await mkdir(join(root, 'c1'));
    await writeFile(join(root, 'c1', 'base.raw'), new Uint8Array(8192));
    await writeQcow2(join(root, 'c1', 'full.qcow2'), join(root, 'c1', 'base.raw'), 'raw');
    await writeQcow2(join(root, 'c1', 'mid.qcow2'), 'full.qcow2'); // no format: QEMU probes it
    const top = await writeQcow2(join(root, 'c1', 'top.qcow2'), 'mid.qcow2', 'qcow2');

    const inspection = await inspect(top);
    expect(inspection.end).toEqual({ kind: 'complete' });
    expect(inspection.images.map((i) => [i.realPath, i.openAs, i.formatSource])).toEqual([
      [top, 'qcow2', 'spec'],
      [join(root, 'c1', 'mid.qcow2'), 'qcow2', 'backing-format'],
      [join(root, 'c1', 'full.qcow2'), 'qcow2', 'probed'],
      [join(root, 'c1', 'base.raw'), 'raw', 'backing-format'],
    ]);
    expect(judge(inspection)).toMatchObject({
      ok: true,
      image: {
        format: 'qcow2',
        backingChain: [
          join(root, 'c1', 'mid.qcow2'),
          join(root, 'c1', 'full.qcow2'),
          join(root, 'c1', 'base.raw'),
        ],
        backingFormat: 'qcow2',
      },
    });
  });

  it('resolves a relative name against the name QEMU was given, and `..` as the kernel does', async () => {
    // root/c2/deep/img/top.qcow2 is reached as root/c2/alias/top.qcow2; alias -> deep/img.
    // QEMU opens "root/c2/alias/../base.qcow2": the kernel goes to deep/base.qcow2, not c2/base.qcow2.
    await mkdir(join(root, 'c2', 'deep', 'img'), { recursive: true });
    await symlink(join(root, 'c2', 'deep', 'img'), join(root, 'c2', 'alias'));
    await writeQcow2(join(root, 'c2', 'deep', 'base.qcow2'));
    await writeQcow2(join(root, 'c2', 'base.qcow2')); // the lexical answer, which would be wrong
    await writeQcow2(join(root, 'c2', 'deep', 'img', 'top.qcow2'), '../base.qcow2', 'qcow2');

    const inspection = await inspect(join(root, 'c2', 'alias', 'top.qcow2'));
    expect(inspection.end).toEqual({ kind: 'complete' });
    expect(inspection.images.map((i) => i.path)).toEqual([
      join(root, 'c2', 'alias', 'top.qcow2'),
      `${join(root, 'c2', 'alias')}/../base.qcow2`,
    ]);
    expect(inspection.images[1]?.realPath).toBe(join(root, 'c2', 'deep', 'base.qcow2'));
  });

  it('stops at a backing name that is not a plain path, before touching anything', async () => {
    const top = await writeQcow2(
      join(root, 'json.qcow2'),
      'json:{"file":{"driver":"file","filename":"/etc/shadow"}}',
    );
    const inspection = await inspect(top);
    expect(inspection.images).toHaveLength(1);
    expect(inspection.end).toMatchObject({ kind: 'refused', refusal: { code: 'backing-name-not-a-path' } });
    expect(judge(inspection)).toMatchObject({ ok: false, code: 'backing-name-not-a-path' });
  });

  it('stops at a symlink that leads outside the roots, without opening the target', async () => {
    await writeQcow2(join(outside, 'secret.qcow2'));
    await symlink(join(outside, 'secret.qcow2'), join(root, 'escape.qcow2'));
    const top = await writeQcow2(join(root, 'escaping.qcow2'), 'escape.qcow2', 'qcow2');
    const inspection = await inspect(top);
    expect(inspection.images).toHaveLength(1);
    expect(inspection.end).toMatchObject({ kind: 'refused', refusal: { code: 'outside-allowed-roots' } });
  });

  it('finds loops by device and inode: a→b→a and a→a', async () => {
    await writeQcow2(join(root, 'loop-a.qcow2'), 'loop-b.qcow2', 'qcow2');
    await writeQcow2(join(root, 'loop-b.qcow2'), 'loop-a.qcow2', 'qcow2');
    expect((await inspect(join(root, 'loop-a.qcow2'))).end).toEqual({
      kind: 'loop',
      path: join(root, 'loop-a.qcow2'),
      namedBy: join(root, 'loop-b.qcow2'),
    });
    await writeQcow2(join(root, 'self.qcow2'), './self.qcow2');
    const self = await inspect(join(root, 'self.qcow2'));
    expect(self.end).toMatchObject({ kind: 'loop' });
    expect(judge(self)).toMatchObject({ ok: false, code: 'chain-loop' });
  });

  it('stops after maxBackingDepth backing files', async () => {
    await mkdir(join(root, 'deep'));
    await writeQcow2(join(root, 'deep', '0.qcow2'));
    for (let i = 1; i <= 6; i++)
      await writeQcow2(join(root, 'deep', `${i}.qcow2`), `${i - 1}.qcow2`, 'qcow2');
    const exactlyFour = await inspect(join(root, 'deep', '4.qcow2'));
    expect(exactlyFour.end).toEqual({ kind: 'complete' });
    expect(exactlyFour.images).toHaveLength(5);
    const five = await inspect(join(root, 'deep', '5.qcow2'));
    expect(five.end).toMatchObject({ kind: 'too-deep', limit: 4 });
    expect(five.images).toHaveLength(5);
    expect(judge(five)).toMatchObject({ ok: false, code: 'chain-too-deep' });
  });

  it('does not read a FIFO named as a backing file', async () => {
    execFileSync('mkfifo', [join(root, 'pipe')]);
    const inspection = await inspect(await writeQcow2(join(root, 'pipe.qcow2'), 'pipe', 'raw'));
    expect(inspection.end).toMatchObject({ kind: 'not-an-image-file', fileType: 'FIFO' });
    expect(judge(inspection)).toMatchObject({ ok: false, code: 'not-a-regular-file' });
  });

  it('reports a missing backing file with the image that names it', async () => {
    const top = await writeQcow2(join(root, 'orphan.qcow2'), 'gone.qcow2', 'qcow2');
    expect((await inspect(top)).end).toEqual({
      kind: 'missing',
      path: join(root, 'gone.qcow2'),
      namedBy: top,
    });
  });

  it('does not follow an image with an external data file, nor a refused backing format', async () => {
    await writeFile(join(root, 'data.raw'), new Uint8Array(4096));
    await writeFile(
      join(root, 'with-data.qcow2'),
      qcow2({ incompatible: 4n, extensions: [{ type: Ext.DataFile, data: utf8('data.raw') }] }),
    );
    const withData = await inspect(join(root, 'with-data.qcow2'));
    expect(withData).toMatchObject({ images: [{}], end: { kind: 'stopped' } });
    expect(judge(withData)).toMatchObject({ ok: false, code: 'external-data-file' });

    const vmdkBacked = await inspect(await writeQcow2(join(root, 'vmdk-backed.qcow2'), 'data.raw', 'vmdk'));
    expect(vmdkBacked).toMatchObject({ images: [{}], end: { kind: 'stopped' } });
    expect(judge(vmdkBacked)).toMatchObject({ ok: false, code: 'backing-format-unsupported' });
  });

  it('reads a raw spec as raw: a qcow2 header in it is reported, its backing name not followed', async () => {
    const top = await writeQcow2(join(root, 'declared-raw.img'), '/etc/shadow');
    const inspection = await inspect(top, 'raw');
    expect(inspection).toMatchObject({
      images: [{ openAs: 'raw', header: { kind: 'qcow2' } }],
      end: { kind: 'complete' },
    });
  });

  it('probes the top image when no format is declared, as QEMU does', async () => {
    await writeFile(join(root, 'probe-base.raw'), new Uint8Array(4096));
    const top = await writeQcow2(join(root, 'probe-top.qcow2'), 'probe-base.raw', 'raw');
    expect(await inspect(top, 'probe')).toMatchObject({
      images: [
        { openAs: 'qcow2', formatSource: 'probed' },
        { openAs: 'raw', formatSource: 'backing-format' },
      ],
      end: { kind: 'complete' },
    });
    expect(await inspect(join(root, 'probe-base.raw'), 'probe')).toMatchObject({
      images: [{ openAs: 'raw', formatSource: 'probed' }],
    });
  });

  it('refuses a relative top path and reports a missing top image', async () => {
    expect((await inspect('relative.qcow2')).end).toMatchObject({ kind: 'unreadable' });
    expect((await inspect(join(root, 'absent.qcow2'))).end).toEqual({
      kind: 'missing',
      path: join(root, 'absent.qcow2'),
    });
  });
});

describe('combineLikeQemu', () => {
  it.each([
    ['/a/b/top', 'base', '/a/b/base'],
    ['/a/b/top', '/x/base', '/x/base'],
    ['/a/b/top', '../base', '/a/b/../base'],
    ['/top', 'base', '/base'],
  ])('%s + %s → %s', (namedBy, name, expected) => {
    expect(combineLikeQemu(namedBy, name)).toBe(expected);
  });
});
