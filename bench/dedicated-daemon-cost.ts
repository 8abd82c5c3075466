/**
 * What a QCOW2 export with client rules costs: it gets a qemu-storage-daemon of its own on a
 * port of its own, behind the host firewall's rules (src/node/qemu-storage-daemon/
 * qemu-export-fleet.ts). Side by side in one run, EXPORTS exports on the shared daemon and
 * EXPORTS on daemons of their own (allowedClients 127.0.0.0/8, maxConnections 4), all through
 * QemuExportFleet with the real HostFirewall:
 *   - adding an export (for its own daemon: assigning the port, the rules, starting the daemon);
 *   - the resident memory of the daemons (VmRSS), in all and per export;
 *   - full NBD handshakes, interleaved, median;
 *   - reading a whole export with nbdcopy (one connection), interleaved, median MiB/s.
 * Prints the figures and writes JSON; asserts nothing. Loopback only, bounded. Needs root
 * (iptables); the rules are removed at the end.
 *
 *   bench/run.sh dedicated-daemon-cost [EXPORTS=8] [SIZE_MIB=256] [ROUNDS=5]
 */
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { pino } from 'pino';
import { format } from 'prettier';
import type { ExportConfig } from '../src/api/export-config.js';
import { HostFirewall } from '../src/node/firewall/host-firewall.js';
import { probeExport } from '../src/node/nbd-probe.js';
import { QemuExportFleet } from '../src/node/qemu-storage-daemon/qemu-export-fleet.js';
import { freePortRange, freePorts } from '../test/support/repo.js';

const exportsPerKind = Number(process.argv[2] ?? 8);
const sizeMiB = Number(process.argv[3] ?? 256);
const rounds = Number(process.argv[4] ?? 5);
const handshakes = 100;

const root = await mkdtemp(join(tmpdir(), 'nbdx-bench-dedicated-'));
const logger = pino({ level: 'warn' });
const stateDir = join(root, 'state');
const [sharedPort] = (await freePorts(1)) as [number];
const firewall = new HostFirewall({ stateDir, exemptGid: 64209, logger });
const fleet = new QemuExportFleet({
  stateDir,
  listenAddress: '127.0.0.1',
  port: sharedPort,
  dedicatedPorts: await freePortRange(exportsPerKind),
  firewall,
  logger,
});

type Kind = 'shared' | 'own';
const kinds: Kind[] = ['shared', 'own'];
try {
  await mkdir(join(root, 'images'));
  await fleet.start();
  const configs: Record<Kind, ExportConfig[]> = { shared: [], own: [] };
  const addMs: Record<Kind, number[]> = { shared: [], own: [] };
  for (let i = 0; i < exportsPerKind; i++)
    for (const kind of kinds) {
      const path = join(root, 'images', `${kind}-${i}.qcow2`);
      // Written all through, so that reading it moves real data (a fresh image reads as zeroes without I/O).
      await execa('qemu-img', ['create', '-q', '-f', 'qcow2', path, `${sizeMiB}M`]);
      await execa('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x5a 0 ${sizeMiB}M`, path]);
      const config: ExportConfig = {
        exportName: `${kind}-${i}`,
        server: 'qemu-storage-daemon',
        path,
        format: 'qcow2',
        blockDevice: false,
        readOnly: true,
        maxConnections: kind === 'own' ? 4 : 1,
        allowedClients: kind === 'own' ? ['127.0.0.0/8'] : [],
        ...(kind === 'own' ? { dedicatedDaemon: true as const } : {}),
      };
      const started = performance.now();
      await fleet.addExport(config);
      addMs[kind].push(performance.now() - started);
      configs[kind].push(config);
    }
  const served = await fleet.exports();
  const portOf = (config: ExportConfig) => served.get(config.exportName)?.port ?? sharedPort;

  const daemonPids = async (): Promise<Record<Kind, number[]>> => {
    const pidOf = async (file: string) => Number((await readFile(file, 'utf8')).trim());
    const dedicatedDir = join(stateDir, 'qemu-storage-daemon-dedicated');
    return {
      shared: [await pidOf(join(stateDir, 'qemu-storage-daemon', 'qemu-storage-daemon.pid'))],
      own: await Promise.all(
        configs.own.map((c) => pidOf(join(dedicatedDir, String(portOf(c)), 'qemu-storage-daemon.pid'))),
      ),
    };
  };
  const rssMiB = async (pids: number[]) => {
    let kib = 0;
    for (const pid of pids) {
      const status = await readFile(`/proc/${pid}/status`, 'utf8');
      kib += Number(/^VmRSS:\s+(\d+) kB/m.exec(status)?.[1] ?? NaN);
    }
    return kib / 1024;
  };

  const handshakeMs: Record<Kind, number[]> = { shared: [], own: [] };
  for (let i = 0; i < handshakes; i++)
    for (const kind of i % 2 === 0 ? kinds : [...kinds].reverse()) {
      const config = configs[kind][i % exportsPerKind] as ExportConfig;
      const started = performance.now();
      const result = await probeExport({
        host: '127.0.0.1',
        port: portOf(config),
        exportName: config.exportName,
      });
      if (!result.ok) throw new Error(`${config.exportName}: ${result.message}`);
      handshakeMs[kind].push(performance.now() - started);
    }

  const readMiBps: Record<Kind, number[]> = { shared: [], own: [] };
  for (let round = 0; round < rounds; round++)
    for (const kind of round % 2 === 0 ? kinds : [...kinds].reverse()) {
      const config = configs[kind][round % exportsPerKind] as ExportConfig;
      const uri = `nbd://127.0.0.1:${portOf(config)}/${config.exportName}`;
      const started = performance.now();
      await execa('nbdcopy', ['--connections=1', uri, 'null:']);
      readMiBps[kind].push(sizeMiB / ((performance.now() - started) / 1000));
    }

  // After the reads: the daemons' caches hold what a served export holds.
  const pids = await daemonPids();
  const report: Record<string, unknown> = { exportsPerKind, sizeMiB, rounds, handshakes };
  for (const kind of kinds) {
    const memory = await rssMiB(pids[kind]);
    report[kind] = {
      daemons: pids[kind].length,
      addMedianMs: round1(median(addMs[kind])),
      rssMiB: round1(memory),
      rssMiBPerExport: round1(memory / exportsPerKind),
      handshakeMedianMs: round1(median(handshakeMs[kind])),
      readMedianMiBps: Math.round(median(readMiBps[kind])),
    };
    console.log(
      `${kind === 'own' ? 'daemons of their own' : 'shared daemon       '}: ${JSON.stringify(report[kind])}`,
    );
  }
  await writeFile(
    join(process.cwd(), 'bench', 'dedicated-daemon-cost.json'),
    await format(JSON.stringify(report), { parser: 'json' }),
  );
} finally {
  await fleet.stop().catch((error: unknown) => console.error('stopping the daemons failed:', error));
  await firewall.remove();
  await rm(root, { recursive: true, force: true });
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)] ?? NaN;
}

function round1(value: number): number {
  return Math.round(value * 10) / 10;
}
