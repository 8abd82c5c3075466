/**
 * Builds the real node services from src/node and starts the servers (adopting running
 * ones). One place that knows which program does what on a node.
 */
import { mkdir, stat, unlink } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { pino, type Logger } from 'pino';
import { probeExport } from '../node/nbd-probe.js';
import { NbdServerSupervisor } from '../node/nbd-server/nbd-server-supervisor.js';
import { OwnershipLedger } from '../node/ownership-ledger.js';
import { ChecksumJobs } from '../node/checksum-jobs.js';
import { inspectImageChain } from '../node/image-header/inspect-image-chain.js';
import {
  createImage,
  probeImageLock,
  removeStaleTemporaryImages,
  stopOrphanedCreates,
} from '../node/qemu-img.js';
import { createBackingGate, judgeImageChain, type ImageJudgeRequest } from '../plan/image-header.js';
import type { ImageObservation } from '../plan/observed-state.js';
import { HostFirewall } from '../node/firewall/host-firewall.js';
import {
  DEFAULT_DEDICATED_PORTS,
  QemuExportFleet,
  type PortRange,
} from '../node/qemu-storage-daemon/qemu-export-fleet.js';
import { resolvePath } from '../node/resolve-path.js';
import { tlsClientIdentity } from '../node/tls-client-identity.js';
import { corruptStateFilesMovedAside } from '../node/corrupt-state-file.js';
import { StateDirectoryHealth } from '../node/state-directory-health.js';
import type { ExportFigures, ServerFigures } from './metrics/controller-metrics.js';
import { collectExportFigures } from './metrics/export-figures.js';
import { readProcessIo, type ProcessIo } from './metrics/process-io.js';
import type { NodeServices } from './node-services.js';

/**
 * `run --controller-group` by default: in Debian's range reserved for its own global ids
 * (60000-64999), which adduser never hands out. The firewall lets connections of processes
 * with this supplementary group through unlisted, so no one else on the node may have it.
 */
export const DEFAULT_CONTROLLER_GROUP = 64209;

/** How often the state directory's condition is checked for /metrics. */
const STATE_DIRECTORY_CHECK_MS = 5_000;

export interface NodeServicesOptions {
  stateDir: string;
  listenAddress: string;
  nbdPort: number;
  qemuPort: number;
  /** Ports for qemu-storage-daemons of one export (exports with client rules). */
  dedicatedPorts: PortRange;
  /**
   * Enforce client rules on those ports with iptables; `controllerGroup` is added to this
   * process's supplementary groups, and the firewall lets connections of processes in it
   * through (the probe needs no entry in any list). Absent: no firewall.
   */
  clientFirewall?: { controllerGroup: number };
  /** `run --tls-dir`: both servers require TLS and a client certificate from its CA. */
  tlsDir?: string;
  logger: Logger;
}

export interface StartedNodeServices extends NodeServices {
  /** The firewall enforces client rules on exports' own ports; a string says why it cannot. */
  clientFirewall: true | string;
  /** Stops supervising; the servers and their clients keep running. */
  detach(): Promise<void>;
  /** For /metrics: what the servers and the ledger report now. */
  serverFigures(): ServerFigures;
  /** For /metrics: every export served, with its server's figures. */
  exportFigures(): Promise<ExportFigures[]>;
  /** For /metrics: qemu-storage-daemon's I/O counters, while it runs. */
  qemuStorageDaemonIo(): Promise<ProcessIo | undefined>;
}

export async function createNodeServices(options: NodeServicesOptions): Promise<StartedNodeServices> {
  const { stateDir, logger } = options;
  // Checked first (a missing directory is created again), then every few seconds for /metrics.
  // Whatever it finds, the controller starts: what cannot be written fails in the actions that
  // write it, which the resources' status shows, and heals when the condition clears.
  const stateDirectory = new StateDirectoryHealth(stateDir, logger);
  await stateDirectory.check();
  stateDirectory.startChecking(STATE_DIRECTORY_CHECK_MS);
  const ledger = new OwnershipLedger(join(stateDir, 'ledger'), { logger });
  await ledger.load();
  await removeTemporaryImagesOfLedger(ledger, logger);

  const tls = options.tlsDir === undefined ? {} : { tlsDir: options.tlsDir };
  // The controller's own clients (probe, checksum reader) need a certificate too.
  const clientIdentity =
    options.tlsDir === undefined ? undefined : await tlsClientIdentity(options.tlsDir, stateDir);
  if (options.tlsDir !== undefined)
    logger.info(
      { tlsDir: options.tlsDir, clientCertificates: clientIdentity?.certificatesDir },
      'TLS with client certificates on both servers; a changed certificate reaches nbd-server at its next hand-over restart and qemu-storage-daemon at its next start',
    );
  const nbdServer = new NbdServerSupervisor({
    stateDir,
    listenAddress: options.listenAddress,
    port: options.nbdPort,
    logger,
    ...tls,
  });
  const clientFirewall = await startClientFirewall(options, logger);
  const firewall = clientFirewall instanceof HostFirewall ? clientFirewall : undefined;
  const qemu = new QemuExportFleet({
    stateDir,
    listenAddress: options.listenAddress,
    port: options.qemuPort,
    dedicatedPorts: options.dedicatedPorts,
    firewall,
    logger,
    ...tls,
  });
  await nbdServer.start(); // never throws: a failure is retried by its watchdog
  // A daemon that cannot start now is started again by the first export that needs it.
  await qemu
    .start()
    .catch((error: unknown) =>
      logger.error({ err: error }, 'could not start or adopt qemu-storage-daemon; will retry on demand'),
    );

  const checksums = new ChecksumJobs({
    logger,
    ...(clientIdentity === undefined ? {} : { tlsCertificatesDir: clientIdentity.certificatesDir }),
  });
  return {
    clientFirewall: typeof clientFirewall === 'string' ? clientFirewall : true,
    ledger,
    nbdServer,
    qemu,
    checksums,
    images: {
      inspect: (path, request) => inspectAndJudge(path, request),
      // An export qemu-storage-daemon still serves, waiting to be claimed again after its
      // exports.json was lost, holds its image's lock: that is us, not a foreign writer.
      probeLock: (path) =>
        qemu.unclaimedPaths().has(path) ? Promise.resolve({ locked: false }) : probeImageLock(path),
      async create(request, beforePublish) {
        // createImage does this too; here it is logged: a controller killed mid-create left it.
        const stopped = await stopOrphanedCreates(dirname(request.path), { image: request.path });
        if (stopped.length > 0)
          logger.warn(
            { path: request.path, pids: stopped },
            'killed an orphaned qemu-img creating this image',
          );
        await createImage(request, { beforePublish });
      },
      async makeParentDirectories(path) {
        await mkdir(dirname(path), { recursive: true, mode: 0o750 });
      },
      async remove(path, inode) {
        try {
          if (inode !== undefined && (await stat(path)).ino !== inode) return 'replaced';
          await unlink(path);
          return 'deleted';
        } catch (error) {
          if ((error as NodeJS.ErrnoException).code === 'ENOENT') return 'missing';
          throw error;
        }
      },
    },
    resolvePath,
    probe:
      clientIdentity === undefined
        ? probeExport
        : async (target) => {
            // Read at every probe: a renewed certificate is used at once; a missing one fails the probe.
            const credentials = await clientIdentity.load().catch((error: unknown) => error as Error);
            return credentials instanceof Error
              ? {
                  ok: false,
                  message: `cannot read the probe's client certificate: ${credentials.message}`,
                }
              : probeExport({ ...target, tls: credentials });
          },
    async detach() {
      stateDirectory.stop();
      checksums.stop();
      await Promise.all([nbdServer.detach(), qemu.detach()]);
    },
    serverFigures() {
      const nbd = nbdServer.status();
      return {
        nbdServer: {
          running: nbd.running,
          restarts: nbd.restarts,
          failing: nbd.lastError !== null,
          loadedExports: nbdServer.loaded().size,
          lastRestartAt: nbd.lastRestartAt,
        },
        qemuStorageDaemon: { running: qemu.status().running, dedicated: qemu.dedicatedDaemons() },
        clientFirewall: firewall !== undefined,
        ownedExports: ledger.all().length,
        stateDirectory: {
          condition: stateDirectory.condition(),
          corruptFilesMovedAside: corruptStateFilesMovedAside(),
        },
      };
    },
    qemuStorageDaemonIo() {
      const { running, pid } = qemu.status();
      return running && pid !== undefined ? readProcessIo(pid) : Promise.resolve(undefined);
    },
    exportFigures() {
      return collectExportFigures({
        ledgerRecords: () => ledger.all(),
        nbdServerConnections: () => nbdServer.connections(),
        nbdServerStaleConnections: () => nbdServer.staleConnections(),
        qemuHighestWrittenOffsets: () => qemu.highestWrittenOffsets(),
      });
    },
  };
}

/**
 * The firewall that enforces client rules on exports' own ports, or why there is none. The
 * controller's group is added to this process's supplementary groups first: every connection
 * it and its children make (probe, checksum reader) then carries it, and only those pass
 * unlisted. Files are still created with the primary group.
 */
async function startClientFirewall(
  options: NodeServicesOptions,
  logger: Logger,
): Promise<HostFirewall | string> {
  if (options.clientFirewall === undefined) return 'run --client-firewall none';
  const unusable = await HostFirewall.check();
  if (unusable !== undefined) {
    logger.warn(
      { reason: unusable },
      'no firewall: exports on qemu-storage-daemon that name allowedClients or maxConnections are refused',
    );
    return unusable;
  }
  const group = options.clientFirewall.controllerGroup;
  try {
    const { getgroups, setgroups } = process;
    if (!getgroups || !setgroups) throw new Error('this platform has no supplementary groups');
    const groups = getgroups();
    if (!groups.includes(group)) setgroups([...groups, group]);
  } catch (error) {
    const reason = `cannot add group ${group} to the controller's groups: ${error instanceof Error ? error.message : String(error)}`;
    logger.warn({ reason }, 'no firewall');
    return reason;
  }
  logger.info(
    { controllerGroup: group, dedicatedPorts: options.dedicatedPorts },
    "client rules on exports' own ports are enforced by iptables",
  );
  return new HostFirewall({ stateDir: options.stateDir, exemptGid: group, logger });
}

/**
 * Our own reading of the image and its chain, never opening what the gate refuses, then the
 * judge's verdict. A missing top image is `missing` (the planner may create it).
 */
async function inspectAndJudge(path: string, request: ImageJudgeRequest): Promise<ImageObservation> {
  const inspection = await inspectImageChain(path, {
    declaredFormat: request.declaredFormat,
    gate: createBackingGate(request),
  });
  if (inspection.images.length === 0 && inspection.end.kind === 'missing') return { kind: 'missing' };
  const verdict = judgeImageChain(inspection, request);
  return verdict.ok
    ? { kind: 'present', info: verdict.image }
    : { kind: 'refused', reason: verdict.reason, message: verdict.message };
}

/**
 * A crash mid-creation leaves a temporary image beside the one being created. The ledger
 * names every image the controller set out to create, so their directories are where to look.
 */
async function removeTemporaryImagesOfLedger(ledger: OwnershipLedger, logger: Logger): Promise<void> {
  const directories = new Set(
    ledger.all().flatMap((r) => (r.createdImage ? [dirname(r.createdImage.path)] : [])),
  );
  for (const directory of directories) {
    const stopped = await stopOrphanedCreates(directory).catch((error: unknown) => {
      logger.warn({ directory, err: error }, 'could not stop orphaned qemu-img creates');
      return [];
    });
    if (stopped.length > 0)
      logger.warn({ directory, pids: stopped }, 'killed orphaned qemu-img creates of a killed controller');
    const removed = await removeStaleTemporaryImages(directory).catch((error: unknown) => {
      logger.warn({ directory, err: error }, 'could not clean up temporary images');
      return [];
    });
    for (const path of removed)
      logger.info({ path }, 'removed a temporary image left by an interrupted creation');
  }
}

/**
 * `stop-servers`: ends every server of a state directory and every client they serve, then
 * lifts the firewall rules of exports' own ports (nothing listens on them any more).
 */
export async function stopServers(stateDir: string): Promise<void> {
  const logger = pino({ level: 'info' });
  const nbdServer = new NbdServerSupervisor({ stateDir, logger });
  await nbdServer.stop({ disconnectClients: true });
  // Only lifts rules: the group that passes unlisted is never rendered.
  const firewall =
    (await HostFirewall.check()) === undefined
      ? new HostFirewall({ stateDir, exemptGid: DEFAULT_CONTROLLER_GROUP, logger })
      : undefined;
  const qemu = new QemuExportFleet({ stateDir, logger, dedicatedPorts: DEFAULT_DEDICATED_PORTS, firewall });
  await qemu.stop();
}
