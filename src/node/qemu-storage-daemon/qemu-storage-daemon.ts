/**
 * Serves exports with qemu-storage-daemon (QSD): one long-lived daemon per node, driven over
 * QMP. Each export is a file node (`locking: on`, so QEMU's image locks keep foreign writers
 * out), a format node (qcow2 or raw) and an NBD block export on the daemon's NBD server.
 *
 * The daemon outlives the controller: it runs in its own session, and a new instance of
 * this class adopts it (pid file + QMP socket) instead of starting another. Never send it
 * SIGHUP: QSD exits on it. Changing an export is remove + add: its clients are cut (or the
 * removal refused with ExportBusyError) and must reconnect.
 */
import { spawn } from 'node:child_process';
import { access, mkdir, open, readFile, stat, unlink } from 'node:fs/promises';
import { basename, join } from 'node:path';
import type { Logger } from 'pino';
import { differsOnlyInAccess, fingerprintOf, type ExportConfig } from '../../api/export-config.js';
import { isLockError } from '../qemu-error.js';
import { holdsQemuWriteLock } from '../qemu-img.js';
import { formatNodeArguments, protocolNodeArguments } from './blockdev-arguments.js';
import { DaemonRetiredError, ExportBusyError, ImageLockedError } from './errors.js';
import {
  exportIdsOf,
  nodesToDelete,
  ID_PREFIX,
  CorruptExportStateError,
  readExportState,
  writeExportState,
  type ExportIds,
  type ExportRecord,
} from './export-state.js';
import { QmpClient, QmpError } from './qmp-client.js';
import { removeTemporaryFiles } from '../../shared/atomic-file.js';
import { moveCorruptStateFileAside } from '../corrupt-state-file.js';
import { SerialLock } from '../../shared/serial-lock.js';
import { readPidFile } from '../process/pid-file.js';
import { commandLineOf, findProcesses, isRunning } from '../process/proc-scan.js';
import { waitFor, waitUntil, WaitTimeoutError } from '../process/wait-until.js';

export interface QemuStorageDaemonOptions {
  /** The controller's state directory; the daemon's files go to `<stateDir>/qemu-storage-daemon/`. */
  stateDir: string;
  /** Where this daemon's files go instead (a daemon of one export: src/node/qemu-storage-daemon/qemu-export-fleet.ts). */
  dir?: string;
  /**
   * Runs before a daemon is spawned (never before one is adopted); when it fails, nothing is
   * spawned. A daemon of one export puts its port's firewall rules in force here, so that no
   * daemon ever listens without them, whoever lifted them meanwhile.
   */
  beforeSpawn?: () => Promise<void>;
  /** Address the NBD server listens on. Default `0.0.0.0`. Applies when this instance starts the daemon. */
  listenAddress?: string;
  /** NBD port. Default 10810. Applies when this instance starts the daemon. */
  port?: number;
  /** pino logger; export-related lines carry an `export` field. */
  logger: Logger;
  /** The qemu-storage-daemon program. Default `qemu-storage-daemon` from PATH. */
  binary?: string;
  /** How long a QMP command, the daemon's start-up, or an export's removal may take. Default 30 s. */
  timeoutMs?: number;
  /**
   * GLIBC_TUNABLES for a daemon this instance starts. Default DEFAULT_GLIBC_TUNABLES: a fixed
   * malloc mmap threshold, without which every NBD write request's buffer is mmapped and
   * unmapped until the first large read (writes ran at about half speed; see
   * docs/qemu-storage-daemon.md). `''` starts the daemon with glibc's defaults. Ignored when
   * GLIBC_TUNABLES is already set in the controller's environment (that one is inherited).
   */
  glibcTunables?: string;
  /**
   * Directory with ca-cert.pem, server-cert.pem, server-key.pem: the NBD server then requires
   * TLS and a client certificate signed by that CA (tls-creds-x509 with verify-peer=on).
   * QEMU reads the files when the daemon starts; a changed certificate reaches it at its next
   * start (a restart cuts its clients, so none is done for a certificate). Default: plain NBD.
   */
  tlsDir?: string;
}

/** The id of the daemon's TLS credentials object; its presence tells an adopted daemon's TLS setting. */
const TLS_CREDS_ID = 'nbd-tls-creds';

/** NBD request buffers up to 4 MiB come from the heap; up to 64 MiB of freed heap is kept. */
export const DEFAULT_GLIBC_TUNABLES =
  'glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=67108864';

export interface QemuStorageDaemonStatus {
  /** The daemon runs and this instance is connected to its QMP socket. */
  running: boolean;
  pid?: number;
  /** This instance found the daemon running rather than starting it. */
  adopted: boolean;
  /** Daemons this instance has spawned: each new one serves nothing until exports are added again. */
  starts: number;
}

interface BlockExportInfo {
  id: string;
  'node-name': string;
  'shutting-down': boolean;
  type: string;
}

const QMP_CHARDEV_ID = 'nbdx-qmp';
/**
 * How long live exports of ours that no record names (exports.json was corrupt or lost) wait
 * for a resource to claim them again before they are removed: longer than the planner's
 * 15 s re-check, so every resource that still wants its export reconciles in time.
 */
const UNCLAIMED_ADOPTION_WINDOW_MS = 120_000;
/** A scrape gives up on the daemon's figures sooner than Prometheus' default 10 s scrape timeout. */
const METRICS_QUERY_TIMEOUT_MS = 5_000;
/** sun_path is 108 bytes including the terminating NUL. */
const MAX_SOCKET_PATH = 107;

export class QemuStorageDaemon {
  readonly #dir: string;
  readonly #socketPath: string;
  readonly #pidFile: string;
  readonly #logFile: string;
  readonly #stateFile: string;
  readonly #listenAddress: string;
  readonly #port: number;
  readonly #logger: Logger;
  readonly #binary: string;
  readonly #timeoutMs: number;
  readonly #glibcTunables: string;
  readonly #tlsDir: string | undefined;
  readonly #beforeSpawn: (() => Promise<void>) | undefined;

  #qmp: QmpClient | undefined;
  #pid: number | undefined;
  #adopted = false;
  #starts = 0;
  #records = new Map<string, ExportRecord>();
  /**
   * Live exports of ours that no record names, kept (not removed) after exports.json was lost
   * or corrupt, until `#unclaimedUntil`: addExport of a config whose ids match adopts one
   * without cutting its clients.
   */
  #unclaimed = new Set<string>();
  #unclaimedUntil = 0;
  /** The image files the unclaimed exports hold open (and locked): not a foreign writer's. */
  #unclaimedPaths = new Set<string>();
  /** exports.json was missing or corrupt when last read: live exports are adopted, not removed. */
  #recordsLost = false;
  /** Stopped for good (retire()): nothing may start it again. */
  #retired = false;
  /** Serialises everything that talks to the daemon or the state file. */
  readonly #lock = new SerialLock();

  constructor(options: QemuStorageDaemonOptions) {
    if (typeof options.stateDir !== 'string' || options.stateDir === '')
      throw new TypeError(`stateDir must be a directory path, got ${JSON.stringify(options.stateDir)}`);
    const port = options.port ?? 10810;
    if (!Number.isInteger(port) || port < 1 || port > 65535)
      throw new TypeError(`port must be an integer between 1 and 65535, got ${port}`);
    this.#dir = options.dir ?? join(options.stateDir, 'qemu-storage-daemon');
    this.#socketPath = join(this.#dir, 'qmp.sock');
    if (Buffer.byteLength(this.#socketPath) > MAX_SOCKET_PATH)
      throw new TypeError(`stateDir is too long for a UNIX socket path: ${this.#socketPath}`);
    this.#pidFile = join(this.#dir, 'qemu-storage-daemon.pid');
    this.#logFile = join(this.#dir, 'qemu-storage-daemon.log');
    this.#stateFile = join(this.#dir, 'exports.json');
    this.#listenAddress = options.listenAddress ?? '0.0.0.0';
    this.#port = port;
    this.#logger = options.logger.child({
      server: 'qemu-storage-daemon',
      ...(options.dir === undefined ? {} : { daemonPort: port }),
    });
    this.#binary = options.binary ?? 'qemu-storage-daemon';
    this.#timeoutMs = options.timeoutMs ?? 30_000;
    this.#glibcTunables = options.glibcTunables ?? DEFAULT_GLIBC_TUNABLES;
    this.#tlsDir = options.tlsDir;
    this.#beforeSpawn = options.beforeSpawn;
  }

  /** Adopts the running daemon of this state directory, or starts one; then reconciles exports.json with it. */
  start(): Promise<void> {
    return this.#serial(() => this.#start());
  }

  status(): QemuStorageDaemonStatus {
    const running = this.#qmp !== undefined && !this.#qmp.closed;
    return {
      running,
      ...(this.#pid === undefined ? {} : { pid: this.#pid }),
      adopted: this.#adopted,
      starts: this.#starts,
    };
  }

  /**
   * Image files held by exports this daemon serves that exports.json lost (until a resource
   * claims them or the adoption window ends). Their QEMU lock is our own: the lock probe must
   * not take it for a foreign writer, or the resource would never claim its export.
   */
  unclaimedPaths(): ReadonlySet<string> {
    return this.#unclaimedPaths;
  }

  /** What the daemon serves now, by export name. */
  exports(): Promise<Map<string, { fingerprint: string; config: ExportConfig }>> {
    return this.#serial(async () => {
      const qmp = await this.#connected();
      await this.#removeUnclaimedAfterWindow(qmp);
      const live = await this.#liveExports(qmp);
      const served = new Map<string, { fingerprint: string; config: ExportConfig }>();
      for (const [name, record] of this.#records)
        if (record.state === 'served' && live.has(record.id))
          served.set(name, { fingerprint: record.fingerprint, config: record.config });
      return served;
    });
  }

  /**
   * Serves the config. Idempotent for the same config; an export of that name with another
   * config must be removed first. Throws ImageLockedError (nothing added) when a foreign
   * process holds the image.
   */
  async addExport(config: ExportConfig): Promise<void> {
    checkConfig(config);
    return this.#serial(async () => {
      const qmp = await this.#connected();
      const name = config.exportName;
      const fingerprint = fingerprintOf(config);
      const log = this.#logger.child({ export: name });
      const existing = this.#records.get(name);
      if (existing) {
        const live = await this.#liveExports(qmp);
        if (live.has(existing.id) && existing.state === 'served') {
          if (existing.fingerprint === fingerprint) return;
          throw new Error(
            `export "${name}" is served with another configuration (${existing.fingerprint}); remove it first`,
          );
        }
        await this.#forget(qmp, name, existing, log);
      }

      // QEMU lets a raw image have several writers (it shares "write"), so only its lock
      // table tells of a foreign one. Our own nodes on the same file hold that lock too.
      const ownPath = [...this.#records.values()].some((r) => r.config.path === config.path);
      if (config.format === 'raw' && !ownPath && (await holdsQemuWriteLock(config.path)))
        throw new ImageLockedError(
          config.path,
          'another process holds QEMU\'s "write" permission lock (OFD lock on byte 101 in /proc/locks)',
        );

      const backing = config.backing ?? [];
      const ids = exportIdsOf(name, fingerprint, backing.length);
      if (this.#unclaimed.has(ids.id) && (await this.#liveExports(qmp)).has(ids.id)) {
        // Served since before exports.json was lost: the ids prove name and configuration.
        this.#unclaimed.delete(ids.id);
        this.#unclaimedPaths.delete(config.path);
        this.#records.set(name, { ...ids, fingerprint, config, state: 'served' });
        await this.#persist();
        log.info({ id: ids.id }, 'adopted a served export that exports.json had lost');
        return;
      }
      await this.#deleteNodes(qmp, ids, log); // leftovers of an interrupted attempt
      this.#records.set(name, { ...ids, fingerprint, config, state: 'adding' });
      await this.#persist();
      const added: string[] = [];
      const addNode = async (args: Record<string, unknown>) => {
        await this.#execute(qmp, 'blockdev-add', args);
        added.unshift(String(args['node-name']));
      };
      try {
        // The whole graph is ours: each backing image the controller checked is a node of its
        // own, deepest first, each naming the next (src/node/qemu-storage-daemon/blockdev-arguments.ts).
        const backingNodes = ids.nodeNames.backing ?? [];
        for (let i = backing.length - 1; i >= 0; i--) {
          const image = backing[i];
          const nodes = backingNodes[i];
          if (!image || !nodes) continue;
          await addNode(
            protocolNodeArguments({ path: image.path, blockDevice: false, readOnly: true }, nodes.file),
          );
          await addNode(
            formatNodeArguments(
              { format: image.format, readOnly: true },
              nodes.format,
              nodes.file,
              backingNodes[i + 1]?.format ?? null,
            ),
          );
        }
        await addNode(protocolNodeArguments(config, ids.nodeNames.file));
        // The format node takes the image's permissions, so this is where a foreign lock shows.
        await addNode(
          formatNodeArguments(
            config,
            ids.nodeNames.format,
            ids.nodeNames.file,
            backingNodes[0]?.format ?? null,
          ),
        );
        await this.#execute(qmp, 'block-export-add', {
          type: 'nbd',
          id: ids.id,
          'node-name': ids.nodeNames.format,
          name,
          writable: !config.readOnly,
        });
      } catch (error) {
        for (const node of added)
          await this.#execute(qmp, 'blockdev-del', { 'node-name': node }).catch((cleanupError: unknown) =>
            log.error({ node, error: String(cleanupError) }, 'could not roll back a block node'),
          );
        this.#records.delete(name);
        await this.#persist();
        if (error instanceof QmpError && isLockError(error.desc))
          throw new ImageLockedError(config.path, error.desc, { cause: error });
        throw error;
      }
      this.#records.set(name, { ...ids, fingerprint, config, state: 'served' });
      await this.#persist();
      log.info(
        { id: ids.id, path: config.path, format: config.format, readOnly: config.readOnly },
        'export added',
      );
    });
  }

  /**
   * Records new client rules for a served export without touching what QEMU serves: the rules
   * live outside the daemon (the node's firewall), and its clients keep their connections.
   * Throws when the export is not served or the config differs in more than its rules.
   */
  updateAccess(config: ExportConfig): Promise<void> {
    checkConfig(config);
    return this.#serial(async () => {
      const record = this.#records.get(config.exportName);
      if (record?.state !== 'served')
        throw new Error(`export "${config.exportName}" is not served; add it instead`);
      if (!differsOnlyInAccess(record.config, config))
        throw new Error(
          `export "${config.exportName}" changed in more than its client rules; remove it first`,
        );
      this.#records.set(config.exportName, { ...record, fingerprint: fingerprintOf(config), config });
      await this.#persist();
    });
  }

  /**
   * Stops serving the export and closes its image. Without force, refuses with
   * ExportBusyError while a client is connected; with force, disconnects the clients.
   * Removing a name that is not served does nothing.
   */
  removeExport(exportName: string, options: { force: boolean }): Promise<void> {
    return this.#serial(async () => {
      const record = this.#records.get(exportName);
      if (!record) return;
      const qmp = await this.#connected();
      const log = this.#logger.child({ export: exportName });
      try {
        await this.#deleteExport(qmp, record.id, options.force);
      } catch (error) {
        if (error instanceof QmpError && /still in use/i.test(error.desc))
          throw new ExportBusyError(exportName, { cause: error });
        throw error;
      }
      await this.#forget(qmp, exportName, record, log);
      log.info({ id: record.id, force: options.force }, 'export removed');
    });
  }

  /**
   * Per served export, the highest guest offset written through it since the daemon opened
   * it (`wr_highest_offset` of its format node), for /metrics. QEMU 7.2 keeps no byte or
   * operation counts for NBD exports (query-blockstats shows 0), so this is all it tells.
   * Read-only, and not queued behind other work: a scrape must not wait out an export removal
   * that waits for its clients (QMP answers overlapping commands by id). When the daemon is
   * not connected this answers an empty map rather than starting it.
   */
  async highestWrittenOffsets(): Promise<Map<string, number>> {
    const offsets = new Map<string, number>();
    const qmp = this.#qmp;
    if (!qmp || qmp.closed) return offsets;
    const stats = await qmp.execute<{ 'node-name'?: string; stats: { wr_highest_offset: number } }[]>(
      'query-blockstats',
      { 'query-nodes': true },
      { timeoutMs: Math.min(this.#timeoutMs, METRICS_QUERY_TIMEOUT_MS) },
    );
    const byNode = new Map(stats.map((s) => [s['node-name'], s.stats.wr_highest_offset]));
    for (const [name, record] of this.#records) {
      const offset = byNode.get(record.nodeNames.format);
      if (record.state === 'served' && offset !== undefined) offsets.set(name, offset);
    }
    return offsets;
  }

  /** Names of the daemon's block nodes (diagnostics; ours start with `nbdx-`). */
  blockNodes(): Promise<string[]> {
    return this.#serial(async () => this.#nodeNames(await this.#connected()));
  }

  /** Closes the QMP connection and leaves the daemon serving (normal controller shutdown). */
  detach(): Promise<void> {
    return this.#serial(() => {
      this.#qmp?.close();
      this.#qmp = undefined;
      return Promise.resolve();
    });
  }

  /** Quits the daemon, cutting every client: for tests and an explicit shutdown only. */
  stop(): Promise<void> {
    return this.#serial(() => this.#stopNow());
  }

  /**
   * Stops the daemon for good: like stop(), and any later call that would start it again
   * fails instead (DaemonRetiredError). A daemon of one export is retired with its export: a
   * call queued behind the stop (a look at what it serves) must not bring it back on a port
   * whose rules are gone. One serial section, so nothing queued after it sees it unretired.
   */
  retire(): Promise<void> {
    return this.#serial(async () => {
      this.#retired = true;
      await this.#stopNow();
    });
  }

  async #stopNow(): Promise<void> {
    const connected = this.#qmp && !this.#qmp.closed ? this.#qmp : undefined;
    this.#qmp = undefined;
    const pid = await this.#runningDaemon();
    if (pid !== undefined && connected === undefined && !(await socketExists(this.#socketPath))) {
      // Its QMP socket is gone (the state directory was deleted): a signal is all it hears.
      await this.#terminate(pid);
    } else if (pid !== undefined) {
      const qmp = connected ?? (await QmpClient.connect(this.#socketPath, { timeoutMs: this.#timeoutMs }));
      await qmp.execute('quit', undefined, { timeoutMs: this.#timeoutMs }).catch(() => undefined);
      qmp.close();
      await waitUntil(() => !isRunning(pid), {
        timeoutMs: this.#timeoutMs,
        what: `qemu-storage-daemon (pid ${pid}) to exit`,
      });
    }
    connected?.close();
    // Forgotten: a call that starts it again later starts a stopped daemon, not a lost one.
    this.#pid = undefined;
    this.#records.clear();
    await this.#persist().catch((error: unknown) => {
      if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error; // never started here
    });
    this.#logger.info(
      { pid },
      pid === undefined ? 'qemu-storage-daemon was not running' : 'qemu-storage-daemon stopped',
    );
  }

  /** Whether an adopted daemon has our TLS credentials object (it was started with --tls-dir). */
  async #servesTls(qmp: QmpClient): Promise<boolean> {
    try {
      const objects = await this.#execute<{ name: string }[]>(qmp, 'qom-list', { path: '/objects' });
      return objects.some((object) => object.name === TLS_CREDS_ID);
    } catch (error) {
      // QEMU creates /objects with the first object: a daemon started without any has none.
      if (error instanceof QmpError && error.class === 'DeviceNotFound') return false;
      throw error;
    }
  }

  #serial<T>(work: () => Promise<T>): Promise<T> {
    return this.#lock.run(work);
  }

  /** The QMP connection; adopts or restarts the daemon when it was lost (it died, or was never started). */
  async #connected(): Promise<QmpClient> {
    if (this.#qmp && !this.#qmp.closed) return this.#qmp;
    if (this.#pid !== undefined)
      this.#logger.warn({ pid: this.#pid }, 'lost the qemu-storage-daemon; starting it again');
    await this.#start();
    if (!this.#qmp) throw new Error('qemu-storage-daemon did not start');
    return this.#qmp;
  }

  async #start(): Promise<void> {
    if (this.#retired) throw new DaemonRetiredError(this.#dir);
    await mkdir(this.#dir, { recursive: true, mode: 0o700 });
    // A controller killed mid-write leaves the temporary of exports.json behind.
    await removeTemporaryFiles(this.#dir);
    this.#records = await this.#readRecords();
    let pid = await this.#runningDaemon();
    if (pid !== undefined && !(await socketExists(this.#socketPath))) {
      // Its QMP socket was deleted (with the state directory): nobody can ever talk to it
      // again, and it holds our port. QEMU offers no way to add a monitor from outside, so it
      // is stopped (SIGTERM: it flushes its images) and a new one re-adds the exports.
      this.#logger.error(
        { pid, socket: this.#socketPath },
        'the running qemu-storage-daemon lost its QMP socket; restarting it',
      );
      await this.#terminate(pid);
      pid = undefined;
    }
    let qmp: QmpClient | undefined;
    if (pid !== undefined) {
      qmp = await QmpClient.connect(this.#socketPath, { timeoutMs: this.#timeoutMs });
      const servesTls = await this.#servesTls(qmp).catch((error: unknown) => {
        qmp?.close(); // QMP serves one client at a time: never leave ours open
        throw error;
      });
      if (servesTls !== (this.#tlsDir !== undefined)) {
        // Adopting it would serve plain NBD where TLS is required (or the reverse) while
        // status.uri says otherwise: the TLS setting outranks its connected clients.
        this.#logger.warn(
          { pid, tls: this.#tlsDir !== undefined },
          'the running qemu-storage-daemon has another TLS setting; restarting it (its clients are cut)',
        );
        qmp.close();
        await this.#terminate(pid);
        pid = undefined;
        qmp = undefined;
      }
    }
    if (qmp !== undefined && pid !== undefined) {
      this.#pid = pid;
      this.#adopted = true;
      this.#logger.info({ pid }, 'adopted the running qemu-storage-daemon');
    } else {
      ({ qmp, pid: this.#pid } = await this.#spawn());
      this.#adopted = false;
      this.#starts++;
    }
    this.#qmp = qmp;
    qmp.onClose(() => {
      if (this.#qmp === qmp)
        this.#logger.warn({ pid: this.#pid }, 'QMP connection to qemu-storage-daemon closed');
    });
    await this.#reconcile(qmp);
  }

  async #spawn(): Promise<{ qmp: QmpClient; pid: number }> {
    await this.#beforeSpawn?.();
    await unlink(this.#socketPath).catch(() => undefined); // stale: its daemon is gone
    const logStart = await stat(this.#logFile).then(
      (s) => s.size,
      () => 0,
    );
    const log = await open(this.#logFile, 'a', 0o600);
    const args = [
      '--chardev',
      `socket,id=${QMP_CHARDEV_ID},path=${qemuOptionValue(this.#socketPath)},server=on,wait=off`,
      '--monitor',
      `chardev=${QMP_CHARDEV_ID}`,
      ...(this.#tlsDir === undefined
        ? []
        : [
            '--object',
            `tls-creds-x509,id=${TLS_CREDS_ID},dir=${qemuOptionValue(this.#tlsDir)},endpoint=server,verify-peer=on`,
          ]),
      '--nbd-server',
      `addr.type=inet,addr.host=${qemuOptionValue(this.#listenAddress)},addr.port=${this.#port}` +
        (this.#tlsDir === undefined ? '' : `,tls-creds=${TLS_CREDS_ID}`),
      '--pidfile',
      this.#pidFile,
    ];
    let exited: string | undefined;
    let pid: number | undefined;
    try {
      // Its own session and no pipes to us: it outlives the controller.
      const env = { ...process.env };
      if (env['GLIBC_TUNABLES'] === undefined && this.#glibcTunables !== '')
        env['GLIBC_TUNABLES'] = this.#glibcTunables;
      const child = spawn(this.#binary, args, { detached: true, stdio: ['ignore', log.fd, log.fd], env });
      child.on('error', (error) => (exited = error.message));
      child.on('exit', (code, signal) => (exited = `exited with ${signal ?? `code ${code}`}`));
      child.unref();
      pid = child.pid;
    } finally {
      await log.close();
    }
    this.#logger.info({ pid, args }, 'starting qemu-storage-daemon');
    let lastConnectError: unknown;
    const started = async (): Promise<{ qmp: QmpClient; pid: number } | undefined> => {
      if (exited !== undefined || pid === undefined) {
        const output = await readFile(this.#logFile, 'utf8').then((text) => text.slice(logStart).trim());
        throw new Error(
          `${this.#binary} ${exited ?? 'did not start'}${output ? `: ${output}` : ''} (log: ${this.#logFile})`,
        );
      }
      try {
        return { qmp: await QmpClient.connect(this.#socketPath, { timeoutMs: 5_000 }), pid };
      } catch (error) {
        lastConnectError = error; // refused until the daemon has created its socket: not yet
        return undefined;
      }
    };
    try {
      const daemon = await waitFor(started, {
        timeoutMs: this.#timeoutMs,
        what: `qemu-storage-daemon to answer on ${this.#socketPath}`,
      });
      this.#logger.info(
        { pid, port: this.#port, listenAddress: this.#listenAddress },
        'qemu-storage-daemon started',
      );
      return daemon;
    } catch (error) {
      if (!(error instanceof WaitTimeoutError)) throw error;
      if (pid !== undefined && isRunning(pid)) process.kill(pid, 'SIGTERM');
      throw new Error(
        `qemu-storage-daemon did not answer on ${this.#socketPath} within ${this.#timeoutMs} ms`,
        { cause: lastConnectError ?? error },
      );
    }
  }

  /**
   * Makes exports.json and the daemon agree. Recorded exports the daemon no longer serves
   * are dropped (their nodes deleted). Exports with our id prefix that no record names are
   * removed (hard): their names are unknown, so they could never be reported or re-added.
   * Block nodes with our prefix that nothing uses are deleted. Exports and nodes without
   * our prefix belong to someone else and are left alone.
   */
  async #reconcile(qmp: QmpClient): Promise<void> {
    const live = await this.#liveExports(qmp);
    const known = new Set<string>();
    for (const [name, record] of [...this.#records]) {
      if (live.has(record.id)) {
        known.add(record.id);
        if (record.state === 'adding') this.#records.set(name, { ...record, state: 'served' });
      } else {
        this.#logger.warn({ export: name, id: record.id }, 'recorded export is not served; dropping it');
        this.#records.delete(name);
      }
    }
    const adopting = this.#recordsLost;
    this.#recordsLost = false;
    this.#unclaimed.clear();
    for (const id of live.keys()) {
      if (!id.startsWith(ID_PREFIX) || known.has(id)) continue;
      if (adopting) {
        this.#unclaimed.add(id);
        continue;
      }
      this.#logger.warn({ id }, 'removing an export of ours that no record names');
      await this.#deleteExport(qmp, id, true);
    }
    this.#unclaimedPaths = new Set();
    if (this.#unclaimed.size > 0) {
      this.#unclaimedUntil = performance.now() + UNCLAIMED_ADOPTION_WINDOW_MS;
      const nodes = await this.#execute<{ 'node-name': string; file?: string }[]>(
        qmp,
        'query-named-block-nodes',
        { flat: true },
      );
      for (const node of nodes)
        if ([...this.#unclaimed].some((id) => node['node-name'] === `${id}-f`) && node.file)
          this.#unclaimedPaths.add(node.file);
      this.#logger.warn(
        { ids: [...this.#unclaimed], windowMs: UNCLAIMED_ADOPTION_WINDOW_MS },
        'exports.json was lost: keeping the exports it named for their resources to claim again',
      );
    }
    const used = new Set([...this.#records.values()].flatMap((r) => nodesToDelete(r)));
    const stale = (await this.#nodeNames(qmp)).filter(
      (node) =>
        node.startsWith(ID_PREFIX) &&
        !used.has(node) &&
        ![...this.#unclaimed].some((id) => node.startsWith(`${id}-`)),
    );
    // Users before what they use: the top format node, its file node, then each backing pair.
    const ordered = stale.sort((a, b) => deletionRank(a) - deletionRank(b));
    for (const node of ordered) {
      this.#logger.warn({ node }, 'deleting an unused block node of ours');
      await this.#execute(qmp, 'blockdev-del', { 'node-name': node }).catch((error: unknown) =>
        this.#logger.error({ node, error: String(error) }, 'could not delete block node'),
      );
    }
    await this.#persist();
  }

  /** block-export-del, then waits until the export is really gone (BLOCK_EXPORT_DELETED). */
  async #deleteExport(qmp: QmpClient, id: string, force: boolean): Promise<void> {
    const live = await this.#liveExports(qmp);
    if (!live.has(id)) return;
    const deleted = qmp.waitForEvent(
      (event) => event.event === 'BLOCK_EXPORT_DELETED' && event.data['id'] === id,
      this.#timeoutMs,
    );
    deleted.promise.catch(() => undefined);
    try {
      if (!live.get(id)?.['shutting-down'])
        await this.#execute(qmp, 'block-export-del', { id, mode: force ? 'hard' : 'safe' });
    } catch (error) {
      deleted.cancel();
      throw error;
    }
    // The event may have gone out before we listened (an export already shutting down): poll too.
    let settled = false;
    const gone = waitUntil(async () => settled || !(await this.#liveExports(qmp)).has(id), {
      timeoutMs: this.#timeoutMs,
      what: `export ${id} to go`,
    });
    try {
      await Promise.race([deleted.promise, gone]);
    } finally {
      settled = true;
      deleted.cancel();
    }
  }

  /** Drops a record and deletes its block nodes. */
  async #forget(qmp: QmpClient, name: string, record: ExportRecord, log: Logger): Promise<void> {
    await this.#deleteNodes(qmp, record, log);
    this.#records.delete(name);
    await this.#persist();
  }

  async #deleteNodes(qmp: QmpClient, ids: ExportIds, log: Logger): Promise<void> {
    const present = new Set(await this.#nodeNames(qmp));
    for (const node of nodesToDelete(ids)) {
      if (!present.has(node)) continue;
      await this.#execute(qmp, 'blockdev-del', { 'node-name': node });
      log.debug({ node }, 'block node deleted');
    }
  }

  async #liveExports(qmp: QmpClient): Promise<Map<string, BlockExportInfo>> {
    const list = await this.#execute<BlockExportInfo[]>(qmp, 'query-block-exports');
    return new Map(list.map((e) => [e.id, e]));
  }

  async #nodeNames(qmp: QmpClient): Promise<string[]> {
    const nodes = await this.#execute<{ 'node-name': string }[]>(qmp, 'query-named-block-nodes', {
      flat: true,
    });
    return nodes.map((n) => n['node-name']);
  }

  #execute<T = unknown>(qmp: QmpClient, command: string, args?: Record<string, unknown>): Promise<T> {
    return qmp.execute<T>(command, args, { timeoutMs: this.#timeoutMs });
  }

  async #persist(): Promise<void> {
    // The directory may have been deleted under us (the daemon keeps running): recreate it.
    await mkdir(this.#dir, { recursive: true, mode: 0o700 });
    await writeExportState(this.#stateFile, this.#records);
  }

  /**
   * exports.json as recorded. A file that does not parse is moved aside and the exports are
   * learnt again from the daemon and the resources (see `#unclaimed`); so is a missing file
   * while a daemon of ours runs (the state directory was deleted).
   */
  async #readRecords(): Promise<Map<string, ExportRecord>> {
    try {
      const records = await readExportState(this.#stateFile);
      this.#recordsLost = records.size === 0 && !(await fileExists(this.#stateFile));
      return records;
    } catch (error) {
      if (error instanceof SyntaxError || error instanceof CorruptExportStateError) {
        await moveCorruptStateFileAside(this.#stateFile, error, this.#logger);
        this.#recordsLost = true;
        return new Map();
      }
      throw error;
    }
  }

  /** Removes the unclaimed exports once their adoption window has passed. */
  async #removeUnclaimedAfterWindow(qmp: QmpClient): Promise<void> {
    if (this.#unclaimed.size === 0 || performance.now() < this.#unclaimedUntil) return;
    for (const id of this.#unclaimed) {
      this.#logger.warn({ id }, 'removing an export of ours that no resource claimed again');
      await this.#deleteExport(qmp, id, true);
      const nodes = (await this.#nodeNames(qmp)).filter((node) => node.startsWith(`${id}-`));
      for (const node of nodes.sort((a, b) => deletionRank(a) - deletionRank(b)))
        await this.#execute(qmp, 'blockdev-del', { 'node-name': node }).catch((error: unknown) =>
          this.#logger.error({ node, error: String(error) }, 'could not delete block node'),
        );
    }
    this.#unclaimed.clear();
    this.#unclaimedPaths.clear();
  }

  /** SIGTERM, then SIGKILL when it has not exited within the timeout. */
  async #terminate(pid: number): Promise<void> {
    if (!signalIfRunning(pid, 'SIGTERM')) return;
    const exited = await waitUntil(() => !isRunning(pid), {
      timeoutMs: this.#timeoutMs,
      what: `qemu-storage-daemon (pid ${pid}) to exit`,
    }).then(
      () => true,
      () => false,
    );
    if (exited || !signalIfRunning(pid, 'SIGKILL')) return;
    await waitUntil(() => !isRunning(pid), {
      timeoutMs: 10_000,
      what: `qemu-storage-daemon (pid ${pid}) to die`,
    });
  }

  /**
   * The pid of this state directory's running daemon: the one we know, the pid file's, or
   * (a lost or stale pid file must not make us start a second daemon) one found in /proc.
   */
  async #runningDaemon(): Promise<number | undefined> {
    for (const pid of [this.#pid, await readPidFile(this.#pidFile)])
      if (pid !== undefined && this.#isOurDaemon(pid, commandLineOf(pid))) return pid;
    // Looks through /proc for a qemu-storage-daemon with our QMP socket.
    return findProcesses((argv, pid) => this.#isOurDaemon(pid, argv))[0];
  }

  /** The pid runs a qemu-storage-daemon whose QMP socket is ours (not a recycled pid). */
  #isOurDaemon(pid: number, argv: readonly string[] | undefined): boolean {
    if (argv === undefined || !isRunning(pid)) return false;
    const program = basename(argv[0] ?? '');
    const socketOption = `path=${qemuOptionValue(this.#socketPath)},`;
    return program.startsWith('qemu-storage-daemon') && argv.some((arg) => arg.includes(socketOption));
  }
}

/** Sends the signal; false when the process had already gone. */
function signalIfRunning(pid: number, signal: NodeJS.Signals): boolean {
  try {
    process.kill(pid, signal);
    return true;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ESRCH') return false;
    throw error;
  }
}

async function socketExists(path: string): Promise<boolean> {
  return (await stat(path).catch(() => undefined))?.isSocket() ?? false;
}

async function fileExists(path: string): Promise<boolean> {
  return access(path).then(
    () => true,
    () => false,
  );
}

function checkConfig(config: ExportConfig): void {
  if (config.server !== 'qemu-storage-daemon')
    throw new TypeError(`export "${config.exportName}" is for ${config.server}, not qemu-storage-daemon`);
  if (config.format !== 'qcow2' && config.format !== 'raw')
    throw new TypeError(`export "${config.exportName}": unknown format ${String(config.format)}`);
}

/** A value inside a QEMU `key=value,...` option: commas are doubled. */
function qemuOptionValue(value: string): string {
  return value.replaceAll(',', ',,');
}

/** Where a node of ours stands in deletion order: `-d`, `-f`, then `-b<i>d`, `-b<i>f` by depth. */
function deletionRank(node: string): number {
  const backing = /-b(\d+)([df])$/.exec(node);
  if (backing) return 2 + 2 * Number(backing[1]) + (backing[2] === 'd' ? 0 : 1);
  return node.endsWith('-d') ? 0 : 1;
}
