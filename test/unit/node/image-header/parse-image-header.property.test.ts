/**
 * The parser is total: random bytes, random mutations of valid qcow2 headers and truncations
 * always give a well-formed ParsedImageHeader, quickly, and never throw.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { parseImageHeader, type ImageBytes } from '../../../../src/node/image-header/parse-image-header.js';
import type { ParsedImageHeader } from '../../../../src/plan/image-header.js';
import { Ext, qcow2, utf8, wholeFile } from './image-bytes.js';

const FOREIGN = ['qcow', 'qed', 'vmdk', 'vdi', 'vpc', 'vhdx', 'luks', 'parallels', 'dmg', 'cloop', 'bochs'];
/** Far above a parse (microseconds), far below "unbounded": a slow shared machine stays green. */
const PARSE_TIME_LIMIT_MS = 500;

function timedParse(bytes: ImageBytes): ParsedImageHeader {
  const started = performance.now();
  const parsed = parseImageHeader(bytes);
  const elapsed = performance.now() - started;
  if (elapsed > PARSE_TIME_LIMIT_MS)
    throw new Error(`parse took ${elapsed} ms for ${bytes.head.length} bytes`);
  return parsed;
}

/** Throws unless `parsed` is one of the declared shapes with sane values. */
function assertWellFormed(parsed: ParsedImageHeader, inputLength: number): void {
  switch (parsed.kind) {
    case 'raw':
      expect(Object.keys(parsed)).toEqual(['kind']);
      return;
    case 'foreign':
      expect(FOREIGN).toContain(parsed.format);
      expect(parsed.evidence.length).toBeGreaterThan(0);
      return;
    case 'invalid':
      expect(['qcow2', ...FOREIGN]).toContain(parsed.format);
      expect(typeof parsed.problem).toBe('string');
      expect(parsed.problem.length).toBeGreaterThan(0);
      return;
    case 'qcow2': {
      const h = parsed.header;
      expect([2, 3]).toContain(h.version);
      expect(h.clusterBits).toBeGreaterThanOrEqual(9);
      expect(h.clusterBits).toBeLessThanOrEqual(21);
      expect(h.virtualSize).toBeGreaterThanOrEqual(0);
      expect(Number.isFinite(h.virtualSize)).toBe(true);
      if (h.backingFileName !== undefined) {
        expect(h.backingFileName.length).toBeLessThanOrEqual(Math.min(1023, inputLength));
      }
      if (h.backingFormat !== undefined) expect(h.backingFormat.length).toBeLessThanOrEqual(15);
      for (const bit of h.incompatible.unknownBits) {
        expect(bit).toBeGreaterThanOrEqual(5);
        expect(bit).toBeLessThan(64);
      }
      return;
    }
  }
}

const validQcow2 = fc.constantFrom(
  qcow2({ version: 2, backingName: '/data/base.qcow2' }),
  qcow2({
    version: 3,
    backingName: 'base.qcow2',
    extensions: [
      { type: Ext.BackingFormat, data: utf8('qcow2') },
      { type: Ext.FeatureNameTable, data: new Uint8Array(96) },
    ],
  }),
  qcow2({ version: 3, clusterBits: 9, extensions: [{ type: Ext.DataFile, data: utf8('data.raw') }] }),
  qcow2({ version: 3, totalLength: 70_000 }),
);

/** Overwrites at the fields that steer the parser: offsets, lengths, versions, extension headers. */
const FIELD_OFFSETS = [4, 8, 12, 16, 20, 24, 32, 72, 80, 88, 96, 100, 104, 112, 116, 120, 124];

describe('parseImageHeader is total', () => {
  it('on random bytes with random sizes, tails and names', () => {
    fc.assert(
      fc.property(
        fc.uint8Array({ maxLength: 2048 }),
        fc.uint8Array({ maxLength: 512 }),
        fc.nat({ max: Number.MAX_SAFE_INTEGER }),
        fc.option(fc.string(), { nil: undefined }),
        (head, tail, size, fileName) => {
          const bytes: ImageBytes = { head, tail, size, ...(fileName !== undefined ? { fileName } : {}) };
          assertWellFormed(timedParse(bytes), head.length);
        },
      ),
      { numRuns: 2000 },
    );
  });

  it('on random bytes behind every magic the parser knows', () => {
    const magics = [
      'QFI\xfb',
      'QED\0',
      'KDMV',
      '# Disk DescriptorFile',
      'conectix',
      'version=1\n',
      '#!/bin/sh',
    ];
    fc.assert(
      fc.property(fc.constantFrom(...magics), fc.uint8Array({ maxLength: 4096 }), (magic, rest) => {
        const bytes = new Uint8Array(magic.length + rest.length);
        bytes.set(Uint8Array.from(magic, (c) => c.charCodeAt(0)));
        bytes.set(rest, magic.length);
        assertWellFormed(timedParse(wholeFile(bytes)), bytes.length);
      }),
      { numRuns: 2000 },
    );
  });

  it('on valid qcow2 headers with random bytes and fields overwritten', () => {
    const byteEdit = fc.record({ at: fc.nat({ max: 1023 }), value: fc.integer({ min: 0, max: 255 }) });
    const fieldEdit = fc.record({
      at: fc.constantFrom(...FIELD_OFFSETS),
      value: fc.oneof(fc.constantFrom(0, 1, 2, 3, 8, 9, 21, 22, 104, 0x7fffffff, 0xffffffff), fc.nat()),
    });
    fc.assert(
      fc.property(
        validQcow2,
        fc.array(byteEdit, { maxLength: 16 }),
        fc.array(fieldEdit, { maxLength: 6 }),
        (valid, byteEdits, fieldEdits) => {
          const bytes = valid.slice();
          const view = new DataView(bytes.buffer);
          for (const { at, value } of byteEdits) if (at < bytes.length) bytes[at] = value;
          for (const { at, value } of fieldEdits) if (at + 4 <= bytes.length) view.setUint32(at, value >>> 0);
          assertWellFormed(timedParse(wholeFile(bytes)), bytes.length);
        },
      ),
      { numRuns: 3000 },
    );
  });

  it('on every truncation of a valid header: a prefix is never read beyond its end', () => {
    fc.assert(
      fc.property(validQcow2, fc.nat(), (valid, cut) => {
        const prefix = valid.slice(0, cut % (valid.length + 1));
        const parsed = timedParse(wholeFile(prefix));
        assertWellFormed(parsed, prefix.length);
        if (prefix.length < 72) expect(parsed.kind).not.toBe('qcow2');
      }),
      { numRuns: 1000 },
    );
  });

  it('answers at once, allocating nothing, for lengths and offsets of 4 GiB', () => {
    const hostile = qcow2({
      backingOffset: 0xfffffff0n,
      backingSize: 0xffffffff,
      extensions: [{ type: Ext.DataFile, data: utf8('x'), length: 0xffffffff }],
    });
    const before = process.memoryUsage().arrayBuffers;
    for (let i = 0; i < 1000; i++) expect(timedParse(wholeFile(hostile)).kind).toBe('invalid');
    expect(process.memoryUsage().arrayBuffers - before).toBeLessThan(16 * 1024 * 1024);
  });
});
