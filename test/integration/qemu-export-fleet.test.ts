/**
 * QemuExportFleet with real qemu-storage-daemons and a recording firewall (the boundary; the
 * real one is tested in host-firewall.test.ts and, wired, in qemu-client-rules.test.ts): an
 * export with client rules gets a daemon and port of its own, the port's rules are in force
 * before the daemon listens and lifted only after it quit, and a restarted fleet puts the
 * recorded rules back before it adopts the daemons.
 */
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { pino } from 'pino';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import type { ExportConfig } from '../../src/api/export-config.js';
import type { PortClientRule } from '../../src/node/firewall/client-rules.js';
import { readTcpSockets, TCP_LISTEN } from '../../src/node/process/proc-net-tcp.js';
import {
  QemuExportFleet,
  type ClientFirewall,
} from '../../src/node/qemu-storage-daemon/qemu-export-fleet.js';
import { isServed } from '../support/nbd.js';
import { freePortRange, freePorts } from '../support/repo.js';

const logger = pino({ level: 'silent' });

/** Records each rule set, with the ports that were listening when it was applied. */
class RecordingFirewall implements ClientFirewall {
  readonly applied: { ports: number[]; listening: number[] }[] = [];
  failing = false;

  async apply(rules: readonly PortClientRule[]): Promise<void> {
    if (this.failing) throw new Error('iptables: not permitted');
    const listening = (await readTcpSockets()).filter((s) => s.state === TCP_LISTEN).map((s) => s.local.port);
    this.applied.push({ ports: rules.map((r) => r.port).sort((a, b) => a - b), listening });
  }

  get current(): number[] {
    return this.applied.at(-1)?.ports ?? [];
  }
}

let dir: string;
let image: string;
/** Each test's own, so that a daemon a failed test leaves behind cannot fail the next. */
let sharedPort: number;
let dedicatedPorts: { first: number; last: number };

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'nbdx-fleet-'));
  image = join(dir, 'disk.qcow2');
  await execa('qemu-img', ['create', '-q', '-f', 'qcow2', image, '4M']);
  dedicatedPorts = await freePortRange(3);
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

function config(exportName: string, overrides: Partial<ExportConfig> = {}): ExportConfig {
  return {
    exportName,
    server: 'qemu-storage-daemon',
    path: image,
    format: 'qcow2',
    blockDevice: false,
    readOnly: true,
    maxConnections: 2,
    allowedClients: ['127.0.0.0/8'],
    dedicatedDaemon: true,
    ...overrides,
  };
}

/** Every fleet a test made: stopped after it, whatever happened. */
const started: QemuExportFleet[] = [];

function fleetOf(stateDir: string, firewall: ClientFirewall | undefined): QemuExportFleet {
  const fleet = new QemuExportFleet({
    stateDir,
    listenAddress: '127.0.0.1',
    port: sharedPort,
    dedicatedPorts,
    firewall,
    logger,
  });
  started.push(fleet);
  return fleet;
}

/** A fleet of its own state directory, started, serving `own` on a daemon of its own. */
async function servingOwn(name: string, firewall = new RecordingFirewall()) {
  const stateDir = join(dir, name);
  const fleet = fleetOf(stateDir, firewall);
  await fleet.start();
  await fleet.addExport(config('own'));
  return { stateDir, fleet, firewall };
}

const uri = (port: number, name: string) => `nbd://127.0.0.1:${port}/${name}`;

describe('QemuExportFleet', () => {
  beforeEach(async () => {
    [sharedPort] = (await freePorts(1)) as [number];
  });
  afterEach(async () => {
    // The newest first: it holds the QMP sockets an older, detached instance would wait for.
    for (const fleet of started.splice(0).reverse()) await fleet.stop().catch(() => undefined);
  });

  it('rules before the daemon listens, lifted after it quit; a restart puts them back before adopting', async () => {
    const { stateDir, fleet, firewall } = await servingOwn('order');
    const { dedicatedDaemon: _, ...open } = config('open', { allowedClients: [] });
    await fleet.addExport(open);
    const served = await fleet.exports();
    const port = served.get('own')?.port;
    expect(port).toBe(dedicatedPorts.first);
    expect(served.get('open')?.port).toBeUndefined();
    expect(firewall.applied[0]?.ports).toEqual([dedicatedPorts.first]);
    expect(firewall.applied[0]?.listening).not.toContain(port);
    expect(await isServed(uri(dedicatedPorts.first, 'own'))).toBe(true);
    expect(await isServed(uri(sharedPort, 'open'))).toBe(true);
    expect(await isServed(uri(sharedPort, 'own'))).toBe(false);

    // A new instance (a restarted controller): the rules first, then the running daemon adopted.
    await fleet.detach();
    const restartedFirewall = new RecordingFirewall();
    const restarted = fleetOf(stateDir, restartedFirewall);
    await restarted.start();
    expect(restartedFirewall.applied.map((a) => a.ports)).toEqual([[dedicatedPorts.first]]);
    expect(restartedFirewall.applied[0]?.listening).toContain(dedicatedPorts.first);
    expect((await restarted.exports()).get('own')).toMatchObject({ port: dedicatedPorts.first });
    expect(restarted.status().starts).toBe(0); // adopted, not started again

    await restarted.removeExport('own', { force: false });
    expect(restartedFirewall.current).toEqual([]);
    expect(restartedFirewall.applied.at(-1)?.listening).not.toContain(dedicatedPorts.first);
    expect(restarted.assigned().size).toBe(0);
    await restarted.stop();
  });

  it('looks at what is served, racing a removal, never start the removed daemon again', async () => {
    const { stateDir, fleet } = await servingOwn('race');
    const port = (await fleet.exports()).get('own')?.port ?? NaN;
    // Each look reaches the export's daemon after the removal has queued its stop there.
    const looks = Array.from({ length: 4 }, () => fleet.exports());
    await fleet.removeExport('own', { force: true });
    for (const look of await Promise.all(looks)) expect(look.has('own')).toBe(false);
    const listening = (await readTcpSockets()).filter((s) => s.state === TCP_LISTEN).map((s) => s.local.port);
    expect(listening).not.toContain(port);
    expect(await readdir(join(stateDir, 'qemu-storage-daemon-dedicated'))).toEqual([]);
  });

  it('a change of rules alone keeps the port, the daemon and its clients', async () => {
    const { fleet, firewall } = await servingOwn('access');
    const before = await fleet.exports();
    const starts = fleet.status().starts;
    const narrowed = config('own', { allowedClients: ['127.0.0.1/32'], maxConnections: 1 });
    await fleet.updateAccess(narrowed);
    const after = await fleet.exports();
    expect(after.get('own')).toMatchObject({ port: before.get('own')?.port, config: narrowed });
    expect(fleet.status().starts).toBe(starts);
    expect(firewall.applied.at(-1)?.ports).toEqual([before.get('own')?.port]);
    // Anything else is not a change of rules.
    await expect(fleet.updateAccess({ ...narrowed, readOnly: false })).rejects.toThrow(
      /more than its client rules/,
    );
    await fleet.stop();
    expect(firewall.current).toEqual([]);
  });

  it('fails closed: without rules in force at start, the daemons they guard are stopped', async () => {
    const { stateDir, fleet } = await servingOwn('closed');
    await fleet.detach();

    const broken = new RecordingFirewall();
    broken.failing = true;
    const restarted = fleetOf(stateDir, broken);
    await restarted.start();
    expect(await isServed(uri(dedicatedPorts.first, 'own'))).toBe(false);
    // Looking at what is served does not start it again either: no daemon listens without its rules.
    expect((await restarted.exports()).has('own')).toBe(false);
    expect(await isServed(uri(dedicatedPorts.first, 'own'))).toBe(false);
    await expect(restarted.addExport(config('own'))).rejects.toThrow(/not permitted/);
    // A forced removal (the resource deleted) needs neither the daemon nor its rules.
    await restarted.removeExport('own', { force: true });
    expect(restarted.assigned().size).toBe(0);
    await restarted.stop().catch(() => undefined);
  });

  it('an assignment that cannot be read stops its daemon and frees the port; no firewall refuses rules', async () => {
    const { stateDir, fleet } = await servingOwn('unreadable');
    await fleet.detach();
    await writeFile(
      join(stateDir, 'qemu-storage-daemon-dedicated', String(dedicatedPorts.first), 'assignment.json'),
      '{',
    );

    const restarted = fleetOf(stateDir, new RecordingFirewall());
    await restarted.start();
    expect(restarted.assigned().size).toBe(0);
    expect(await isServed(uri(dedicatedPorts.first, 'own'))).toBe(false);
    await restarted.stop();

    const without = fleetOf(join(dir, 'none'), undefined);
    await without.start();
    await expect(without.addExport(config('own'))).rejects.toThrow(/no firewall/);
    await without.stop();
  });
});
