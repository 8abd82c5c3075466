/**
 * What the daemon serves, as this controller recorded it: `exports.json` maps each export
 * name to the QMP ids of its export and block nodes, its fingerprint and its config.
 * QMP's `query-block-exports` knows ids but not export names, so the file is how a
 * restarted controller learns what it serves. Written ahead: an entry is recorded as
 * `adding` before the QMP commands run, so a crash in between leaves a trace to clean up.
 */
import { createHash } from 'node:crypto';
import { readFileIfPresent } from '../../shared/read-file-if-present.js';
import type { ExportConfig } from '../../api/export-config.js';
import { writeFileAtomic } from '../../shared/atomic-file.js';

/** Every id and node name this controller gives QEMU starts with it; nothing else is touched. */
export const ID_PREFIX = 'nbdx-';

export interface ExportIds {
  /** block-export id. */
  id: string;
  /** The file (protocol) node and the format node on top of it. */
  nodeNames: {
    file: string;
    format: string;
    /** The same pair for each backing image, nearest first (absent in records of older versions). */
    backing?: { file: string; format: string }[];
  };
}

/** Every block node of an export, in an order QEMU lets them be deleted (users before what they use). */
export function nodesToDelete(ids: ExportIds): string[] {
  return [
    ids.nodeNames.format,
    ids.nodeNames.file,
    ...(ids.nodeNames.backing ?? []).flatMap((b) => [b.format, b.file]),
  ];
}

export interface ExportRecord extends ExportIds {
  fingerprint: string;
  config: ExportConfig;
  /** `adding` until block-export-add succeeded. */
  state: 'adding' | 'served';
}

interface StateFile {
  version: 1;
  exports: Record<string, ExportRecord>;
}

/**
 * QMP ids for an export, derived from its name and fingerprint: deterministic (a restart
 * finds them again), distinct for a changed config (remove and add never collide), and at
 * most 27 characters (QEMU node names are limited to 31).
 */
export function exportIdsOf(exportName: string, fingerprint: string, backingDepth = 0): ExportIds {
  const digest = createHash('sha256').update(`${exportName}\0${fingerprint}`).digest('hex').slice(0, 20);
  const id = `${ID_PREFIX}${digest}`;
  // `-b<i>f` / `-b<i>d`: at most 30 characters for a depth below 100.
  const backing = Array.from({ length: backingDepth }, (_, i) => ({
    file: `${id}-b${i}f`,
    format: `${id}-b${i}d`,
  }));
  return {
    id,
    nodeNames: { file: `${id}-f`, format: `${id}-d`, ...(backingDepth > 0 ? { backing } : {}) },
  };
}

/** exports.json exists but cannot be what writeExportState wrote (torn, truncated, overwritten). */
export class CorruptExportStateError extends Error {
  override name = 'CorruptExportStateError';
}

/** The recorded exports; empty when there is no file. @throws CorruptExportStateError */
export async function readExportState(path: string): Promise<Map<string, ExportRecord>> {
  const text = await readFileIfPresent(path);
  if (text === undefined) return new Map();
  let parsed: Partial<StateFile> | null;
  try {
    parsed = JSON.parse(text) as Partial<StateFile> | null;
  } catch (error) {
    throw new CorruptExportStateError(`${path}: not JSON`, { cause: error });
  }
  if (
    typeof parsed !== 'object' ||
    parsed === null ||
    parsed.version !== 1 ||
    typeof parsed.exports !== 'object' ||
    parsed.exports === null
  )
    throw new CorruptExportStateError(`${path}: not an export state file of version 1`);
  return new Map(Object.entries(parsed.exports));
}

export async function writeExportState(
  path: string,
  records: ReadonlyMap<string, ExportRecord>,
): Promise<void> {
  const file: StateFile = {
    version: 1,
    exports: Object.fromEntries([...records].sort(([a], [b]) => (a < b ? -1 : 1))),
  };
  await writeFileAtomic(path, `${JSON.stringify(file, null, 2)}\n`, { mode: 0o600 });
}
