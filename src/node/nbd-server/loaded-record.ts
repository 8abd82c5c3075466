/**
 * loaded.json: what the running nbd-server parent read when it started, so that a
 * restarted controller knows what the parent it adopts serves (nbd-server cannot be
 * asked). Written atomically once the parent is up, with its pid: a record whose pid is
 * not the running parent's describes nothing, and the next apply restarts to be sure.
 *
 * `retired` remembers the paths of exports (or older configurations of exports) that
 * earlier parents served: their clients may still be connected to orphaned children,
 * and `connections()`/`disconnect()` must find them by name. An entry is dropped once
 * no nbd-server process holds its path open any more.
 */
import type { Logger } from 'pino';
import { readFileIfPresent } from '../../shared/read-file-if-present.js';
import { writeFileAtomic } from '../../shared/atomic-file.js';
import { moveCorruptStateFileAside } from '../corrupt-state-file.js';

export interface LoadedExport {
  fingerprint: string;
  path: string;
  /**
   * Start (clock ticks since boot) of the parent that first served this fingerprint: a client
   * process started before it was forked under an older configuration of the export.
   */
  sinceTicks?: number;
}

export interface LoadedRecord {
  /** The parent that read this configuration; null when none runs (no exports). */
  pid: number | null;
  startedAt: string;
  /** A digest of the base config the parent read ('' when unknown: the parent must be restarted). */
  base: string;
  exports: Record<string, LoadedExport>;
  retired: Record<string, string[]>;
}

export const EMPTY_RECORD: LoadedRecord = { pid: null, startedAt: '', base: '', exports: {}, retired: {} };

/**
 * The record at `path`; EMPTY_RECORD when there is none. A file that does not parse is moved
 * aside (when a logger is given) and read as absent: the next apply restarts and rewrites it.
 */
export async function readLoadedRecord(path: string, logger?: Logger): Promise<LoadedRecord> {
  const text = await readFileIfPresent(path);
  if (text === undefined) return EMPTY_RECORD;
  try {
    const value = JSON.parse(text) as Partial<LoadedRecord> | null;
    if (value === null || typeof value !== 'object' || Array.isArray(value))
      throw new Error('not a JSON object');
    return {
      pid: typeof value.pid === 'number' ? value.pid : null,
      startedAt: typeof value.startedAt === 'string' ? value.startedAt : '',
      base: typeof value.base === 'string' ? value.base : '',
      exports: isObject(value.exports) ? value.exports : {},
      retired: isObject(value.retired) ? value.retired : {},
    };
  } catch (error) {
    // Unreadable: as if absent; the next apply restarts and rewrites it.
    if (logger) await moveCorruptStateFileAside(path, error, logger);
    return EMPTY_RECORD;
  }
}

export async function writeLoadedRecord(path: string, record: LoadedRecord): Promise<void> {
  await writeFileAtomic(path, `${JSON.stringify(record, null, 2)}\n`, { mode: 0o644 });
}

/**
 * The retired map after a parent serving `previous` is replaced by one serving `next`:
 * every path an export name was served from and no longer is, kept while `inUse`.
 */
export function retiredAfter(
  previous: LoadedRecord,
  next: Record<string, LoadedExport>,
  inUse: ReadonlySet<string>,
): Record<string, string[]> {
  const retired = new Map<string, Set<string>>();
  const add = (name: string, path: string) => {
    if (next[name]?.path === path || !inUse.has(path)) return;
    retired.set(name, (retired.get(name) ?? new Set()).add(path));
  };
  for (const [name, paths] of Object.entries(previous.retired)) for (const path of paths) add(name, path);
  for (const [name, loaded] of Object.entries(previous.exports)) add(name, loaded.path);
  return Object.fromEntries([...retired].map(([name, paths]) => [name, [...paths].sort()]));
}

function isObject<T>(value: T | undefined): value is T {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}
