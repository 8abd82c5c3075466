/**
 * Block devices exported through the real controller on a plain host: loop devices and a
 * zram device, served by nbd-server, checked with real NBD clients (nbdinfo, nbdcopy) and
 * against the device's own bytes read with O_DIRECT. Every device is set up here and
 * released in afterAll, whatever happened.
 */
import { readdir, readFile, mkdir, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  deviceSize,
  LoopDevice,
  readDeviceDirect,
  releaseAllBlockDevices,
  requireBlockDeviceTools,
  sha256Device,
  ZramDevice,
} from '../support/block-devices.js';
import {
  canWrite,
  exportSize,
  isServed,
  requireNbdClients,
  sha256File,
  writeRandomFile,
} from '../support/nbd.js';
import { waitFor } from '../support/poll.js';
import { probeExport } from '../../src/node/nbd-probe.js';
import { nbdExport, PlainHostNode } from './harness/plain-host-controller.js';

const MiB = 1024 * 1024;
const LOOP_SIZE = 64 * MiB;
const ZRAM_SIZE = 256 * MiB;
/** How long a device may be gone before the resource must say so. */
const NOTICE_WITHIN_MS = 60_000;

describe('block devices through the plain-host controller', () => {
  let node: PlainHostNode;
  /** Served read-only; its file holds random data. */
  let readOnlyLoop: LoopDevice;
  /** Served read-write, then taken away and brought back. */
  let vanishingLoop: LoopDevice;
  /** Reached only through a symlink. */
  let linkedLoop: LoopDevice;
  /** Matches no allowed pattern. */
  let deniedLoop: LoopDevice;
  let zram: ZramDevice;
  let linkDir: string;

  beforeAll(async () => {
    await requireBlockDeviceTools();
    await requireNbdClients();
    node = await PlainHostNode.create();
    const loop = async (name: string) => {
      const file = join(node.root, `${name}.img`);
      await writeRandomFile(file, LOOP_SIZE);
      return LoopDevice.attach(file);
    };
    readOnlyLoop = await loop('read-only');
    vanishingLoop = await loop('vanishing');
    linkedLoop = await loop('linked');
    deniedLoop = await loop('denied');
    zram = await ZramDevice.create(ZRAM_SIZE);
    linkDir = join(node.root, 'by-id');
    await mkdir(linkDir);
    await node.start([
      `--allowed-device=${readOnlyLoop.path}`,
      `--allowed-device=${vanishingLoop.path}`,
      `--allowed-device=${linkedLoop.path}`,
      // A glob: any zram device.
      '--allowed-device=/dev/zram*',
      // Symlinks here are names, not devices: what they point to must itself be allowed.
      `--allowed-device=${linkDir}/*`,
    ]);
  });

  afterAll(async () => {
    try {
      await node?.destroy();
    } finally {
      await releaseAllBlockDevices();
    }
  });

  const device = (path: string) => ({ source: { blockDevice: { path } } });

  it('serves a loop device read-only with the size of the device; a write fails and the data stays', async () => {
    const before = await sha256Device(readOnlyLoop.path, join(node.root, 'ro-before.bin'), LOOP_SIZE);
    await node.writeExports('ro.yaml', [
      nbdExport('loop-ro', { ...device(readOnlyLoop.path), readOnly: true }),
    ]);
    const served = await node.waitForReady('loop-ro');
    const size = await deviceSize(readOnlyLoop.path);
    expect(size).toBe(LOOP_SIZE);
    expect(served.status).toMatchObject({ server: 'nbd-server', format: 'raw', virtualSize: size });
    expect(await exportSize(node.uri(served))).toBe(size);
    expect(await canWrite(node.uri(served))).toBe(false);

    const payload = join(node.root, 'ro-payload.bin');
    await writeRandomFile(payload, LOOP_SIZE);
    const write = await execa('nbdcopy', ['--connections=1', '--flush', payload, node.uri(served)], {
      reject: false,
    });
    expect(write.exitCode).not.toBe(0);

    const viaNbd = join(node.root, 'ro-via-nbd.bin');
    await execa('nbdcopy', ['--connections=1', node.uri(served), viaNbd]);
    expect(await sha256File(viaNbd)).toBe(before);
    expect(await sha256Device(readOnlyLoop.path, join(node.root, 'ro-after.bin'), LOOP_SIZE)).toBe(before);
  });

  it('serves a zram device read-write: data written through NBD is on the device, bit for bit', async () => {
    await node.writeExports('zram.yaml', [nbdExport('zram-rw', device(zram.path))]);
    const served = await node.waitForReady('zram-rw');
    expect(await deviceSize(zram.path)).toBe(ZRAM_SIZE);
    expect(served.status?.virtualSize).toBe(ZRAM_SIZE);
    expect(await exportSize(node.uri(served))).toBe(ZRAM_SIZE);
    expect(await canWrite(node.uri(served))).toBe(true);

    const payload = join(node.root, 'zram-payload.bin');
    await writeRandomFile(payload, ZRAM_SIZE);
    await execa('nbdcopy', ['--connections=1', '--flush', payload, node.uri(served)]);
    const onDevice = join(node.root, 'zram-direct.bin');
    await readDeviceDirect(zram.path, onDevice, ZRAM_SIZE);
    const viaNbd = join(node.root, 'zram-via-nbd.bin');
    await execa('nbdcopy', ['--connections=1', node.uri(served), viaNbd]);
    const expected = await sha256File(payload);
    expect(await sha256File(onDevice)).toBe(expected);
    expect(await sha256File(viaNbd)).toBe(expected);
  });

  it('refuses a device outside the allowed patterns, and serves nothing for it', async () => {
    await node.writeExports('denied.yaml', [nbdExport('loop-denied', device(deniedLoop.path))]);
    const refused = await node.waitForReady('loop-denied', 'False', 'DeviceNotAllowed');
    const ready = refused.status?.conditions?.find((c) => c.type === 'Ready');
    expect(ready?.message).toContain(deniedLoop.path);
    expect(refused.status?.uri).toBeUndefined();
    expect(await isServed(node.nbdServerUri('loop-denied'))).toBe(false);
    expect(await configuredDevicePaths()).not.toContain(deniedLoop.path);
    // Gone again, so that the refused resource takes no part in the next test.
    await node.removeExports('denied.yaml');
    await node.waitForGone('loop-denied');
  });

  it('resolves a symlink to a device and checks the patterns on the real path', async () => {
    const allowedLink = join(linkDir, 'disk-linked');
    const deniedLink = join(linkDir, 'disk-denied');
    await symlink(linkedLoop.path, allowedLink);
    await symlink(deniedLoop.path, deniedLink);
    await node.writeExports('links.yaml', [
      nbdExport('link-allowed', { ...device(allowedLink), readOnly: true }),
      nbdExport('link-denied', { ...device(deniedLink), readOnly: true }),
    ]);

    const served = await node.waitForReady('link-allowed');
    expect(await exportSize(node.uri(served))).toBe(LOOP_SIZE);
    // nbd-server opens the device itself, never the link (which could be re-pointed later).
    const configured = await configuredDevicePaths();
    expect(configured).toContain(linkedLoop.path);
    expect(configured).not.toContain(allowedLink);
    const viaNbd = join(node.root, 'linked-via-nbd.bin');
    await execa('nbdcopy', ['--connections=1', node.uri(served), viaNbd]);
    expect(await sha256File(viaNbd)).toBe(await sha256File(linkedLoop.backingFile));

    // The link's own name matches an allowed pattern; the device it points to does not.
    const decided = await decidedReady('link-denied', ['Served', 'DeviceNotAllowed']);
    expect(decided.reason).toBe('DeviceNotAllowed');
    expect(decided.object.status?.uri).toBeUndefined();
    expect(await isServed(node.nbdServerUri('link-denied'))).toBe(false);
    expect(await configuredDevicePaths()).not.toContain(deniedLoop.path);
  });

  it('reports a loop device that goes away while served, keeps running, and serves it again when it is back', async () => {
    await node.writeExports('vanishing.yaml', [nbdExport('loop-vanishing', device(vanishingLoop.path))]);
    const served = await node.waitForReady('loop-vanishing');
    expect(await exportSize(node.uri(served))).toBe(LOOP_SIZE);
    const data = await sha256File(vanishingLoop.backingFile);

    await vanishingLoop.detach();
    expect(await deviceSize(vanishingLoop.path)).toBe(0);
    // nbd-server still offers the export, with a size it made up; the controller's probe says so.
    const probe = await probeExport({
      host: '127.0.0.1',
      port: node.nbdPort,
      exportName: 'it.loop-vanishing',
    });
    expect(probe.ok).toBe(false);
    if (!probe.ok) expect(probe.message).toContain('could not determine the size');

    const gone = await node.waitForReady('loop-vanishing', 'False', undefined, NOTICE_WITHIN_MS);
    const ready = gone.status?.conditions?.find((c) => c.type === 'Ready');
    expect.soft(ready?.reason).toBe('ImageNotFound');
    expect(ready?.message).toContain(vanishingLoop.path);
    await expectControllerAlive();

    await vanishingLoop.reattach();
    const back = await node.waitForReady('loop-vanishing', 'True', undefined, NOTICE_WITHIN_MS);
    expect(back.status?.virtualSize).toBe(LOOP_SIZE);
    const viaNbd = join(node.root, 'vanishing-via-nbd.bin');
    await execa('nbdcopy', ['--connections=1', node.uri(back), viaNbd]);
    expect(await sha256File(viaNbd)).toBe(data);
  });

  it('reports a zram device that is reset while served, and serves it again once it has a size', async () => {
    const served = await node.waitForReady('zram-rw');
    // The kernel refuses a reset while anything holds the device open: wait (bounded) for nbd-server to let go.
    await waitFor('the zram device to accept a reset', () => zram.reset().then(() => true), {
      timeoutMs: 30_000,
      intervalMs: 200,
    });
    expect(await deviceSize(zram.path)).toBe(0);
    const gone = await node.waitForReady('zram-rw', 'False', undefined, NOTICE_WITHIN_MS);
    const ready = gone.status?.conditions?.find((c) => c.type === 'Ready');
    expect.soft(ready?.reason).toBe('ImageNotFound');
    expect(ready?.message).toContain(zram.path);
    await expectControllerAlive();

    await zram.resize(ZRAM_SIZE);
    const back = await node.waitForReady('zram-rw', 'True', undefined, NOTICE_WITHIN_MS);
    expect(back.status?.virtualSize).toBe(ZRAM_SIZE);
    expect(await exportSize(node.uri(served))).toBe(ZRAM_SIZE);
  });

  /** Waits until Ready, for the current generation, has one of `reasons` (the planner has decided). */
  async function decidedReady(name: string, reasons: string[]) {
    return waitFor(`${name} Ready with reason ${reasons.join(' or ')}`, async () => {
      const object = await node.object(name);
      const ready = object?.status?.conditions?.find((c) => c.type === 'Ready');
      if (!object || !ready || ready.observedGeneration !== object.metadata.generation) return undefined;
      return reasons.includes(ready.reason) ? { object, reason: ready.reason } : undefined;
    });
  }

  /** The paths nbd-server's export files name (`exportname = ...`). */
  async function configuredDevicePaths(): Promise<string[]> {
    const confDir = join(node.stateDir, 'nbd-server', 'conf.d');
    const names = await readdir(confDir).catch(() => []);
    const paths: string[] = [];
    for (const name of names.filter((n) => n.endsWith('.conf'))) {
      const text = await readFile(join(confDir, name), 'utf8');
      for (const match of text.matchAll(/^exportname = (.*)$/gm)) paths.push(match[1] ?? '');
    }
    return paths;
  }

  /** The controller process still runs and answers /readyz; the other device exports stay Ready. */
  async function expectControllerAlive(): Promise<void> {
    const pid = node.pid;
    expect(pid).toBeDefined();
    expect(() => process.kill(pid ?? 0, 0)).not.toThrow();
    const response = await fetch(`http://127.0.0.1:${node.healthPort}/readyz`);
    expect(response.ok).toBe(true);
    expect((await node.condition('loop-ro'))?.status).toBe('True');
  }
});
