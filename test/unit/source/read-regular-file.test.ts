import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, rm, symlink, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { inspectEntry, readRegularFile } from '../../../src/source/read-regular-file.js';
import { SourceFileRefusal, type RefusalReason } from '../../../src/source/source-file-refusal.js';

async function refusalOf(read: Promise<unknown>): Promise<RefusalReason> {
  try {
    await read;
  } catch (error) {
    if (error instanceof SourceFileRefusal) return error.reason;
    throw error;
  }
  throw new Error('expected a refusal');
}

describe('reading files someone else controls', () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'read-regular-file-'));
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('reads a regular file and names its version', async () => {
    await writeFile(join(dir, 'a.yaml'), 'a: 1\n');
    const content = await readRegularFile(join(dir, 'a.yaml'), 'a.yaml', 100);
    expect(content.text).toBe('a: 1\n');
    const entry = await inspectEntry(join(dir, 'a.yaml'), 'a.yaml');
    expect(entry).toEqual({ kind: 'regular-file', identity: content.identity });
    await writeFile(join(dir, 'a.yaml'), 'a: 2\n');
    expect((await readRegularFile(join(dir, 'a.yaml'), 'a.yaml', 100)).identity).not.toBe(content.identity);
  });

  it('refuses a FIFO without blocking, whether it is found by lstat or opened directly', async () => {
    const fifo = join(dir, 'x.yaml');
    execFileSync('mkfifo', [fifo]);
    const entry = await inspectEntry(fifo, 'x.yaml');
    expect(entry.kind === 'refused' && entry.refusal.reason).toBe('not-a-regular-file');
    // The race lstat cannot close: opened anyway, it must neither block nor be read.
    expect(await refusalOf(readRegularFile(fifo, 'x.yaml', 100))).toBe('not-a-regular-file');
  });

  it('refuses a directory and a symbolic link', async () => {
    await mkdir(join(dir, 'd.yaml'));
    await writeFile(join(dir, 'real'), 'a: 1\n');
    await symlink(join(dir, 'real'), join(dir, 'link.yaml'));
    const directory = await inspectEntry(join(dir, 'd.yaml'), 'd.yaml');
    expect(directory.kind === 'refused' && directory.refusal.reason).toBe('not-a-regular-file');
    const link = await inspectEntry(join(dir, 'link.yaml'), 'link.yaml');
    expect(link.kind === 'refused' && link.refusal.reason).toBe('not-a-regular-file');
    expect(await refusalOf(readRegularFile(join(dir, 'link.yaml'), 'link.yaml', 100))).toBe(
      'not-a-regular-file',
    );
    expect(await refusalOf(readRegularFile(join(dir, 'd.yaml'), 'd.yaml', 100))).toBe('not-a-regular-file');
  });

  it('refuses a file over the limit without reading it, and accepts one exactly at it', async () => {
    await truncate(join(dir, 'huge.yaml'), 0).catch(() => writeFile(join(dir, 'huge.yaml'), ''));
    await truncate(join(dir, 'huge.yaml'), 64 * 1024 * 1024); // sparse: costs no disk
    expect(await refusalOf(readRegularFile(join(dir, 'huge.yaml'), 'huge.yaml', 1024 * 1024))).toBe(
      'too-large',
    );
    await writeFile(join(dir, 'exact.yaml'), 'x'.repeat(100));
    expect((await readRegularFile(join(dir, 'exact.yaml'), 'exact.yaml', 100)).text).toHaveLength(100);
    expect(await refusalOf(readRegularFile(join(dir, 'exact.yaml'), 'exact.yaml', 99))).toBe('too-large');
  });

  it('refuses bytes that are not UTF-8 as a syntax problem', async () => {
    await writeFile(join(dir, 'bin.yaml'), Buffer.from([0x61, 0x3a, 0x20, 0xff, 0xfe, 0x0a]));
    expect(await refusalOf(readRegularFile(join(dir, 'bin.yaml'), 'bin.yaml', 100))).toBe('syntax');
  });

  it('reports a name that vanished as missing', async () => {
    expect(await inspectEntry(join(dir, 'gone.yaml'), 'gone.yaml')).toEqual({ kind: 'missing' });
  });
});
