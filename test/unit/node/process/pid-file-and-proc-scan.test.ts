import { once } from 'node:events';
import { spawn } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readPidFile } from '../../../../src/node/process/pid-file.js';
import {
  commandLineOf,
  findProcesses,
  isRunning,
  parentOf,
  startTicksOf,
} from '../../../../src/node/process/proc-scan.js';
import { signalGroup } from '../../../../src/node/process/signal-group.js';
import { waitFor } from '../../../support/poll.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'pid-file-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('readPidFile', () => {
  it.each([
    { text: '1234\n', expected: 1234 },
    { text: ' 1234 ', expected: 1234 },
    { text: '0\n', expected: undefined },
    { text: '-5\n', expected: undefined },
    { text: '12ab\n', expected: undefined },
    { text: '', expected: undefined },
  ])('$text → $expected', async ({ text, expected }) => {
    const path = join(dir, 'daemon.pid');
    await writeFile(path, text);
    expect(await readPidFile(path)).toBe(expected);
  });

  it('a missing file is no pid', async () => {
    expect(await readPidFile(join(dir, 'missing.pid'))).toBeUndefined();
  });
});

describe('proc-scan and signalGroup', () => {
  it('sees a child by its command line, and it is gone once its group is killed', async () => {
    const marker = `proc-scan-marker-${process.pid}`;
    const child = spawn('/bin/sh', ['-c', 'exec sleep 60', marker], { detached: true, stdio: 'ignore' });
    const pid = child.pid;
    if (pid === undefined) throw new Error('could not start sleep');
    // Reaped, not merely dead: a zombie still takes a signal to its group.
    const reaped = once(child, 'exit');
    try {
      await waitFor(
        'the child to exec sleep',
        () => (commandLineOf(pid)?.[0] === 'sleep' ? true : undefined),
        {
          timeoutMs: 30_000,
          intervalMs: 10,
        },
      );
      expect(isRunning(pid)).toBe(true);
      expect(parentOf(pid)).toBe(process.pid);
      expect(startTicksOf(pid)).toBeGreaterThanOrEqual(startTicksOf(process.pid) ?? Infinity);
      expect(findProcesses((argv, p) => p === pid && argv.join(' ') === 'sleep 60')).toEqual([pid]);
    } finally {
      expect(signalGroup(pid, 'SIGKILL')).toBe(true);
    }
    await reaped;
    expect(isRunning(pid)).toBe(false);
    expect(signalGroup(pid, 'SIGKILL')).toBe(false);
  });
});
