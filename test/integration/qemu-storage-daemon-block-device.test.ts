/**
 * QemuStorageDaemon serving a real block device (a loop device set up here): opened with
 * O_DIRECT (what /proc says about the daemon's descriptor, not what we asked for), and the
 * data written through NBD is on the device. An image file keeps the page cache. Needs root
 * (losetup).
 */
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, readdir, readlink, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ExportConfig } from '../../src/api/export-config.js';
import { createImage } from '../../src/node/qemu-img.js';
import { QemuStorageDaemon } from '../../src/node/qemu-storage-daemon/qemu-storage-daemon.js';
import { sha256File } from '../support/nbd.js';
import { freePorts } from '../support/repo.js';

const MiB = 1024 * 1024;
/** O_DIRECT on x86-64 and arm64 Linux, as the `flags` line of /proc/PID/fdinfo shows it (octal). */
const O_DIRECT = 0o40000;
const logger = pino({ level: process.env['LOG_LEVEL'] ?? 'silent' });
let dir: string;
let port: number;
let loopDevice: string | undefined;
let daemon: QemuStorageDaemon | undefined;

function run(command: string, args: string[]): string {
  const result = spawnSync(command, args, { encoding: 'utf8' });
  if (result.status !== 0)
    throw new Error(`${command} ${args.join(' ')} failed (${String(result.status)}): ${result.stderr}`);
  return result.stdout;
}

function config(exportName: string, path: string, blockDevice: boolean): ExportConfig {
  return {
    exportName,
    server: 'qemu-storage-daemon',
    path,
    format: blockDevice ? 'raw' : 'qcow2',
    blockDevice,
    readOnly: false,
    maxConnections: 1,
    allowedClients: [],
  };
}

/** The open flags of the daemon's descriptors on `path` (one per node that opened it). */
async function openFlagsOf(pid: number, path: string): Promise<number[]> {
  const flags: number[] = [];
  for (const fd of await readdir(`/proc/${pid}/fd`)) {
    const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
    if (target !== path) continue;
    const info = await readFile(`/proc/${pid}/fdinfo/${fd}`, 'utf8');
    const octal = /^flags:\s+([0-7]+)$/m.exec(info)?.[1];
    if (octal === undefined) throw new Error(`no flags in /proc/${pid}/fdinfo/${fd}: ${info}`);
    flags.push(Number.parseInt(octal, 8));
  }
  return flags;
}

function daemonPid(): number {
  const pid = daemon?.status().pid;
  if (pid === undefined) throw new Error('the daemon has no pid');
  return pid;
}

beforeAll(async () => {
  for (const name of ['qemu-storage-daemon', 'qemu-img', 'nbdcopy', 'losetup'])
    if (spawnSync('sh', ['-c', `command -v ${name}`]).status !== 0)
      throw new Error(
        `${name} is required for these tests (Debian: qemu-system-common, qemu-utils, libnbd-bin)`,
      );
  if (process.getuid?.() !== 0) throw new Error('these tests set up a loop device: run them as root');
  dir = await mkdtemp(join(tmpdir(), 'nbdx-qsd-dev-'));
  const backing = join(dir, 'device.img');
  run('fallocate', ['-l', `${32 * MiB}`, backing]);
  loopDevice = run('losetup', ['-f', '--show', backing]).trim();
  [port] = (await freePorts(1)) as [number];
  daemon = new QemuStorageDaemon({ stateDir: join(dir, 'state'), listenAddress: '127.0.0.1', port, logger });
  await daemon.start();
});

afterAll(async () => {
  await daemon?.stop();
  if (loopDevice) run('losetup', ['-d', loopDevice]);
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('QemuStorageDaemon with a block device', () => {
  it('opens the device with O_DIRECT and writes through NBD onto it', async () => {
    const device = loopDevice ?? '';
    await daemon?.addExport(config('device', device, true));
    const flags = await openFlagsOf(daemonPid(), device);
    expect(flags.length).toBeGreaterThan(0);
    for (const f of flags) expect(f & O_DIRECT).toBe(O_DIRECT);

    const source = join(dir, 'source.bin');
    await writeFile(source, randomBytes(32 * MiB));
    expect(spawnSync('nbdcopy', ['--flush', source, `nbd://127.0.0.1:${port}/device`]).status).toBe(0);
    // Read the device itself, past any page cache, after the daemon is done with it.
    await daemon?.removeExport('device', { force: false });
    const back = join(dir, 'back.bin');
    run('dd', [`if=${device}`, `of=${back}`, 'bs=1M', 'iflag=direct', 'status=none']);
    expect(await sha256File(back)).toBe(await sha256File(source));
  });

  it('keeps the page cache for an image file', async () => {
    const image = join(dir, 'image.qcow2');
    await createImage({ path: image, format: 'qcow2', sizeBytes: 16 * MiB });
    await daemon?.addExport(config('image', image, false));
    const flags = await openFlagsOf(daemonPid(), image);
    expect(flags.length).toBeGreaterThan(0);
    for (const f of flags) expect(f & O_DIRECT).toBe(0);
    await daemon?.removeExport('image', { force: false });
  });
});
