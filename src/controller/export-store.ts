import type { ExportEvent, NbdExport, NbdExportStatus, ResourceKey } from '../api/types.js';

export type { ExportEvent };

/**
 * Where desired state comes from and where status goes: the Kubernetes API (src/kube/)
 * or a directory of YAML files (src/source/). The engine sees only this.
 *
 * Both keep a cache of the NbdExports of this node. A deleted resource stays visible,
 * with `metadata.deletionTimestamp` set, for as long as it carries our finalizer, so
 * that node-side cleanup runs before it disappears.
 */
export interface ExportStore {
  /** Starts watching; resolves once the first complete listing is in the cache. */
  start(): Promise<void>;
  /** Stops watching. Never touches what the node serves. */
  stop(): Promise<void>;
  /** True once the first listing is in the cache (drives /readyz). */
  readonly synced: boolean;
  /**
   * Seconds since desired state was last read, when the source can tell that its reading
   * has stopped (the directory source; a watch that is merely quiet is not stale).
   */
  secondsSinceRead?(): number;
  list(): NbdExport[];
  get(key: ResourceKey): NbdExport | undefined;
  /** Told a key whenever that resource may have changed, including periodic resyncs. */
  onChange(listener: (key: ResourceKey) => void): void;
  /** Writes the status subresource; a no-op when it equals what is stored. */
  updateStatus(key: ResourceKey, status: NbdExportStatus): Promise<void>;
  addFinalizer(key: ResourceKey): Promise<void>;
  removeFinalizer(key: ResourceKey): Promise<void>;
  recordEvent(key: ResourceKey, event: ExportEvent): Promise<void>;
}
