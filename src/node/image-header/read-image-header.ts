/**
 * Reads an image's header from the file system with bounded reads and no surprises:
 * never follows a symlink in the last component, never blocks on a FIFO, never acquires a
 * controlling terminal, and never reads from anything that is not a regular file or a block
 * device. Everything reported about the file comes from one fstat of the descriptor the
 * bytes were read from, so a rename between a check and the read cannot mix two files.
 */
import { fileTypeOf } from '../../shared/file-type.js';
import { constants } from 'node:fs';
import { lstat, open, readFile, readlink, type FileHandle } from 'node:fs/promises';
import { basename } from 'node:path';
import type { ImageFileFacts, ParsedImageHeader } from '../../plan/image-header.js';
import { HEAD_BYTES, TAIL_BYTES, parseImageHeader } from './parse-image-header.js';

export type ImageHeaderRead =
  | { kind: 'read'; file: ImageFileFacts; header: ParsedImageHeader; openedPath: string }
  | { kind: 'missing' }
  /** Not read: a FIFO, socket, character device, directory or symlink. */
  | { kind: 'not-an-image-file'; fileType: string }
  | { kind: 'error'; message: string; code?: string };

const OPEN_FLAGS = constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK | constants.O_NOCTTY;

export interface ReadImageHeaderOptions {
  /**
   * Whether a block device may be read: yes for the top image (a raw export of an LV), no for
   * a backing file, which QEMU would open just because a header names it.
   */
  allowBlockDevice: boolean;
}

export async function readImageHeader(
  path: string,
  options: ReadImageHeaderOptions,
): Promise<ImageHeaderRead> {
  const readable = (type: string): boolean =>
    type === 'file' || (type === 'block-device' && options.allowBlockDevice);
  // lstat first so that a FIFO or character device is never even opened (opening some devices
  // has effects); the fstat below is still what decides, as the name may change in between.
  try {
    const before = await lstat(path);
    const type = fileTypeOf(before);
    if (!readable(type)) return { kind: 'not-an-image-file', fileType: type };
  } catch (error) {
    return failure(error, path);
  }

  let handle: FileHandle;
  try {
    handle = await open(path, OPEN_FLAGS);
  } catch (error) {
    if (errorCode(error) === 'ELOOP') return { kind: 'not-an-image-file', fileType: 'symlink' };
    return failure(error, path);
  }
  try {
    const info = await handle.stat({ bigint: true });
    const type = fileTypeOf(info);
    if (type !== 'file' && type !== 'block-device') return { kind: 'not-an-image-file', fileType: type };
    if (!readable(type)) return { kind: 'not-an-image-file', fileType: type };
    const size = type === 'file' ? Number(info.size) : await blockDeviceSize(info.rdev);
    const file: ImageFileFacts = {
      type,
      fileId: `${info.dev}:${info.ino}`,
      nlink: Number(info.nlink),
      size,
      allocatedBytes: Number(info.blocks * 512n),
    };
    const head = await readAt(handle, 0, Math.min(HEAD_BYTES, size));
    const tailStart = Math.max(0, size - TAIL_BYTES);
    const tail =
      tailStart < head.length ? head.subarray(tailStart) : await readAt(handle, tailStart, size - tailStart);
    const header = parseImageHeader({ head, tail, size, fileName: basename(path) });
    const openedPath = await readlink(`/proc/self/fd/${handle.fd}`).catch(() => path);
    return { kind: 'read', file, header, openedPath };
  } catch (error) {
    return failure(error, path);
  } finally {
    await handle.close().catch(() => undefined);
  }
}

/** Reads up to `length` bytes at `position`; fewer if the file is shorter (it may shrink while we read). */
async function readAt(handle: FileHandle, position: number, length: number): Promise<Uint8Array> {
  const buffer = Buffer.alloc(Math.max(0, length));
  let filled = 0;
  while (filled < buffer.length) {
    const { bytesRead } = await handle.read(buffer, filled, buffer.length - filled, position + filled);
    if (bytesRead === 0) break;
    filled += bytesRead;
  }
  return buffer.subarray(0, filled);
}

/** fstat reports 0 bytes for a block device; the kernel's size is in sysfs, in 512-byte sectors. */
async function blockDeviceSize(rdev: bigint): Promise<number> {
  const major = ((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & ~0xfffn);
  const minor = (rdev & 0xffn) | ((rdev >> 12n) & ~0xffn);
  const sectors = (await readFile(`/sys/dev/block/${major}:${minor}/size`, 'utf8')).trim();
  if (!/^\d+$/.test(sectors))
    throw new Error(`/sys/dev/block/${major}:${minor}/size holds ${JSON.stringify(sectors)}`);
  return Number(BigInt(sectors) * 512n);
}

function failure(error: unknown, path: string): ImageHeaderRead {
  const code = errorCode(error);
  if (code === 'ENOENT' || code === 'ENOTDIR') return { kind: 'missing' };
  const message = error instanceof Error ? error.message : String(error);
  return { kind: 'error', message: `reading the header of ${path}: ${message}`, ...(code ? { code } : {}) };
}

function errorCode(error: unknown): string | undefined {
  const code = (error as NodeJS.ErrnoException | undefined)?.code;
  return typeof code === 'string' ? code : undefined;
}
