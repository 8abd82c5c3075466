import type { ExportConfig } from '../api/export-config.js';
import type { ChecksumRequest } from './observed-state.js';
import type { ImageFormat, Preallocation, ServerKind } from '../api/types.js';

/** What the planner asks the edges to do. Each is idempotent; order matters. */
export type Action =
  | { kind: 'addFinalizer' }
  | { kind: 'removeFinalizer' }
  | { kind: 'recordOwnership'; createdImage: { path: string } }
  /** Takes the export name on that server for this resource, from whoever claimed it before. */
  | { kind: 'claimExport'; exportName: string; server: ServerKind }
  /** This resource serves nothing any more (it lost a conflict). */
  | { kind: 'releaseExport' }
  /** The resource moved to another file: the one it created is no longer its to delete. */
  | { kind: 'forgetCreatedImage' }
  | { kind: 'forgetOwnership' }
  | { kind: 'makeParentDirectories'; path: string }
  | {
      kind: 'createImage';
      path: string;
      format: ImageFormat;
      sizeBytes?: number;
      backingFile?: string;
      backingFormat?: ImageFormat;
      preallocation?: Preallocation;
    }
  | { kind: 'deleteImage'; path: string; inode?: number }
  | { kind: 'writeNbdServerExport'; config: ExportConfig }
  | { kind: 'removeNbdServerExport'; exportName: string }
  /** Coalesced node-wide: one hand-over restart serves every pending change. */
  | { kind: 'applyNbdServer' }
  | { kind: 'disconnectNbdServerClients'; exportName: string }
  | { kind: 'addQemuExport'; config: ExportConfig }
  | { kind: 'removeQemuExport'; exportName: string; force: boolean }
  /** New client rules for an export on a qemu-storage-daemon of its own; its clients stay connected. */
  | { kind: 'updateQemuExportAccess'; config: ExportConfig }
  /** `port`: the export's own qemu-storage-daemon's, when it has one (else the server's shared port). */
  | {
      kind: 'probe';
      server: ServerKind;
      exportName: string;
      fingerprint: string;
      expectedSize: number;
      port?: number;
    }
  /** Reads the export through its server in the background and hashes it (seal or verify). */
  | {
      kind: 'startChecksum';
      server: ServerKind;
      exportName: string;
      request: ChecksumRequest;
      port?: number;
    };

export type ActionKind = Action['kind'];
