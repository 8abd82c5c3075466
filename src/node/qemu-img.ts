/**
 * qemu-img, as the controller needs it: create images without ever overwriting a file (and
 * without opening a backing file: its size and format come from our own header reading),
 * and tell from the kernel's lock table whether another process holds an image for writing.
 * Images are inspected by src/node/image-header/, never by a QEMU tool.
 *
 * The free functions use the real `qemu-img`; `createQemuImg()` builds the same functions
 * on another binary or a fake `CommandRunner` (unit tests).
 */
import { randomBytes } from 'node:crypto';
import { link, lstat, open, readFile, readdir, stat, unlink } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join } from 'node:path';
import type { ImageFormat } from '../api/types.js';
import type { LockObservation } from '../plan/observed-state.js';
import type { RunOptions } from './process/run-command.js';
import { commandLineOf, findProcesses, isRunning, parentOf } from './process/proc-scan.js';
import { waitUntil } from './process/wait-until.js';
import { QemuCommandError, runCommand, type CommandRunner } from './qemu-error.js';

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
  probeImageLock(path: string): Promise<LockObservation>;
  /** Resolves to the published image's inode. */
  createImage(request: CreateImageRequest, hooks?: CreateImageHooks): Promise<number>;
}

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

  async function probeImageLock(path: string): Promise<LockObservation> {
    // The kernel's lock table answers without touching the image: no QEMU tool opens an
    // image that a user controls (it would follow whatever the header names), and a qemu-img
    // taking its own shared lock for a moment would make a QEMU writer starting then fail.
    if (!(await holdsQemuWriteLock(path, procLocksPath))) return { locked: false };
    return {
      locked: true,
      message: `another process has ${path} open for writing (it holds QEMU's "write" permission lock: an OFD lock on byte 101 in /proc/locks)`,
    };
  }

  async function createImage(request: CreateImageRequest, hooks: CreateImageHooks = {}): Promise<number> {
    checkCreateRequest(request);
    const { path, format, backingFile, backingFormat } = request;
    if (await exists(path)) throw new ImageExistsError(path);

    const directory = dirname(path);
    // A controller killed mid-create leaves its qemu-img running (preallocating, perhaps for
    // hours); a second one for the same image would do the work twice and race it.
    await stopOrphanedCreates(directory, { image: path });
    const temporary = join(directory, `.${basename(path)}.nbdx-tmp-${randomBytes(6).toString('hex')}`);
    const args = [
      'create',
      '-q',
      '-f',
      format,
      ...(request.preallocation ? ['-o', `preallocation=${request.preallocation}`] : []),
      // -u: qemu-img does not open the backing file; its size and format come from our own reading.
      ...(backingFile !== undefined ? ['-u', '-b', backingFile, '-F', backingFormat ?? 'raw'] : []),
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

  return { probeImageLock, createImage };
}

const defaultQemuImg = createQemuImg();

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

/**
 * Ends `qemu-img create` processes that a killed controller left writing one of createImage's
 * temporaries in `directory` (only for `image`, when given): their command line names the
 * temporary. Creates started by this process are left alone. SIGKILL (qemu-img holds nothing
 * worth flushing: its half-made temporary is removed next), then waits until each has exited,
 * so that the temporary can be removed and is not written again. Returns the pids stopped.
 */
export async function stopOrphanedCreates(
  directory: string,
  options: { image?: string } = {},
): Promise<number[]> {
  const prefix = options.image === undefined ? undefined : `.${basename(options.image)}.nbdx-tmp-`;
  const isOrphanedCreate = (argv: readonly string[], pid: number) =>
    basename(argv[0] ?? '') === 'qemu-img' &&
    argv[1] === 'create' &&
    parentOf(pid) !== process.pid &&
    argv.some(
      (arg) =>
        isAbsolute(arg) &&
        dirname(arg) === directory &&
        isTemporaryImageName(basename(arg)) &&
        (prefix === undefined || basename(arg).startsWith(prefix)),
    );
  const pids = findProcesses(isOrphanedCreate);
  for (const pid of pids) {
    // Checked again just before the signal: the pid must still be that qemu-img.
    const argv = commandLineOf(pid);
    if (argv === undefined || !isOrphanedCreate(argv, pid)) continue;
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // Gone meanwhile.
    }
  }
  if (pids.length > 0)
    await waitUntil(() => pids.every((pid) => !isRunning(pid)), {
      timeoutMs: 10_000,
      what: `orphaned qemu-img create processes ${pids.join(', ')} to exit`,
    });
  return pids;
}

/**
 * Removes createImage's leftover temporaries (only those) from a directory; returns their
 * paths. An orphaned qemu-img still writing one is stopped first.
 */
export async function removeStaleTemporaryImages(directory: string): Promise<string[]> {
  await stopOrphanedCreates(directory);
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
    if (request.backingFormat === undefined)
      throw new TypeError('backingFormat is required with a backing file (qemu-img never probes it)');
  }
  if (request.sizeBytes === undefined) throw new TypeError('sizeBytes is required');
  if (request.sizeBytes !== undefined && (!Number.isSafeInteger(request.sizeBytes) || request.sizeBytes <= 0))
    throw new TypeError(`sizeBytes must be a positive integer, got ${request.sizeBytes}`);
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
