/**
 * Walks an image's backing chain the way QEMU would open it, without QEMU: reads the top
 * image's header, combines a backing name with the directory of the image that names it
 * (QEMU's rule for plain paths), resolves symlinks, reads the next header, and so on.
 *
 * Before it touches a backing file it asks the gate (src/plan/image-header.ts, passed in by the
 * controller, as node/ may not import plan/): names that are not plain paths (`json:`, `nbd://`,
 * `file:` …) are never resolved, files outside the allowed roots never opened, external data
 * files never looked at. Loops are found by (device, inode), so two names of one file count
 * once; the walk stops after `gate.maxBackingDepth` backing images.
 *
 * Its result, judged by judgeImageChain, replaces `qemu-img info --backing-chain`.
 */
import { realpath } from 'node:fs/promises';
import { isAbsolute } from 'node:path';
import type { ImageFormat } from '../../api/types.js';
import type {
  BackingGate,
  ChainEnd,
  DetectedImageFormat,
  ImageChainInspection,
  InspectedImage,
  ParsedImageHeader,
} from '../../plan/image-header.js';
import { readImageHeader, type ImageHeaderRead } from './read-image-header.js';

export interface InspectImageChainOptions {
  /**
   * The format the spec declares for the top image: QEMU is told it, never left to probe.
   * Undefined probes it by magic, as QEMU does when nothing says (a spec's backing file
   * without backingFormat).
   */
  declaredFormat: ImageFormat | undefined;
  /** createBackingGate(policy) from src/plan/image-header.ts. */
  gate: BackingGate;
}

interface NextImage {
  path: string;
  realPath: string;
  namedBy?: string;
  openAs?: DetectedImageFormat;
  formatSource: InspectedImage['formatSource'];
}

/**
 * Inspects `path` (absolute: the name the server will be given) and its backing chain.
 * Never throws for anything found on disk; every outcome is in the result.
 */
export async function inspectImageChain(
  path: string,
  options: InspectImageChainOptions,
): Promise<ImageChainInspection> {
  const images: InspectedImage[] = [];
  const done = (end: ChainEnd): ImageChainInspection => ({ images, end });
  if (!isAbsolute(path))
    return done({ kind: 'unreadable', path, message: 'the image path must be absolute' });

  const top = await resolveReal(path);
  if (top.kind !== 'resolved') return done(top.end);
  const seen = new Set<string>();
  let next: NextImage = {
    path,
    realPath: top.realPath,
    ...(options.declaredFormat !== undefined ? { openAs: options.declaredFormat } : {}),
    formatSource: options.declaredFormat !== undefined ? 'spec' : 'probed',
  };

  for (;;) {
    const read = await readImageHeader(next.realPath, { allowBlockDevice: next.namedBy === undefined });
    const failed = endOfFailedRead(read, next);
    if (failed) return done(failed);
    if (read.kind !== 'read') return done({ kind: 'stopped' }); // unreachable: endOfFailedRead covers the rest
    if (seen.has(read.file.fileId) && next.namedBy !== undefined)
      return done({ kind: 'loop', path: next.realPath, namedBy: next.namedBy });
    seen.add(read.file.fileId);

    const image: InspectedImage = {
      path: next.path,
      realPath: next.realPath,
      openedPath: read.openedPath,
      file: read.file,
      header: read.header,
      openAs: next.openAs ?? probedFormat(read.header),
      formatSource: next.formatSource,
    };
    images.push(image);

    if (image.openAs !== 'qcow2' || image.header.kind !== 'qcow2')
      return done(image.openAs === 'raw' ? { kind: 'complete' } : { kind: 'stopped' });
    const header = image.header.header;
    // An image the judge refuses for what it reaches outside itself is not followed further.
    if (
      header.incompatible.externalDataFile ||
      header.dataFileName !== undefined ||
      header.autoclearRawExternalData
    )
      return done({ kind: 'stopped' });
    const name = header.backingFileName;
    if (name === undefined || name === '') return done({ kind: 'complete' });
    if (
      header.backingFormat !== undefined &&
      header.backingFormat !== 'raw' &&
      header.backingFormat !== 'qcow2'
    )
      return done({ kind: 'stopped' });

    if (images.length > options.gate.maxBackingDepth)
      return done({ kind: 'too-deep', namedBy: image.path, limit: options.gate.maxBackingDepth });
    const nameRefusal = options.gate.vetName(name, image.path);
    if (nameRefusal) return done({ kind: 'refused', refusal: nameRefusal });

    const backingPath = combineLikeQemu(image.path, name);
    const resolved = await resolveReal(backingPath, image.path);
    if (resolved.kind !== 'resolved') return done(resolved.end);
    const pathRefusal = options.gate.vetPath(resolved.realPath, image.path);
    if (pathRefusal) return done({ kind: 'refused', refusal: pathRefusal });

    next = {
      path: backingPath,
      realPath: resolved.realPath,
      namedBy: image.path,
      ...(header.backingFormat !== undefined ? { openAs: header.backingFormat } : {}),
      formatSource: header.backingFormat !== undefined ? 'backing-format' : 'probed',
    };
  }
}

/**
 * QEMU's path_combine for a plain name: an absolute name stands; a relative one is appended
 * to the naming image's name up to its last `/`. Nothing is normalised (`..` after a symlinked
 * directory must go where the kernel takes it), so realpath sees exactly what QEMU's open would.
 */
export function combineLikeQemu(namedBy: string, name: string): string {
  if (isAbsolute(name)) return name;
  return namedBy.slice(0, namedBy.lastIndexOf('/') + 1) + name;
}

/** Without a recorded backing format QEMU probes; so do we, with the same magic. */
function probedFormat(header: ParsedImageHeader): DetectedImageFormat {
  switch (header.kind) {
    case 'raw':
    case 'qcow2':
      return header.kind;
    case 'foreign':
    case 'invalid':
      return header.format;
  }
}

function endOfFailedRead(read: ImageHeaderRead, image: NextImage): ChainEnd | undefined {
  const namedBy = image.namedBy !== undefined ? { namedBy: image.namedBy } : {};
  switch (read.kind) {
    case 'read':
      return undefined;
    case 'missing':
      return { kind: 'missing', path: image.realPath, ...namedBy };
    case 'not-an-image-file':
      return { kind: 'not-an-image-file', path: image.realPath, fileType: read.fileType, ...namedBy };
    case 'error':
      return { kind: 'unreadable', path: image.realPath, message: read.message, ...namedBy };
  }
}

type Resolution = { kind: 'resolved'; realPath: string } | { kind: 'failed'; end: ChainEnd };

async function resolveReal(path: string, namedBy?: string): Promise<Resolution> {
  const by = namedBy !== undefined ? { namedBy } : {};
  try {
    return { kind: 'resolved', realPath: await realpath(path) };
  } catch (error) {
    const code = (error as NodeJS.ErrnoException | undefined)?.code;
    if (code === 'ENOENT' || code === 'ENOTDIR')
      return { kind: 'failed', end: { kind: 'missing', path, ...by } };
    const message = error instanceof Error ? error.message : String(error);
    return {
      kind: 'failed',
      end: { kind: 'unreadable', path, message: `resolving ${path}: ${message}`, ...by },
    };
  }
}
