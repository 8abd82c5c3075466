/**
 * Writes a file so that readers see either the old content or the new, never a part:
 * a temporary name in the same directory (starting with "." and ending in ".tmp", so
 * nbd-server, which reads only `*.conf`, never picks it up), fsync, rename, fsync of
 * the directory so the rename itself survives a crash.
 */
import { randomBytes } from 'node:crypto';
import { open, readdir, rename, rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';

export interface WriteFileAtomicOptions {
  /** Permission bits of the new file. Default 0o644. */
  mode?: number;
}

/** The temporary name used for `path`: recognisable, so leftovers can be cleaned up. */
export function temporaryNameFor(path: string): string {
  return join(dirname(path), `.${basename(path)}.${randomBytes(4).toString('hex')}.tmp`);
}

export function isTemporaryName(fileName: string): boolean {
  return /^\..+\.[0-9a-f]{8}\.tmp$/.test(fileName);
}

export async function writeFileAtomic(
  path: string,
  data: string | Uint8Array,
  options: WriteFileAtomicOptions = {},
): Promise<void> {
  const temporary = temporaryNameFor(path);
  try {
    const handle = await open(temporary, 'wx', options.mode ?? 0o644);
    try {
      await handle.writeFile(data);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await rename(temporary, path);
  } catch (error) {
    await rm(temporary, { force: true });
    throw error;
  }
  await syncDirectory(dirname(path));
}

/**
 * Removes the temporary files an interrupted `writeFileAtomic` left in `dir` (a crash
 * between creating and renaming one). Returns the names removed; a missing directory
 * has none. Only names `temporaryNameFor` produces are touched.
 */
export async function removeTemporaryFiles(dir: string): Promise<string[]> {
  const names = await readdir(dir).catch((error: unknown) => {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw error;
  });
  const removed = names.filter(isTemporaryName);
  for (const name of removed) await rm(join(dir, name), { force: true });
  return removed;
}

export async function syncDirectory(dir: string): Promise<void> {
  const handle = await open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
