/**
 * Per-export figures for /metrics: every export the ownership ledger says this node serves,
 * named by its resource, with what its server can tell. The ledger forgets a deleted
 * resource's export, so its series go with it.
 */
import type { LedgerEntry as OwnershipRecord } from '../../plan/observed-state.js';
import type { ExportFigures } from './controller-metrics.js';

export interface ExportFigureSources {
  ledgerRecords(): OwnershipRecord[];
  /** nbd-server: per export name, the pids of its per-client processes. */
  nbdServerConnections(): Promise<ReadonlyMap<string, readonly number[]>>;
  /** nbd-server: per export name, clients still on an older configuration of it. */
  nbdServerStaleConnections(): Promise<ReadonlyMap<string, number>>;
  /** qemu-storage-daemon: per export name, the highest guest offset written through it. */
  qemuHighestWrittenOffsets(): Promise<ReadonlyMap<string, number>>;
}

export async function collectExportFigures(sources: ExportFigureSources): Promise<ExportFigures[]> {
  const records = sources.ledgerRecords().filter((r) => r.exportName !== undefined && r.server !== undefined);
  // Each server is asked only when it serves something of ours.
  const servesNbd = records.some((r) => r.server === 'nbd-server');
  const [connections, stale, offsets] = await Promise.all([
    servesNbd ? sources.nbdServerConnections() : new Map<string, readonly number[]>(),
    servesNbd ? sources.nbdServerStaleConnections() : new Map<string, number>(),
    records.some((r) => r.server === 'qemu-storage-daemon')
      ? sources.qemuHighestWrittenOffsets()
      : new Map<string, number>(),
  ]);
  const figures: ExportFigures[] = [];
  for (const record of records) {
    const exportName = record.exportName ?? '';
    const { namespace, name } = splitKey(record.key);
    const base = { namespace, name, export: exportName };
    if (record.server === 'nbd-server')
      figures.push({
        ...base,
        server: 'nbd-server',
        connectedClients: connections.get(exportName)?.length ?? 0,
        staleClients: stale.get(exportName) ?? 0,
      });
    else if (record.server === 'qemu-storage-daemon') {
      const offset = offsets.get(exportName);
      // Not served (yet, or any more): no series rather than a made-up 0.
      figures.push({
        ...base,
        server: 'qemu-storage-daemon',
        ...(offset === undefined ? {} : { highestWrittenOffsetBytes: offset }),
      });
    }
  }
  return figures;
}

/** `namespace/name`; a key without a namespace part keeps it all as the name. */
function splitKey(key: string): { namespace: string; name: string } {
  const slash = key.indexOf('/');
  return slash < 0
    ? { namespace: '', name: key }
    : { namespace: key.slice(0, slash), name: key.slice(slash + 1) };
}
