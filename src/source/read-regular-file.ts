/**
 * Reading a file someone else controls without letting it wedge or swamp the controller:
 * a FIFO named `x.yaml` would block a plain open() forever, and a 62 MB file would be
 * read (and parsed) in full. Only regular files are opened, never through a symbolic
 * link, without blocking, and at most `maxBytes` (+1, to tell "exactly the limit" from
 * "more") are read.
 */
import { fileTypeOf } from '../shared/file-type.js';
import { constants, type BigIntStats } from 'node:fs';
import { lstat, open } from 'node:fs/promises';
import { SourceFileRefusal } from './source-file-refusal.js';

/**
 * What identifies one version of a file: any write changes size, mtime or ctime, and a
 * replacement (rename over it) changes the inode. Unchanged identity ⇒ not read again.
 */
export type FileIdentity = string;

export function identityOf(stats: BigIntStats): FileIdentity {
  return `${stats.dev}:${stats.ino}:${stats.size}:${stats.mtimeNs}:${stats.ctimeNs}`;
}

export type DirectoryEntryState =
  | { kind: 'missing' }
  | { kind: 'regular-file'; identity: FileIdentity }
  | { kind: 'refused'; identity: FileIdentity; refusal: SourceFileRefusal };

/**
 * lstat only: what a cheap rescan needs. `label` names the file in refusals and logs.
 * A name that vanished since readdir is `missing`.
 */
export async function inspectEntry(path: string, label: string): Promise<DirectoryEntryState> {
  let stats: BigIntStats;
  try {
    stats = await lstat(path, { bigint: true });
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return { kind: 'missing' };
    return {
      kind: 'refused',
      identity: `lstat-failed:${(error as NodeJS.ErrnoException).code ?? 'unknown'}`,
      refusal: new SourceFileRefusal(label, 'unreadable', `cannot lstat: ${String(error)}`, { cause: error }),
    };
  }
  if (!stats.isFile())
    return {
      kind: 'refused',
      identity: identityOf(stats),
      refusal: new SourceFileRefusal(
        label,
        'not-a-regular-file',
        `is a ${fileTypeOf(stats)}, not a regular file`,
      ),
    };
  return { kind: 'regular-file', identity: identityOf(stats) };
}

export interface RegularFileContent {
  text: string;
  /** The identity the content belongs to (the same before and after reading). */
  identity: FileIdentity;
}

const READ_CHUNK_BYTES = 64 * 1024;
const OPEN_FLAGS = constants.O_RDONLY | constants.O_NONBLOCK | constants.O_NOFOLLOW;

/**
 * Reads a regular file of at most `maxBytes` as UTF-8. Throws a SourceFileRefusal for
 * anything else. The descriptor is checked with fstat, closing the race between an
 * earlier lstat and the open (the name swapped for a FIFO or a symbolic link).
 */
export async function readRegularFile(
  path: string,
  label: string,
  maxBytes: number,
): Promise<RegularFileContent> {
  let handle;
  try {
    handle = await open(path, OPEN_FLAGS);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    // O_NOFOLLOW on a symbolic link fails with ELOOP; a FIFO cannot fail (O_NONBLOCK).
    if (code === 'ELOOP')
      throw new SourceFileRefusal(label, 'not-a-regular-file', 'is a symbolic link, not a regular file', {
        cause: error,
      });
    throw new SourceFileRefusal(label, 'unreadable', `cannot open: ${String(error)}`, { cause: error });
  }
  try {
    const before = await handle.stat({ bigint: true });
    // Refusals of what the descriptor shows name that version, so it is not read again.
    const identity = identityOf(before);
    if (!before.isFile())
      throw new SourceFileRefusal(
        label,
        'not-a-regular-file',
        `is a ${fileTypeOf(before)}, not a regular file`,
        {
          identity,
        },
      );
    if (before.size > BigInt(maxBytes)) throw tooLarge(label, before.size, maxBytes, identity);
    const chunks: Buffer[] = [];
    let total = 0;
    for (;;) {
      const want = Math.min(READ_CHUNK_BYTES, maxBytes + 1 - total);
      if (want <= 0) break;
      const chunk = Buffer.alloc(want);
      const { bytesRead } = await handle.read(chunk, 0, want, total);
      if (bytesRead === 0) break;
      chunks.push(chunk.subarray(0, bytesRead));
      total += bytesRead;
    }
    if (total > maxBytes) throw tooLarge(label, BigInt(total), maxBytes, undefined);
    const after = await handle.stat({ bigint: true });
    if (identityOf(after) !== identity)
      throw new SourceFileRefusal(label, 'changed-while-reading', 'was written to while being read');
    let text: string;
    try {
      text = new TextDecoder('utf-8', { fatal: true }).decode(Buffer.concat(chunks, total));
    } catch (error) {
      throw new SourceFileRefusal(label, 'syntax', 'is not UTF-8 text', { cause: error, identity });
    }
    return { text, identity };
  } catch (error) {
    if (error instanceof SourceFileRefusal) throw error;
    throw new SourceFileRefusal(label, 'unreadable', `cannot read: ${String(error)}`, { cause: error });
  } finally {
    await handle.close();
  }
}

function tooLarge(
  label: string,
  size: bigint,
  maxBytes: number,
  identity: FileIdentity | undefined,
): SourceFileRefusal {
  return new SourceFileRefusal(
    label,
    'too-large',
    `is ${size} bytes; the maximum is ${maxBytes} bytes`,
    identity === undefined ? {} : { identity },
  );
}
