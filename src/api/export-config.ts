import { createHash } from 'node:crypto';
import type { ImageFormat, ServerKind } from './types.js';

/**
 * What a server needs to serve one export: derived by the planner from a valid spec
 * whose paths have been resolved and checked. Servers never see a raw spec.
 */
export interface ExportConfig {
  exportName: string;
  server: ServerKind;
  /** Real path (symlinks resolved) of the image file or block device. */
  path: string;
  /** Format the server decodes: block devices are raw. */
  format: ImageFormat;
  blockDevice: boolean;
  readOnly: boolean;
  maxConnections: number;
  /** Validated CIDRs; empty allows every client. */
  allowedClients: string[];
  /**
   * qcow2: the backing chain as the controller read and checked it, nearest first. The
   * server opens exactly these files (never a name from an image's header), and the chain
   * ends where this list ends.
   */
  backing?: { path: string; format: ImageFormat }[];
  /**
   * nbd-server: `<st_dev>:<st_ino>` of the file the controller checked. nbd-server opens the
   * path again at every connection; a connection is refused when the path leads elsewhere.
   * (qemu-storage-daemon holds the file it opened, so it needs none.)
   */
  fileId?: string;
  /**
   * qemu-storage-daemon: served by a daemon of its own, on a port of its own, where the node's
   * firewall enforces allowedClients and maxConnections (QEMU's NBD server can do neither per
   * export). Absent: the node's shared daemon, which limits no client per export.
   */
  dedicatedDaemon?: true;
}

/** Whether two configs of an export differ in nothing but their client rules. */
export function differsOnlyInAccess(a: ExportConfig, b: ExportConfig): boolean {
  const neutral = { allowedClients: [], maxConnections: 0 };
  return fingerprintOf({ ...a, ...neutral }) === fingerprintOf({ ...b, ...neutral });
}

/**
 * A stable digest of everything that changes how an export is served. Servers record it
 * next to what they serve, so the planner can tell "served as specified" from "served
 * with an older configuration" without parsing server-specific config back.
 */
export function fingerprintOf(config: ExportConfig): string {
  const canonical = JSON.stringify([
    config.exportName,
    config.server,
    config.path,
    config.format,
    config.blockDevice,
    config.readOnly,
    config.maxConnections,
    [...config.allowedClients].sort(),
    ...(config.backing && config.backing.length > 0 ? [config.backing] : []),
    ...(config.fileId === undefined ? [] : [{ fileId: config.fileId }]),
    ...(config.dedicatedDaemon === true ? [{ dedicatedDaemon: true }] : []),
  ]);
  return createHash('sha256').update(canonical).digest('hex').slice(0, 16);
}
