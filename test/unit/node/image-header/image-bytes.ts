/**
 * Hand-built image headers for the parser's tests: qcow2 with every field under the test's
 * control (including the wrong values), and the first bytes of every other format.
 */
import type { ImageBytes } from '../../../../src/node/image-header/parse-image-header.js';

export const Ext = {
  End: 0,
  BackingFormat: 0xe2792aca,
  FeatureNameTable: 0x6803f857,
  Bitmaps: 0x23852875,
  FullDiskEncryption: 0x0537be77,
  DataFile: 0x44415441,
} as const;

export interface Qcow2Fields {
  version?: number;
  clusterBits?: number;
  size?: bigint;
  cryptMethod?: number;
  /** A string is UTF-8 encoded; bytes are written as they are. */
  backingName?: string | Uint8Array;
  /** Defaults to right after the extensions. */
  backingOffset?: bigint;
  /** Defaults to the name's length. */
  backingSize?: number;
  incompatible?: bigint;
  autoclear?: bigint;
  refcountOrder?: number;
  /** v3 only; default 112 (with the compression type byte). */
  headerLength?: number;
  compressionType?: number;
  extensions?: { type: number; data: Uint8Array; length?: number }[];
  /** Write the end-of-extensions marker (default true). */
  endMarker?: boolean;
  /** Pad the result to this many bytes (default: just what is written). */
  totalLength?: number;
}

export const utf8 = (text: string): Uint8Array => new TextEncoder().encode(text);

export function qcow2(fields: Qcow2Fields = {}): Uint8Array {
  const version = fields.version ?? 3;
  const headerLength = version >= 3 ? (fields.headerLength ?? 112) : 72;
  const name = typeof fields.backingName === 'string' ? utf8(fields.backingName) : fields.backingName;

  const extensionBytes: number[] = [];
  const pushU32 = (target: number[], value: number): void => {
    target.push((value >>> 24) & 0xff, (value >>> 16) & 0xff, (value >>> 8) & 0xff, value & 0xff);
  };
  for (const extension of fields.extensions ?? []) {
    pushU32(extensionBytes, extension.type);
    pushU32(extensionBytes, extension.length ?? extension.data.length);
    extensionBytes.push(...extension.data);
    while (extensionBytes.length % 8 !== 0) extensionBytes.push(0);
  }
  if (fields.endMarker ?? true) extensionBytes.push(0, 0, 0, 0, 0, 0, 0, 0);

  const nameAt = headerLength + extensionBytes.length;
  const written = nameAt + (name?.length ?? 0);
  const total = Math.max(written, fields.totalLength ?? 0, headerLength);
  const bytes = new Uint8Array(total);
  const view = new DataView(bytes.buffer);
  bytes.set([0x51, 0x46, 0x49, 0xfb], 0);
  view.setUint32(4, version);
  if (name !== undefined || fields.backingOffset !== undefined) {
    view.setBigUint64(8, fields.backingOffset ?? BigInt(nameAt));
    view.setUint32(16, fields.backingSize ?? name?.length ?? 0);
  }
  view.setUint32(20, fields.clusterBits ?? 16);
  view.setBigUint64(24, fields.size ?? 64n * 1024n * 1024n);
  view.setUint32(32, fields.cryptMethod ?? 0);
  if (version >= 3) {
    view.setBigUint64(72, fields.incompatible ?? 0n);
    view.setBigUint64(88, fields.autoclear ?? 0n);
    view.setUint32(96, fields.refcountOrder ?? 4);
    view.setUint32(100, headerLength);
    if (headerLength > 104 && total > 104) view.setUint8(104, fields.compressionType ?? 0);
  }
  bytes.set(extensionBytes, headerLength);
  if (name !== undefined) bytes.set(name, nameAt);
  return bytes;
}

/** The parser's input for bytes that are the whole file. */
export function wholeFile(bytes: Uint8Array, fileName?: string): ImageBytes {
  return {
    head: bytes.subarray(0, 64 * 1024),
    tail: bytes.subarray(Math.max(0, bytes.length - 512)),
    size: bytes.length,
    ...(fileName !== undefined ? { fileName } : {}),
  };
}

/** `length` zero bytes with `magic` written at `at`. */
export function withMagic(magic: Uint8Array | string, at = 0, length = 4096): Uint8Array {
  const bytes = new Uint8Array(length);
  bytes.set(typeof magic === 'string' ? Uint8Array.from(magic, (c) => c.charCodeAt(0)) : magic, at);
  return bytes;
}
