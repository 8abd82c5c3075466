/**
 * Real block devices for the tests: loop devices over files and zram (RAM-backed) devices.
 * Each test sets up its own and releases it, even when it fails: every device made here is
 * registered, and `releaseAllBlockDevices()` (from an afterAll) detaches or removes what is
 * left. A device that cannot be set up fails the test with what is missing; nothing is skipped.
 */
import { access, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { sha256File } from './nbd.js';
import { waitFor } from './poll.js';
import { requireBinary } from './repo.js';

const ZRAM_CONTROL = '/sys/class/zram-control';

/** Everything set up and not yet released, newest last. */
const live = new Set<{ release(): Promise<void> }>();

/** Fails with what to install when a program the block-device tests need is missing. */
export async function requireBlockDeviceTools(): Promise<void> {
  for (const name of ['losetup', 'blockdev', 'dd']) await requireBinary(name);
  if (process.getuid?.() !== 0)
    throw new Error('the block-device tests need root: they attach loop devices and create zram devices');
}

/** The size of a block device in bytes, as the kernel reports it. */
export async function deviceSize(path: string): Promise<number> {
  const { stdout } = await execa('blockdev', ['--getsize64', path]);
  return Number(stdout.trim());
}

/**
 * Reads a device's first `bytes` with O_DIRECT (past the page cache, so what the device holds)
 * into `destination`.
 */
export async function readDeviceDirect(path: string, destination: string, bytes: number): Promise<void> {
  const blockSize = 4 * 1024 * 1024;
  if (bytes % blockSize !== 0) throw new RangeError(`read a multiple of 4 MiB, not ${bytes} bytes`);
  await execa('dd', [
    `if=${path}`,
    `of=${destination}`,
    'iflag=direct',
    `bs=${blockSize}`,
    `count=${bytes / blockSize}`,
    'status=none',
  ]);
}

/** sha256 of a device's first `bytes`, read with O_DIRECT through a scratch file. */
export async function sha256Device(path: string, scratch: string, bytes: number): Promise<string> {
  await readDeviceDirect(path, scratch, bytes);
  return sha256File(scratch);
}

/** A loop device over a file. `detach()` takes the device away; `reattach()` brings it back at the same path. */
export class LoopDevice {
  readonly path: string;
  readonly backingFile: string;
  #attached = true;

  private constructor(path: string, backingFile: string) {
    this.path = path;
    this.backingFile = backingFile;
  }

  static async attach(backingFile: string): Promise<LoopDevice> {
    const result = await execa('losetup', ['--find', '--show', backingFile], { reject: false });
    const path = String(result.stdout).trim();
    if (result.exitCode !== 0 || !path.startsWith('/dev/loop'))
      throw new Error(
        `cannot attach a loop device to ${backingFile} (losetup exited ${result.exitCode}: ${String(result.stderr).trim()}); the block-device tests need free loop devices and root`,
      );
    const device = new LoopDevice(path, backingFile);
    live.add(device);
    return device;
  }

  get attached(): boolean {
    return this.#attached;
  }

  /**
   * `losetup -d`. The kernel detaches at once when nothing holds the device open, else when
   * the last holder closes it (autoclear); either way the node stays, empty.
   */
  async detach(): Promise<void> {
    await execa('losetup', ['--detach', this.path]);
    this.#attached = false;
  }

  /** Attaches the same file at the same path again (fails if someone else took the device meanwhile). */
  async reattach(): Promise<void> {
    // The kernel finishes a deferred detach when the last holder lets go: wait for it, bounded.
    await waitFor(
      `${this.path} to be detached before attaching it again`,
      async () => ((await this.#backingFileNow()) === undefined ? true : undefined),
      { timeoutMs: 60_000, intervalMs: 200 },
    );
    await execa('losetup', [this.path, this.backingFile]);
    this.#attached = true;
  }

  /** What the kernel says backs the device now; undefined when nothing does. */
  async #backingFileNow(): Promise<string | undefined> {
    const name = this.path.slice('/dev/'.length);
    return readFile(`/sys/block/${name}/loop/backing_file`, 'utf8').then(
      (text) => text.trim() || undefined,
      () => undefined,
    );
  }

  /** Detaches if still attached (to this test's file). Safe to call twice. */
  async release(): Promise<void> {
    live.delete(this);
    const backing = await this.#backingFileNow();
    if (backing === undefined || !backing.startsWith(this.backingFile)) return;
    await execa('losetup', ['--detach', this.path], { reject: false });
  }
}

/**
 * A zram device of its own (hot-added, so it never takes a device someone else uses).
 * `reset()` empties it and makes it size 0 (the kernel refuses while anything holds it open);
 * `resize()` gives it a size again.
 */
export class ZramDevice {
  readonly path: string;
  readonly id: number;

  private constructor(id: number) {
    this.id = id;
    this.path = `/dev/zram${id}`;
  }

  static async create(sizeBytes: number): Promise<ZramDevice> {
    await loadZram();
    let id: number;
    try {
      id = Number((await readFile(join(ZRAM_CONTROL, 'hot_add'), 'utf8')).trim());
    } catch (error) {
      throw new Error(`cannot add a zram device (${ZRAM_CONTROL}/hot_add)`, { cause: error });
    }
    const device = new ZramDevice(id);
    live.add(device);
    await waitFor(`${device.path} to appear`, () => access(device.path).then(() => true), {
      timeoutMs: 30_000,
      intervalMs: 100,
    });
    await device.resize(sizeBytes);
    return device;
  }

  get sysfs(): string {
    return `/sys/block/zram${this.id}`;
  }

  async resize(sizeBytes: number): Promise<void> {
    await writeFile(join(this.sysfs, 'disksize'), String(sizeBytes));
  }

  /** Empties the device; its size becomes 0. Throws EBUSY while it is open. */
  async reset(): Promise<void> {
    await writeFile(join(this.sysfs, 'reset'), '1');
  }

  /** Resets and removes the device, retrying (bounded) while a holder is still letting go. Safe to call twice. */
  async release(): Promise<void> {
    live.delete(this);
    await waitFor(
      `${this.path} to be reset and removed`,
      async () => {
        if (!(await exists(this.sysfs))) return true;
        await this.reset();
        await writeFile(join(ZRAM_CONTROL, 'hot_remove'), String(this.id));
        return true;
      },
      { timeoutMs: 30_000, intervalMs: 200 },
    );
  }
}

/** Releases every device still set up, in reverse order; reports all failures at once. */
export async function releaseAllBlockDevices(): Promise<void> {
  const failures: unknown[] = [];
  for (const device of [...live].reverse()) {
    try {
      await device.release();
    } catch (error) {
      failures.push(error);
    }
  }
  if (failures.length > 0) throw new AggregateError(failures, 'some block devices could not be released');
}

async function loadZram(): Promise<void> {
  if (await exists(ZRAM_CONTROL)) return;
  const modprobe = await execa('modprobe', ['zram', 'num_devices=0'], { reject: false });
  if (!(await exists(ZRAM_CONTROL)))
    throw new Error(
      `zram is not available: ${ZRAM_CONTROL} is missing and "modprobe zram" (Debian package kmod) failed (${String(modprobe.stderr ?? modprobe.message).trim()}); the kernel needs CONFIG_ZRAM`,
    );
}

async function exists(path: string): Promise<boolean> {
  return access(path).then(
    () => true,
    () => false,
  );
}
