/**
 * qemu-img, as the controller needs it: inspect an image (format, sizes, backing chain),
 * tell whether another process holds it open for writing, and create images without
 * ever overwriting a file.
 *
 * The free functions use the real `qemu-img`; `createQemuImg()` builds the same functions
 * on another binary or a fake `CommandRunner` (unit tests).
 */
import { randomBytes } from 'node:crypto';
import { link, lstat, open, readFile, readdir, realpath, stat, unlink } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, resolve } from 'node:path';
import type { ImageFormat } from '../api/types.js';
import type { LockObservation } from '../plan/observed-state.js';
import type { RunOptions } from './process/run-command.js';
import { QemuCommandError, isLockError, qemuMessage, runCommand, type CommandRunner } from './qemu-error.js';

export interface ImageInfo {
  /** The format qemu-img found (or was told, for raw after a header check): compare it to the spec. */
  format: string;
  /** Bytes a client sees. */
  virtualSize: number;
  /** Bytes allocated on disk. */
  actualSize: number;
  /** Absolute (real, where they exist) paths of the backing images, nearest first, without the image itself. */
  backingChain: string[];
  /** Format of the nearest backing image, as recorded in the image. */
  backingFormat?: string;
  /** QCOW2 corrupt bit: QEMU refuses to write such an image. */
  corrupt?: boolean;
  /** Dirty flag (lazy refcounts after a crash). */
  dirty?: boolean;
}

export interface InspectOptions {
  /** `-U`: read the header even while another process (our qemu-storage-daemon) holds the image. */
  forceShare?: boolean;
  /**
   * `raw`: open as raw, never letting qemu-img guess a format from the first bytes; a file that
   * nevertheless starts with a QCOW2 header is reported as qcow2 (serving it raw would expose
   * the container, not the disk). Without it, qemu-img probes the format.
   */
  format?: 'raw';
}

export interface CreateImageRequest {
  /** Absolute path of the image to create; must not exist. */
  path: string;
  format: ImageFormat;
  /** Bytes; taken from the backing file when omitted (qcow2 with backingFile only). */
  sizeBytes?: number;
  /** Absolute path of the backing image (qcow2 only); recorded as given. */
  backingFile?: string;
  /** Probed from the backing file when omitted. */
  backingFormat?: ImageFormat;
  preallocation?: 'off' | 'metadata' | 'falloc' | 'full';
}

/** createImage found a file (or anything) at the path: nothing was changed. */
export class ImageExistsError extends Error {
  override name = 'ImageExistsError';
  readonly path: string;
  constructor(path: string, options?: { cause?: unknown }) {
    super(`${path} already exists; an existing file is never overwritten`, options);
    this.path = path;
  }
}

export interface QemuImgOptions {
  /** The qemu-img program. Default `qemu-img` from PATH. */
  binary?: string;
  /** Runs the program. Default: a real child process. */
  run?: CommandRunner;
  /** Where the kernel lists file locks. Default `/proc/locks`. */
  procLocksPath?: string;
}

export interface CreateImageHooks {
  /**
   * Called with the new image's inode after it is complete under its temporary name and
   * before it is published at `path`. link(2) keeps the inode, so a caller that records it
   * here can prove the published file its own even if it dies right after publishing.
   */
  beforePublish?: (inode: number) => Promise<void>;
}

export interface QemuImg {
  inspectImage(path: string, options?: InspectOptions): Promise<ImageInfo>;
  probeImageLock(path: string): Promise<LockObservation>;
  /** Resolves to the published image's inode. */
  createImage(request: CreateImageRequest, hooks?: CreateImageHooks): Promise<number>;
}

const QCOW2_MAGIC = Buffer.from([0x51, 0x46, 0x49, 0xfb]); // "QFI\xfb"
/** `.<basename>.nbdx-tmp-<12 hex>`: a temporary image of createImage, ours to remove after a crash. */
const TEMP_PATTERN = /^\..+\.nbdx-tmp-[0-9a-f]{12}$/;
/** QEMU locks byte 100 + n while it holds permission n; n = 1 is "write". */
const QEMU_WRITE_PERMISSION_BYTE = 101n;

export function createQemuImg(options: QemuImgOptions = {}): QemuImg {
  const binary = options.binary ?? 'qemu-img';
  const run = options.run ?? runCommand;
  const procLocksPath = options.procLocksPath ?? '/proc/locks';

  async function qemuImg(args: string[], runOptions?: RunOptions): Promise<string> {
    const result = await run(binary, args, runOptions);
    if (result.exitCode !== 0) throw QemuCommandError.fromResult(binary, args, result);
    return result.stdout;
  }

  async function inspectImage(path: string, inspectOptions: InspectOptions = {}): Promise<ImageInfo> {
    let format = inspectOptions.format;
    if (format === 'raw' && (await startsWithQcow2Header(path))) format = undefined;
    const args = [
      'info',
      '--output=json',
      '--backing-chain',
      ...(inspectOptions.forceShare ? ['-U'] : []),
      ...(format ? ['-f', format] : []),
      path,
    ];
    const stdout = await qemuImg(args);
    let chain: unknown;
    try {
      chain = JSON.parse(stdout);
    } catch (error) {
      throw new QemuCommandError(binary, args, 0, '', {
        cause: error,
        message: `${binary} info printed no JSON for ${path}`,
      });
    }
    return parseInfoChain(path, chain);
  }

  async function probeImageLock(path: string): Promise<LockObservation> {
    // The kernel's lock table answers without touching the image. Asking qemu-img first
    // would itself take a shared lock for a moment, and a QEMU writer starting in that
    // moment would fail to open the image.
    const held = await holdsQemuWriteLock(path, procLocksPath).catch((error: unknown) => {
      if (
        (error as NodeJS.ErrnoException).code === 'ENOENT' &&
        (error as NodeJS.ErrnoException).path === procLocksPath
      )
        return undefined; // no /proc/locks: ask qemu-img alone
      throw error;
    });
    if (held === false) return { locked: false };

    // Without -U qemu-img asks for the permissions a reader needs and fails, with QEMU's own
    // words, when a writer of a format with metadata (qcow2) does not share "write". A raw
    // image's writer shares it, so qemu-img opens it fine: the lock table told us.
    const args = ['info', '--output=json', path];
    const result = await run(binary, args);
    if (result.exitCode !== 0) {
      if (isLockError(result.stderr)) return { locked: true, message: qemuMessage(result.stderr) };
      throw QemuCommandError.fromResult(binary, args, result);
    }
    if (held === undefined) return { locked: false };
    return {
      locked: true,
      message: `another process has ${path} open for writing (it holds QEMU's "write" permission lock, OFD lock on byte 101 in /proc/locks)`,
    };
  }

  async function createImage(request: CreateImageRequest, hooks: CreateImageHooks = {}): Promise<number> {
    checkCreateRequest(request);
    const { path, format, backingFile } = request;
    let backingFormat = request.backingFormat;
    if (backingFile !== undefined && backingFormat === undefined) {
      const found = (await inspectImage(backingFile, { forceShare: true })).format;
      if (found !== 'qcow2' && found !== 'raw')
        throw new TypeError(`backing file ${backingFile} has format "${found}", expected qcow2 or raw`);
      backingFormat = found;
    }
    if (await exists(path)) throw new ImageExistsError(path);

    const directory = dirname(path);
    const temporary = join(directory, `.${basename(path)}.nbdx-tmp-${randomBytes(6).toString('hex')}`);
    const args = [
      'create',
      '-q',
      '-f',
      format,
      ...(request.preallocation ? ['-o', `preallocation=${request.preallocation}`] : []),
      ...(backingFile !== undefined ? ['-b', backingFile, '-F', backingFormat ?? 'raw'] : []),
      temporary,
      ...(request.sizeBytes !== undefined ? [String(request.sizeBytes)] : []),
    ];
    try {
      // Preallocation can take hours on a large disk; a create that stops allocating is hung.
      await qemuImg(args, { progress: { measure: async () => (await stat(temporary)).blocks } });
      await fsyncPath(temporary, 'r');
      const { ino } = await stat(temporary);
      await hooks.beforePublish?.(ino);
      try {
        await link(temporary, path);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === 'EEXIST')
          throw new ImageExistsError(path, { cause: error });
        throw error;
      }
      return ino;
    } finally {
      await unlink(temporary).catch((error: unknown) => {
        if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
      });
      await fsyncPath(directory, 'r').catch(() => undefined);
    }
  }

  return { inspectImage, probeImageLock, createImage };
}

const defaultQemuImg = createQemuImg();

/** `qemu-img info --output=json --backing-chain` of an image. */
export function inspectImage(path: string, options?: InspectOptions): Promise<ImageInfo> {
  return defaultQemuImg.inspectImage(path, options);
}

/** Whether another process holds the image open for writing (a QEMU write lock). */
export function probeImageLock(path: string): Promise<LockObservation> {
  return defaultQemuImg.probeImageLock(path);
}

/**
 * Creates an image under a temporary name in the same directory, then publishes it with
 * link(2), which fails rather than replace an existing file (ImageExistsError). A failure
 * leaves nothing behind but, after a crash, a temporary that removeStaleTemporaryImages finds.
 */
export function createImage(request: CreateImageRequest, hooks?: CreateImageHooks): Promise<number> {
  return defaultQemuImg.createImage(request, hooks);
}

/** Whether a file name is one of createImage's temporaries. */
export function isTemporaryImageName(name: string): boolean {
  return TEMP_PATTERN.test(name);
}

/** Removes createImage's leftover temporaries (only those) from a directory; returns their paths. */
export async function removeStaleTemporaryImages(directory: string): Promise<string[]> {
  const removed: string[] = [];
  for (const entry of await readdir(directory, { withFileTypes: true })) {
    if (!entry.isFile() || !isTemporaryImageName(entry.name)) continue;
    const path = join(directory, entry.name);
    try {
      await unlink(path);
      removed.push(path);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
    }
  }
  if (removed.length > 0) await fsyncPath(directory, 'r').catch(() => undefined);
  return removed;
}

function checkCreateRequest(request: CreateImageRequest): void {
  if (!isAbsolute(request.path)) throw new TypeError(`image path must be absolute, got "${request.path}"`);
  if (request.format !== 'qcow2' && request.format !== 'raw')
    throw new TypeError(`format must be qcow2 or raw, got "${String(request.format)}"`);
  if (request.backingFile !== undefined) {
    if (request.format !== 'qcow2') throw new TypeError('only a qcow2 image can have a backing file');
    if (!isAbsolute(request.backingFile))
      throw new TypeError(`backing file must be an absolute path, got "${request.backingFile}"`);
  } else if (request.sizeBytes === undefined) {
    throw new TypeError('sizeBytes is required without a backing file');
  }
  if (request.sizeBytes !== undefined && (!Number.isSafeInteger(request.sizeBytes) || request.sizeBytes <= 0))
    throw new TypeError(`sizeBytes must be a positive integer, got ${request.sizeBytes}`);
}

interface InfoEntry {
  filename?: string;
  format?: string;
  'virtual-size'?: number;
  'actual-size'?: number;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  'dirty-flag'?: boolean;
  'format-specific'?: { type?: string; data?: { corrupt?: boolean } };
}

/** Turns qemu-img's backing-chain JSON (an array, the image first) into ImageInfo. */
export async function parseInfoChain(path: string, chain: unknown): Promise<ImageInfo> {
  const entries = (Array.isArray(chain) ? chain : [chain]) as InfoEntry[];
  const top = entries[0];
  if (top === undefined || typeof top.format !== 'string' || typeof top['virtual-size'] !== 'number')
    throw new TypeError(`qemu-img info gave no format or size for ${path}`);

  const backingChain: string[] = [];
  let previous = resolve(path);
  for (const entry of entries.slice(0, -1)) {
    const named = entry['full-backing-filename'] ?? entry['backing-filename'];
    if (named === undefined) break;
    const absolute = resolve(dirname(previous), named);
    const real = await realpath(absolute).catch(() => absolute);
    backingChain.push(real);
    previous = real;
  }
  const corrupt = top['format-specific']?.data?.corrupt;
  return {
    format: top.format,
    virtualSize: top['virtual-size'],
    actualSize: top['actual-size'] ?? 0,
    backingChain,
    ...(top['backing-filename-format'] !== undefined
      ? { backingFormat: top['backing-filename-format'] }
      : {}),
    ...(corrupt !== undefined ? { corrupt } : {}),
    ...(top['dirty-flag'] !== undefined ? { dirty: top['dirty-flag'] } : {}),
  };
}

async function startsWithQcow2Header(path: string): Promise<boolean> {
  const handle = await open(path, 'r');
  try {
    const { bytesRead, buffer } = await handle.read(Buffer.alloc(4), 0, 4, 0);
    return bytesRead === 4 && buffer.equals(QCOW2_MAGIC);
  } finally {
    await handle.close();
  }
}

/**
 * Whether /proc/locks shows an OFD lock on QEMU's "write" permission byte of the file:
 * how a raw image's writer is seen (QEMU shares "write" on raw images, so qemu-img does
 * not complain). OFD locks are listed with pid -1, across pid namespaces.
 */
export async function holdsQemuWriteLock(path: string, procLocksPath = '/proc/locks'): Promise<boolean> {
  const info = await stat(path, { bigint: true });
  const major = ((info.dev >> 8n) & 0xfffn) | ((info.dev >> 32n) & ~0xfffn);
  const minor = (info.dev & 0xffn) | ((info.dev >> 12n) & ~0xffn);
  const fileId = `${major.toString(16).padStart(2, '0')}:${minor.toString(16).padStart(2, '0')}:${info.ino}`;
  const text = await readFile(procLocksPath, 'utf8');
  return parseProcLocks(text).some(
    (lock) =>
      lock.kind === 'OFDLCK' &&
      lock.fileId === fileId &&
      lock.start <= QEMU_WRITE_PERMISSION_BYTE &&
      (lock.end === undefined || lock.end >= QEMU_WRITE_PERMISSION_BYTE),
  );
}

interface ProcLock {
  kind: string;
  fileId: string;
  start: bigint;
  /** Undefined: to the end of the file. */
  end: bigint | undefined;
}

/** Parses /proc/locks lines such as `2: OFDLCK ADVISORY  READ -1 fe:00:9978027 100 101`. */
export function parseProcLocks(text: string): ProcLock[] {
  const locks: ProcLock[] = [];
  for (const line of text.split('\n')) {
    const fields = line.trim().split(/\s+/);
    if (fields[1] === '->') continue; // a waiter, not a holder
    const [, kind, , , , fileId, start, end] = fields;
    if (kind === undefined || fileId === undefined || start === undefined || end === undefined) continue;
    if (!/^\d+$/.test(start)) continue;
    locks.push({ kind, fileId, start: BigInt(start), end: end === 'EOF' ? undefined : BigInt(end) });
  }
  return locks;
}

async function exists(path: string): Promise<boolean> {
  try {
    await lstat(path);
    return true;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw error;
  }
}

async function fsyncPath(path: string, flags: string): Promise<void> {
  const handle = await open(path, flags);
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
