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
import { join } from 'node:path';

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

/** Where one export's admission lives in auth/: its rules, its hook's lock, its clients' slots. */
export interface AdmissionPaths {
  rulesPath: string;
  lockPath: string;
  slotsDir: string;
}

/**
 * `<digest>.rules`, `<digest>.lock` and `<digest>.clients/` in `authDir`. Named by a digest
 * of the export name, not its stem: the paths go into the hook's command line, where
 * nbd-server's printf would read a `%` of an encoded name as a conversion.
 */
export function admissionPathsOf(authDir: string, exportName: string): AdmissionPaths {
  const digest = createHash('sha256').update(exportName, 'utf8').digest('hex').slice(0, 32);
  const rulesPath = join(authDir, `${digest}${RULES_SUFFIX}`);
  return { rulesPath, lockPath: join(authDir, `${digest}.lock`), slotsDir: slotsDirOf(rulesPath) };
}

/** The slots directory that goes with a rules file (the hook knows only the rules' path). */
export function slotsDirOf(rulesPath: string): string {
  return `${rulesPath.slice(0, -RULES_SUFFIX.length)}.clients`;
}

export const RULES_SUFFIX = '.rules';

/**
 * The file in auth/ naming the controller's process (last line `<pid> <start ticks>`): the hook lets
 * that process and its children in unfiltered and uncounted (the probe, the checksum reader).
 */
export function controllerFileOf(authDir: string): string {
  return join(authDir, 'controller');
}

/** The admission hook's own log in auth/: one JSON line per decision (nbd-server's daemon has no stderr). */
export function admissionLogOf(authDir: string): string {
  return join(authDir, 'admission.log');
}
