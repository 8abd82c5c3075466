/**
 * The edges the reconciler drives, as the controller needs them. src/node implements
 * them (NbdServerSupervisor, QemuStorageDaemon, qemu-img, the NBD probe, the ledger);
 * unit tests may fake them here, at the boundary.
 */
import type { ExportConfig } from '../api/export-config.js';
import type {
  ChecksumJob,
  ChecksumRequest,
  ImageObservation,
  LockObservation,
  PathObservation,
} from '../plan/observed-state.js';
import type { Action } from '../plan/actions.js';
import type { ImageJudgeRequest } from '../plan/image-header.js';
import type { OwnershipLedger } from '../node/ownership-ledger.js';
import type { ProbeResult, ProbeTarget } from '../node/nbd-probe.js';

export interface NbdServerControl {
  writeExport(config: ExportConfig): Promise<boolean>;
  removeExport(exportName: string): Promise<boolean>;
  configured(): Promise<Map<string, string>>;
  loaded(): ReadonlyMap<string, string>;
  requestApply(): void;
  connections(): Promise<Map<string, number[]>>;
  disconnect(exportName: string): Promise<number>;
  /** Per export, clients still using an older configuration of it (connected before a change). */
  staleConnections(): Promise<Map<string, number>>;
  /** `lastError`: why the last start or restart failed, if it did. */
  status(): { running: boolean; lastError: string | null };
  onApplied(listener: (changedExportNames: string[]) => void): void;
}

export interface QemuServerControl {
  /** `port`: the export's own daemon's, when it has one (ExportConfig.dedicatedDaemon). */
  exports(): Promise<ReadonlyMap<string, { fingerprint: string; config: ExportConfig; port?: number }>>;
  addExport(config: ExportConfig): Promise<void>;
  /** New client rules for an export served by a daemon of its own; its clients stay connected. */
  updateAccess(config: ExportConfig): Promise<void>;
  removeExport(exportName: string, options: { force: boolean }): Promise<void>;
  /** Export names that have a daemon of their own, served or not: the orphan sweep releases those no resource owns. */
  assigned(): ReadonlySet<string>;
  /**
   * `starts`: daemons this instance has spawned. A new daemon serves nothing, whoever's call
   * started it; a change of this count means every export must be added again.
   */
  status(): { running: boolean; starts?: number };
}

export type CreateImageRequest = Omit<Extract<Action, { kind: 'createImage' }>, 'kind'>;

export interface ImageTools {
  /**
   * Reads the image's header and its backing chain in our own code (no QEMU tool sees an
   * untrusted image) and judges them by the request: present, refused, missing or unreadable.
   */
  inspect(path: string, request: ImageJudgeRequest): Promise<ImageObservation>;
  probeLock(path: string): Promise<LockObservation>;
  /**
   * Creates without ever overwriting. `beforePublish` receives the new file's inode before
   * the file appears at its path, so that the ledger can record it first.
   */
  create(request: CreateImageRequest, beforePublish: (inode: number) => Promise<void>): Promise<void>;
  makeParentDirectories(path: string): Promise<void>;
  /** Deletes only the very file that was created (same inode, when one was recorded). */
  remove(path: string, inode: number | undefined): Promise<'deleted' | 'replaced' | 'missing'>;
}

/** Background checksums of what exports serve (src/node/checksum-jobs.ts). */
export interface ChecksumControl {
  start(key: string, request: ChecksumRequest, uri: string): void;
  get(key: string): ChecksumJob | undefined;
  forget(key: string): void;
  onChange(listener: (key: string) => void): void;
}

export interface NodeServices {
  nbdServer: NbdServerControl;
  qemu: QemuServerControl;
  images: ImageTools;
  ledger: OwnershipLedger;
  checksums: ChecksumControl;
  resolvePath(path: string): Promise<PathObservation>;
  probe(target: ProbeTarget): Promise<ProbeResult>;
}
