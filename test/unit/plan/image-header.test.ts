import { describe, expect, it } from 'vitest';
import { Reason } from '../../../src/api/reasons.js';
import {
  createBackingGate,
  DEFAULT_MAX_BACKING_DEPTH,
  judgeImageChain,
  vetBackingName,
  type ChainEnd,
  type ImageChainInspection,
  type ImageJudgeRequest,
  type InspectedImage,
  type ParsedImageHeader,
  type Qcow2Header,
} from '../../../src/plan/image-header.js';

const ROOT = '/data';
const request = (overrides: Partial<ImageJudgeRequest> = {}): ImageJudgeRequest => ({
  allowedRoots: [ROOT],
  maxBackingDepth: DEFAULT_MAX_BACKING_DEPTH,
  allowRawOverForeignHeader: false,
  declaredFormat: 'qcow2',
  ...overrides,
});

function qcow2Header(overrides: Partial<Qcow2Header> = {}): ParsedImageHeader {
  return {
    kind: 'qcow2',
    header: {
      version: 3,
      clusterBits: 16,
      virtualSize: 1 << 30,
      cryptMethod: 0,
      encryptionExtension: false,
      bitmapsExtension: false,
      featureNameTable: true,
      incompatible: {
        dirty: false,
        corrupt: false,
        externalDataFile: false,
        compressionType: false,
        extendedL2: false,
        unknownBits: [],
      },
      autoclearBitmaps: false,
      autoclearRawExternalData: false,
      compressionType: 0,
      ...overrides,
    },
  };
}

let nextInode = 1;
function image(
  path: string,
  header: ParsedImageHeader,
  overrides: Partial<InspectedImage> = {},
): InspectedImage {
  return {
    path,
    realPath: path,
    openedPath: path,
    file: { type: 'file', fileId: `1:${nextInode++}`, nlink: 1, size: 4096, allocatedBytes: 8192 },
    header,
    openAs: header.kind === 'qcow2' ? 'qcow2' : 'raw',
    formatSource: 'spec',
    ...overrides,
  };
}

const chain = (images: InspectedImage[], end: ChainEnd = { kind: 'complete' }): ImageChainInspection => ({
  images,
  end,
});

function refusalOf(inspection: ImageChainInspection, overrides: Partial<ImageJudgeRequest> = {}) {
  const verdict = judgeImageChain(inspection, request(overrides));
  if (verdict.ok) throw new Error('expected a refusal');
  return verdict;
}

describe('judgeImageChain accepts benign chains and summarises them like qemu-img info', () => {
  it('a qcow2 incremental over a qcow2 full over a raw base', () => {
    const top = image(
      '/data/incr.qcow2',
      qcow2Header({ backingFileName: 'full.qcow2', backingFormat: 'qcow2' }),
    );
    const full = image(
      '/data/full.qcow2',
      qcow2Header({ backingFileName: '/data/base.raw', backingFormat: 'raw' }),
      {
        formatSource: 'backing-format',
      },
    );
    const base = image('/data/base.raw', { kind: 'raw' }, { formatSource: 'backing-format' });
    expect(judgeImageChain(chain([top, full, base]), request())).toEqual({
      ok: true,
      image: {
        format: 'qcow2',
        fileId: '1:1',
        virtualSize: 1 << 30,
        actualSize: 8192,
        backingChain: ['/data/full.qcow2', '/data/base.raw'],
        backingFormats: ['qcow2', 'raw'],
        backingFormat: 'qcow2',
        corrupt: false,
        dirty: false,
      },
    });
  });

  it('a raw file: its size is the virtual size', () => {
    const raw = image('/data/disk.raw', { kind: 'raw' });
    expect(judgeImageChain(chain([raw]), request({ declaredFormat: 'raw' }))).toMatchObject({
      ok: true,
      image: { format: 'raw', virtualSize: 4096, backingChain: [] },
    });
  });

  it('a raw block device outside the roots (devices are the device policy’s business)', () => {
    const device = image(
      '/dev/vg/backup',
      { kind: 'raw' },
      {
        openedPath: '/dev/dm-3',
        file: { type: 'block-device', fileId: '5:3', nlink: 1, size: 1 << 20, allocatedBytes: 0 },
      },
    );
    expect(judgeImageChain(chain([device]), request({ declaredFormat: 'raw' })).ok).toBe(true);
  });

  it('a dirty qcow2 is served, and reported dirty', () => {
    const dirty = qcow2Header();
    if (dirty.kind === 'qcow2') dirty.header.incompatible.dirty = true;
    expect(judgeImageChain(chain([image('/data/a.qcow2', dirty)]), request())).toMatchObject({
      ok: true,
      image: { dirty: true },
    });
  });

  it('raw over a foreign header when the operator allows it', () => {
    const raw = image('/data/nested.raw', qcow2Header(), { openAs: 'raw' });
    expect(
      judgeImageChain(chain([raw]), request({ declaredFormat: 'raw', allowRawOverForeignHeader: true })).ok,
    ).toBe(true);
  });
});

describe('judgeImageChain refuses', () => {
  const flags = (set: Partial<Qcow2Header['incompatible']>): ParsedImageHeader => {
    const parsed = qcow2Header();
    if (parsed.kind === 'qcow2') Object.assign(parsed.header.incompatible, set);
    return parsed;
  };

  it.each<[string, ParsedImageHeader, string, string]>([
    ['external data file bit', flags({ externalDataFile: true }), 'external-data-file', Reason.ImageUnsafe],
    [
      'data file extension',
      qcow2Header({ dataFileName: '/etc/shadow' }),
      'external-data-file',
      Reason.ImageUnsafe,
    ],
    [
      'raw external data autoclear bit',
      qcow2Header({ autoclearRawExternalData: true }),
      'external-data-file',
      Reason.ImageUnsafe,
    ],
    ['AES encryption', qcow2Header({ cryptMethod: 1 }), 'encrypted', Reason.Unsupported],
    ['LUKS encryption', qcow2Header({ cryptMethod: 2 }), 'encrypted', Reason.Unsupported],
    ['the FDE extension', qcow2Header({ encryptionExtension: true }), 'encrypted', Reason.Unsupported],
    [
      'unknown incompatible bits',
      flags({ unknownBits: [9] }),
      'unknown-incompatible-features',
      Reason.Unsupported,
    ],
    ['a corrupt image', flags({ corrupt: true }), 'corrupt', Reason.ImageInvalid],
    ['virtual size 0', qcow2Header({ virtualSize: 0 }), 'virtual-size', Reason.ImageInvalid],
    ['virtual size above 2^53', qcow2Header({ virtualSize: 2 ** 60 }), 'virtual-size', Reason.ImageInvalid],
    [
      'a vmdk backing format',
      qcow2Header({ backingFileName: 'b', backingFormat: 'vmdk' }),
      'backing-format-unsupported',
      Reason.Unsupported,
    ],
    [
      'an invalid header',
      { kind: 'invalid', format: 'qcow2', problem: 'x' },
      'invalid-header',
      Reason.ImageInvalid,
    ],
    ['a raw file as qcow2', { kind: 'raw' }, 'format-mismatch', Reason.ImageFormatMismatch],
    [
      'a vmdk as qcow2',
      { kind: 'foreign', format: 'vmdk', evidence: 'KDMV' },
      'format-mismatch',
      Reason.ImageFormatMismatch,
    ],
  ])('%s', (_name, header, code, reason) => {
    expect(refusalOf(chain([image('/data/top.qcow2', header, { openAs: 'qcow2' })]))).toMatchObject({
      code,
      reason,
    });
  });

  it.each<[string, ParsedImageHeader]>([
    ['qcow2', qcow2Header()],
    ['luks', { kind: 'foreign', format: 'luks', evidence: 'LUKS magic' }],
    ['vmdk', { kind: 'foreign', format: 'vmdk', evidence: 'descriptor' }],
    ['a broken qcow2', { kind: 'invalid', format: 'qcow2', problem: 'cluster bits 40' }],
  ])('a raw spec over a %s header', (_name, header) => {
    expect(
      refusalOf(chain([image('/data/disk.raw', header, { openAs: 'raw' })]), { declaredFormat: 'raw' }),
    ).toMatchObject({ code: 'foreign-header-as-raw', reason: Reason.ImageFormatMismatch });
  });

  it('an empty raw file', () => {
    const empty = image(
      '/data/empty.raw',
      { kind: 'raw' },
      { file: { type: 'file', fileId: '1:1', nlink: 1, size: 0, allocatedBytes: 0 } },
    );
    expect(refusalOf(chain([empty]), { declaredFormat: 'raw' })).toMatchObject({ code: 'virtual-size' });
  });

  it('a hard-linked image, top or backing', () => {
    const linked = { type: 'file' as const, fileId: '1:77', nlink: 2, size: 4096, allocatedBytes: 4096 };
    expect(refusalOf(chain([image('/data/a.qcow2', qcow2Header(), { file: linked })]))).toMatchObject({
      code: 'hard-linked',
      reason: Reason.ImageUnsafe,
    });
    const top = image('/data/a.qcow2', qcow2Header({ backingFileName: 'b.raw' }));
    const base = image('/data/b.raw', { kind: 'raw' }, { file: linked, formatSource: 'probed' });
    expect(refusalOf(chain([top, base])).code).toBe('hard-linked');
  });

  it('a backing file that is a block device', () => {
    const top = image('/data/a.qcow2', qcow2Header({ backingFileName: '/data/dev' }));
    const device = image(
      '/data/dev',
      { kind: 'raw' },
      {
        file: { type: 'block-device', fileId: '0:5', nlink: 1, size: 512, allocatedBytes: 0 },
      },
    );
    expect(refusalOf(chain([top, device]))).toMatchObject({
      code: 'not-a-regular-file',
      reason: Reason.ImageUnsafe,
    });
  });

  it('an opened file outside the roots (a directory swapped for a symlink after realpath)', () => {
    const swapped = image('/data/a.qcow2', qcow2Header(), { openedPath: '/etc/a.qcow2' });
    expect(refusalOf(chain([swapped]))).toMatchObject({
      code: 'outside-allowed-roots',
      reason: Reason.PathNotAllowed,
    });
  });

  it('a probed backing file in a format other than raw and qcow2', () => {
    const top = image('/data/a.qcow2', qcow2Header({ backingFileName: 'b.vdi' }));
    const vdi = image(
      '/data/b.vdi',
      { kind: 'foreign', format: 'vdi', evidence: 'sig' },
      {
        openAs: 'vdi',
        formatSource: 'probed',
      },
    );
    expect(refusalOf(chain([top, vdi], { kind: 'stopped' }))).toMatchObject({
      code: 'backing-format-unsupported',
      reason: Reason.Unsupported,
    });
  });

  it('a probed top image (a spec backing file without backingFormat) in another format', () => {
    const vmdk = image(
      '/data/base.vmdk',
      { kind: 'foreign', format: 'vmdk', evidence: 'KDMV' },
      {
        openAs: 'vmdk',
        formatSource: 'probed',
      },
    );
    expect(refusalOf(chain([vmdk], { kind: 'stopped' }), { declaredFormat: undefined })).toMatchObject({
      code: 'backing-format-unsupported',
      reason: Reason.Unsupported,
    });
    const qcow = image('/data/base.qcow2', qcow2Header(), { formatSource: 'probed' });
    expect(judgeImageChain(chain([qcow]), request({ declaredFormat: undefined }))).toMatchObject({
      ok: true,
      image: { format: 'qcow2' },
    });
  });

  it('a backing file declared qcow2 that is not', () => {
    const top = image('/data/a.qcow2', qcow2Header({ backingFileName: 'b', backingFormat: 'qcow2' }));
    const raw = image('/data/b', { kind: 'raw' }, { openAs: 'qcow2', formatSource: 'backing-format' });
    expect(refusalOf(chain([top, raw], { kind: 'stopped' }))).toMatchObject({ code: 'format-mismatch' });
  });

  it('a raw-declared backing file carrying a qcow2 header, unless the operator allows it', () => {
    const top = image('/data/a.qcow2', qcow2Header({ backingFileName: 'b', backingFormat: 'raw' }));
    const disguised = image('/data/b', qcow2Header({ backingFileName: '/etc/shadow' }), {
      openAs: 'raw',
      formatSource: 'backing-format',
    });
    expect(refusalOf(chain([top, disguised]))).toMatchObject({
      code: 'foreign-header-as-raw',
      reason: Reason.ImageUnsafe,
    });
    expect(judgeImageChain(chain([top, disguised]), request({ allowRawOverForeignHeader: true })).ok).toBe(
      true,
    );
  });

  it.each<[ChainEnd, string, string]>([
    [
      { kind: 'missing', path: '/data/gone', namedBy: '/data/top.qcow2' },
      'backing-missing',
      Reason.BackingFileNotFound,
    ],
    [{ kind: 'missing', path: '/data/top.qcow2' }, 'backing-missing', Reason.ImageNotFound],
    [
      { kind: 'not-an-image-file', path: '/data/fifo', fileType: 'FIFO', namedBy: '/data/top.qcow2' },
      'not-a-regular-file',
      Reason.ImageUnsafe,
    ],
    [{ kind: 'unreadable', path: '/data/x', message: 'EACCES' }, 'unreadable', Reason.ImageInvalid],
    [{ kind: 'loop', path: '/data/top.qcow2', namedBy: '/data/b.qcow2' }, 'chain-loop', Reason.ImageUnsafe],
    [{ kind: 'too-deep', namedBy: '/data/x', limit: 16 }, 'chain-too-deep', Reason.ImageUnsafe],
    [
      {
        kind: 'refused',
        refusal: { reason: Reason.ImageUnsafe, code: 'backing-name-not-a-path', message: 'json:' },
      },
      'backing-name-not-a-path',
      Reason.ImageUnsafe,
    ],
  ])('a chain that ended %j', (end, code, reason) => {
    expect(
      refusalOf(chain([image('/data/top.qcow2', qcow2Header({ backingFileName: 'x' }))], end)),
    ).toMatchObject({
      code,
      reason,
    });
  });

  it('the first problem from the top: a corrupt top image before a missing backing file', () => {
    const corrupt = qcow2Header({ backingFileName: 'gone' });
    if (corrupt.kind === 'qcow2') corrupt.header.incompatible.corrupt = true;
    expect(
      refusalOf(
        chain([image('/data/t', corrupt)], { kind: 'missing', path: '/data/gone', namedBy: '/data/t' }),
      ).code,
    ).toBe('corrupt');
  });

  it('messages name the file and say what to do', () => {
    const refusal = refusalOf(
      chain([image('/data/top.qcow2', qcow2Header({ dataFileName: '/etc/shadow' }))]),
    );
    expect(refusal.message).toContain('/data/top.qcow2');
    expect(refusal.message).toContain('/etc/shadow');
    expect(refusal.message).toMatch(/qemu-img convert/);
  });
});

describe('backing names: only plain paths are followed', () => {
  it.each([
    'json:{"file":{"driver":"nbd","host":"127.0.0.1","port":"1"}}',
    'nbd://127.0.0.1:1/x',
    'nbd:127.0.0.1:10809',
    'file:/data/base.qcow2',
    'file:base.qcow2',
    'http://example.invalid/disk',
    'ssh://host/disk',
    'gluster+tcp://h/v/img',
    'host_device:/dev/sda',
    'a:b/c',
    'base\0.qcow2',
    '/data/x/nbd://127.0.0.1/y',
  ])('refuses %j', (name) => {
    expect(vetBackingName(name, '/data/top.qcow2')).toMatchObject({
      code: 'backing-name-not-a-path',
      reason: Reason.ImageUnsafe,
    });
  });

  it.each(['base.qcow2', '/data/base.qcow2', '../data/base.qcow2', './a:b', 'dir/a:b', '/data/a:b'])(
    'follows %j',
    (name) => {
      expect(vetBackingName(name, '/data/top.qcow2')).toBeUndefined();
    },
  );

  it('the gate refuses real paths outside the roots, and only those', () => {
    const gate = createBackingGate({ allowedRoots: ['/data', '/backups'], maxBackingDepth: 4 });
    expect(gate.maxBackingDepth).toBe(4);
    expect(gate.vetPath('/data/a/b.qcow2', '/data/t')).toBeUndefined();
    expect(gate.vetPath('/backups', '/data/t')).toBeUndefined();
    expect(gate.vetPath('/database/x', '/data/t')).toMatchObject({
      code: 'outside-allowed-roots',
      reason: Reason.PathNotAllowed,
    });
    expect(gate.vetName('nbd://127.0.0.1:1/x', '/data/t')?.code).toBe('backing-name-not-a-path');
  });
});
