/**
 * File names for exports in conf.d and auth/: one per export name, injective, safe in a
 * directory nbd-server reads (`<name>.conf`, never hidden, never a temporary name).
 *
 * Every byte outside [A-Za-z0-9._-], and a "." at the start, is percent-encoded (UTF-8),
 * so two names never share a file. A name whose encoding would be too long for a file
 * name (NAME_MAX is 255 bytes) becomes a prefix of the encoding, "~" and a SHA-256 of
 * the whole name: "~" never appears in an encoding, so such a name never collides with
 * a short one, and two long names collide only if SHA-256 does.
 */
import { createHash } from 'node:crypto';

const MAX_STEM = 200;
const SAFE_BYTE = /^[A-Za-z0-9_.-]$/;

export function fileStemOf(exportName: string): string {
  // A lone "%" is no encoding of anything else: the empty name (refused elsewhere) stays unique and visible.
  if (exportName === '') return '%';
  let stem = '';
  for (const byte of Buffer.from(exportName, 'utf8')) {
    const char = String.fromCharCode(byte);
    stem +=
      SAFE_BYTE.test(char) && !(char === '.' && stem === '')
        ? char
        : `%${byte.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  if (stem.length <= MAX_STEM) return stem;
  const digest = createHash('sha256').update(exportName, 'utf8').digest('hex');
  // Cut before a partial "%XX" so the prefix stays readable.
  let prefix = stem.slice(0, MAX_STEM - digest.length - 1);
  const percent = prefix.lastIndexOf('%');
  if (percent > prefix.length - 3) prefix = prefix.slice(0, percent);
  return `${prefix}~${digest}`;
}

/** `<stem>.conf`, the export's file in conf.d. */
export function confFileNameOf(exportName: string): string {
  return `${fileStemOf(exportName)}.conf`;
}

/** `<stem>.allow`, the export's authfile. */
export function authFileNameOf(exportName: string): string {
  return `${fileStemOf(exportName)}.allow`;
}
