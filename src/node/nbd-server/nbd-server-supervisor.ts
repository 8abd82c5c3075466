/**
 * Runs nbd-server for this node and applies changes of its export set by hand-over
 * restarts, never by SIGHUP (3.24 crashes on it, and no version removes or changes an
 * export on reload). A hand-over SIGKILLs the parent and starts a new one with the full
 * configuration at once: per-client children keep serving their clients (they do not
 * hold the listening socket), the new parent binds the port and serves the new set.
 * docs/nbd-server.md has the experiments behind every choice here.
 *
 * The parent outlives the controller: it daemonizes itself (nbd-server's `-d` would
 * also stop it forking per client, so one client would block every other), and a
 * restarted controller adopts it through the pid file and loaded.json.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { mkdir, open, readFile, rm, stat, truncate } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import type { ExportConfig } from '../../api/export-config.js';
import { removeTemporaryFiles, writeFileAtomic } from '../../shared/atomic-file.js';
import { exponentialBackoff } from '../../shared/backoff.js';
import { SerialLock } from '../../shared/serial-lock.js';
import { readPidFile } from '../process/pid-file.js';
import { signalGroup } from '../process/signal-group.js';
import { processState, startTicksOf } from '../process/proc-scan.js';
import { runCommand } from '../process/run-command.js';
import { pollUntil, waitFor, waitUntil, withDeadline, WaitTimeoutError } from '../process/wait-until.js';
import { ApplyScheduler } from './apply-scheduler.js';
import { ConfDir, type ConfiguredExport } from './conf-dir.js';
import { NbdServerError } from './nbd-server-error.js';
import {
  EMPTY_RECORD,
  readLoadedRecord,
  retiredAfter,
  writeLoadedRecord,
  type LoadedExport,
  type LoadedRecord,
} from './loaded-record.js';
import { defaultAdmissionHook } from './admission-hook-command.js';
import { admissionLogOf } from './conf-file-name.js';
import { checkedPath, renderBaseConfig, type AdmissionHookCommand } from './render-export-config.js';
import {
  isListeningOn,
  processesListeningOn,
  isServerProcess,
  listenersOn,
  listServerProcesses,
} from './server-processes.js';

export interface NbdServerSupervisorOptions {
  /** The node's state directory; this backend keeps everything under `<stateDir>/nbd-server/`. Required. */
  stateDir: string;
  /** The one address nbd-server listens on. Default '0.0.0.0'. */
  listenAddress?: string;
  /** TCP port. Default 10809. */
  port?: number;
  /** Required. */
  logger: Logger;
  /** Quiet time after the last `requestApply()` before a hand-over restart. Default 200 ms. */
  debounceMs?: number;
  /** Longest a burst of requests delays the restart. Default max(2000, debounceMs) ms. */
  maxDelayMs?: number;
  /** The nbd-server program, by name (looked up in PATH) or path. Default 'nbd-server'. */
  binary?: string;
  /**
   * How nbd-server runs the admission hook before serving each client (a prerun command).
   * Default: flock from PATH, this Node runtime, and the hook built next to this module.
   */
  admissionHook?: AdmissionHookCommand;
  /**
   * The controller's process: its connections and its children's (the probe, the checksum
   * reader) pass the admission hook unfiltered and uncounted. Default this process; null: none.
   */
  controllerPid?: number | null;
  /** How often the watchdog checks that the parent is alive. Default 1000 ms. */
  watchdogIntervalMs?: number;
  /** How long a new parent may take to listen. Default 15000 ms. */
  startTimeoutMs?: number;
  /** How long a client may take over its NBD handshake. Default HANDSHAKE_TIMEOUT_MS (30 s). */
  handshakeTimeoutMs?: number;
  /** TLS with client certificates for every export (see BaseConfig.tlsDir). Default: plain NBD. */
  tlsDir?: string;
}

export interface NbdServerStatus {
  running: boolean;
  pid: number | null;
  /** Hand-over restarts (and first starts) done by this instance. */
  restarts: number;
  lastRestartAt: Date | null;
  /** The last failure (start, restart, a dead parent); null after a successful restart. */
  lastError: string | null;
  /** `nbd-server -V`, e.g. "3.24"; null when unknown. */
  version: string | null;
  /** Clients cut before they chose an export: at a hand-over, or past the handshake timeout. */
  handshakesCut: number;
}

type AppliedListener = (changedExportNames: string[]) => void;

const LOG_LIMIT = 1 << 20;
const CHILD_GRACE_MS = 3_000;
/**
 * How long a client may take over its NBD handshake before it is cut. nbd-server 3.24 has no
 * such deadline; a real client negotiates in milliseconds, and the cap bounds how long one
 * idle connection holds a process (and the listening socket) of the node.
 */
export const HANDSHAKE_TIMEOUT_MS = 30_000;
/** Retrying a failed start: 1 s, doubling, at most 30 s; exact (one supervisor per node, nothing to spread). */
const RESTART_BACKOFF = { baseMs: 1_000, maxMs: 30_000, jitter: 0 };

export class NbdServerSupervisor {
  readonly dir: string;
  readonly configPath: string;
  readonly pidPath: string;
  readonly loadedPath: string;
  readonly logPath: string;
  /** The admission hook's decisions, one JSON line each. */
  readonly admissionLogPath: string;
  readonly port: number;
  readonly #listenAddress: string;
  readonly #binary: string;
  readonly #log: Logger;
  readonly #confDir: ConfDir;
  readonly #scheduler: ApplyScheduler;
  readonly #watchdogIntervalMs: number;
  readonly #startTimeoutMs: number;
  readonly #handshakeTimeoutMs: number;
  readonly #listeners = new Set<AppliedListener>();
  #pid: number | null = null;
  #record: LoadedRecord = EMPTY_RECORD;
  #baseConfig = '';
  #restarts = 0;
  #lastRestartAt: Date | null = null;
  #lastError: string | null = null;
  #version: string | null = null;
  #handshakesCut = 0;
  /** Children seen negotiating (holding the listening socket), with when they were first seen. */
  readonly #negotiatingSince = new Map<number, number>();
  #failures = 0;
  #retryAt = 0;
  #watchdog: NodeJS.Timeout | undefined;
  #stopped = false;
  #healing = false;
  /** Whether the admission hook knows this controller (undefined: not tried yet). */
  #controllerNamed: boolean | undefined;
  /** Serializes conf.d changes and hand-overs. */
  readonly #lock = new SerialLock();
  #timings: { killed?: number; launcherExited?: number } = {};

  constructor(options: NbdServerSupervisorOptions) {
    if (typeof options.stateDir !== 'string' || options.stateDir === '')
      throw new TypeError(`stateDir must be a directory path, got ${JSON.stringify(options.stateDir)}`);
    this.dir = resolve(options.stateDir, 'nbd-server');
    checkedPath(this.dir, 'state directory');
    this.configPath = join(this.dir, 'config');
    this.pidPath = join(this.dir, 'nbd-server.pid');
    this.loadedPath = join(this.dir, 'loaded.json');
    this.logPath = join(this.dir, 'nbd-server.log');
    this.admissionLogPath = admissionLogOf(join(this.dir, 'auth'));
    this.#confDir = new ConfDir(
      join(this.dir, 'conf.d'),
      join(this.dir, 'auth'),
      options.admissionHook ?? defaultAdmissionHook(),
      options.controllerPid === undefined ? process.pid : options.controllerPid,
    );
    this.port = options.port ?? 10809;
    this.#listenAddress = options.listenAddress ?? '0.0.0.0';
    this.#binary = options.binary ?? 'nbd-server';
    this.#log = options.logger.child({ component: 'nbd-server' });
    this.#watchdogIntervalMs = options.watchdogIntervalMs ?? 1_000;
    this.#startTimeoutMs = options.startTimeoutMs ?? 15_000;
    this.#handshakeTimeoutMs = options.handshakeTimeoutMs ?? HANDSHAKE_TIMEOUT_MS;
    // Validates port and address now: a bad option is a TypeError at construction.
    this.#baseConfig = renderBaseConfig({
      port: this.port,
      listenAddress: this.#listenAddress,
      includeDir: this.#confDir.confDir,
      ...(options.tlsDir === undefined ? {} : { tlsDir: options.tlsDir }),
    });
    const debounceMs = options.debounceMs ?? 200;
    this.#scheduler = new ApplyScheduler({
      debounceMs,
      maxDelayMs: options.maxDelayMs ?? Math.max(2_000, debounceMs),
      run: () => this.#apply(),
    });
  }

  /**
   * Cleans leftovers, then adopts the running parent (pid file, checked against /proc:
   * an nbd-server with our config that listens on our port) or starts one with the
   * current conf.d. An adopted parent is not restarted here, even when conf.d differs
   * from what it loaded: `requestApply()` decides that. Failing to start is recorded in
   * `status().lastError` and retried by the watchdog; it does not throw.
   */
  async start(): Promise<void> {
    this.#stopped = false;
    try {
      await this.#startOrAdopt();
    } catch (error) {
      // A state directory that is read-only, full or unreadable must not keep the controller
      // from starting: the watchdog retries (with backoff) until the condition clears.
      this.#failures++;
      this.#retryAt = Date.now() + exponentialBackoff(this.#failures, RESTART_BACKOFF, Math.random);
      this.#lastError = `could not start: ${error instanceof Error ? error.message : String(error)}`;
      this.#log.error({ err: error }, 'could not start or adopt nbd-server; will retry');
    }
    this.#watchdog = setInterval(() => this.#watch(), this.#watchdogIntervalMs);
    this.#watchdog.unref();
  }

  async #startOrAdopt(): Promise<void> {
    await this.#ensureStateFiles();
    const removed = [
      ...(await removeTemporaryFiles(this.dir)),
      ...(await this.#confDir.removeTemporaryFiles()),
    ];
    if (removed.length > 0) this.#log.info({ files: removed }, 'removed leftover temporary files');
    this.#version = await this.#readVersion();

    const record = await readLoadedRecord(this.loadedPath, this.#log);
    const adopted = await this.#findRunningParent();
    if (adopted !== null) {
      this.#pid = adopted;
      if (record.pid === adopted && record.base === hashOf(this.#baseConfig)) {
        this.#record = record;
        this.#log.info(
          { pid: adopted, exports: Object.keys(record.exports).length },
          'adopted running nbd-server',
        );
      } else {
        // It serves something we cannot know: report nothing loaded, so the next apply restarts it.
        this.#record = { ...record, pid: adopted, base: '', exports: {}, retired: mergedRetired(record) };
        this.#log.warn(
          { pid: adopted },
          'adopted an nbd-server whose configuration is unknown; it will be restarted',
        );
      }
    } else {
      this.#record = record;
      // A parent of ours on another port (the port option changed) is replaced, not left behind.
      const stale = await this.#readPidFile();
      if (stale !== null && isServerProcess(stale, this.configPath)) this.#pid = stale;
      const configured = await this.#confDir.read();
      if (configured.size > 0 || this.#pid !== null) await this.#handOver('start').catch(() => undefined);
      else this.#log.info('no nbd-server exports configured; not starting nbd-server');
    }
  }

  /**
   * Writes the export's conf.d file (and authfile first, when it restricts clients);
   * returns whether anything changed. Takes effect with the next apply.
   * @throws TypeError for a config not meant for nbd-server or with an unsafe value.
   */
  async writeExport(config: ExportConfig): Promise<boolean> {
    if (config.server !== 'nbd-server')
      throw new TypeError(`export "${config.exportName}" is for ${config.server}, not nbd-server`);
    return this.#exclusive(async () => {
      const changed = await this.#confDir.write(config);
      if (changed) this.#log.debug({ export: config.exportName }, 'export configuration written');
      return changed;
    });
  }

  /** Removes the export's conf.d file; returns whether it was there. Takes effect with the next apply. */
  async removeExport(exportName: string): Promise<boolean> {
    return this.#exclusive(async () => {
      const removed = await this.#confDir.remove(exportName);
      if (removed) this.#log.debug({ export: exportName }, 'export configuration removed');
      return removed;
    });
  }

  /** exportName → fingerprint of every export configured in conf.d (what the next parent will serve). */
  async configured(): Promise<Map<string, string>> {
    const configured = await this.#confDir.read();
    return new Map([...configured].map(([name, c]) => [name, c.fingerprint]));
  }

  /** exportName → fingerprint of what the running parent serves; empty when none runs. */
  loaded(): ReadonlyMap<string, string> {
    if (!this.#alive()) return new Map();
    return new Map(Object.entries(this.#record.exports).map(([name, e]) => [name, e.fingerprint]));
  }

  /**
   * Asks for a hand-over restart if what runs differs from conf.d (or nothing runs).
   * Coalesced: a burst of requests gives one restart after the debounce window.
   */
  requestApply(): void {
    this.#scheduler.request();
  }

  /** Called after every restart with the export names whose served configuration changed. */
  onApplied(listener: AppliedListener): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /** Resolves when no apply is scheduled or under way (tests, shutdown). */
  async settled(): Promise<void> {
    await this.#scheduler.settled();
  }

  /**
   * exportName → pids of per-client processes serving it: the current parent's children
   * and orphans of earlier parents. A process is known by the file it holds open. When
   * exports share a file, a process is counted for the configured ones among them (it
   * cannot be told apart), and for a removed one only if no configured export uses it.
   * Clients still negotiating hold no file and are not counted.
   */
  async connections(): Promise<Map<string, number[]>> {
    const configured = await this.#confDir.read();
    const byConfiguredPath = new Map<string, string[]>();
    for (const [name, c] of configured)
      byConfiguredPath.set(c.path, [...(byConfiguredPath.get(c.path) ?? []), name]);
    const byOtherPath = new Map<string, string[]>();
    const addOther = (name: string, path: string) =>
      byOtherPath.set(path, [...new Set([...(byOtherPath.get(path) ?? []), name])]);
    for (const [name, e] of Object.entries(this.#record.exports)) addOther(name, e.path);
    for (const [name, paths] of Object.entries(this.#record.retired))
      for (const path of paths) addOther(name, path);

    const result = new Map<string, number[]>();
    for (const process of await listServerProcesses(this.configPath)) {
      if (process.pid === this.#pid) continue;
      const names = new Set(
        process.paths.flatMap((p) => byConfiguredPath.get(p) ?? byOtherPath.get(p) ?? []),
      );
      for (const name of names) result.set(name, [...(result.get(name) ?? []), process.pid]);
    }
    return result;
  }

  /**
   * Per export, how many clients still use an older configuration of it: their processes
   * were forked (by an earlier parent) before the served configuration began. A hand-over
   * applies a change to new connections only; these keep what they had until they leave.
   */
  async staleConnections(): Promise<Map<string, number>> {
    const byPath = new Map<string, [string, number][]>();
    for (const [name, e] of Object.entries(this.#record.exports))
      if (e.sinceTicks !== undefined)
        byPath.set(e.path, [...(byPath.get(e.path) ?? []), [name, e.sinceTicks]]);
    const result = new Map<string, number>();
    for (const process of await listServerProcesses(this.configPath)) {
      if (process.pid === this.#pid) continue;
      for (const path of process.paths)
        for (const [name, since] of byPath.get(path) ?? [])
          if (process.startTicks < since) result.set(name, (result.get(name) ?? 0) + 1);
    }
    return result;
  }

  /**
   * Ends the per-client processes of an export that is no longer configured (deleting
   * a resource revokes access): SIGTERM, then SIGKILL after a grace period. Returns how
   * many there were. Does nothing for an export still configured in conf.d.
   */
  async disconnect(exportName: string): Promise<number> {
    if ((await this.#confDir.read()).has(exportName)) {
      this.#log.warn(
        { export: exportName },
        'not disconnecting clients of an export that is still configured',
      );
      return 0;
    }
    const pids = ((await this.connections()).get(exportName) ?? []).filter(
      (pid) => pid !== this.#pid && isServerProcess(pid, this.configPath),
    );
    if (pids.length === 0) return 0;
    this.#log.info({ export: exportName, pids }, 'disconnecting clients of a removed export');
    await this.#terminate(pids);
    return pids.length;
  }

  status(): NbdServerStatus {
    const running = this.#alive();
    return {
      running,
      pid: running ? this.#pid : null,
      restarts: this.#restarts,
      lastRestartAt: this.#lastRestartAt,
      lastError: this.#lastError,
      version: this.#version,
      handshakesCut: this.#handshakesCut,
    };
  }

  /**
   * Stops supervising, leaving nbd-server and its clients running (normal controller
   * shutdown: a restarted controller adopts them).
   */
  async detach(): Promise<void> {
    this.#stopped = true;
    if (this.#watchdog !== undefined) clearInterval(this.#watchdog);
    this.#watchdog = undefined;
    await this.#scheduler.stop();
    await this.#exclusive(() => Promise.resolve()); // let a conf.d write under way finish
  }

  /**
   * Stops nbd-server (tests, explicit shutdown). The parent is SIGKILLed, so its clients
   * keep their connections; with `disconnectClients`, every per-client process of this
   * state directory (orphans too) is ended as well.
   */
  async stop({ disconnectClients }: { disconnectClients: boolean }): Promise<void> {
    await this.detach();
    await this.#exclusive(async () => {
      const parent = this.#pid ?? (await this.#findRunningParent());
      if (parent !== null) await this.#killParent(parent);
      this.#pid = null;
      if (disconnectClients) {
        const pids = (await listServerProcesses(this.configPath)).map((p) => p.pid);
        if (pids.length > 0) await this.#terminate(pids);
      }
      const inUse = await this.#pathsInUse();
      await this.#ensureStateFiles();
      await writeLoadedRecord(this.loadedPath, {
        pid: null,
        startedAt: '',
        base: '',
        exports: {},
        retired: retiredAfter(this.#record, {}, inUse),
      });
      this.#record = EMPTY_RECORD;
      await rm(this.pidPath, { force: true });
      this.#log.info({ disconnectClients }, 'nbd-server stopped');
    });
  }

  // ---- internals ----

  /** One hand-over if what runs is not what conf.d says; run by the scheduler. */
  async #apply(): Promise<void> {
    if (this.#stopped) return;
    const configured = await this.#confDir.read();
    const alive = this.#alive();
    const same =
      alive &&
      this.#record.base === hashOf(this.#baseConfig) &&
      sameExports(this.#record.exports, configured);
    if (same || (!alive && configured.size === 0 && Object.keys(this.#record.exports).length === 0)) {
      this.#failures = 0;
      return;
    }
    await this.#handOver(alive ? 'configuration changed' : 'nbd-server is not running');
  }

  /**
   * SIGKILLs the parent (its children keep serving), starts a new one with conf.d as it
   * is now, records what it loaded, and tells the listeners what changed. Holds the lock
   * from reading conf.d until the new parent has read it.
   */
  async #handOver(reason: string): Promise<void> {
    const before = this.loaded();
    try {
      await this.#exclusive(async () => {
        // The state directory may have been deleted or emptied: the new parent needs its config.
        await this.#ensureStateFiles();
        const configured = await this.#confDir.read();
        const old = this.#pid;
        const started = Date.now();
        // Everything that can be done before the kill is done first: the port is closed from
        // the old parent's death until the new one binds it (docs/nbd-server.md).
        const killOld = async () => {
          if (old !== null) await this.#killParent(old);
          this.#pid = null;
        };
        let pid: number | null = null;
        if (configured.size > 0) pid = await this.#launchWithRetries(killOld);
        else await killOld();
        const newStart = pid === null ? undefined : startTicksOf(pid);
        const exports: Record<string, LoadedExport> = Object.fromEntries(
          [...configured].map(([name, c]) => {
            const before = this.#record.exports[name];
            // Unchanged exports keep when their configuration began; changed or new ones begin now.
            const sinceTicks = before?.fingerprint === c.fingerprint ? before.sinceTicks : newStart;
            return [
              name,
              {
                fingerprint: c.fingerprint,
                path: c.path,
                ...(sinceTicks === undefined ? {} : { sinceTicks }),
              },
            ];
          }),
        );
        const record: LoadedRecord = {
          pid,
          startedAt: new Date().toISOString(),
          base: hashOf(this.#baseConfig),
          exports,
          retired: retiredAfter(this.#record, exports, await this.#pathsInUse()),
        };
        await writeLoadedRecord(this.loadedPath, record);
        this.#record = record;
        this.#pid = pid;
        if (pid === null) await rm(this.pidPath, { force: true });
        const referenced = new Set(
          [...configured.values()].flatMap((c) => [c.rules, c.authfile].filter((p) => p !== undefined)),
        );
        await this.#confDir.removeUnreferenced(referenced);
        this.#restarts++;
        this.#lastRestartAt = new Date();
        this.#lastError = null;
        this.#failures = 0;
        this.#log.info(
          { reason, oldPid: old, pid, exports: configured.size, ms: Date.now() - started },
          pid === null ? 'nbd-server stopped: no exports configured' : 'nbd-server (re)started by hand-over',
        );
      });
    } catch (error) {
      this.#failures++;
      this.#retryAt = Date.now() + exponentialBackoff(this.#failures, RESTART_BACKOFF, Math.random);
      this.#lastError = error instanceof Error ? error.message : String(error);
      this.#log.error(
        { reason, err: error, failures: this.#failures },
        'nbd-server hand-over failed; will retry',
      );
      // Whatever it served, it no longer does: record that, keeping orphans findable.
      await this.#exclusive(async () => {
        if (this.#pid !== null) return;
        const record: LoadedRecord = {
          ...EMPTY_RECORD,
          retired: retiredAfter(this.#record, {}, await this.#pathsInUse()),
        };
        await writeLoadedRecord(this.loadedPath, record).catch(() => undefined);
        this.#record = record;
      }).catch(() => undefined);
      this.#notify(before, this.loaded());
      throw error;
    }
    this.#notify(before, this.loaded());
  }

  /**
   * `#launch`, tried again (after a short pause) when the new parent died after
   * daemonizing, which is how a failed bind shows: the port may be held a moment longer.
   */
  async #launchWithRetries(beforeSpawn: () => Promise<void>): Promise<number> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.#launch(attempt === 1 ? beforeSpawn : () => Promise.resolve());
      } catch (error) {
        if (!(error instanceof NbdServerError && error.diedAfterDaemonizing) || attempt >= 3) throw error;
        this.#log.warn({ attempt, err: error }, 'new nbd-server parent died at once; trying again');
        // Its bind failed: children of an earlier parent whose clients never negotiated may
        // still hold the port (the parent died without our hand-over, or before this fix).
        await this.#killNegotiatingChildren(this.#pid ?? 0);
        await sleep(50 * attempt);
      }
    }
  }

  /** Starts a parent, calling `beforeSpawn` (the kill) at the last moment; returns its pid once it listens. */
  async #launch(beforeSpawn: () => Promise<void>): Promise<number> {
    await rm(this.pidPath, { force: true });
    if (((await stat(this.logPath).catch(() => undefined))?.size ?? 0) > LOG_LIMIT)
      await truncate(this.logPath, 0);
    const logOffset = (await stat(this.logPath).catch(() => undefined))?.size ?? 0;
    const args = ['-C', this.configPath, '-p', this.pidPath];
    const command = [this.#binary, ...args];
    const log = await open(this.logPath, 'a');
    let exitCode: number | null;
    try {
      await log.write(`--- ${new Date().toISOString()} ${command.join(' ')}\n`);
      // Forking this (large) process can take from milliseconds to, on a loaded machine,
      // over a second, and the port is closed from the kill until nbd-server binds. So a
      // shell is forked first and waits on its stdin; after the kill one newline makes it
      // exec nbd-server (arguments passed as "$@", never through the shell's parser). EOF
      // without a newline makes it exit without running anything.
      // nbd-server then daemonizes (fork, setsid, stdio to /dev/null, pid file) and the
      // launcher exits; until then its stderr goes to the log file.
      const launcher = spawn('/bin/sh', ['-c', 'read -r _ && exec "$0" "$@"', this.#binary, ...args], {
        detached: true,
        stdio: ['pipe', log.fd, log.fd],
      });
      launcher.unref();
      const exited = new Promise<number | null>((resolveExit, rejectExit) => {
        launcher.once('error', rejectExit);
        launcher.once('exit', (code) => resolveExit(code));
      });
      exited.catch(() => undefined);
      await Promise.race([once(launcher, 'spawn'), exited]);
      try {
        await beforeSpawn();
      } catch (error) {
        launcher.stdin?.end();
        throw error;
      }
      this.#timings = { killed: performance.now() };
      launcher.stdin?.end('\n');
      try {
        exitCode = await withDeadline(exited, {
          timeoutMs: this.#startTimeoutMs,
          what: `${this.#binary} to daemonize`,
        });
      } catch (error) {
        if (!(error instanceof WaitTimeoutError)) throw error;
        // Still in the launcher's process group: it never daemonized, so it serves no client.
        if (launcher.pid !== undefined) signalGroup(launcher.pid, 'SIGKILL');
        throw new NbdServerError(
          `nbd-server did not daemonize within ${this.#startTimeoutMs} ms; killed it`,
          {
            command,
            stderr: await this.#logSince(logOffset),
            cause: error,
          },
        );
      }
      this.#timings.launcherExited = performance.now();
    } catch (error) {
      if (error instanceof NbdServerError) throw error;
      if (error instanceof Error && 'code' in error && typeof error.code === 'string')
        throw new NbdServerError(`could not run ${this.#binary}`, { command, cause: error });
      throw error;
    } finally {
      await log.close();
    }
    if (exitCode !== 0)
      throw new NbdServerError(
        `nbd-server exited with code ${String(exitCode)} before serving (127: not found)`,
        {
          command,
          exitCode,
          stderr: await this.#logSince(logOffset),
        },
      );

    let pid: number | null = null;
    try {
      return await waitFor(
        async () => {
          pid ??= await this.#readPidFile();
          if (pid === null) return undefined;
          if (processState(pid) !== 'running') {
            const holders = await listenersOn(this.port);
            throw new NbdServerError(
              `nbd-server (pid ${pid}) exited after daemonizing${holders.length > 0 ? `; port ${this.port} is held by ${holders.join(', ')}` : ''} (it logs to syslog from then on)`,
              { command, exitCode: 0, stderr: await this.#logSince(logOffset), diedAfterDaemonizing: true },
            );
          }
          if (!(await isListeningOn(pid, this.port))) return undefined;
          const { killed = 0, launcherExited = 0 } = this.#timings;
          this.#log.debug(
            {
              pid,
              launcherMs: Math.round(launcherExited - killed),
              listeningMs: Math.round(performance.now() - killed),
            },
            'new nbd-server parent listens',
          );
          return pid;
        },
        {
          timeoutMs: this.#startTimeoutMs,
          // Tight at first: the port is closed until it listens.
          intervalMs: (attempt) => (attempt < 100 ? 2 : 20),
          what: `nbd-server to listen on port ${this.port}`,
        },
      );
    } catch (error) {
      if (!(error instanceof WaitTimeoutError)) throw error;
      throw new NbdServerError(
        `nbd-server did not listen on port ${this.port} within ${this.#startTimeoutMs} ms`,
        {
          command,
          exitCode: 0,
          stderr: await this.#logSince(logOffset),
          cause: error,
        },
      );
    }
  }

  /**
   * SIGKILL (never SIGTERM: that takes every child with it), wait until it has exited, then
   * end the children still negotiating, which hold its listening socket, whether it was killed
   * here or had died before. Runs before a new parent is started, so every process of this
   * config that still listens on the port is one of those.
   */
  async #killParent(pid: number): Promise<void> {
    if (isServerProcess(pid, this.configPath)) {
      process.kill(pid, 'SIGKILL');
      // Poll tightly (intervalMs 0): this is the time the port is closed.
      await waitUntil(() => processState(pid) !== 'running', {
        timeoutMs: 10_000,
        intervalMs: 0,
        what: `nbd-server parent ${pid} to exit after SIGKILL`,
      });
    }
    await this.#killNegotiatingChildren(pid);
  }

  /**
   * A child still negotiating holds the old parent's listening socket (nbd-server 3.24 closes
   * it in a child only once the client has chosen an export). Such a child was forked with the
   * old export set: left alone, it would serve an export this hand-over retires to a client
   * that finishes its handshake later; and while it holds the socket no new parent can bind,
   * so a client that never finishes (a port scan, a stalled or hostile client) would freeze the
   * export set for good (found by test/integration/hostile-input.test.ts). It serves nobody
   * yet, so it is ended; its client sees a reset and must retry, as it must for a connect
   * refused during any hand-over.
   */
  async #killNegotiatingChildren(parent: number): Promise<void> {
    const holders = await processesListeningOn(this.port, this.configPath);
    if (holders.length === 0) return;
    const startedAt = performance.now();
    for (const child of holders)
      try {
        // Its admission hook holds the socket too; only nbd-server's own processes are clients.
        const client = isServerProcess(child, this.configPath);
        process.kill(child, 'SIGKILL');
        if (client) this.#handshakesCut++;
      } catch {
        // Gone meanwhile.
      }
    // Not an error when it lasts: the new parent's bind then fails, and the launch is retried.
    const freed = await pollUntil(
      async () => (await processesListeningOn(this.port, this.configPath)).length === 0,
      { timeoutMs: 2_000, intervalMs: 0, what: `the children of nbd-server parent ${parent} to exit` },
    );
    this.#log.info(
      { parent, children: holders.length, freed, ms: Math.round(performance.now() - startedAt) },
      'ended children of the old nbd-server parent that were still negotiating (they held its listening socket and its old export set)',
    );
  }

  /**
   * The handshake deadline nbd-server 3.24 lacks: a child still negotiating (holding the
   * listening socket) after the handshake timeout is cut, so idle connections cannot pile up
   * one process each. Checked by the watchdog; a client is seen at its first check.
   */
  async #reapStalledHandshakes(): Promise<void> {
    if (this.#pid === null) return;
    const parent = this.#pid;
    const now = performance.now();
    // Every process of this config on the port but the parent: a child still negotiating.
    const negotiating = new Set(
      (await processesListeningOn(this.port, this.configPath)).filter((pid) => pid !== parent),
    );
    for (const pid of this.#negotiatingSince.keys())
      if (!negotiating.has(pid)) this.#negotiatingSince.delete(pid);
    for (const pid of negotiating) {
      const since = this.#negotiatingSince.get(pid) ?? now;
      this.#negotiatingSince.set(pid, since);
      if (now - since < this.#handshakeTimeoutMs) continue;
      try {
        const client = isServerProcess(pid, this.configPath);
        process.kill(pid, 'SIGKILL');
        if (client) this.#handshakesCut++;
        this.#log.info({ pid }, 'cut a client that did not finish its NBD handshake in time');
      } catch {
        // Gone meanwhile.
      }
      this.#negotiatingSince.delete(pid);
    }
  }

  /** SIGTERM, a grace period, SIGKILL; waits until they have exited. */
  async #terminate(pids: number[]): Promise<void> {
    const signal = (name: NodeJS.Signals) => {
      for (const pid of pids)
        if (isServerProcess(pid, this.configPath))
          try {
            process.kill(pid, name);
          } catch {
            // Gone meanwhile.
          }
    };
    const allGone = () => pids.every((pid) => processState(pid) !== 'running');
    const what = `nbd-server processes ${pids.join(', ')} to exit`;
    signal('SIGTERM');
    if (await pollUntil(allGone, { timeoutMs: CHILD_GRACE_MS, intervalMs: 20, what })) return;
    signal('SIGKILL');
    if (!(await pollUntil(allGone, { timeoutMs: 10_000, intervalMs: 20, what })))
      this.#log.warn({ pids }, 'nbd-server client processes outlived SIGKILL');
  }

  /** The watchdog: restarts a parent that died, and retries a failed start with backoff. */
  #watch(): void {
    if (this.#stopped || this.#scheduler.busy) return;
    this.#reapStalledHandshakes().catch((error: unknown) =>
      this.#log.warn({ error: String(error) }, 'could not check for stalled handshakes'),
    );
    void this.#healStateDirectory();
    if (this.#controllerNamed === false) void this.#nameController();
    if (this.#pid !== null && !this.#alive()) {
      const pid = this.#pid;
      this.#lastError = `nbd-server parent ${pid} died (killed, or crashed: it logs to syslog)`;
      this.#log.error({ pid, exports: Object.keys(this.#record.exports) }, `${this.#lastError}; restarting`);
      this.#pid = null;
      this.#scheduler.request();
    } else if (this.#pid === null && this.#failures > 0 && Date.now() >= this.#retryAt) {
      this.#scheduler.request();
    }
  }

  #alive(): boolean {
    return this.#pid !== null && isServerProcess(this.#pid, this.configPath);
  }

  #notify(before: ReadonlyMap<string, string>, after: ReadonlyMap<string, string>): void {
    const changed = [...new Set([...before.keys(), ...after.keys()])].filter(
      (n) => before.get(n) !== after.get(n),
    );
    for (const listener of this.#listeners)
      try {
        listener(changed.sort());
      } catch (error) {
        this.#log.error({ err: error }, 'onApplied listener failed');
      }
  }

  /** The parent to adopt: the pid file's, else any listening nbd-server of our config. */
  async #findRunningParent(): Promise<number | null> {
    const fromFile = await this.#readPidFile();
    if (
      fromFile !== null &&
      isServerProcess(fromFile, this.configPath) &&
      (await isListeningOn(fromFile, this.port))
    )
      return fromFile;
    for (const candidate of await listServerProcesses(this.configPath))
      if (await isListeningOn(candidate.pid, this.port)) {
        this.#log.warn(
          { pid: candidate.pid, pidFile: fromFile },
          'found our nbd-server without a valid pid file',
        );
        // A deleted state directory loses the pid file: adopting (or stopping) must still work.
        await mkdir(this.dir, { recursive: true });
        await writeFileAtomic(this.pidPath, `${candidate.pid}\n`).catch((error: unknown) =>
          this.#log.warn({ err: error }, 'could not rewrite the pid file'),
        );
        return candidate.pid;
      }
    return null;
  }

  async #readPidFile(): Promise<number | null> {
    return (await readPidFile(this.pidPath)) ?? null;
  }

  async #pathsInUse(): Promise<Set<string>> {
    return new Set((await listServerProcesses(this.configPath)).flatMap((p) => p.paths));
  }

  /**
   * The directories and the base config a parent needs. Run before every start and hand-over,
   * so that a state directory deleted while running is rebuilt instead of every later start
   * failing on a missing config file.
   */
  async #ensureStateFiles(): Promise<void> {
    await mkdir(this.dir, { recursive: true });
    await this.#confDir.ensure();
    await this.#writeBaseConfig();
    await this.#nameController();
  }

  /**
   * Names this controller for the admission hook. A state directory that is read-only must
   * not stop adoption or hand-overs: until the name is written the hook treats the probe as
   * any client (restricted exports then fail their probe, which status reports), and the
   * watchdog tries again.
   */
  async #nameController(): Promise<void> {
    try {
      await this.#confDir.nameController();
      this.#controllerNamed = true;
    } catch (error) {
      if (this.#controllerNamed !== false)
        this.#log.warn({ err: error }, 'cannot name the controller for the admission hook; will retry');
      this.#controllerNamed = false;
    }
  }

  /**
   * The watchdog's check of the state directory: when the base config has gone (the directory
   * was deleted) it is rebuilt with the loaded record and pid file this instance still knows.
   * The running parent keeps serving; each resource's next reconcile writes its conf.d file again.
   */
  async #healStateDirectory(): Promise<void> {
    if (this.#healing) return;
    this.#healing = true;
    try {
      if ((await stat(this.configPath).catch(() => undefined)) !== undefined) return;
      this.#log.warn({ dir: this.dir }, 'the state directory lost its files; rebuilding them');
      await this.#exclusive(async () => {
        await this.#ensureStateFiles();
        // What runs is still known here: write it down again, so a restarted controller adopts it.
        await writeLoadedRecord(this.loadedPath, this.#record);
        if (this.#pid !== null) await writeFileAtomic(this.pidPath, `${this.#pid}\n`);
      });
    } catch (error) {
      this.#lastError = `could not rebuild the state directory: ${error instanceof Error ? error.message : String(error)}`;
      this.#log.error({ dir: this.dir, err: error }, 'could not rebuild the state directory');
    } finally {
      this.#healing = false;
    }
  }

  async #writeBaseConfig(): Promise<void> {
    const current = await readFile(this.configPath, 'utf8').catch(() => undefined);
    if (current !== this.#baseConfig)
      await writeFileAtomic(this.configPath, this.#baseConfig, { mode: 0o644 });
  }

  async #readVersion(): Promise<string | null> {
    const result = await runCommand(this.#binary, ['-V']);
    if (result.spawnError !== undefined) return null;
    if (result.timedOut !== undefined)
      this.#log.warn({ binary: this.#binary, timedOut: result.timedOut }, 'nbd-server -V did not answer');
    return /version\s+([0-9][0-9.]*)/.exec(`${result.stdout}\n${result.stderr}`)?.[1] ?? null;
  }

  async #logSince(offset: number): Promise<string> {
    const text = await readFile(this.logPath, 'utf8').catch(() => '');
    return text.slice(offset).split('\n').slice(-20).join('\n');
  }

  async #exclusive<T>(fn: () => Promise<T>): Promise<T> {
    return this.#lock.run(fn);
  }
}

function sameExports(
  loaded: Record<string, LoadedExport>,
  configured: ReadonlyMap<string, ConfiguredExport>,
): boolean {
  const names = Object.keys(loaded);
  return (
    names.length === configured.size &&
    names.every((n) => configured.get(n)?.fingerprint === loaded[n]?.fingerprint)
  );
}

/** Every path a record says was served, as retired entries (its parent's configuration is unknown now). */
function mergedRetired(record: LoadedRecord): Record<string, string[]> {
  const retired: Record<string, string[]> = { ...record.retired };
  for (const [name, e] of Object.entries(record.exports))
    retired[name] = [...new Set([...(retired[name] ?? []), e.path])].sort();
  return retired;
}

function hashOf(text: string): string {
  return createHash('sha256').update(text).digest('hex').slice(0, 16);
}
