/**
 * Hostile disk images for the tests, made with the real qemu-img and then, where qemu-img will
 * not write what an attacker would, patched byte by byte. Every builder returns the path it made.
 */
import { open, readFile, writeFile } from 'node:fs/promises';
import { execa } from 'execa';

/** A throwaway passphrase: LUKS images need one, and these images hold nothing. */
const SECRET_OBJECT = 'secret,id=sec0,data=hostile-input';

/**
 * `qemu-img create -q -f FORMAT [options…] PATH [SIZE]`. LUKS key setup first times a round of
 * PBKDF2 on the thread's CPU-time clock and gives up ("Unable to get accurate CPU usage") when
 * that clock did not move. With tick-based CPU accounting (this kernel: HZ=250, no
 * VIRT_CPU_ACCOUNTING) a round of a few milliseconds often shows none: 17 of 40 LUKS creations
 * failed so here, and five tries in a row failed in a CI run. That one failure is retried, up to
 * 40 times (all 40 failing: about 1e-15).
 */
export async function createImage(
  format: string,
  path: string,
  size: string | undefined,
  ...options: string[]
): Promise<string> {
  const args = ['create', '-q', '-f', format, ...options, path, ...(size === undefined ? [] : [size])];
  for (let attempt = 1; ; attempt++) {
    const result = await execa('qemu-img', args, { reject: false, timeout: 60_000 });
    if (result.exitCode === 0) return path;
    if (attempt >= 40 || !String(result.stderr).includes('Unable to get accurate CPU usage'))
      throw new Error(`qemu-img ${args.join(' ')} failed: ${String(result.stderr)}`);
  }
}

/** A LUKS container (`-f luks`), or with `format: 'qcow2'` a qcow2 image encrypted with LUKS. */
export async function createEncrypted(format: 'luks' | 'qcow2', path: string): Promise<string> {
  const options =
    format === 'luks'
      ? ['-o', 'key-secret=sec0,iter-time=100']
      : ['-o', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100'];
  return createImage(format, path, '4M', '--object', SECRET_OBJECT, ...options);
}

/**
 * A qcow2 image whose header names `backingName` as its backing file, which qemu-img never
 * opens (`-u`): the name can be anything an attacker writes.
 */
export async function qcow2WithBacking(path: string, backingName: string, backingFormat = 'qcow2') {
  return createImage('qcow2', path, '4M', '-u', '-b', backingName, '-F', backingFormat);
}

/** Points an existing qcow2 at `backingName` without opening anything (qemu-img rebase -u). */
export async function rebaseUnsafe(path: string, backingName: string, backingFormat = 'qcow2') {
  await execa('qemu-img', ['rebase', '-u', '-b', backingName, '-F', backingFormat, path]);
}

/** Big-endian u64 fields of a qcow2 v3 header, by byte offset. */
export const QCOW2_FIELD = { size: 24, incompatibleFeatures: 72 } as const;

/** Overwrites a big-endian u64 of a qcow2 header, or ORs bits into it. */
export async function patchQcow2Field(
  path: string,
  offset: number,
  value: bigint,
  mode: 'set' | 'or' = 'set',
): Promise<string> {
  const handle = await open(path, 'r+');
  try {
    const field = Buffer.alloc(8);
    await handle.read(field, 0, 8, offset);
    field.writeBigUInt64BE(mode === 'or' ? field.readBigUInt64BE(0) | value : value);
    await handle.write(field, 0, 8, offset);
  } finally {
    await handle.close();
  }
  return path;
}

/** Keeps only the first `bytes` of a file (a header cut short). */
export async function truncateTo(path: string, bytes: number): Promise<string> {
  const content = await readFile(path);
  await writeFile(path, content.subarray(0, bytes));
  return path;
}

/**
 * A VMDK text descriptor (the form QEMU accepts as a whole file) whose one extent is
 * `extentPath`: opened as VMDK, the export would serve that file.
 */
export async function vmdkDescriptor(path: string, extentPath: string, sectors: number): Promise<string> {
  await writeFile(
    path,
    [
      '# Disk DescriptorFile',
      'version=1',
      'CID=fffffffe',
      'parentCID=ffffffff',
      'createType="monolithicFlat"',
      '',
      `RW ${sectors} FLAT "${extentPath}" 0`,
      '',
      'ddb.virtualHWVersion = "4"',
      '',
    ].join('\n'),
  );
  return path;
}
