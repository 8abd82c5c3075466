/**
 * What QEMU itself says of an image: `qemu-img info --backing-chain`, for tests that check
 * the controller's own header reading against QEMU's (never used by the controller, which
 * lets no QEMU tool open an image a user controls).
 */
import { open, realpath } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { execa } from 'execa';

export interface QemuImageInfo {
  format: string;
  virtualSize: number;
  actualSize: number;
  /** Real paths of the backing images, nearest first. */
  backingChain: string[];
  backingFormat?: string;
  corrupt?: boolean;
  dirty?: boolean;
}

export interface QemuInfoOptions {
  /** `-U`: read even while another process holds the image. */
  forceShare?: boolean;
  /** `raw`: open as raw unless the file starts with a QCOW2 header (then let QEMU say qcow2). */
  format?: 'raw';
}

const QCOW2_MAGIC = Buffer.from([0x51, 0x46, 0x49, 0xfb]);

/** `qemu-img info --output=json --backing-chain`; rejects with qemu-img's stderr. */
export async function qemuImageInfo(path: string, options: QemuInfoOptions = {}): Promise<QemuImageInfo> {
  let format = options.format;
  if (format === 'raw' && (await startsWithQcow2Header(path))) format = undefined;
  const { stdout } = await execa('qemu-img', [
    'info',
    '--output=json',
    '--backing-chain',
    ...(options.forceShare ? ['-U'] : []),
    ...(format ? ['-f', format] : []),
    path,
  ]);
  return parseInfoChain(path, JSON.parse(stdout));
}

interface InfoEntry {
  format?: string;
  'virtual-size'?: number;
  'actual-size'?: number;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  'dirty-flag'?: boolean;
  'format-specific'?: { data?: { corrupt?: boolean } };
}

/** qemu-img's backing-chain JSON (an array, the image first) as QemuImageInfo. */
export async function parseInfoChain(path: string, chain: unknown): Promise<QemuImageInfo> {
  const entries = (Array.isArray(chain) ? chain : [chain]) as InfoEntry[];
  const top = entries[0];
  if (top === undefined || typeof top.format !== 'string' || typeof top['virtual-size'] !== 'number')
    throw new TypeError(`qemu-img info gave no format or size for ${path}`);
  const backingChain: string[] = [];
  let previous = resolve(path);
  for (const entry of entries.slice(0, -1)) {
    const named = entry['full-backing-filename'] ?? entry['backing-filename'];
    if (named === undefined) break;
    const absolute = resolve(dirname(previous), named);
    const real = await realpath(absolute).catch(() => absolute);
    backingChain.push(real);
    previous = real;
  }
  const corrupt = top['format-specific']?.data?.corrupt;
  return {
    format: top.format,
    virtualSize: top['virtual-size'],
    actualSize: top['actual-size'] ?? 0,
    backingChain,
    ...(top['backing-filename-format'] !== undefined
      ? { backingFormat: top['backing-filename-format'] }
      : {}),
    ...(corrupt !== undefined ? { corrupt } : {}),
    ...(top['dirty-flag'] !== undefined ? { dirty: top['dirty-flag'] } : {}),
  };
}

async function startsWithQcow2Header(path: string): Promise<boolean> {
  const handle = await open(path, 'r');
  try {
    const { bytesRead, buffer } = await handle.read(Buffer.alloc(4), 0, 4, 0);
    return bytesRead === 4 && buffer.equals(QCOW2_MAGIC);
  } finally {
    await handle.close();
  }
}
