/**
 * The runner against real (tiny) programs: shell scripts that answer, fail, or hang like
 * qemu-img on a FIFO would. The deadlines here are short on purpose; what is asserted is
 * that the program was stopped, never how fast the machine is.
 */
import { chmod, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QemuCommandError } from '../../../../src/node/qemu-error.js';
import { processState } from '../../../../src/node/process/proc-scan.js';
import {
  DEFAULT_TIMEOUTS_MS,
  FALLBACK_TIMEOUT_MS,
  defaultTimeoutMs,
  runCommand,
  type CommandResult,
} from '../../../../src/node/process/run-command.js';
import { waitFor } from '../../../support/poll.js';

let dir: string;

async function script(name: string, body: string): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, `#!/bin/sh\n${body}\n`);
  await chmod(path, 0o755);
  return path;
}

/**
 * Runs a program that prints "ready" once it is set up (a trap, a helper forked), with
 * deadlines that grow until one was long enough for that: a slow machine takes more
 * attempts, never fails the test. Returns the result and the deadline that worked.
 */
async function runUntilReady(
  program: string,
  killGraceMs?: number,
): Promise<{ result: CommandResult; timeoutMs: number }> {
  for (const timeoutMs of [200, 1_000, 5_000, 20_000]) {
    const result = await runCommand(program, ['info'], {
      timeoutMs,
      ...(killGraceMs === undefined ? {} : { killGraceMs }),
    });
    if (result.stdout.includes('ready')) return { result, timeoutMs };
  }
  throw new Error(`${program} never printed "ready" before its deadline`);
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'run-command-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('runCommand', () => {
  it('reports exit code and both outputs, in the C locale', async () => {
    const program = await script('answers', 'echo "out $LC_ALL"; echo err >&2; exit 3');
    const result = await runCommand(program, []);
    expect(result).toEqual({ exitCode: 3, stdout: 'out C', stderr: 'err' });
  });

  it('reports a program that is not installed without throwing', async () => {
    const result = await runCommand(join(dir, 'no-such-program'), ['info']);
    expect(result.exitCode).toBeUndefined();
    expect((result.spawnError as NodeJS.ErrnoException | undefined)?.code).toBe('ENOENT');
    expect(result.timedOut).toBeUndefined();
  });

  it('stops a program that hangs at its deadline with SIGTERM, and says so', async () => {
    const program = await script('hangs', 'echo ready; exec sleep 60');
    const started = performance.now();
    const { result, timeoutMs } = await runUntilReady(program);
    expect(performance.now() - started).toBeLessThan(55_000); // it never ran its 60 s
    expect(result.exitCode).toBeUndefined();
    expect(result.stdout).toBe('ready');
    expect(result.timedOut).toEqual({ afterMs: timeoutMs, lastSignal: 'SIGTERM' });

    const error = QemuCommandError.fromResult(program, ['info'], result);
    expect(error.message).toBe(`${program} info: timed out after ${timeoutMs} ms (killed with SIGTERM)`);
  });

  it('sends SIGKILL after the grace period to a program that ignores SIGTERM', async () => {
    const program = await script('ignores-term', "trap '' TERM; echo ready; while :; do sleep 1; done");
    const { result, timeoutMs } = await runUntilReady(program, 200);
    expect(result.timedOut).toEqual({ afterMs: timeoutMs, lastSignal: 'SIGKILL' });
    expect(QemuCommandError.fromResult(program, [], result).message).toContain(
      `timed out after ${timeoutMs} ms (killed with SIGTERM, then SIGKILL)`,
    );
  });

  it('kills the whole process group: a helper the program forked dies with it', async () => {
    const pidFile = join(dir, 'helper.pid');
    const program = await script('forks', `sleep 60 & echo $! > ${pidFile}; echo ready; wait`);
    const { result } = await runUntilReady(program);
    expect(result.timedOut).toBeDefined();
    const helper = Number((await readFile(pidFile, 'utf8')).trim());
    expect(helper).toBeGreaterThan(0);
    await waitFor(
      `helper ${helper} to be gone`,
      () => (processState(helper) === 'running' ? undefined : true),
      {
        timeoutMs: 30_000,
        intervalMs: 20,
      },
    );
  });

  it('refuses a deadline that is not positive', () => {
    expect(() => runCommand('true', [], { timeoutMs: 0 })).toThrow(TypeError);
  });
});

describe('defaultTimeoutMs', () => {
  it.each([
    {
      command: 'qemu-img',
      args: ['info', '--output=json', '/x'],
      expected: DEFAULT_TIMEOUTS_MS['qemu-img info'],
    },
    { command: '/usr/bin/qemu-img', args: ['check', '/x'], expected: DEFAULT_TIMEOUTS_MS['qemu-img check'] },
    {
      command: 'qemu-img',
      args: ['create', '-q', '-f', 'qcow2'],
      expected: DEFAULT_TIMEOUTS_MS['qemu-img create'],
    },
    { command: 'qemu-img', args: ['resize', '/x', '1G'], expected: DEFAULT_TIMEOUTS_MS['qemu-img'] },
    { command: 'nbd-server', args: ['-V'], expected: DEFAULT_TIMEOUTS_MS['nbd-server'] },
    { command: 'cp', args: ['a', 'b'], expected: FALLBACK_TIMEOUT_MS },
  ])('$command $args → $expected ms', ({ command, args, expected }) => {
    expect(defaultTimeoutMs(command, args)).toBe(expected);
  });

  it('metadata reads are short, whole-image writes long', () => {
    expect(defaultTimeoutMs('qemu-img', ['info'])).toBeLessThanOrEqual(60_000);
    expect(defaultTimeoutMs('qemu-img', ['create'])).toBeGreaterThanOrEqual(10 * 60_000);
  });
});

describe('runCommand with a progress watch', () => {
  it('lets a slow program run on while its measure changes', async () => {
    const program = await script('slow-but-moving', 'sleep 1; echo done');
    let counter = 0;
    const result = await runCommand(program, [], {
      timeoutMs: 60_000,
      progress: { measure: () => Promise.resolve(++counter), stallMs: 100, everyMs: 20 },
    });
    expect(result).toEqual({ exitCode: 0, stdout: 'done', stderr: '' });
  });

  it('stops a program whose measure stands still, long before its deadline, and says so', async () => {
    const program = await script('stalls', 'echo ready; exec sleep 60');
    const started = performance.now();
    const result = await runCommand(program, ['create'], {
      timeoutMs: 50_000,
      progress: { measure: () => Promise.resolve(42), stallMs: 300, everyMs: 50 },
    });
    expect(performance.now() - started).toBeLessThan(45_000);
    expect(result.exitCode).toBeUndefined();
    expect(result.timedOut?.stalledMs).toBe(300);
    expect(result.timedOut?.afterMs).toBeGreaterThanOrEqual(300);
    expect(result.timedOut?.afterMs).toBeLessThan(50_000);
    expect(QemuCommandError.fromResult(program, ['create'], result).message).toMatch(
      new RegExp(
        `^${program} create: timed out: no progress for 300 ms, stopped after [0-9]+ ms \\(killed with SIGTERM`,
      ),
    );
  });
});
