/**
 * The `blockdev-add` arguments of an export's nodes: a protocol node (the image file or block
 * device) and a format node on top, for the image and for each backing image the controller
 * checked. Kept apart from the daemon's life cycle so the settings that decide throughput and
 * what QEMU may open are in one place (measured in bench/data-path.ts, recorded in
 * docs/qemu-storage-daemon.md, "Throughput").
 */
import type { ImageFormat } from '../../api/types.js';

export interface ProtocolNodeTarget {
  path: string;
  blockDevice: boolean;
  readOnly: boolean;
}

/**
 * Block devices are opened with O_DIRECT (`cache.direct`): through the device's page cache a
 * first write was two to three times slower (the device's writeback, not QEMU, was the limit),
 * and the host's memory is not spent twice. Image files keep the page cache: for them O_DIRECT
 * lost on every operation (first write 0.65 against 0.99 GiB/s).
 */
export function protocolNodeArguments(target: ProtocolNodeTarget, nodeName: string): Record<string, unknown> {
  return {
    driver: target.blockDevice ? 'host_device' : 'file',
    'node-name': nodeName,
    filename: target.path,
    locking: 'on',
    'read-only': target.readOnly,
    ...(target.blockDevice ? { cache: { direct: true } } : {}),
  };
}

/**
 * A qcow2 node always names its backing node, or none (`null`): QEMU then opens no file, URL
 * or `json:` name written in the image's header; the chain is the one the controller checked.
 */
export function formatNodeArguments(
  image: { format: ImageFormat; readOnly: boolean },
  nodeName: string,
  protocolNodeName: string,
  backingNodeName: string | null = null,
): Record<string, unknown> {
  return {
    driver: image.format,
    'node-name': nodeName,
    file: protocolNodeName,
    'read-only': image.readOnly,
    ...(image.format === 'qcow2' ? { backing: backingNodeName } : {}),
  };
}
