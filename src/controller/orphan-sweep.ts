/**
 * Level-triggered cleanup of what no resource accounts for any more: a ledger entry
 * whose resource is gone without its finalizer having run (removed by hand, or the
 * node's copy of a directory source lost), and exports our servers serve that no
 * ledger entry owns. Such exports stop being served; files are always kept, since no
 * one asked for their deletion.
 */
import type { Logger } from 'pino';
import type { ExportStore } from './export-store.js';
import type { NodeServices } from './node-services.js';

export async function sweepOrphans(
  store: ExportStore,
  services: NodeServices,
  logger: Logger,
): Promise<void> {
  if (!store.synced) return;
  const { ledger, nbdServer, qemu } = services;
  const liveUids = new Set(store.list().map((r) => r.metadata.uid));
  for (const record of ledger.all()) {
    if (liveUids.has(record.uid)) continue;
    logger.warn(
      { key: record.key, export: record.exportName },
      'resource gone without cleanup; retiring its export, keeping files',
    );
    if (record.exportName !== undefined && record.server === 'nbd-server')
      await nbdServer.removeExport(record.exportName);
    if (record.exportName !== undefined && record.server === 'qemu-storage-daemon')
      await qemu.removeExport(record.exportName, { force: true }).catch((error: unknown) => {
        logger.warn({ key: record.key, error: String(error) }, 'could not remove orphaned qemu export');
      });
    await ledger.forget(record.uid);
  }

  // What the servers serve is listed before the ledger is read: a reconcile records its claim
  // before it adds an export, so an export listed here is either claimed below or truly orphaned.
  const nbdConfigured = await nbdServer.configured();
  const nbdLoaded = [...nbdServer.loaded().keys()];
  const qemuServed = await qemu.exports();
  const qemuAssigned = [...qemu.assigned()];
  const owned = new Set(
    ledger.all().flatMap((r) => (r.exportName === undefined ? [] : [`${r.server}/${r.exportName}`])),
  );
  let nbdChanged = false;
  for (const exportName of nbdConfigured.keys()) {
    if (owned.has(`nbd-server/${exportName}`)) continue;
    logger.warn({ export: exportName }, 'nbd-server export owned by no resource; removing it');
    nbdChanged = (await nbdServer.removeExport(exportName)) || nbdChanged;
  }
  if (nbdChanged || nbdLoaded.some((name) => !owned.has(`nbd-server/${name}`))) nbdServer.requestApply();
  for (const exportName of new Set([...qemuServed.keys(), ...qemuAssigned])) {
    if (owned.has(`qemu-storage-daemon/${exportName}`)) continue;
    logger.warn({ export: exportName }, 'qemu-storage-daemon export owned by no resource; removing it');
    await qemu.removeExport(exportName, { force: true });
  }
}
