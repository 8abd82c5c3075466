/**
 * What a resource asks of this node, parsed once per reconcile step: the validated spec
 * and the facts derived from it (export name, format, server, path, access). The observer,
 * the planner and the node-wide conflict check all read this one value, so the spec is
 * validated once and each derived fact has one definition.
 */
import { effectiveExportName } from '../api/export-name.js';
import type { ImageFormat, NbdExport, NbdExportSpec, ServerKind } from '../api/types.js';
import { validateSpec } from '../api/validate-spec.js';
import { serverFor, type NodePolicy } from './node-policy.js';

export interface DesiredExport {
  ok: true;
  spec: NbdExportSpec;
  exportName: string;
  /** Block devices are served raw. */
  format: ImageFormat;
  server: ServerKind;
  /** The file or device path exactly as the spec names it (resolved later, by the observer). */
  specPath: string;
  isDevice: boolean;
  readOnly: boolean;
  /**
   * Served by a qemu-storage-daemon of its own, behind the node firewall's rules: the spec
   * names client rules (allowedClients or maxConnections), which QEMU's NBD server cannot
   * enforce per export (src/node/qemu-storage-daemon/qemu-export-fleet.ts).
   */
  dedicatedDaemon: boolean;
  /** The backing file a creation would name, as the spec names it. */
  createBackingFile?: string;
  /** Its format, when the spec says (else it is probed by magic, never by QEMU). */
  createBackingFormat?: ImageFormat;
}

export interface InvalidExport {
  ok: false;
  /** Every field error, each with its field path: for the resource's status. */
  message: string;
}

export function desiredExportOf(
  resource: NbdExport,
  policy: Pick<NodePolicy, 'rawServer'>,
): DesiredExport | InvalidExport {
  const validation = validateSpec(resource.spec);
  if (!validation.ok)
    return { ok: false, message: validation.errors.map((e) => `${e.path}: ${e.message}`).join('; ') };
  const spec = validation.spec;
  const file = spec.source.file;
  const format: ImageFormat = file?.format ?? 'raw';
  const backing = file?.create?.backingFile;
  const backingFormat = file?.create?.backingFormat;
  const server = serverFor(format, policy);
  return {
    ok: true,
    spec,
    exportName: effectiveExportName(resource),
    format,
    server,
    specPath: file?.path ?? spec.source.blockDevice?.path ?? '',
    isDevice: file === undefined,
    readOnly: spec.readOnly ?? false,
    dedicatedDaemon:
      server === 'qemu-storage-daemon' &&
      ((spec.allowedClients?.length ?? 0) > 0 || spec.maxConnections !== undefined),
    ...(backing === undefined ? {} : { createBackingFile: backing }),
    ...(backingFormat === undefined ? {} : { createBackingFormat: backingFormat }),
  };
}
