/**
 * Every qemu-storage-daemon of a node: the shared one, and one per export with client rules.
 *
 * QEMU 7.2's NBD server is one per daemon, and it can neither filter clients by address nor
 * count them per export. So an export whose spec names allowedClients or maxConnections gets
 * a daemon of its own on a port of its own (from a configured range), and the node's firewall
 * enforces its rules on that port (src/node/firewall/). Every other export stays on the shared
 * daemon, which limits no one per export.
 *
 * A port is assigned before its daemon starts, and recorded in
 * `<stateDir>/qemu-storage-daemon-dedicated/<port>/assignment.json` with the export's rules:
 * a restarted controller applies the rules of every assignment before any daemon can listen,
 * then adopts the daemons (each keeps its clients, as the shared one does). A released
 * port loses its rules only after its daemon has quit, so no port is ever open without them.
 */
import { mkdir, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import type { ExportConfig } from '../../api/export-config.js';
import { writeFileAtomic } from '../../shared/atomic-file.js';
import { readFileIfPresent } from '../../shared/read-file-if-present.js';
import { SerialLock } from '../../shared/serial-lock.js';
import type { PortClientRule } from '../firewall/client-rules.js';
import { readTcpSockets, TCP_LISTEN } from '../process/proc-net-tcp.js';
import { DaemonRetiredError } from './errors.js';
import { QemuStorageDaemon, type QemuStorageDaemonOptions } from './qemu-storage-daemon.js';

/** Enforces client rules per TCP port (src/node/firewall/host-firewall.ts); every call replaces the whole set. */
export interface ClientFirewall {
  apply(rules: readonly PortClientRule[]): Promise<void>;
}

export interface PortRange {
  first: number;
  last: number;
}

/** `run --dedicated-ports` by default: beside nbd-server's 10809 and the shared daemon's 10810. */
export const DEFAULT_DEDICATED_PORTS: PortRange = { first: 10900, last: 10999 };

export interface QemuExportFleetOptions extends Omit<QemuStorageDaemonOptions, 'dir'> {
  /** Ports for daemons of one export. */
  dedicatedPorts: PortRange;
  /** Absent: exports with client rules cannot be served (the planner refuses them first). */
  firewall: ClientFirewall | undefined;
}

/** What one export's daemon is, and the rules its port is under. */
interface Assignment {
  exportName: string;
  port: number;
  allowedClients: string[];
  maxConnections: number;
}

interface Dedicated {
  assignment: Assignment;
  daemon: QemuStorageDaemon;
}

export interface FleetExport {
  fingerprint: string;
  config: ExportConfig;
  /** The port of the export's own daemon; absent on the shared one. */
  port?: number;
}

const ASSIGNMENT_FILE = 'assignment.json';

export class QemuExportFleet {
  /** The daemon of every export without client rules. */
  readonly shared: QemuStorageDaemon;
  readonly #options: QemuExportFleetOptions;
  readonly #root: string;
  readonly #logger: Logger;
  /** By export name. */
  readonly #dedicated = new Map<string, Dedicated>();
  /** Serialises assignments and firewall applies (the daemons serialise their own work). */
  readonly #lock = new SerialLock();

  constructor(options: QemuExportFleetOptions) {
    const { first, last } = options.dedicatedPorts;
    if (!Number.isInteger(first) || !Number.isInteger(last) || first < 1 || last > 65535 || first > last)
      throw new TypeError(`dedicated ports must be a range within 1-65535, got ${first}-${last}`);
    this.#options = options;
    this.shared = new QemuStorageDaemon(options);
    this.#root = join(options.stateDir, 'qemu-storage-daemon-dedicated');
    this.#logger = options.logger.child({ server: 'qemu-storage-daemon' });
  }

  /**
   * Loads the assignments, puts their rules in force, then adopts (or starts) each export's
   * daemon and the shared one. Rules that cannot be put in force stop the daemons they guard
   * (cutting their clients: who may connect is no longer known), and a daemon whose
   * assignment cannot be read is stopped and its port released; the resources add their
   * exports again. A daemon that cannot start is logged and started again by the first call
   * that needs it; only the shared daemon's failure is thrown.
   */
  async start(): Promise<void> {
    const inForce = await this.#lock.run(async () => {
      const { assignments, unreadable } = await this.#readAssignments();
      for (const port of unreadable) await this.#discard(port);
      for (const assignment of assignments)
        this.#dedicated.set(assignment.exportName, { assignment, daemon: this.#daemonFor(assignment.port) });
      if (this.#dedicated.size === 0) return true;
      return this.#applyRules().then(
        () => true,
        async (error: unknown) => {
          this.#logger.error(
            { err: error },
            "cannot put the client rules of exports' own ports in force; stopping their daemons",
          );
          for (const { daemon } of this.#dedicated.values())
            await daemon
              .stop()
              .catch((stopError: unknown) => this.#logger.error({ err: stopError }, 'could not stop'));
          return false;
        },
      );
    });
    if (inForce)
      for (const { assignment, daemon } of this.#dedicated.values())
        await daemon
          .start()
          .catch((error: unknown) =>
            this.#logger.error(
              { export: assignment.exportName, port: assignment.port, err: error },
              "could not start or adopt an export's own qemu-storage-daemon; will retry on demand",
            ),
          );
    await this.shared.start();
  }

  /** What every daemon serves now, by export name. A daemon that cannot answer serves nothing. */
  async exports(): Promise<Map<string, FleetExport>> {
    const served = new Map<string, FleetExport>(await this.shared.exports());
    for (const [name, { assignment, daemon }] of this.#dedicated) {
      const own = await daemon.exports().catch((error: unknown) => {
        if (error instanceof DaemonRetiredError) return undefined; // released meanwhile
        this.#logger.warn(
          { export: name, port: assignment.port, err: error },
          "an export's own qemu-storage-daemon does not answer",
        );
        return undefined;
      });
      const entry = own?.get(name);
      if (entry) served.set(name, { ...entry, port: assignment.port });
    }
    return served;
  }

  /** Export names that have a daemon of their own, served or not (for the orphan sweep). */
  assigned(): ReadonlySet<string> {
    return new Set(this.#dedicated.keys());
  }

  /**
   * Serves the config on the shared daemon, or on the export's own behind its rules. The rules
   * are in force before the daemon listens. Moving an export between the two needs its removal first.
   */
  async addExport(config: ExportConfig): Promise<void> {
    const name = config.exportName;
    if (config.dedicatedDaemon !== true) {
      if (this.#dedicated.has(name))
        throw new Error(`export "${name}" is served by a daemon of its own; remove it first`);
      return this.shared.addExport(config);
    }
    if ((await this.shared.exports()).has(name))
      throw new Error(`export "${name}" is served by the shared daemon; remove it first`);
    const { daemon } = await this.#lock.run(() => this.#assign(config));
    await daemon.addExport(config);
  }

  /** New client rules for a served export: in force for the next connection; connected clients stay. */
  async updateAccess(config: ExportConfig): Promise<void> {
    const dedicated = this.#dedicated.get(config.exportName);
    if (config.dedicatedDaemon !== true || !dedicated)
      throw new Error(`export "${config.exportName}" has no daemon of its own whose rules could change`);
    await this.#lock.run(() => this.#assign(config));
    await dedicated.daemon.updateAccess(config);
  }

  /**
   * Stops serving the export (ExportBusyError without force while a client is connected). An
   * export's own daemon then quits, and its port's rules go after it.
   */
  async removeExport(exportName: string, options: { force: boolean }): Promise<void> {
    const dedicated = this.#dedicated.get(exportName);
    if (!dedicated) return this.shared.removeExport(exportName, options);
    // Quitting its daemon is what a forced removal is (and needs no daemon started first, nor
    // its rules); only a gentle one asks the daemon whether a client is connected.
    if (!options.force) await dedicated.daemon.removeExport(exportName, options);
    // Retired, not just stopped: a look at what it serves, already on its way, would start it again.
    await dedicated.daemon.retire();
    await this.#lock.run(async () => {
      if (this.#dedicated.get(exportName) !== dedicated) return; // assigned anew meanwhile
      this.#dedicated.delete(exportName);
      await rm(this.#dirOf(dedicated.assignment.port), { recursive: true, force: true });
      // Nothing listens on the port any more: rules left on it refuse, never admit, and the
      // next apply that works takes them away. A broken firewall must not keep an export from
      // being deleted.
      await this.#applyRules().catch((error: unknown) =>
        this.#logger.warn(
          { export: exportName, port: dedicated.assignment.port, err: error },
          'could not lift the rules of a released port; the next change of rules will',
        ),
      );
      this.#logger.info(
        { export: exportName, port: dedicated.assignment.port },
        "stopped the export's own qemu-storage-daemon and released its port",
      );
    });
  }

  /**
   * `running`: the shared daemon (an export's own is started again by the next look at it).
   * `starts`: daemons spawned by every instance: a new one serves nothing until exports are added again.
   */
  status(): { running: boolean; starts: number; pid?: number } {
    const shared = this.shared.status();
    let starts = shared.starts;
    for (const { daemon } of this.#dedicated.values()) starts += daemon.status().starts;
    return { running: shared.running, starts, ...(shared.pid === undefined ? {} : { pid: shared.pid }) };
  }

  /** Daemons of one export: how many are assigned, and how many run with QMP connected (for /metrics). */
  dedicatedDaemons(): { assigned: number; running: number } {
    let running = 0;
    for (const { daemon } of this.#dedicated.values()) if (daemon.status().running) running++;
    return { assigned: this.#dedicated.size, running };
  }

  /** Image files held by exports a daemon serves that its exports.json lost (see QemuStorageDaemon). */
  unclaimedPaths(): ReadonlySet<string> {
    const paths = new Set(this.shared.unclaimedPaths());
    for (const { daemon } of this.#dedicated.values())
      for (const path of daemon.unclaimedPaths()) paths.add(path);
    return paths;
  }

  /** Per served export, the highest guest offset written through it (for /metrics). */
  async highestWrittenOffsets(): Promise<Map<string, number>> {
    const offsets = await this.shared.highestWrittenOffsets();
    for (const { daemon } of this.#dedicated.values())
      for (const [name, offset] of await daemon
        .highestWrittenOffsets()
        .catch(() => new Map<string, number>()))
        offsets.set(name, offset);
    return offsets;
  }

  /** Leaves every daemon serving (normal controller shutdown). */
  async detach(): Promise<void> {
    await Promise.all([this.shared.detach(), ...[...this.#dedicated.values()].map((d) => d.daemon.detach())]);
  }

  /**
   * Quits every daemon, cutting every client, then lifts the rules of their ports (for tests
   * and `stop-servers`). Assignments stay recorded: a later start serves them again.
   */
  async stop(): Promise<void> {
    await this.#lock.run(async () => {
      for (const assignment of (await this.#readAssignments()).assignments)
        if (!this.#dedicated.has(assignment.exportName))
          this.#dedicated.set(assignment.exportName, {
            assignment,
            daemon: this.#daemonFor(assignment.port),
          });
    });
    for (const { daemon } of this.#dedicated.values()) await daemon.stop();
    await this.shared.stop();
    await this.#options.firewall?.apply([]);
  }

  /** Creates or updates the export's assignment and puts its rules in force. Under the lock. */
  async #assign(config: ExportConfig): Promise<Dedicated> {
    const firewall = this.#options.firewall;
    if (!firewall)
      throw new Error(
        `export "${config.exportName}" has client rules, and this node enforces them with no firewall`,
      );
    const existing = this.#dedicated.get(config.exportName);
    const port = existing?.assignment.port ?? (await this.#freePort());
    const assignment: Assignment = {
      exportName: config.exportName,
      port,
      allowedClients: [...config.allowedClients],
      maxConnections: config.maxConnections,
    };
    if (existing && sameRules(existing.assignment, assignment)) return existing;
    const dedicated = existing ?? { assignment, daemon: this.#daemonFor(port) };
    dedicated.assignment = assignment;
    await mkdir(this.#dirOf(port), { recursive: true, mode: 0o700 });
    // Recorded first: a controller killed after the daemon started knows its port and rules.
    await writeFileAtomic(join(this.#dirOf(port), ASSIGNMENT_FILE), `${JSON.stringify(assignment)}\n`, {
      mode: 0o600,
    });
    this.#dedicated.set(config.exportName, dedicated);
    await this.#applyRules();
    this.#logger.info(
      {
        export: config.exportName,
        port,
        allowedClients: assignment.allowedClients,
        maxConnections: assignment.maxConnections,
      },
      existing
        ? "changed the client rules of an export's own port"
        : 'assigned an export a daemon and port of its own',
    );
    return dedicated;
  }

  async #applyRules(): Promise<void> {
    const rules: PortClientRule[] = [...this.#dedicated.values()].map(({ assignment }) => ({
      port: assignment.port,
      allowedClients: assignment.allowedClients,
      maxConnections: assignment.maxConnections,
    }));
    if (!this.#options.firewall) {
      if (rules.length > 0)
        throw new Error('exports with client rules are assigned, but this node has no firewall');
      return;
    }
    await this.#options.firewall.apply(rules);
  }

  /** The lowest port of the range that no assignment holds and nothing listens on. */
  async #freePort(): Promise<number> {
    const taken = new Set([...this.#dedicated.values()].map((d) => d.assignment.port));
    for (const name of await readdir(this.#root).catch(() => [])) taken.add(Number(name));
    for (const row of await readTcpSockets()) if (row.state === TCP_LISTEN) taken.add(row.local.port);
    const { first, last } = this.#options.dedicatedPorts;
    for (let port = first; port <= last; port++) if (!taken.has(port)) return port;
    throw new Error(`no free port left for an export's own qemu-storage-daemon in ${first}-${last}`);
  }

  /** Every recorded assignment, and the ports whose directory holds none that can be read. */
  async #readAssignments(): Promise<{ assignments: Assignment[]; unreadable: number[] }> {
    const assignments: Assignment[] = [];
    const unreadable: number[] = [];
    for (const name of await readdir(this.#root).catch(() => [])) {
      if (!/^[0-9]+$/.test(name)) continue;
      const text = await readFileIfPresent(join(this.#root, name, ASSIGNMENT_FILE)).catch(() => undefined);
      const assignment = text === undefined ? undefined : parseAssignment(text, Number(name));
      if (assignment) assignments.push(assignment);
      else unreadable.push(Number(name));
    }
    return { assignments, unreadable };
  }

  /** A port whose assignment is lost: its daemon (if any) quits, and the port is free again. */
  async #discard(port: number): Promise<void> {
    this.#logger.error(
      { port, dir: this.#dirOf(port) },
      "an export's own port has no readable assignment; stopping its daemon and releasing the port",
    );
    await this.#daemonFor(port)
      .stop()
      .catch((error: unknown) => this.#logger.error({ port, err: error }, 'could not stop its daemon'));
    await rm(this.#dirOf(port), { recursive: true, force: true });
  }

  /**
   * Every spawn of an export's own daemon (its first start, or again after it died or was
   * stopped) puts the rules of every assignment in force first: the kernel may have lost them
   * (a reboot, `stop-servers`, an operator) while the assignment stayed.
   */
  #daemonFor(port: number): QemuStorageDaemon {
    return new QemuStorageDaemon({
      ...this.#options,
      dir: this.#dirOf(port),
      port,
      beforeSpawn: () => this.#lock.run(() => this.#applyRules()),
    });
  }

  #dirOf(port: number): string {
    return join(this.#root, String(port));
  }
}

function sameRules(a: Assignment, b: Assignment): boolean {
  return (
    a.port === b.port &&
    a.maxConnections === b.maxConnections &&
    JSON.stringify([...a.allowedClients].sort()) === JSON.stringify([...b.allowedClients].sort())
  );
}

function parseAssignment(text: string, port: number): Assignment | undefined {
  try {
    const value = JSON.parse(text) as Partial<Assignment>;
    if (
      typeof value.exportName !== 'string' ||
      value.port !== port ||
      !Array.isArray(value.allowedClients) ||
      !value.allowedClients.every((c) => typeof c === 'string') ||
      typeof value.maxConnections !== 'number'
    )
      return undefined;
    return {
      exportName: value.exportName,
      port,
      allowedClients: value.allowedClients,
      maxConnections: value.maxConnections,
    };
  } catch {
    return undefined;
  }
}
