/**
 * Image headers, read by our own code before any QEMU tool sees an image, and the pure judge
 * that decides whether an image chain may be served.
 *
 * Why: the controller runs as root next to every backup, and the images are written by users
 * or by backup agents through raw exports. QEMU opens whatever a header names (a backing file,
 * a `json:{...}` pseudo-filename, an `nbd://` URL, an external data file), so letting
 * `qemu-img info --backing-chain` look first already means following the attacker's links.
 * src/node/image-header/ reads headers with bounded reads and walks the chain itself; this
 * file declares the shapes it produces (node imports them type-only) and judges them.
 */
import type { ImageFormat } from '../api/types.js';
import { Reason } from '../api/reasons.js';
import { isInsideAnyRoot } from './node-policy.js';

/** Formats that are not raw and not qcow2: recognised only so that they are never served as raw bytes. */
export type ForeignImageFormat =
  'qcow' | 'qed' | 'vmdk' | 'vdi' | 'vpc' | 'vhdx' | 'luks' | 'parallels' | 'dmg' | 'cloop' | 'bochs';

/** What a format's magic bytes say; `raw` means no known magic. */
export type DetectedImageFormat = 'raw' | 'qcow2' | ForeignImageFormat;

/** Bits of the qcow2 `incompatible_features` field (QEMU refuses an image with a bit it does not know). */
export interface Qcow2IncompatibleFeatures {
  /** Bit 0: refcounts may be stale (lazy refcounts, unclean shutdown). QEMU repairs on a writable open. */
  dirty: boolean;
  /** Bit 1: QEMU found an inconsistency and will not write the image. */
  corrupt: boolean;
  /** Bit 2: guest data lives in another file, named by the data-file extension. */
  externalDataFile: boolean;
  /** Bit 3: the compression type field is not zlib. */
  compressionType: boolean;
  /** Bit 4: extended L2 entries (subclusters). */
  extendedL2: boolean;
  /** Positions of set bits this code does not know (5..63). */
  unknownBits: number[];
}

export interface Qcow2Header {
  version: 2 | 3;
  /** log2 of the cluster size, 9..21. */
  clusterBits: number;
  /** Bytes a client sees. May exceed Number.MAX_SAFE_INTEGER (then it is not exact): the judge refuses that. */
  virtualSize: number;
  /** 0 none, 1 AES (legacy), 2 LUKS. */
  cryptMethod: number;
  /** The backing file name exactly as recorded (may contain anything, including `json:` or a NUL). */
  backingFileName?: string;
  /** Backing format extension (0xe2792aca), as recorded. */
  backingFormat?: string;
  /** External data file extension (0x44415441), as recorded. */
  dataFileName?: string;
  /** Full disk encryption extension (0x0537be77) present. */
  encryptionExtension: boolean;
  /** Bitmaps extension (0x23852875) present. */
  bitmapsExtension: boolean;
  /** Feature name table extension (0x6803f857) present. */
  featureNameTable: boolean;
  incompatible: Qcow2IncompatibleFeatures;
  /** Autoclear bit 0: bitmaps extension is consistent. */
  autoclearBitmaps: boolean;
  /** Autoclear bit 1: the external data file is a valid raw image (reads may bypass qcow2). */
  autoclearRawExternalData: boolean;
  /** 0 zlib, 1 zstd (v3 with a header longer than 104 bytes). */
  compressionType: number;
}

/** The parser's answer: every input gives one of these, never an exception. */
export type ParsedImageHeader =
  | { kind: 'raw' }
  | { kind: 'qcow2'; header: Qcow2Header }
  | { kind: 'foreign'; format: ForeignImageFormat; evidence: string }
  | { kind: 'invalid'; format: 'qcow2' | ForeignImageFormat; problem: string };

/** Facts from one fstat of the descriptor the header was read from. */
export interface ImageFileFacts {
  type: 'file' | 'block-device';
  /** `<st_dev>:<st_ino>`: one file, whatever its names (loop detection). */
  fileId: string;
  /** Hard links to the file; above 1 a name inside a root may share the inode with one outside. */
  nlink: number;
  /** Bytes: st_size for a file, the device's size for a block device. */
  size: number;
  /** st_blocks * 512. */
  allocatedBytes: number;
}

/** How QEMU would open one image of the chain, and what we found there. */
export interface InspectedImage {
  /** The name QEMU would use: the spec path, or a backing name combined with its parent's directory. */
  path: string;
  /** `path` with every symlink resolved, before opening. */
  realPath: string;
  /** What the kernel says the open descriptor is (/proc/self/fd): immune to a swap after realpath. */
  openedPath: string;
  file: ImageFileFacts;
  header: ParsedImageHeader;
  /** The format QEMU would open it as. */
  openAs: DetectedImageFormat;
  /** Where `openAs` comes from: the spec, the parent's backing format extension, or QEMU's probing. */
  formatSource: 'spec' | 'backing-format' | 'probed';
}

/** Why the walk ended. Anything but `complete` is a refusal. */
export type ChainEnd =
  | { kind: 'complete' }
  /** The gate refused a backing name or path before it was opened. */
  | { kind: 'refused'; refusal: ImageRefusal }
  | { kind: 'missing'; path: string; namedBy?: string }
  /** Exists but is not a regular file or block device (FIFO, socket, char device, directory, symlink). */
  | { kind: 'not-an-image-file'; path: string; fileType: string; namedBy?: string }
  | { kind: 'unreadable'; path: string; message: string; namedBy?: string }
  /** An image names one already in the chain (same device and inode). */
  | { kind: 'loop'; path: string; namedBy: string }
  /** The chain has more backing images than the limit. */
  | { kind: 'too-deep'; namedBy: string; limit: number }
  /** The last image opened cannot be followed (its format is refused; the judge says why). */
  | { kind: 'stopped' };

export interface ImageChainInspection {
  /** Images opened and read, the top first. */
  images: InspectedImage[];
  end: ChainEnd;
}

/** Checks the inspector runs on each backing link before it touches that file. */
export interface BackingGate {
  /** At most this many backing images below the top one. */
  readonly maxBackingDepth: number;
  /** Before any file system access: is the name one QEMU reads as a plain local path? */
  vetName(name: string, namedBy: string): ImageRefusal | undefined;
  /** After realpath, before open: may the file be read at all? */
  vetPath(realPath: string, namedBy: string): ImageRefusal | undefined;
}

/** Machine-readable cause of a refusal (logs, tests); `reason` is the API word. */
export type RefusalCode =
  | 'external-data-file'
  | 'backing-name-not-a-path'
  | 'outside-allowed-roots'
  | 'not-a-regular-file'
  | 'backing-format-unsupported'
  | 'chain-too-deep'
  | 'chain-loop'
  | 'backing-missing'
  | 'unreadable'
  | 'encrypted'
  | 'unknown-incompatible-features'
  | 'corrupt'
  | 'invalid-header'
  | 'format-mismatch'
  | 'foreign-header-as-raw'
  | 'hard-linked'
  | 'virtual-size';

export interface ImageRefusal {
  reason: Reason;
  code: RefusalCode;
  /** What is wrong and what a person can do about it. */
  message: string;
}

/** What `qemu-img info --backing-chain` told the controller, from our own reading. */
export interface ImageChainSummary {
  format: DetectedImageFormat;
  /** The top image's `<st_dev>:<st_ino>`, from the descriptor its header was read through. */
  fileId: string;
  virtualSize: number;
  actualSize: number;
  /** Real paths of the backing images, nearest first. */
  backingChain: string[];
  /** The format each of them is opened as, in the same order. */
  backingFormats: DetectedImageFormat[];
  backingFormat?: string;
  corrupt?: boolean;
  dirty?: boolean;
}

export type ImageVerdict = { ok: true; image: ImageChainSummary } | ({ ok: false } & ImageRefusal);

export interface ImageChainPolicy {
  /** Real paths under which image files (and so every backing file) must live. */
  allowedRoots: readonly string[];
  /** Backing images allowed below the top one; DEFAULT_MAX_BACKING_DEPTH unless the operator says otherwise. */
  maxBackingDepth: number;
  /**
   * The operator's explicit consent to serve raw bytes that begin with another format's header
   * (e.g. a guest disk that itself holds a qcow2 image). Off by default: a VMDK or LUKS container
   * served read-write as raw lets a client rewrite the container's metadata.
   */
  allowRawOverForeignHeader: boolean;
}

export interface ImageJudgeRequest extends ImageChainPolicy {
  /**
   * The format the spec declares for the top image; undefined when nothing declares it (a
   * backing file named by a spec without backingFormat), so it was probed as QEMU would.
   */
  declaredFormat: ImageFormat | undefined;
}

/**
 * 16 backing images: a weekly full with daily incrementals for two weeks fits; a chain longer
 * than that is more likely a loop built from distinct files (or a slow-down attack) than a backup.
 */
export const DEFAULT_MAX_BACKING_DEPTH = 16;

const BACKING_FORMATS: readonly string[] = ['raw', 'qcow2'];

/** The gate the inspector must pass each backing link through, built from the same rules as the judge. */
export function createBackingGate(
  policy: Pick<ImageChainPolicy, 'allowedRoots' | 'maxBackingDepth'>,
): BackingGate {
  return {
    maxBackingDepth: policy.maxBackingDepth,
    vetName: (name, namedBy) => vetBackingName(name, namedBy),
    vetPath: (realPath, namedBy) =>
      isInsideAnyRoot(realPath, policy.allowedRoots)
        ? undefined
        : refuse(
            Reason.PathNotAllowed,
            'outside-allowed-roots',
            `${namedBy} names backing file ${realPath} (symlinks resolved), which is outside the allowed roots ` +
              `(${policy.allowedRoots.join(', ')}); move the backing file under a root or rebase the image`,
          ),
  };
}

/**
 * Whether QEMU would read a backing name as a plain local path. QEMU treats a `:` before the
 * first `/` as a protocol prefix (`nbd:`, `json:`, `http:` …); `file:` is one of them and is
 * refused like the rest rather than taught to a second parser. A NUL would cut the name short
 * in QEMU but not here, so such a name means two different files.
 */
export function vetBackingName(name: string, namedBy: string): ImageRefusal | undefined {
  const notAPath = (why: string): ImageRefusal =>
    refuse(
      Reason.ImageUnsafe,
      'backing-name-not-a-path',
      `${namedBy} names its backing file ${JSON.stringify(name)}, ${why}; only plain file paths are followed. ` +
        `Rebase the image onto a file path (qemu-img rebase -u -b /path/to/base -F qcow2 ${namedBy})`,
    );
  if (name.includes('\0')) return notAPath('which contains a NUL byte');
  if (name.startsWith('json:')) return notAPath('a json: pseudo-filename that QEMU would parse as options');
  if (name.includes('://')) return notAPath('a URL that QEMU would connect to');
  const firstSlash = name.indexOf('/');
  const firstColon = name.indexOf(':');
  if (firstColon !== -1 && (firstSlash === -1 || firstColon < firstSlash))
    return notAPath(`which QEMU reads as protocol "${name.slice(0, firstColon)}:"`);
  return undefined;
}

/**
 * Decides whether an inspected chain may be served, checking the top image first: the first
 * problem found is the one reported.
 */
export function judgeImageChain(inspection: ImageChainInspection, request: ImageJudgeRequest): ImageVerdict {
  const { images } = inspection;
  for (const [depth, image] of images.entries()) {
    const refusal = judgeImage(image, depth, request);
    if (refusal) return { ok: false, ...refusal };
  }
  const endRefusal = judgeEnd(inspection.end);
  if (endRefusal) return { ok: false, ...endRefusal };
  const top = images[0];
  if (top === undefined)
    return {
      ok: false,
      ...refuse(Reason.ImageInvalid, 'unreadable', 'the image was not read (empty inspection)'),
    };
  return { ok: true, image: summarizeImageChain({ ...inspection, images: [top, ...images.slice(1)] }) };
}

/** The qemu-img-info-like view of what was read; meaningful for a chain the judge accepted. */
export function summarizeImageChain(inspection: {
  images: [InspectedImage, ...InspectedImage[]];
}): ImageChainSummary {
  const [top, ...backing] = inspection.images;
  const header = top.header.kind === 'qcow2' && top.openAs === 'qcow2' ? top.header.header : undefined;
  return {
    format: top.openAs,
    fileId: top.file.fileId,
    virtualSize: header ? header.virtualSize : top.file.size,
    actualSize: top.file.allocatedBytes,
    backingChain: backing.map((image) => image.realPath),
    backingFormats: backing.map((image) => image.openAs),
    ...(header?.backingFormat !== undefined ? { backingFormat: header.backingFormat } : {}),
    ...(header ? { corrupt: header.incompatible.corrupt, dirty: header.incompatible.dirty } : {}),
  };
}

function judgeImage(
  image: InspectedImage,
  depth: number,
  request: ImageJudgeRequest,
): ImageRefusal | undefined {
  const { path, file } = image;
  const role = depth === 0 ? 'image' : `backing file (depth ${depth})`;

  if (depth > 0 && file.type !== 'file')
    return refuse(
      Reason.ImageUnsafe,
      'not-a-regular-file',
      `${role} ${path} is a ${file.type}, not a regular file; backing files must be regular files`,
    );
  if (file.type === 'file' && !isInsideAnyRoot(image.openedPath, request.allowedRoots))
    return refuse(
      Reason.PathNotAllowed,
      'outside-allowed-roots',
      `${role} ${path} opened as ${image.openedPath}, which is outside the allowed roots (${request.allowedRoots.join(', ')})`,
    );
  if (file.type === 'file' && file.nlink > 1)
    return refuse(
      Reason.ImageUnsafe,
      'hard-linked',
      `${role} ${path} has ${file.nlink} hard links; a link inside an allowed root can share its inode with a file ` +
        `outside it, so hard-linked images are refused. Copy the file (cp --reflink=auto) or remove the other links`,
    );

  switch (image.openAs) {
    case 'raw':
      return judgeRaw(image, depth, role, request);
    case 'qcow2':
      return judgeQcow2(image, depth, role, request);
    default:
      return depth === 0 && request.declaredFormat !== undefined
        ? refuse(
            Reason.ImageFormatMismatch,
            'format-mismatch',
            `${path} is ${image.openAs}, but the spec says ${request.declaredFormat}`,
          )
        : refuse(
            Reason.Unsupported,
            'backing-format-unsupported',
            `${role} ${path} is ${image.openAs} (${image.formatSource}); only raw and qcow2 images are served`,
          );
  }
}

function judgeRaw(
  image: InspectedImage,
  depth: number,
  role: string,
  request: ImageJudgeRequest,
): ImageRefusal | undefined {
  const { header, path, file } = image;
  if (header.kind !== 'raw' && !request.allowRawOverForeignHeader) {
    const found = header.kind === 'qcow2' ? 'qcow2' : header.format;
    return refuse(
      depth === 0 ? Reason.ImageFormatMismatch : Reason.ImageUnsafe,
      'foreign-header-as-raw',
      `${role} ${path} is read as raw but begins with a ${found} header; serving it raw would expose the ` +
        `container's metadata to clients. Fix the format in the spec, or let the operator allow raw over ` +
        `foreign headers if the bytes really are a disk`,
    );
  }
  if (file.size <= 0)
    return file.type === 'block-device'
      ? refuse(
          Reason.ImageNotFound,
          'virtual-size',
          `block device ${path} has no medium: its size is 0 (a detached loop device, a reset zram device); it is served again once it has one`,
        )
      : refuse(
          Reason.ImageInvalid,
          'virtual-size',
          `${role} ${path} is empty (0 bytes); there is nothing to serve`,
        );
  if (!Number.isSafeInteger(file.size))
    return refuse(Reason.ImageInvalid, 'virtual-size', `${role} ${path} is larger than 2^53 - 1 bytes`);
  return undefined;
}

function judgeQcow2(
  image: InspectedImage,
  depth: number,
  role: string,
  request: ImageJudgeRequest,
): ImageRefusal | undefined {
  const { header, path } = image;
  if (header.kind === 'invalid')
    return refuse(
      Reason.ImageInvalid,
      'invalid-header',
      `${role} ${path} has a malformed ${header.format} header: ${header.problem}`,
    );
  if (header.kind !== 'qcow2') {
    const found = header.kind === 'raw' ? 'raw (no known header)' : header.format;
    return depth === 0
      ? refuse(
          Reason.ImageFormatMismatch,
          'format-mismatch',
          `${path} is ${found}, but the spec says ${request.declaredFormat}`,
        )
      : refuse(
          Reason.ImageInvalid,
          'format-mismatch',
          `${role} ${path} is recorded as qcow2 but is ${found}`,
        );
  }
  const h = header.header;
  if (h.incompatible.corrupt)
    return refuse(
      Reason.ImageInvalid,
      'corrupt',
      `${role} ${path} is marked corrupt; QEMU will not write it. Check it with qemu-img check -r all on a copy`,
    );
  if (h.incompatible.externalDataFile || h.dataFileName !== undefined || h.autoclearRawExternalData)
    return refuse(
      Reason.ImageUnsafe,
      'external-data-file',
      `${role} ${path} keeps its data in an external file` +
        (h.dataFileName !== undefined ? ` (${JSON.stringify(h.dataFileName)})` : '') +
        `; a client could read and write that file through the export, wherever it is. Convert the image ` +
        `(qemu-img convert -O qcow2) to one without a data file`,
    );
  if (h.cryptMethod !== 0 || h.encryptionExtension)
    return refuse(
      Reason.Unsupported,
      'encrypted',
      `${role} ${path} is encrypted (crypt method ${h.cryptMethod}); encrypted images are not served`,
    );
  if (h.incompatible.unknownBits.length > 0)
    return refuse(
      Reason.Unsupported,
      'unknown-incompatible-features',
      `${role} ${path} sets incompatible feature bits ${h.incompatible.unknownBits.join(', ')}, which this ` +
        `controller does not know; an image written by a newer QEMU must not be read by one that ignores them`,
    );
  if (h.backingFormat !== undefined && !BACKING_FORMATS.includes(h.backingFormat))
    return refuse(
      Reason.Unsupported,
      'backing-format-unsupported',
      `${role} ${path} records backing format ${JSON.stringify(h.backingFormat)}; only raw and qcow2 backing files are served`,
    );
  if (!(h.virtualSize > 0) || !Number.isSafeInteger(h.virtualSize))
    return refuse(
      Reason.ImageInvalid,
      'virtual-size',
      `${role} ${path} declares a virtual size of ${h.virtualSize} bytes; it must be positive and at most 2^53 - 1`,
    );
  return undefined;
}

function judgeEnd(end: ChainEnd): ImageRefusal | undefined {
  switch (end.kind) {
    case 'complete':
    case 'stopped':
      return undefined;
    case 'refused':
      return end.refusal;
    case 'missing':
      return end.namedBy === undefined
        ? refuse(Reason.ImageNotFound, 'backing-missing', `${end.path} does not exist`)
        : refuse(
            Reason.BackingFileNotFound,
            'backing-missing',
            `${end.namedBy} names backing file ${end.path}, which does not exist`,
          );
    case 'not-an-image-file':
      return refuse(
        Reason.ImageUnsafe,
        'not-a-regular-file',
        `${end.path}${end.namedBy !== undefined ? ` (named by ${end.namedBy})` : ''} is a ${end.fileType}; ` +
          `only regular files (and block devices as the top image) are read`,
      );
    case 'unreadable':
      return refuse(
        Reason.ImageInvalid,
        'unreadable',
        `cannot read ${end.path}${end.namedBy !== undefined ? ` (named by ${end.namedBy})` : ''}: ${end.message}`,
      );
    case 'loop':
      return refuse(
        Reason.ImageUnsafe,
        'chain-loop',
        `${end.namedBy} names backing file ${end.path}, which is already in its own chain (a loop)`,
      );
    case 'too-deep':
      return refuse(
        Reason.ImageUnsafe,
        'chain-too-deep',
        `the backing chain is longer than ${end.limit} backing files (at ${end.namedBy}); ` +
          `commit or stream it (qemu-img commit / rebase) into a shorter chain`,
      );
  }
}

function refuse(reason: Reason, code: RefusalCode, message: string): ImageRefusal {
  return { reason, code, message };
}
