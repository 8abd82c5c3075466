/**
 * QemuStorageDaemon with a real qemu-storage-daemon on loopback and real NBD clients
 * (nbdinfo, nbdcopy, qemu-io): sizes, data integrity in and out of QCOW2, incrementals,
 * undisturbed neighbours, busy removal, foreign locks and adoption by a new instance.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ExportConfig } from '../../src/api/export-config.js';
import { fingerprintOf } from '../../src/api/export-config.js';
import { createImage } from '../../src/node/qemu-img.js';
import {
  DaemonRetiredError,
  ExportBusyError,
  ImageLockedError,
} from '../../src/node/qemu-storage-daemon/errors.js';
import { exportIdsOf } from '../../src/node/qemu-storage-daemon/export-state.js';
import { QemuStorageDaemon } from '../../src/node/qemu-storage-daemon/qemu-storage-daemon.js';
import { QmpClient } from '../../src/node/qemu-storage-daemon/qmp-client.js';
import { sha256File } from '../support/nbd.js';
import { stopChild } from '../support/child-process.js';
import { waitFor } from '../support/poll.js';

const MiB = 1024 * 1024;
const logger = pino({ level: process.env['LOG_LEVEL'] ?? 'silent' });
let dir: string;
let port: number;
let daemon: QemuStorageDaemon;
const children: ChildProcess[] = [];

function requireBinary(name: string): void {
  if (spawnSync('sh', ['-c', `command -v ${name}`]).status !== 0)
    throw new Error(
      `${name} is required for these tests (Debian: qemu-system-common, qemu-utils, libnbd-bin)`,
    );
}

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  await new Promise((resolve) => server.close(resolve));
  if (address === null || typeof address === 'string') throw new Error('no port');
  return address.port;
}

function run(command: string, args: string[]): string {
  const result = spawnSync(command, args, { encoding: 'utf8', maxBuffer: 64 * MiB });
  if (result.status !== 0)
    throw new Error(`${command} ${args.join(' ')} failed (${result.status}): ${result.stderr}`);
  return result.stdout;
}

/** Runs a client to completion without blocking the event loop (the daemon class needs it). */
function runAsync(command: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    children.push(child);
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    child.on('error', reject);
    child.on('exit', (code) =>
      code === 0 ? resolve(stdout) : reject(new Error(`${command} ${args.join(' ')}: ${code}: ${stderr}`)),
    );
  });
}

const uri = (name: string) => `nbd://127.0.0.1:${port}/${name}`;

function config(exportName: string, path: string, overrides: Partial<ExportConfig> = {}): ExportConfig {
  return {
    exportName,
    server: 'qemu-storage-daemon',
    path,
    format: 'qcow2',
    blockDevice: false,
    readOnly: false,
    maxConnections: 1,
    allowedClients: [],
    ...overrides,
  };
}

/**
 * An NBD client that stays connected: qemu-io reading commands from a pipe. `command`
 * resolves with the output of one qemu-io command.
 */
class HeldConnection {
  readonly child: ChildProcess;
  #output = '';
  constructor(exportUri: string) {
    this.child = spawn('qemu-io', ['-f', 'raw', exportUri], { stdio: ['pipe', 'pipe', 'pipe'] });
    children.push(this.child);
    this.child.stdout?.on('data', (chunk: Buffer) => (this.#output += chunk.toString()));
    this.child.stderr?.on('data', (chunk: Buffer) => (this.#output += chunk.toString()));
  }
  async command(line: string, expect: RegExp): Promise<string> {
    const start = this.#output.length;
    this.child.stdin?.write(`${line}\n`);
    return waitFor(`qemu-io "${line}"`, () => {
      const output = this.#output.slice(start);
      if (expect.test(output)) return Promise.resolve(output);
      if (this.child.exitCode !== null) throw new Error(`qemu-io exited: ${this.#output}`);
      return Promise.resolve(undefined);
    });
  }
  async close(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.child.stdin?.end(); // qemu-io quits at the end of its input
    await stopChild(this.child, { signal: 'none', graceMs: 10_000 });
  }
}

beforeAll(async () => {
  for (const name of ['qemu-storage-daemon', 'qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo', 'nbdcopy'])
    requireBinary(name);
  dir = await mkdtemp(join(tmpdir(), 'nbdx-qsd-'));
  port = await freePort();
  daemon = new QemuStorageDaemon({ stateDir: join(dir, 'state'), listenAddress: '127.0.0.1', port, logger });
  await daemon.start();
});

/** Stops what a test started, even when it failed half-way. */
const cleanups: (() => Promise<unknown>)[] = [];

afterAll(async () => {
  for (const child of children)
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  await daemon?.stop();
  for (const cleanup of cleanups) await cleanup().catch(() => undefined);
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('QemuStorageDaemon', () => {
  const source = () => join(dir, 'source.raw');
  const disk = () => join(dir, 'disk.qcow2');

  it('starts a daemon in its own session', () => {
    const status = daemon.status();
    expect(status).toMatchObject({ running: true, adopted: false });
    const sid = run('ps', ['-o', 'sid=', '-p', String(status.pid)]).trim();
    expect(sid).toBe(String(status.pid));
  });

  it('serves a QCOW2 export with its virtual size', async () => {
    await createImage({ path: disk(), format: 'qcow2', sizeBytes: 64 * MiB });
    await daemon.addExport(config('disk', disk()));
    expect(run('nbdinfo', ['--size', uri('disk')]).trim()).toBe(String(64 * MiB));
    const served = await daemon.exports();
    expect([...served.keys()]).toEqual(['disk']);
    expect(served.get('disk')?.fingerprint).toBe(fingerprintOf(config('disk', disk())));
    // Idempotent.
    await daemon.addExport(config('disk', disk()));
  });

  it('writes through NBD into the QCOW2 and reads the same data back', async () => {
    await writeFile(source(), randomBytes(64 * MiB));
    await runAsync('nbdcopy', ['--flush', source(), uri('disk')]);
    const back = join(dir, 'back.raw');
    await runAsync('nbdcopy', [uri('disk'), back]);
    expect(await sha256File(back)).toBe(await sha256File(source()));
    // The data is in the QCOW2 itself, read by qemu-img beside the daemon (-U: it holds the lock).
    expect(run('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'qcow2', source(), disk()])).toMatch(
      /identical/,
    );
  });

  it('serves an incremental: its own data where it has any, its backing file elsewhere', async () => {
    const base = join(dir, 'base.qcow2');
    const incremental = join(dir, 'incr.qcow2');
    await createImage({ path: base, format: 'qcow2', sizeBytes: 8 * MiB });
    run('qemu-io', ['-f', 'qcow2', '-c', `write -P 0xaa 0 ${8 * MiB}`, base]);
    await createImage({
      path: incremental,
      format: 'qcow2',
      backingFile: base,
      backingFormat: 'qcow2',
      sizeBytes: 8 * MiB,
    });
    run('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x55 ${MiB} ${MiB}`, incremental]);

    // The chain is handed over whole: the daemon opens the backing file it is given.
    await daemon.addExport(
      config('incr', incremental, { readOnly: true, backing: [{ path: base, format: 'qcow2' }] }),
    );
    expect(run('nbdinfo', ['--size', uri('incr')]).trim()).toBe(String(8 * MiB));
    const out = join(dir, 'incr.out');
    await runAsync('nbdcopy', [uri('incr'), out]);
    const expected = Buffer.alloc(8 * MiB, 0xaa);
    expected.fill(0x55, MiB, 2 * MiB);
    expect((await readFile(out)).equals(expected)).toBe(true);
    await daemon.removeExport('incr', { force: false });
    // Backing nodes are `<id>-b<i>f`/`<id>-b<i>d`; an id's hash may itself start with "b".
    expect((await daemon.blockNodes()).filter((n) => /-b[0-9]+[fd]$/.test(n))).toEqual([]);
  });

  it('opens nothing an image header names: a backing name it is not given is not followed', async () => {
    const secret = join(dir, 'secret.raw');
    await writeFile(secret, Buffer.alloc(MiB, 0x5e));
    const hostile = join(dir, 'hostile.qcow2');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', secret, '-F', 'raw', hostile, String(MiB)]);
    await daemon.addExport(config('hostile', hostile, { readOnly: true }));
    const out = join(dir, 'hostile.out');
    await runAsync('nbdcopy', [uri('hostile'), out]);
    // Served without a backing file: unallocated clusters read as zeros, never the named file.
    expect((await readFile(out)).equals(Buffer.alloc(MiB, 0))).toBe(true);
    await daemon.removeExport('hostile', { force: false });
  });

  it('adds and removes other exports while a client transfers on one', async () => {
    const held = new HeldConnection(uri('disk'));
    const dump = async () =>
      (await held.command('read -v 0 16', /read 16\/16 bytes/)).match(/00000000:.*/)?.[0];
    const before = await dump();
    expect(before).toBeDefined();

    const copy = join(dir, 'during.raw');
    const transfer = runAsync('nbdcopy', ['--connections=1', uri('disk'), copy]);
    const other = join(dir, 'other.qcow2');
    await createImage({ path: other, format: 'qcow2', sizeBytes: 16 * MiB });
    await daemon.addExport(config('other', other));
    expect(run('nbdinfo', ['--size', uri('other')]).trim()).toBe(String(16 * MiB));
    await daemon.removeExport('other', { force: false });
    await transfer;

    expect(await sha256File(copy)).toBe(await sha256File(source()));
    expect(await dump()).toBe(before);
    await held.close();
  });

  it('refuses to remove an export with a connected client unless forced', async () => {
    const held = new HeldConnection(uri('disk'));
    await held.command('read 0 512', /read 512\/512 bytes/);

    const error = await daemon.removeExport('disk', { force: false }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(ExportBusyError);
    expect((error as Error).name).toBe('ExportBusyError');
    expect((await daemon.exports()).has('disk')).toBe(true);
    await held.command('read 0 512', /read 512\/512 bytes/);

    await daemon.removeExport('disk', { force: true });
    expect((await daemon.exports()).has('disk')).toBe(false);
    expect(await daemon.blockNodes()).toEqual([]);
    // The client was cut: its next read fails or it has gone.
    await waitFor('the client to notice', async () => {
      if (held.child.exitCode !== null) return true;
      const output = await held.command('read 0 512', /read failed|bytes|Input\/output|Connection/);
      return /failed|Input\/output|Connection/.test(output) ? true : undefined;
    });
    await held.close();
    // Still intact after all this.
    expect(run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', source(), disk()])).toMatch(/identical/);
  });

  for (const format of ['qcow2', 'raw'] as const)
    it(`refuses a ${format} image a foreign qemu-nbd writes, leaving nothing behind`, async () => {
      const image = join(dir, `foreign.${format}`);
      await createImage({ path: image, format, sizeBytes: 8 * MiB });
      const socket = join(dir, `foreign-${format}.sock`);
      const foreign = spawn('qemu-nbd', ['--persistent', '-f', format, '-k', socket, image], {
        stdio: 'ignore',
      });
      children.push(foreign);
      await waitFor('qemu-nbd', async () =>
        (await readFile(socket).catch((e: NodeJS.ErrnoException) => e.code)) === 'ENXIO' ? true : undefined,
      );

      const nodesBefore = await daemon.blockNodes();
      for (const readOnly of [false, true]) {
        const error = await daemon
          .addExport(config(`foreign-${format}`, image, { format, readOnly }))
          .catch((e: unknown) => e);
        expect(error).toBeInstanceOf(ImageLockedError);
        // QEMU's own words for qcow2; for raw (QEMU shares "write" there) the lock table's.
        expect((error as Error).message).toMatch(
          format === 'qcow2' ? /Failed to get (shared )?"write" lock/ : /"write" permission lock/,
        );
        expect((await daemon.exports()).has(`foreign-${format}`)).toBe(false);
        expect(await daemon.blockNodes()).toEqual(nodesBefore);
      }

      await stopChild(foreign);
      await daemon.addExport(config(`foreign-${format}`, image, { format }));
      expect(run('nbdinfo', ['--size', uri(`foreign-${format}`)]).trim()).toBe(String(8 * MiB));
    });

  it('is adopted by a new instance without a restart', async () => {
    const before = await daemon.exports();
    const { pid } = daemon.status();
    await daemon.detach();

    const adopter = new QemuStorageDaemon({
      stateDir: join(dir, 'state'),
      listenAddress: '127.0.0.1',
      port,
      logger,
    });
    await adopter.start();
    expect(adopter.status()).toMatchObject({ running: true, adopted: true, pid });
    expect(await adopter.exports()).toEqual(before);
    expect(run('nbdinfo', ['--size', uri('foreign-raw')]).trim()).toBe(String(8 * MiB));
    daemon = adopter; // afterAll stops it
  });

  it('refuses configs it cannot serve', async () => {
    await expect(daemon.addExport(config('x', disk(), { server: 'nbd-server' }))).rejects.toThrow(TypeError);
    await expect(daemon.addExport(config('x', disk(), { format: 'vmdk' as 'raw' }))).rejects.toThrow(
      TypeError,
    );
  });
});

describe('QemuStorageDaemon recovery', () => {
  it('reconciles exports.json with the daemon after a crash, touching only what is ours', async () => {
    const stateDir = join(dir, 'recovery');
    const recoveryPort = await freePort();
    const options = { stateDir, listenAddress: '127.0.0.1', port: recoveryPort, logger };
    const first = new QemuStorageDaemon(options);
    await first.start();
    cleanups.push(() => first.stop());
    const { pid } = first.status();
    const image = (name: string) => join(dir, `recovery-${name}.qcow2`);
    for (const name of ['keep', 'stray', 'operator', 'leftover'])
      await createImage({ path: image(name), format: 'qcow2', sizeBytes: 4 * MiB });
    await first.addExport(config('keep', image('keep')));
    await first.detach();

    // What a crash, an operator and a lost state file could leave behind.
    const qmp = await QmpClient.connect(join(stateDir, 'qemu-storage-daemon', 'qmp.sock'));
    const nodes = async (name: string, prefix: string) => {
      await qmp.execute('blockdev-add', {
        driver: 'file',
        'node-name': `${prefix}-f`,
        filename: image(name),
      });
      await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': `${prefix}-d`, file: `${prefix}-f` });
    };
    await nodes('stray', 'nbdx-stray');
    await qmp.execute('block-export-add', {
      type: 'nbd',
      id: 'nbdx-stray',
      'node-name': 'nbdx-stray-d',
      name: 'stray',
    });
    await nodes('operator', 'op');
    await qmp.execute('block-export-add', { type: 'nbd', id: 'op', 'node-name': 'op-d', name: 'operator' });
    await nodes('leftover', 'nbdx-leftover');
    qmp.close();
    const stateFile = join(stateDir, 'qemu-storage-daemon', 'exports.json');
    const state = JSON.parse(await readFile(stateFile, 'utf8')) as { exports: Record<string, unknown> };
    state.exports['ghost'] = {
      id: 'nbdx-ghost',
      nodeNames: { file: 'nbdx-ghost-f', format: 'nbdx-ghost-d' },
      fingerprint: '0',
      state: 'adding',
      config: config('ghost', image('ghost')),
    };
    await writeFile(stateFile, JSON.stringify(state));

    await rm(join(stateDir, 'qemu-storage-daemon', 'qemu-storage-daemon.pid')); // found in /proc instead
    const second = new QemuStorageDaemon(options);
    cleanups.unshift(() => second.stop());
    await second.start();
    expect(second.status()).toMatchObject({ running: true, adopted: true, pid });
    expect([...(await second.exports()).keys()]).toEqual(['keep']);
    const keep = exportIdsOf('keep', fingerprintOf(config('keep', image('keep')))).nodeNames;
    expect((await second.blockNodes()).sort()).toEqual([keep.file, keep.format, 'op-d', 'op-f'].sort());
    expect(run('nbdinfo', ['--size', `nbd://127.0.0.1:${recoveryPort}/operator`]).trim()).toBe(
      String(4 * MiB),
    );
    expect(Object.keys((JSON.parse(await readFile(stateFile, 'utf8')) as typeof state).exports)).toEqual([
      'keep',
    ]);

    // The daemon dies: the next call starts a new one, which serves nothing yet.
    process.kill(pid ?? 0, 'SIGKILL');
    await waitFor('the daemon to die', () => Promise.resolve(second.status().running ? undefined : true));
    expect((await second.exports()).size).toBe(0);
    expect(second.status()).toMatchObject({ running: true, adopted: false });
    expect(second.status().pid).not.toBe(pid);
    await second.addExport(config('keep', image('keep')));
    expect(run('nbdinfo', ['--size', `nbd://127.0.0.1:${recoveryPort}/keep`]).trim()).toBe(String(4 * MiB));
    await second.stop();
    expect(second.status().running).toBe(false);
    // Stopping what does not run (`stop-servers` on a node without a daemon) is fine.
    await second.stop();
    await new QemuStorageDaemon({ ...options, stateDir: join(dir, 'never-started') }).stop();
  });

  it('a stopped daemon starts again as stopped, not lost; a retired one is started again by nothing', async () => {
    const messages: string[] = [];
    const captured = pino({ level: 'info' }, { write: (line: string) => void messages.push(line) });
    const retiring = new QemuStorageDaemon({
      stateDir: join(dir, 'retiring'),
      listenAddress: '127.0.0.1',
      port: await freePort(),
      logger: captured,
    });
    cleanups.unshift(() => retiring.stop());
    await retiring.start();
    await retiring.stop();
    expect(retiring.status()).toEqual({ running: false, adopted: false, starts: 1 });

    expect((await retiring.exports()).size).toBe(0); // a call that needs it starts it again
    expect(retiring.status()).toMatchObject({ running: true, starts: 2 });
    expect(messages.filter((line) => line.includes('lost the qemu-storage-daemon'))).toEqual([]);

    await retiring.retire();
    await expect(retiring.start()).rejects.toBeInstanceOf(DaemonRetiredError);
    await expect(retiring.exports()).rejects.toBeInstanceOf(DaemonRetiredError);
    expect(retiring.status()).toEqual({ running: false, adopted: false, starts: 2 });
  });
});
