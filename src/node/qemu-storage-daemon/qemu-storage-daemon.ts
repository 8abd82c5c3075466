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
import { mkdir, open, readFile, readdir, stat, unlink } from 'node:fs/promises';
import { basename, join } from 'node:path';
import type { Logger } from 'pino';
import { fingerprintOf, type ExportConfig } from '../../api/export-config.js';
import { isLockError } from '../qemu-error.js';
import { holdsQemuWriteLock } from '../qemu-img.js';
import { formatNodeArguments, protocolNodeArguments } from './blockdev-arguments.js';
import { ExportBusyError, ImageLockedError } from './errors.js';
import {
  exportIdsOf,
  ID_PREFIX,
  readExportState,
  writeExportState,
  type ExportIds,
  type ExportRecord,
} from './export-state.js';
import { QmpClient, QmpError } from './qmp-client.js';
import { removeTemporaryFiles } from '../../shared/atomic-file.js';

export interface QemuStorageDaemonOptions {
  /** The controller's state directory; the daemon's files go to `<stateDir>/qemu-storage-daemon/`. */
  stateDir: string;
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
}

/** NBD request buffers up to 4 MiB come from the heap; up to 64 MiB of freed heap is kept. */
export const DEFAULT_GLIBC_TUNABLES =
  'glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=67108864';

export interface QemuStorageDaemonStatus {
  /** The daemon runs and this instance is connected to its QMP socket. */
  running: boolean;
  pid?: number;
  /** This instance found the daemon running rather than starting it. */
  adopted: boolean;
}

interface BlockExportInfo {
  id: string;
  'node-name': string;
  'shutting-down': boolean;
  type: string;
}

const QMP_CHARDEV_ID = 'nbdx-qmp';
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

  #qmp: QmpClient | undefined;
  #pid: number | undefined;
  #adopted = false;
  #records = new Map<string, ExportRecord>();
  /** Serialises everything that talks to the daemon or the state file. */
  #queue: Promise<unknown> = Promise.resolve();

  constructor(options: QemuStorageDaemonOptions) {
    if (typeof options.stateDir !== 'string' || options.stateDir === '')
      throw new TypeError(`stateDir must be a directory path, got ${JSON.stringify(options.stateDir)}`);
    const port = options.port ?? 10810;
    if (!Number.isInteger(port) || port < 1 || port > 65535)
      throw new TypeError(`port must be an integer between 1 and 65535, got ${port}`);
    this.#dir = join(options.stateDir, 'qemu-storage-daemon');
    this.#socketPath = join(this.#dir, 'qmp.sock');
    if (Buffer.byteLength(this.#socketPath) > MAX_SOCKET_PATH)
      throw new TypeError(`stateDir is too long for a UNIX socket path: ${this.#socketPath}`);
    this.#pidFile = join(this.#dir, 'qemu-storage-daemon.pid');
    this.#logFile = join(this.#dir, 'qemu-storage-daemon.log');
    this.#stateFile = join(this.#dir, 'exports.json');
    this.#listenAddress = options.listenAddress ?? '0.0.0.0';
    this.#port = port;
    this.#logger = options.logger.child({ server: 'qemu-storage-daemon' });
    this.#binary = options.binary ?? 'qemu-storage-daemon';
    this.#timeoutMs = options.timeoutMs ?? 30_000;
    this.#glibcTunables = options.glibcTunables ?? DEFAULT_GLIBC_TUNABLES;
  }

  /** Adopts the running daemon of this state directory, or starts one; then reconciles exports.json with it. */
  start(): Promise<void> {
    return this.#serial(() => this.#start());
  }

  status(): QemuStorageDaemonStatus {
    const running = this.#qmp !== undefined && !this.#qmp.closed;
    return { running, ...(this.#pid === undefined ? {} : { pid: this.#pid }), adopted: this.#adopted };
  }

  /** What the daemon serves now, by export name. */
  exports(): Promise<Map<string, { fingerprint: string; config: ExportConfig }>> {
    return this.#serial(async () => {
      const live = await this.#liveExports(await this.#connected());
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

      const ids = exportIdsOf(name, fingerprint);
      await this.#deleteNodes(qmp, ids, log); // leftovers of an interrupted attempt
      this.#records.set(name, { ...ids, fingerprint, config, state: 'adding' });
      await this.#persist();
      const added: string[] = [];
      try {
        await this.#execute(qmp, 'blockdev-add', protocolNodeArguments(config, ids.nodeNames.file));
        added.push(ids.nodeNames.file);
        // The format node takes the image's permissions, so this is where a foreign lock shows.
        await this.#execute(
          qmp,
          'blockdev-add',
          formatNodeArguments(config, ids.nodeNames.format, ids.nodeNames.file),
        );
        added.unshift(ids.nodeNames.format);
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
    return this.#serial(async () => {
      const connected = this.#qmp && !this.#qmp.closed ? this.#qmp : undefined;
      this.#qmp = undefined;
      const pid = await this.#runningDaemon();
      if (pid !== undefined) {
        const qmp = connected ?? (await QmpClient.connect(this.#socketPath, { timeoutMs: this.#timeoutMs }));
        await qmp.execute('quit', undefined, { timeoutMs: this.#timeoutMs }).catch(() => undefined);
        qmp.close();
        await waitFor(() => !processAlive(pid), this.#timeoutMs, `qemu-storage-daemon (pid ${pid}) to exit`);
      }
      connected?.close();
      this.#records.clear();
      await this.#persist().catch((error: unknown) => {
        if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error; // never started here
      });
      this.#logger.info(
        { pid },
        pid === undefined ? 'qemu-storage-daemon was not running' : 'qemu-storage-daemon stopped',
      );
    });
  }

  #serial<T>(work: () => Promise<T>): Promise<T> {
    const result = this.#queue.then(work, work);
    this.#queue = result.catch(() => undefined);
    return result;
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
    await mkdir(this.#dir, { recursive: true, mode: 0o700 });
    // A controller killed mid-write leaves the temporary of exports.json behind.
    await removeTemporaryFiles(this.#dir);
    this.#records = await readExportState(this.#stateFile);
    const pid = await this.#runningDaemon();
    let qmp: QmpClient;
    if (pid !== undefined) {
      qmp = await QmpClient.connect(this.#socketPath, { timeoutMs: this.#timeoutMs });
      this.#pid = pid;
      this.#adopted = true;
      this.#logger.info({ pid }, 'adopted the running qemu-storage-daemon');
    } else {
      ({ qmp, pid: this.#pid } = await this.#spawn());
      this.#adopted = false;
    }
    this.#qmp = qmp;
    qmp.onClose(() => {
      if (this.#qmp === qmp)
        this.#logger.warn({ pid: this.#pid }, 'QMP connection to qemu-storage-daemon closed');
    });
    await this.#reconcile(qmp);
  }

  async #spawn(): Promise<{ qmp: QmpClient; pid: number }> {
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
      '--nbd-server',
      `addr.type=inet,addr.host=${qemuOptionValue(this.#listenAddress)},addr.port=${this.#port}`,
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
    const deadline = Date.now() + this.#timeoutMs;
    for (;;) {
      if (exited !== undefined || pid === undefined) {
        const output = await readFile(this.#logFile, 'utf8').then((text) => text.slice(logStart).trim());
        throw new Error(
          `${this.#binary} ${exited ?? 'did not start'}${output ? `: ${output}` : ''} (log: ${this.#logFile})`,
        );
      }
      try {
        const qmp = await QmpClient.connect(this.#socketPath, { timeoutMs: 5_000 });
        this.#logger.info(
          { pid, port: this.#port, listenAddress: this.#listenAddress },
          'qemu-storage-daemon started',
        );
        return { qmp, pid };
      } catch (error) {
        if (Date.now() > deadline) {
          if (processAlive(pid)) process.kill(pid, 'SIGTERM');
          throw new Error(`qemu-storage-daemon did not answer on ${this.#socketPath}`, { cause: error });
        }
        await sleep(100);
      }
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
    for (const id of live.keys()) {
      if (!id.startsWith(ID_PREFIX) || known.has(id)) continue;
      this.#logger.warn({ id }, 'removing an export of ours that no record names');
      await this.#deleteExport(qmp, id, true);
    }
    const used = new Set([...this.#records.values()].flatMap((r) => [r.nodeNames.file, r.nodeNames.format]));
    const stale = (await this.#nodeNames(qmp)).filter(
      (node) => node.startsWith(ID_PREFIX) && !used.has(node),
    );
    // Format nodes (-d) before the file nodes (-f) under them.
    const ordered = [...stale.filter((n) => n.endsWith('-d')), ...stale.filter((n) => !n.endsWith('-d'))];
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
    const gone = waitFor(
      async () => settled || !(await this.#liveExports(qmp)).has(id),
      this.#timeoutMs,
      `export ${id} to go`,
    );
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
    for (const node of [ids.nodeNames.format, ids.nodeNames.file]) {
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
    await writeExportState(this.#stateFile, this.#records);
  }

  async #readPid(): Promise<number | undefined> {
    try {
      const pid = Number.parseInt((await readFile(this.#pidFile, 'utf8')).trim(), 10);
      return Number.isInteger(pid) && pid > 0 ? pid : undefined;
    } catch {
      return undefined;
    }
  }

  /**
   * The pid of this state directory's running daemon: the one we know, the pid file's, or
   * (a lost or stale pid file must not make us start a second daemon) one found in /proc.
   */
  async #runningDaemon(): Promise<number | undefined> {
    for (const pid of [this.#pid, await this.#readPid()])
      if (pid !== undefined && (await this.#isOurDaemon(pid))) return pid;
    return this.#findDaemon();
  }

  /** Looks through /proc for a qemu-storage-daemon with our QMP socket. */
  async #findDaemon(): Promise<number | undefined> {
    const entries = await readdir('/proc').catch(() => [] as string[]);
    for (const entry of entries) {
      if (!/^\d+$/.test(entry)) continue;
      const pid = Number(entry);
      if (await this.#isOurDaemon(pid)) return pid;
    }
    return undefined;
  }

  /** The pid is a qemu-storage-daemon whose QMP socket is ours (not a recycled pid). */
  async #isOurDaemon(pid: number): Promise<boolean> {
    try {
      const argv = (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0');
      const program = basename(argv[0] ?? '');
      const socketOption = `path=${qemuOptionValue(this.#socketPath)},`;
      return program.startsWith('qemu-storage-daemon') && argv.some((arg) => arg.includes(socketOption));
    } catch {
      return false;
    }
  }
}

function checkConfig(config: ExportConfig): void {
  if (config.server !== 'qemu-storage-daemon')
    throw new TypeError(`export "${config.exportName}" is for ${config.server}, not qemu-storage-daemon`);
  if (config.allowedClients.length > 0)
    throw new TypeError(
      `export "${config.exportName}": qemu-storage-daemon cannot restrict clients (allowedClients: ${config.allowedClients.join(', ')})`,
    );
  if (config.format !== 'qcow2' && config.format !== 'raw')
    throw new TypeError(`export "${config.exportName}": unknown format ${String(config.format)}`);
}

/** A value inside a QEMU `key=value,...` option: commas are doubled. */
function qemuOptionValue(value: string): string {
  return value.replaceAll(',', ',,');
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function waitFor(
  check: () => boolean | Promise<boolean>,
  timeoutMs: number,
  what: string,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}
