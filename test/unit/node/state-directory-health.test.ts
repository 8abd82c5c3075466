/** The state directory's condition as /metrics shows it; full and read-only are in test/integration/faults.test.ts. */
import { mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { StateDirectoryHealth } from '../../../src/node/state-directory-health.js';

describe('StateDirectoryHealth', () => {
  let root: string;
  const logger = pino({ level: 'silent' });
  beforeEach(async () => {
    root = await mkdtemp(join(tmpdir(), 'nbdx-health-'));
  });
  afterEach(async () => {
    await rm(root, { recursive: true, force: true });
  });

  it('finds a usable directory ok and leaves nothing behind', async () => {
    const health = new StateDirectoryHealth(root, logger);
    expect(await health.check()).toBe('ok');
    expect(health.condition()).toBe('ok');
    expect(await readdir(root)).toEqual([]);
  });

  it('creates a deleted directory again', async () => {
    const dir = join(root, 'state');
    const health = new StateDirectoryHealth(dir, logger);
    expect(await health.check()).toBe('ok');
    await rm(dir, { recursive: true });
    expect(await health.check()).toBe('ok');
    expect(await readdir(root)).toEqual(['state']);
  });

  it('reports a directory that cannot be created as missing, and ok once it can', async () => {
    // A regular file where a parent directory should be: mkdir fails whatever our privileges.
    await writeFile(join(root, 'blocked'), '');
    const health = new StateDirectoryHealth(join(root, 'blocked', 'state'), logger);
    expect(await health.check()).toBe('missing');
    expect(health.condition()).toBe('missing');
    await rm(join(root, 'blocked'));
    await mkdir(join(root, 'blocked'));
    expect(await health.check()).toBe('ok');
  });
});
