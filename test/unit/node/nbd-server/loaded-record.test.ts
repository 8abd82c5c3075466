import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import {
  EMPTY_RECORD,
  readLoadedRecord,
  retiredAfter,
  writeLoadedRecord,
  type LoadedRecord,
} from '../../../../src/node/nbd-server/loaded-record.js';

describe('retiredAfter', () => {
  const previous: LoadedRecord = {
    ...EMPTY_RECORD,
    pid: 1,
    exports: { a: { fingerprint: 'fa', path: '/a' }, b: { fingerprint: 'fb', path: '/b' } },
    retired: { c: ['/c'], old: ['/gone'] },
  };

  it('keeps the paths of exports no longer served while a process holds them', () => {
    const inUse = new Set(['/a', '/b', '/c']);
    expect(retiredAfter(previous, { a: { fingerprint: 'fa', path: '/a' } }, inUse)).toEqual({
      b: ['/b'],
      c: ['/c'],
    });
  });

  it('keeps the old path of an export whose path changed', () => {
    const inUse = new Set(['/a']);
    expect(retiredAfter(previous, { a: { fingerprint: 'fa2', path: '/a2' } }, inUse)).toEqual({ a: ['/a'] });
  });

  it('forgets paths nobody holds', () => {
    expect(retiredAfter(previous, {}, new Set())).toEqual({});
  });
});

describe('loaded.json', () => {
  it('round-trips, and reads a missing or broken file as empty', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'nbdx-loaded-'));
    try {
      const path = join(dir, 'loaded.json');
      expect(await readLoadedRecord(path)).toEqual(EMPTY_RECORD);
      const record: LoadedRecord = {
        pid: 42,
        startedAt: '2026-01-01T00:00:00.000Z',
        base: 'abc',
        exports: { a: { fingerprint: 'f', path: '/a' } },
        retired: { b: ['/b'] },
      };
      await writeLoadedRecord(path, record);
      expect(await readLoadedRecord(path)).toEqual(record);
      await writeFile(path, '{broken');
      expect(await readLoadedRecord(path)).toEqual(EMPTY_RECORD);
      await writeFile(path, 'null');
      expect(await readLoadedRecord(path)).toEqual(EMPTY_RECORD);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('a corrupt loaded.json', () => {
  it('is moved aside when a logger is given, and read as empty', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'nbdx-loaded-'));
    try {
      const path = join(dir, 'loaded.json');
      await writeFile(path, '{"pid": 4');
      expect(await readLoadedRecord(path, pino({ level: 'silent' }))).toEqual(EMPTY_RECORD);
      const names = await readdir(dir);
      expect(names).toHaveLength(1);
      expect(names[0]).toMatch(/^loaded\.json\.corrupt-\d{8}T\d{9}Z$/);
      expect(await readFile(join(dir, names[0] ?? ''), 'utf8')).toBe('{"pid": 4');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
