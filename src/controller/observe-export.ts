/**
 * Gathers what the planner needs about one resource from the node. Reads only: nothing
 * here changes the node. Skips what the plan cannot use (no image inspection for a spec
 * that does not validate, no lock probe for an image our own qemu-storage-daemon holds).
 */
import { fingerprintOf } from '../api/export-config.js';
import { keyOf, type ImageFormat, type NbdExport, type ServerKind } from '../api/types.js';
import type { NodePolicy } from '../plan/node-policy.js';
import type { DesiredExport, InvalidExport } from '../plan/desired-export.js';
import type {
  ConflictObservation,
  ImageObservation,
  ObservedExport,
  ProbeObservation,
  ServingObservation,
} from '../plan/observed-state.js';
import type { NodeServices } from './node-services.js';

export interface ObserveContext {
  services: NodeServices;
  policy: NodePolicy;
  conflict: ConflictObservation | undefined;
  probe: ProbeObservation | undefined;
}

export async function observeExport(
  resource: NbdExport,
  desired: DesiredExport | InvalidExport,
  context: ObserveContext,
): Promise<ObservedExport> {
  const { services } = context;
  const uid = resource.metadata.uid ?? '';
  const ledger = services.ledger.get(uid);
  const deleting = resource.metadata.deletionTimestamp !== undefined;
  // Who should serve it decides which /proc scans are worth making.
  const server = desired.ok ? desired.server : undefined;
  const servers = await serverSnapshot(services, {
    connections: deleting,
    stale: !deleting && server === 'nbd-server',
  });

  const checksum = services.checksums.get(keyOf(resource.metadata));
  const observed: ObservedExport = {
    ...(ledger ? { ledger } : {}),
    ...(checksum ? { checksum } : {}),
    ...(context.conflict ? { conflict: context.conflict } : {}),
    ...(context.probe ? { probe: context.probe } : {}),
  };
  if (ledger?.exportName !== undefined && ledger.server !== undefined)
    observed.owned = servers.serving(ledger.server, ledger.exportName);

  if (deleting || !desired.ok || server === undefined) {
    const created = ledger?.createdImage;
    if (created) observed.image = await inspect(services, context.policy, created.path, undefined);
    return observed;
  }
  observed.desired = servers.serving(server, desired.exportName);

  const path = await services.resolvePath(desired.specPath);
  observed.path = path;
  if (path.kind === 'resolved' && path.exists) {
    observed.image = await inspect(services, context.policy, path.realPath, desired.format);
    const heldByUs = servers.qemuPaths.has(path.realPath);
    if (!heldByUs && observed.image.kind === 'present')
      observed.lock = await services.images.probeLock(path.realPath);
  } else if (path.kind === 'resolved') {
    observed.image = { kind: 'missing' };
    const backingFile = desired.createBackingFile;
    if (backingFile !== undefined) {
      const backingPath = await services.resolvePath(backingFile);
      observed.backingPath = backingPath;
      observed.backingImage =
        backingPath.kind === 'resolved' && backingPath.exists
          ? await inspect(services, context.policy, backingPath.realPath, desired.createBackingFormat)
          : { kind: 'missing' };
    }
  }
  return observed;
}

/** Inspected by our own header reading and judged by the node's rules (src/plan/image-header.ts). */
async function inspect(
  services: NodeServices,
  policy: NodePolicy,
  path: string,
  declaredFormat: ImageFormat | undefined,
): Promise<ImageObservation> {
  try {
    return await services.images.inspect(path, {
      allowedRoots: policy.allowedRoots,
      maxBackingDepth: policy.maxBackingDepth,
      allowRawOverForeignHeader: policy.allowRawOverForeignHeader,
      declaredFormat,
    });
  } catch (error) {
    return { kind: 'unreadable', message: error instanceof Error ? error.message : String(error) };
  }
}

interface ServerSnapshot {
  serving(server: ServerKind, exportName: string): ServingObservation;
  /** Real paths qemu-storage-daemon has open: it holds their locks itself. */
  qemuPaths: Set<string>;
}

async function serverSnapshot(
  services: NodeServices,
  scan: { connections: boolean; stale: boolean },
): Promise<ServerSnapshot> {
  const [configured, qemuExports, connections, stale] = await Promise.all([
    services.nbdServer.configured(),
    services.qemu.exports(),
    scan.connections ? services.nbdServer.connections() : Promise.resolve(new Map<string, number[]>()),
    scan.stale ? services.nbdServer.staleConnections() : Promise.resolve(new Map<string, number>()),
  ]);
  const loaded = services.nbdServer.loaded();
  const nbdStatus = services.nbdServer.status();
  const nbdRunning = nbdStatus.running;
  const qemuRunning = services.qemu.status().running;
  const qemuPaths = new Set([...qemuExports.values()].map((e) => e.config.path));
  return {
    qemuPaths,
    serving(server, exportName) {
      if (server === 'nbd-server') {
        const observation: ServingObservation = { server, exportName, running: nbdRunning };
        const conf = configured.get(exportName);
        const served = loaded.get(exportName);
        const pids = connections.get(exportName);
        if (conf !== undefined) observation.configured = conf;
        if (served !== undefined && nbdRunning) observation.served = served;
        if (pids) observation.connections = pids.length;
        const staleCount = stale.get(exportName);
        if (staleCount) observation.staleConnections = staleCount;
        if (!nbdRunning && nbdStatus.lastError !== null) observation.failure = nbdStatus.lastError;
        return observation;
      }
      const entry = qemuExports.get(exportName);
      return {
        server,
        exportName,
        running: qemuRunning,
        ...(entry
          ? {
              served: entry.fingerprint || fingerprintOf(entry.config),
              servedConfig: entry.config,
              ...(entry.port === undefined ? {} : { port: entry.port }),
            }
          : {}),
      };
    },
  };
}
