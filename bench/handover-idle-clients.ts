/**
 * The nbd-server hand-over under idle clients: N TCP connections that never negotiate are held
 * open to the port while hand-over restarts run; a prober makes a real NBD handshake
 * (NBD_OPT_GO) every 10 ms and measures how long new clients are refused. Before the
 * supervisor ended children still negotiating, one idle client kept the port from the new
 * parent for 25–30 s. Prints figures and writes JSON; asserts nothing. Loopback only, bounded.
 *
 *   bench/run.sh handover-idle-clients [IDLE=500] [HANDOVERS=10]
 */
import { once } from 'node:events';
import { mkdtemp, rm, truncate, writeFile } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { format } from 'prettier';
import { NbdServerSupervisor } from '../src/node/nbd-server/nbd-server-supervisor.js';
import { probeExport } from '../src/node/nbd-probe.js';
import { rawExportConfig } from '../test/support/export-config.js';
import { freePorts } from '../test/support/repo.js';

const idleArgument = Number(process.argv[2] ?? 500);
const handovers = Number(process.argv[3] ?? 10);
const results = [];
// Side by side in one run: the same hand-overs with no idle client, then with them.
for (const idleCount of [0, idleArgument]) results.push(await measure(idleCount));
await writeFile(
  join(process.cwd(), 'bench', 'handover-idle-clients.json'),
  // Formatted as the repository formats JSON: the latest run is committed beside the bench.
  await format(JSON.stringify({ handovers, results }), { parser: 'json' }),
);

async function measure(idleCount: number) {
  const root = await mkdtemp(join(tmpdir(), 'nbdx-bench-handover-'));
  const [port] = (await freePorts(1)) as [number];
  const server = new NbdServerSupervisor({
    stateDir: join(root, 'state'),
    listenAddress: '127.0.0.1',
    port,
    logger: pino({ level: 'warn' }),
  });
  const idle: Socket[] = [];

  async function sparse(name: string): Promise<string> {
    const path = join(root, name);
    await writeFile(path, '');
    await truncate(path, 1024 * 1024);
    return path;
  }

  async function applied(names: string[]): Promise<void> {
    server.requestApply();
    for (let i = 0; i < 600; i++) {
      if (JSON.stringify([...server.loaded().keys()].sort()) === JSON.stringify([...names].sort())) break;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    await server.settled();
  }

  try {
    await server.writeExport(rawExportConfig('probe', await sparse('probe.raw')));
    await server.start();
    for (let i = 0; i < idleCount; i++) {
      const socket = connect({ host: '127.0.0.1', port });
      socket.on('error', () => undefined);
      await once(socket, 'connect');
      idle.push(socket);
    }

    const refusals: number[] = [];
    let attempts = 0;
    let refused = 0;
    let probing = true;
    const prober = (async () => {
      let since: number | undefined;
      while (probing) {
        const result = await probeExport({ host: '127.0.0.1', port, exportName: 'probe' });
        attempts++;
        const now = performance.now();
        if (!result.ok) refused++;
        if (!result.ok && since === undefined) since = now;
        if (result.ok && since !== undefined) {
          refusals.push(now - since);
          since = undefined;
        }
        // A client every 10 ms: the window is measured to 10 ms, and the prober is no flood itself.
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
    })();
    const names = ['probe'];
    const started = performance.now();
    for (let i = 0; i < handovers; i++) {
      const name = `added-${i}`;
      await server.writeExport(rawExportConfig(name, await sparse(`${name}.raw`)));
      names.push(name);
      await applied(names);
    }
    const seconds = (performance.now() - started) / 1000;
    probing = false;
    await prober;

    const sorted = [...refusals].sort((a, b) => a - b);
    const figures = {
      idleClients: idleCount,
      handovers,
      seconds: Number(seconds.toFixed(1)),
      probes: attempts,
      refusedProbes: refused,
      refusalWindowsMs: sorted.map((ms) => Math.round(ms)),
      longestRefusalMs: Math.round(sorted.at(-1) ?? 0),
      medianRefusalMs: Math.round(sorted[Math.floor(sorted.length / 2)] ?? 0),
      negotiatingClientsCut: server.status().handshakesCut,
    };
    console.log(
      `${idleCount} idle clients, ${handovers} hand-overs in ${figures.seconds} s: ` +
        `${refused} of ${attempts} probes refused, longest refusal ${figures.longestRefusalMs} ms ` +
        `(median ${figures.medianRefusalMs} ms); ${figures.negotiatingClientsCut} negotiating clients cut`,
    );
    return figures;
  } finally {
    for (const socket of idle) socket.destroy();
    await server.stop({ disconnectClients: true });
    await rm(root, { recursive: true, force: true });
  }
}
