import { describe, expect, it } from 'vitest';
import { parseImageHeader } from '../../../../src/node/image-header/parse-image-header.js';
import type { ParsedImageHeader, Qcow2Header } from '../../../../src/plan/image-header.js';
import { Ext, qcow2, utf8, wholeFile, withMagic } from './image-bytes.js';

const parse = (bytes: Uint8Array, fileName?: string): ParsedImageHeader =>
  parseImageHeader(wholeFile(bytes, fileName));

function qcow2Header(bytes: Uint8Array): Qcow2Header {
  const parsed = parse(bytes);
  if (parsed.kind !== 'qcow2') throw new Error(`expected qcow2, got ${JSON.stringify(parsed)}`);
  return parsed.header;
}

function problemOf(bytes: Uint8Array): string {
  const parsed = parse(bytes);
  if (parsed.kind !== 'invalid') throw new Error(`expected invalid, got ${JSON.stringify(parsed)}`);
  expect(parsed.format).toBe('qcow2');
  return parsed.problem;
}

describe('formats other than qcow2 are recognised by their magic', () => {
  const u32le = (value: number): Uint8Array => {
    const bytes = new Uint8Array(4);
    new DataView(bytes.buffer).setUint32(0, value, true);
    return bytes;
  };
  it.each([
    ['qed', withMagic('QED\0')],
    ['vmdk', withMagic('KDMV')],
    ['vmdk', withMagic('COWD')],
    ['vmdk', utf8('# Disk DescriptorFile\nversion=1\nCID=fffffffe\ncreateType="monolithicFlat"\n')],
    ['vmdk', utf8('# comment\n   \nversion=2\n')],
    ['vmdk', utf8('version=3\r\nRW 8 FLAT "/etc/shadow" 0\n')],
    ['vdi', withMagic(u32le(0xbeda107f), 0x40)],
    ['vpc', withMagic('conectix')],
    ['vhdx', withMagic('vhdxfile')],
    ['luks', withMagic(Uint8Array.of(0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe, 0, 1))],
    ['parallels', withMagic('WithoutFreeSpace')],
    ['parallels', withMagic('WithouFreSpacExt')],
    ['bochs', withMagic('Bochs Virtual HD Image')],
    [
      'cloop',
      utf8('#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$IMAGE && mount -r -t iso9660 /dev/cloop $1\n'),
    ],
    ['qcow', qcow2({ version: 1 })],
  ])('%s', (format, bytes) => {
    expect(parse(bytes)).toMatchObject({ kind: 'foreign', format });
  });

  it('finds a VHD footer and a DMG trailer in the last 512 bytes, and DMG by name', () => {
    const footer = (magic: string): Uint8Array => withMagic(magic, 8192 - 512, 8192);
    expect(parse(footer('conectix'))).toMatchObject({ kind: 'foreign', format: 'vpc' });
    expect(parse(footer('koly'))).toMatchObject({ kind: 'foreign', format: 'dmg' });
    expect(parse(new Uint8Array(4096), 'disk.dmg')).toMatchObject({ kind: 'foreign', format: 'dmg' });
    // Beyond the head: only the tail the reader supplies shows it.
    const far = { head: new Uint8Array(65536), tail: withMagic('conectix', 0, 512), size: 10 * 2 ** 30 };
    expect(parseImageHeader(far)).toMatchObject({ kind: 'foreign', format: 'vpc' });
  });

  it.each([
    ['zeros', new Uint8Array(65536)],
    ['empty', new Uint8Array(0)],
    ['three bytes of the qcow2 magic', Uint8Array.of(0x51, 0x46, 0x49)],
    ['text', utf8('hello world\n')],
    ['version=4 is not a VMDK descriptor', utf8('version=4\n')],
    ['version=1 after a non-comment line', utf8('x\nversion=1\n')],
    ['a shell script that is not cloop', utf8('#!/bin/sh\necho hi\n')],
    ['conectix in the middle', withMagic('conectix', 1000)],
  ])('raw: %s', (_name, bytes) => {
    expect(parse(bytes)).toEqual({ kind: 'raw' });
  });
});

describe('qcow2', () => {
  it('reads a version 2 header with a backing file', () => {
    const header = qcow2Header(qcow2({ version: 2, backingName: '/data/base.qcow2', size: 1n << 30n }));
    expect(header).toMatchObject({
      version: 2,
      clusterBits: 16,
      virtualSize: 2 ** 30,
      cryptMethod: 0,
      backingFileName: '/data/base.qcow2',
      encryptionExtension: false,
      autoclearRawExternalData: false,
    });
    expect(header.incompatible).toEqual({
      dirty: false,
      corrupt: false,
      externalDataFile: false,
      compressionType: false,
      extendedL2: false,
      unknownBits: [],
    });
    expect(header.backingFormat).toBeUndefined();
  });

  it('reads a version 3 header with its extensions', () => {
    const header = qcow2Header(
      qcow2({
        backingName: 'base.qcow2',
        extensions: [
          { type: Ext.BackingFormat, data: utf8('qcow2') },
          { type: Ext.FeatureNameTable, data: new Uint8Array(48) },
          { type: Ext.Bitmaps, data: new Uint8Array(24) },
          { type: 0x12345678, data: utf8('ignored') },
        ],
        autoclear: 1n,
      }),
    );
    expect(header).toMatchObject({
      version: 3,
      backingFileName: 'base.qcow2',
      backingFormat: 'qcow2',
      featureNameTable: true,
      bitmapsExtension: true,
      autoclearBitmaps: true,
    });
  });

  it('reports every incompatible feature bit, the unknown ones by position', () => {
    const header = qcow2Header(
      qcow2({ incompatible: 0b11111n | (1n << 7n) | (1n << 63n), compressionType: 1 }),
    );
    expect(header.incompatible).toEqual({
      dirty: true,
      corrupt: true,
      externalDataFile: true,
      compressionType: true,
      extendedL2: true,
      unknownBits: [7, 63],
    });
    expect(header.compressionType).toBe(1);
  });

  it('reports the external data file, raw-data autoclear bit, encryption', () => {
    const header = qcow2Header(
      qcow2({
        incompatible: 4n,
        autoclear: 2n,
        cryptMethod: 2,
        extensions: [
          { type: Ext.DataFile, data: utf8('/etc/shadow') },
          { type: Ext.FullDiskEncryption, data: new Uint8Array(16) },
        ],
      }),
    );
    expect(header).toMatchObject({
      dataFileName: '/etc/shadow',
      autoclearRawExternalData: true,
      cryptMethod: 2,
      encryptionExtension: true,
    });
    expect(header.incompatible.externalDataFile).toBe(true);
  });

  it('keeps a backing name as recorded, protocols and NULs included', () => {
    expect(qcow2Header(qcow2({ backingName: 'json:{"file.driver":"nbd"}' })).backingFileName).toBe(
      'json:{"file.driver":"nbd"}',
    );
    expect(qcow2Header(qcow2({ backingName: 'a\0b' })).backingFileName).toBe('a\0b');
  });

  it('treats an empty backing name as none', () => {
    expect(
      qcow2Header(qcow2({ backingOffset: 512n, backingSize: 0, totalLength: 1024 })).backingFileName,
    ).toBe(undefined);
  });

  it('reads extensions up to the backing name only, as QEMU does', () => {
    // The name sits right after the header: an extension written after it is not one.
    const bytes = qcow2({ backingName: 'base', backingOffset: 112n, endMarker: false, totalLength: 4096 });
    expect(qcow2Header(bytes).backingFormat).toBeUndefined();
  });

  it('accepts the area without an end marker when it is fully read', () => {
    const bytes = qcow2({ clusterBits: 9, endMarker: false, totalLength: 512 });
    expect(parse(bytes).kind).toBe('qcow2');
  });
});

describe('malformed qcow2 headers are "invalid", with the reason', () => {
  it.each([
    ['unknown version', qcow2({ version: 4 }), /unknown version 4/],
    ['version 0', qcow2({ version: 0 }), /unknown version 0/],
    ['truncated before the version', Uint8Array.of(0x51, 0x46, 0x49, 0xfb, 0), /truncated/],
    ['truncated v2', qcow2({ version: 2 }).subarray(0, 60), /truncated/],
    ['truncated v3', qcow2({ version: 3 }).subarray(0, 90), /truncated/],
    ['cluster bits too small', qcow2({ clusterBits: 8 }), /cluster bits 8/],
    ['cluster bits too large', qcow2({ clusterBits: 22 }), /cluster bits 22/],
    [
      'header length too short',
      qcow2({ headerLength: 96, endMarker: false, totalLength: 200 }),
      /header length 96/,
    ],
    [
      'header length beyond the cluster',
      qcow2({ clusterBits: 9, headerLength: 1024, totalLength: 2048 }),
      /exceeds/,
    ],
    ['header length beyond the bytes', qcow2({ headerLength: 4096 }).subarray(0, 2000), /beyond/],
    ['refcount order', qcow2({ refcountOrder: 7 }), /refcount order 7/],
    ['unknown compression type', qcow2({ compressionType: 2, incompatible: 8n }), /compression type 2/],
    ['zstd without its bit', qcow2({ compressionType: 1 }), /without the compression-type/],
    ['backing name too long', qcow2({ backingName: 'x'.repeat(1024) }), /1024 bytes/],
    [
      'backing name outside the cluster',
      qcow2({ clusterBits: 9, backingOffset: 500n, backingSize: 20 }),
      /outside/,
    ],
    ['backing name at a huge offset', qcow2({ backingOffset: 2n ** 63n, backingSize: 4 }), /outside/],
    ['backing name beyond the bytes read', qcow2({ backingOffset: 1000n, backingSize: 8 }), /beyond/],
    ['backing name not UTF-8', qcow2({ backingName: Uint8Array.of(0x2f, 0xff, 0xfe) }), /UTF-8/],
    [
      'extension longer than the header area',
      qcow2({ extensions: [{ type: Ext.BackingFormat, data: utf8('raw'), length: 0xffffffff }] }),
      /overruns/,
    ],
    [
      'extensions running past the bytes read',
      qcow2({ clusterBits: 20, endMarker: false, extensions: [{ type: 0x1234, data: new Uint8Array(80) }] }),
      /beyond the 200 bytes/,
    ],
    [
      'backing format too long',
      qcow2({ extensions: [{ type: Ext.BackingFormat, data: utf8('q'.repeat(16)) }] }),
      /backing format extension of 16/,
    ],
    [
      'data file name absurdly long',
      qcow2({ clusterBits: 16, extensions: [{ type: Ext.DataFile, data: new Uint8Array(5000) }] }),
      /external data file name of 5000/,
    ],
  ])('%s', (_name, bytes, problem) => {
    expect(problemOf(bytes)).toMatch(problem);
  });
});
