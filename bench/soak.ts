/**
 * A soak of the controller on one plain host, for a bounded time: NbdExports are created,
 * changed and deleted at a steady rate (raw on nbd-server, QCOW2 on qemu-storage-daemon)
 * while idle and hostile connections are held open against both NBD ports. Every few
 * seconds the controller's resident memory and open file descriptors are sampled; the curve
 * is printed, written as JSON, and judged: growth must level off (the last third of the run
 * may not grow beyond the middle third by more than a small margin). Loopback only.
 *
 *   bench/run.sh soak [SECONDS=120] [JSON_PATH=.cache/bench/soak.json]
 *
 * Prints figures and a verdict; exits 1 when the growth did not level off.
 */
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { dirname, join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { nbdExport, PlainHostNode } from '../test/integration/harness/plain-host-controller.js';
import { REPO_ROOT } from '../test/support/repo.js';

const seconds = Number(process.argv[2] ?? 120);
if (!Number.isFinite(seconds) || seconds < 30 || seconds > 3_600)
  throw new RangeError(`SECONDS must be between 30 and 3600, got ${process.argv[2]}`);
const jsonPath = resolve(process.argv[3] ?? join(REPO_ROOT, '.cache', 'bench', 'soak.json'));

/** One operation (create, change or delete) per this many ms. */
const OPERATION_INTERVAL_MS = 1_000;
const SAMPLE_INTERVAL_MS = 3_000;
/** Exports alive at once; the oldest is deleted when a new one would exceed it. */
const LIVE_EXPORTS = 6;
const IDLE_CONNECTIONS_PER_PORT = 8;
const HOSTILE_CONNECTIONS_PER_PORT = 8;
/** The last third may exceed the middle third's peak by this much and still count as level. */
const RSS_MARGIN = 0.1;
const FD_MARGIN = 4;

interface Sample {
  atSeconds: number;
  rssMiB: number;
  openFds: number;
  liveExports: number;
  heldConnections: number;
  operations: number;
}

const node = await PlainHostNode.create();

async function rssMiB(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  return Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? NaN) / 1024;
}

async function openFds(pid: number): Promise<number> {
  return (await readdir(`/proc/${pid}/fd`)).length;
}

/**
 * Connections held open against a port: idle ones that connect and never speak, and hostile
 * ones that send half an NBD option (a magic and nothing more) or garbage, then stall. A
 * closed one is opened again, so the servers face the same load for the whole run.
 */
class HeldConnections {
  readonly #sockets = new Set<Socket>();
  #stopped = false;

  readonly #port: number;
  readonly #idle: number;
  readonly #hostile: number;

  constructor(port: number, idle: number, hostile: number) {
    this.#port = port;
    this.#idle = idle;
    this.#hostile = hostile;
  }

  start(): void {
    for (let i = 0; i < this.#idle; i++) this.#open('idle');
    for (let i = 0; i < this.#hostile; i++) this.#open(i % 2 === 0 ? 'half-option' : 'garbage');
  }

  get count(): number {
    return this.#sockets.size;
  }

  stop(): void {
    this.#stopped = true;
    for (const socket of this.#sockets) socket.destroy();
    this.#sockets.clear();
  }

  #open(kind: 'idle' | 'half-option' | 'garbage'): void {
    if (this.#stopped) return;
    const socket = connect({ host: '127.0.0.1', port: this.#port });
    this.#sockets.add(socket);
    socket.on('error', () => undefined);
    socket.once('data', () => {
      // After the server's greeting: the client flags, then (hostile) a stalled option.
      if (kind === 'half-option') socket.write(Buffer.from('0000000349484156454f5054', 'hex'));
      if (kind === 'garbage') socket.write(Buffer.from('GET / HTTP/1.1\r\n'));
    });
    socket.once('close', () => {
      this.#sockets.delete(socket);
      // A refused connect (the port closed for a hand-over) is retried after a pause.
      if (!this.#stopped) setTimeout(() => this.#open(kind), 500).unref();
    });
  }
}

function spec(index: number, readOnly: boolean): object {
  const qcow2 = index % 2 === 0;
  return nbdExport(`soak-${index}`, {
    source: {
      file: qcow2
        ? { path: join(node.images, `soak-${index}.qcow2`), format: 'qcow2', create: { size: '4Mi' } }
        : { path: join(node.images, `soak-${index}.raw`), format: 'raw', create: { size: '1Mi' } },
    },
    readOnly,
    deletionPolicy: 'Delete',
  });
}

/** Whether the last third of `values` stays within the margin of the middle third's peak. */
function levelledOff(values: number[], margin: (peak: number) => number): boolean {
  const third = Math.floor(values.length / 3);
  if (third < 2) return true; // too short a run to judge
  const middlePeak = Math.max(...values.slice(third, 2 * third));
  const lastPeak = Math.max(...values.slice(2 * third));
  return lastPeak <= middlePeak + margin(middlePeak);
}

const held = [
  new HeldConnections(node.nbdPort, IDLE_CONNECTIONS_PER_PORT, HOSTILE_CONNECTIONS_PER_PORT),
  new HeldConnections(node.qemuPort, IDLE_CONNECTIONS_PER_PORT, HOSTILE_CONNECTIONS_PER_PORT),
];
const samples: Sample[] = [];
let verdict = false;
try {
  await node.start();
  const pid = node.pid;
  if (pid === undefined) throw new Error('the controller did not start');
  for (const h of held) h.start();

  const live = new Map<number, boolean>(); // index → readOnly
  let next = 0;
  let operations = 0;
  const started = performance.now();
  const elapsed = () => (performance.now() - started) / 1000;
  let nextSample = 0;
  console.log('  t(s)  RSS(MiB)  fds  exports  held  operations');
  while (elapsed() < seconds) {
    // Create, change, delete in turn: the set of exports keeps moving at a steady rate.
    const step = operations % 3;
    if (step === 0 || live.size === 0) live.set(next++, false);
    else if (step === 1) {
      const [index, readOnly] = [...live].at(-1) ?? [0, false];
      live.set(index, !readOnly);
    } else if (live.size >= LIVE_EXPORTS) {
      const oldest = [...live.keys()][0];
      if (oldest !== undefined) live.delete(oldest);
    } else live.set(next++, false);
    await node.writeExports(
      'soak.yaml',
      [...live].map(([index, readOnly]) => spec(index, readOnly)),
    );
    operations++;

    if (elapsed() >= nextSample) {
      const sample: Sample = {
        atSeconds: Math.round(elapsed()),
        rssMiB: Number((await rssMiB(pid)).toFixed(1)),
        openFds: await openFds(pid),
        liveExports: live.size,
        heldConnections: held.reduce((sum, h) => sum + h.count, 0),
        operations,
      };
      samples.push(sample);
      console.log(
        `${String(sample.atSeconds).padStart(6)}  ${sample.rssMiB.toFixed(1).padStart(8)}  ${String(sample.openFds).padStart(3)}  ${String(sample.liveExports).padStart(7)}  ${String(sample.heldConnections).padStart(4)}  ${String(sample.operations).padStart(10)}`,
      );
      nextSample += SAMPLE_INTERVAL_MS / 1000;
    }
    await sleep(OPERATION_INTERVAL_MS);
  }

  // The last set must still converge: a soak that left the controller wedged is no pass.
  let converged = true;
  let notConverged = '';
  for (const index of live.keys())
    try {
      await node.waitForReady(`soak-${index}`, 'True', undefined, 120_000);
    } catch (error) {
      converged = false;
      notConverged = error instanceof Error ? error.message.split('\n').slice(0, 2).join(' ') : String(error);
      break;
    }

  const rssLevel = levelledOff(
    samples.map((s) => s.rssMiB),
    (peak) => peak * RSS_MARGIN,
  );
  const fdLevel = levelledOff(
    samples.map((s) => s.openFds),
    () => FD_MARGIN,
  );
  verdict = rssLevel && fdLevel && converged;
  const first = samples[0];
  const last = samples.at(-1);
  console.log(
    `\n${operations} operations in ${seconds} s; RSS ${first?.rssMiB} → ${last?.rssMiB} MiB (peak ${Math.max(...samples.map((s) => s.rssMiB))}), fds ${first?.openFds} → ${last?.openFds} (peak ${Math.max(...samples.map((s) => s.openFds))})`,
  );
  console.log(
    `RSS growth levelled off: ${rssLevel ? 'yes' : 'NO'}; fds levelled off: ${fdLevel ? 'yes' : 'NO'}; the last set converged: ${converged ? 'yes' : `NO (${notConverged})`}`,
  );
  await mkdir(dirname(jsonPath), { recursive: true });
  await writeFile(
    jsonPath,
    `${JSON.stringify({ seconds, operations, rssLevelledOff: rssLevel, fdsLevelledOff: fdLevel, converged, samples }, null, 2)}\n`,
  );
  console.log(`samples written to ${jsonPath}`);
} finally {
  for (const h of held) h.stop();
  await node.destroy();
}
process.exitCode = verdict ? 0 : 1;
