/**
 * Where a resource's status file lives in the status directory. Readable
 * `<namespace>_<name>.yaml` whenever it fits; otherwise the start of the name, `~` and a
 * hash of the whole key, so that every valid name (namespace ≤ 63, name ≤ 253) has a file.
 *
 * Unique: `_` appears in neither part, so a readable name splits back exactly; only hashed
 * names contain `~` (no valid name does), so the two forms never meet; hashed names differ
 * in 128 bits of SHA-256 of the key. Stable: a pure function of the key.
 */
import { createHash } from 'node:crypto';

/**
 * NAME_MAX is 255 bytes, and writeFileAtomic writes `.<name>.<8 hex digits>.tmp` next to
 * the file first: 14 bytes more, which must fit too.
 */
export const MAX_STATUS_FILE_NAME_BYTES = 255 - 14;

const EXTENSION = '.yaml';
const HASH_HEX_DIGITS = 32;

export function statusFileName(namespace: string, name: string): string {
  const readable = `${namespace}_${name}${EXTENSION}`;
  if (Buffer.byteLength(readable) <= MAX_STATUS_FILE_NAME_BYTES) return readable;
  const hash = createHash('sha256').update(`${namespace}/${name}`).digest('hex').slice(0, HASH_HEX_DIGITS);
  const fixedBytes = Buffer.byteLength(`${namespace}_~${hash}${EXTENSION}`);
  // Valid names are ASCII, so characters are bytes; a namespace of 63 leaves 139 for the name.
  const prefix = name.slice(0, Math.max(0, MAX_STATUS_FILE_NAME_BYTES - fixedBytes));
  return `${namespace}_${prefix}~${hash}${EXTENSION}`;
}

/** Whether a status directory entry may hold a status file (either form). */
export function isStatusFileName(fileName: string): boolean {
  return fileName.endsWith(EXTENSION) && !fileName.startsWith('.');
}
