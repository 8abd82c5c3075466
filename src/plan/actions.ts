import type { ExportConfig } from '../api/export-config.js';
import type { ImageFormat, Preallocation, ServerKind } from '../api/types.js';

/** What the planner asks the edges to do. Each is idempotent; order matters. */
export type Action =
  | { kind: 'addFinalizer' }
  | { kind: 'removeFinalizer' }
  | { kind: 'recordOwnership'; exportName?: string; server?: ServerKind; createdImage?: { path: string } }
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
  | { kind: 'probe'; server: ServerKind; exportName: string; fingerprint: string; expectedSize: number };

export type ActionKind = Action['kind'];
