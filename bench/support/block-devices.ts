/**
 * Block devices for the benchmark, set up and released by it: a loop device over a file
 * and a zram device of its own (hot-added, so another user's /dev/zram0 is never touched).
 * `releaseAllBlockDevices()` undoes whatever is still set up, also on an interrupt.
 */
import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { execa } from 'execa';

const releases = new Map<string, () => Promise<void>>();

/** A loop device over `file` (which must exist at its final size). */
export async function attachLoopDevice(file: string): Promise<string> {
  const { stdout } = await execa('losetup', ['-f', '--show', file]);
  const device = stdout.trim();
  releases.set(device, async () => {
    await execa('losetup', ['-d', device], { reject: false });
  });
  return device;
}

/** A new zram device of `bytes` (lz4 or the kernel's default compressor). */
export async function addZramDevice(bytes: number): Promise<string> {
  if (!existsSync('/sys/class/zram-control')) await execa('modprobe', ['zram']);
  const id = (await readFile('/sys/class/zram-control/hot_add', 'utf8')).trim();
  const device = `/dev/zram${id}`;
  releases.set(device, async () => {
    await writeFile(`/sys/block/zram${id}/reset`, '1').catch(() => undefined);
    await writeFile('/sys/class/zram-control/hot_remove', id).catch(() => undefined);
  });
  await writeFile(`/sys/block/zram${id}/disksize`, String(bytes));
  return device;
}

export async function releaseBlockDevice(device: string): Promise<void> {
  const release = releases.get(device);
  releases.delete(device);
  await release?.();
}

export async function releaseAllBlockDevices(): Promise<void> {
  for (const device of [...releases.keys()]) await releaseBlockDevice(device);
}
