/**
 * Resolves a spec path the way the kernel will when a server opens it: every symlink
 * followed. A missing file is resolved through its deepest existing ancestor, so a
 * symlinked directory cannot smuggle a new image outside the allowed roots.
 */
import { lstat, realpath, stat } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import type { PathObservation } from '../plan/observed-state.js';

export async function resolvePath(path: string): Promise<PathObservation> {
  try {
    const realPath = await realpath(path);
    const info = await stat(realPath);
    return {
      kind: 'resolved',
      realPath,
      exists: true,
      parentExists: true,
      isBlockDevice: info.isBlockDevice(),
      isFile: info.isFile(),
    };
  } catch (error) {
    if (!isNotFound(error)) return { kind: 'error', message: `cannot resolve ${path}: ${describe(error)}` };
  }
  if (await isDanglingSymlink(path))
    return {
      kind: 'error',
      message: `${path} is a symlink to a file that does not exist; refusing to create through it`,
    };

  const missing: string[] = [];
  let ancestor = path;
  for (;;) {
    missing.unshift(basename(ancestor));
    ancestor = dirname(ancestor);
    try {
      const realAncestor = await realpath(ancestor);
      return {
        kind: 'resolved',
        realPath: join(realAncestor, ...missing),
        exists: false,
        parentExists: missing.length === 1,
        isBlockDevice: false,
        isFile: false,
      };
    } catch (error) {
      if (!isNotFound(error))
        return { kind: 'error', message: `cannot resolve ${ancestor}: ${describe(error)}` };
      if (ancestor === '/') return { kind: 'error', message: `cannot resolve ${path}` };
    }
  }
}

async function isDanglingSymlink(path: string): Promise<boolean> {
  try {
    return (await lstat(path)).isSymbolicLink();
  } catch {
    return false;
  }
}

function isNotFound(error: unknown): boolean {
  const code = (error as NodeJS.ErrnoException | undefined)?.code;
  return code === 'ENOENT' || code === 'ENOTDIR';
}

function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
