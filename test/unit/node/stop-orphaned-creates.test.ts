/**
 * stopOrphanedCreates against real processes: stand-ins whose command line reads like a
 * `qemu-img create` of one of createImage's temporaries (bash's `exec -a` names them), left
 * without their parent as a killed controller leaves its qemu-img.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { stopOrphanedCreates } from '../../../src/node/qemu-img.js';
import { findProcesses, isRunning } from '../../../src/node/process/proc-scan.js';
import { waitFor } from '../../support/poll.js';

/** Starts an orphan (double fork) whose argv is `qemu-img create <args>`; returns its pid. */
async function startOrphan(args: string[]): Promise<number> {
  const marker = args.at(-1) ?? '';
  // tail -f /dev/null runs until killed, whatever names follow `create`.
  const script = `(exec -a qemu-img tail create ${args.map((a) => `'${a}'`).join(' ')} /dev/null -f >/dev/null 2>&1 &)`;
  const launcher = spawn('bash', ['-c', script], { stdio: 'ignore' });
  await new Promise((resolve) => launcher.once('exit', resolve));
  return waitFor(
    `the stand-in for ${marker}`,
    () => findProcesses((argv) => argv[0] === 'qemu-img' && argv.includes(marker))[0],
    { timeoutMs: 10_000, intervalMs: 20 },
  );
}

describe('stopOrphanedCreates', () => {
  let dir: string;
  const started: number[] = [];
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'nbdx-orphans-'));
  });
  afterEach(async () => {
    for (const pid of started.splice(0))
      if (isRunning(pid))
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // gone
        }
    await rm(dir, { recursive: true, force: true });
  });

  it('kills the orphaned create of the image, and only that one', async () => {
    const mine = await startOrphan([
      '-q',
      '-f',
      'raw',
      join(dir, '.disk.raw.nbdx-tmp-0123456789ab'),
      '1048576',
    ]);
    const otherImage = await startOrphan([
      '-q',
      '-f',
      'raw',
      join(dir, '.other.raw.nbdx-tmp-0123456789ab'),
      '1',
    ]);
    const elsewhere = await startOrphan([
      '-q',
      '-f',
      'raw',
      join(tmpdir(), '.disk.raw.nbdx-tmp-0123456789ab'),
      '2',
    ]);
    const notATemporary = await startOrphan(['-q', '-f', 'raw', join(dir, 'disk.raw'), '3']);
    started.push(mine, otherImage, elsewhere, notATemporary);

    expect(await stopOrphanedCreates(dir, { image: join(dir, 'disk.raw') })).toEqual([mine]);
    expect(isRunning(mine)).toBe(false);
    expect([otherImage, elsewhere, notATemporary].map(isRunning)).toEqual([true, true, true]);

    // Without an image: every orphaned create of a temporary in the directory.
    expect(await stopOrphanedCreates(dir)).toEqual([otherImage]);
    expect([elsewhere, notATemporary].map(isRunning)).toEqual([true, true]);
  });

  it('finds nothing to stop when nothing is orphaned', async () => {
    expect(await stopOrphanedCreates(dir, { image: join(dir, 'disk.raw') })).toEqual([]);
  });
});
