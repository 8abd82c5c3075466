/**
 * What the controller observed on the node for one resource, gathered by the edges
 * (src/node via src/controller) before each planning step. Plain data: the planner
 * decides from it alone, so every decision is testable as a table.
 */
import type { ExportConfig } from '../api/export-config.js';
import type { ServerKind } from '../api/types.js';
import type { ActionKind } from './actions.js';

/** A spec path after resolving symlinks; for a missing file, its deepest existing ancestor resolved. */
export type PathObservation =
  | {
      kind: 'resolved';
      realPath: string;
      exists: boolean;
      parentExists: boolean;
      isBlockDevice: boolean;
      isFile: boolean;
    }
  | { kind: 'error'; message: string };

export interface ImageInfo {
  format: string;
  /** `<st_dev>:<st_ino>` of the file read (absent: not known, e.g. in older observations). */
  fileId?: string;
  virtualSize: number;
  actualSize: number;
  /** Real paths of the backing images, nearest first. */
  backingChain: string[];
  /** The format each backing image is opened as, in the same order (absent: not known). */
  backingFormats?: string[];
  corrupt?: boolean;
}

/**
 * An image as the controller's own header reading found it (never QEMU's): `present` once the
 * judge (src/plan/image-header.ts) accepted it and its whole backing chain, `refused` with the
 * judge's reason when anything in it must not be opened or served.
 */
export type ImageObservation =
  | { kind: 'missing' }
  | { kind: 'present'; info: ImageInfo }
  | { kind: 'refused'; reason: string; message: string }
  | { kind: 'unreadable'; message: string };

export type LockObservation = { locked: false } | { locked: true; message: string };

/** What one server does with one export name. */
export interface ServingObservation {
  server: ServerKind;
  exportName: string;
  running: boolean;
  /** nbd-server only: fingerprint of the configuration written for its next (re)start. */
  configured?: string;
  /** Fingerprint of what the running server serves under this name, if anything. */
  served?: string;
  /** nbd-server only: per-client processes still serving this name (orphans included). */
  connections?: number;
  /** nbd-server only: clients connected before the served configuration began, still on the old one. */
  staleConnections?: number;
  /** Why the server is not running, when it failed to start. */
  failure?: string;
  /** qemu-storage-daemon: the port of the export's own daemon, when it is served by one. */
  port?: number;
  /** qemu-storage-daemon: the config it serves, so that a change of client rules alone can be told apart. */
  servedConfig?: ExportConfig;
}

export interface ProbeObservation {
  fingerprint: string;
  ok: boolean;
  size?: number;
  message: string;
  /** How long ago the handshake was made: the planner decides whether it still stands. */
  ageMs: number;
}

/** A checksum of what an export serves, read through the server: seal it, or verify a seal. */
export interface ChecksumRequest {
  kind: 'seal' | 'verify';
  /** The resource generation it is for: a seal describes the export of that spec. */
  generation: number;
  /** The bytes the export serves (its virtual size): a read that ends short failed. */
  totalBytes: number;
  /** verify only: the token of the request (the annotation's value). */
  token?: string;
}

export type ChecksumJob = ChecksumRequest &
  (
    | { state: 'running'; bytesRead: number }
    | { state: 'done'; digest: string; bytesRead: number; completedAt: string }
    | { state: 'failed'; message: string; bytesRead: number; completedAt: string }
  );

/** An action of the previous step threw. */
export interface ExecutionFailure {
  action: ActionKind;
  message: string;
  /** Retrying cannot help (a request the executor refuses as malformed, a 4xx from the API). */
  permanent: boolean;
}

/** What the node remembers this resource owns (src/node/ownership-ledger.ts). */
export interface LedgerEntry {
  uid: string;
  key: string;
  /** The export name and server last served for this resource. */
  exportName?: string;
  server?: ServerKind;
  /** An image this controller created for the resource: only such a file may ever be deleted. */
  createdImage?: { path: string; inode?: number };
}

/** Decided over all resources of the node (conflicts.ts). */
export interface ConflictObservation {
  reason: 'ExportNameConflict' | 'ImageInUse';
  message: string;
}

export interface ObservedExport {
  path?: PathObservation;
  backingPath?: PathObservation;
  image?: ImageObservation;
  backingImage?: ImageObservation;
  /** Looked at only when this controller does not serve the image itself. */
  lock?: LockObservation;
  /** The server and export name the spec asks for. */
  desired?: ServingObservation;
  /** The server and export name the ledger says this resource serves, when it has one. */
  owned?: ServingObservation;
  probe?: ProbeObservation;
  ledger?: LedgerEntry;
  conflict?: ConflictObservation;
  /** Other resources on this node that use the image this one created (they keep it alive). */
  createdImageUsedBy?: string[];
  /** Files other resources of this node export read-write (real paths): none may back this image. */
  writersElsewhere?: { realPath: string; key: string }[];
  /** What an executor learned in this run: a gentle qemu export removal refused (a client is connected). */
  removalBlocked?: string;
  /** The checksum job of this resource, running or finished, if it asked for one. */
  checksum?: ChecksumJob;
  /** What an executor learned in this run: the last step's action threw. */
  executionFailure?: ExecutionFailure;
}
