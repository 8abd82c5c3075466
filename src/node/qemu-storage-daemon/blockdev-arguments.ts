/**
 * The `blockdev-add` arguments of an export's two nodes: the protocol node (the image file or
 * block device) and the format node on top. Kept apart from the daemon's life cycle so the
 * settings that decide throughput are in one place (measured in bench/data-path.ts, recorded
 * in docs/qemu-storage-daemon.md, "Throughput").
 */
import type { ExportConfig } from '../../api/export-config.js';

/**
 * Block devices are opened with O_DIRECT (`cache.direct`): through the device's page cache a
 * first write was two to three times slower (the device's writeback, not QEMU, was the limit),
 * and the host's memory is not spent twice. Image files keep the page cache: for them O_DIRECT
 * lost on every operation (first write 0.65 against 0.99 GiB/s).
 */
export function protocolNodeArguments(config: ExportConfig, nodeName: string): Record<string, unknown> {
  return {
    driver: config.blockDevice ? 'host_device' : 'file',
    'node-name': nodeName,
    filename: config.path,
    locking: 'on',
    'read-only': config.readOnly,
    ...(config.blockDevice ? { cache: { direct: true } } : {}),
  };
}

export function formatNodeArguments(
  config: ExportConfig,
  nodeName: string,
  protocolNodeName: string,
): Record<string, unknown> {
  return {
    driver: config.format,
    'node-name': nodeName,
    file: protocolNodeName,
    'read-only': config.readOnly,
  };
}
