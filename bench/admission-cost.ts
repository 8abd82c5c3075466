/**
 * What nbd-server's admission hook costs a connecting client: full NBD handshakes (connect,
 * NBD_OPT_GO, NBD_CMD_DISC; with TLS, STARTTLS and a client certificate first) one after the
 * other against the supervisor's nbd-server (every client passes the hook: it runs Node, reads
 * /proc and counts clients under flock) and, side by side in the same run, against nbd-server
 * by hand with the same export and no hook. Prints medians and handshakes per second per
 * client, writes JSON; asserts nothing. Loopback only, bounded.
 *
 *   bench/run.sh admission-cost [HANDSHAKES=200]
 */
import { mkdir, mkdtemp, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { pino } from 'pino';
import { format } from 'prettier';
import { NbdServerSupervisor } from '../src/node/nbd-server/nbd-server-supervisor.js';
import { probeExport, type ProbeTlsCredentials } from '../src/node/nbd-probe.js';
import { rawExportConfig } from '../test/support/export-config.js';
import { freePorts } from '../test/support/repo.js';
import { createCa, issueCertificate } from '../test/support/tls-certificates.js';

const handshakes = Number(process.argv[2] ?? 200);
const root = await mkdtemp(join(tmpdir(), 'nbdx-bench-admission-'));
const results: Record<string, unknown>[] = [];
try {
  for (const tls of [false, true]) results.push(await measure(tls));
} finally {
  await rm(root, { recursive: true, force: true });
}
await writeFile(
  join(process.cwd(), 'bench', 'admission-cost.json'),
  await format(JSON.stringify({ handshakes, results }), { parser: 'json' }),
);

async function measure(tls: boolean): Promise<Record<string, unknown>> {
  const dir = join(root, tls ? 'tls' : 'plain');
  await mkdir(dir, { recursive: true });
  const image = join(dir, 'disk.raw');
  await writeFile(image, '');
  await truncate(image, 1024 * 1024);
  const [hookPort, handPort] = (await freePorts(2)) as [number, number];

  let credentials: ProbeTlsCredentials | undefined;
  const tlsDir = join(dir, 'server-tls');
  if (tls) {
    const ca = await createCa(join(dir, 'ca'), 'bench CA');
    await issueCertificate(ca, tlsDir, 'server', { commonName: 'localhost', usages: ['serverAuth'] });
    const clientDir = join(dir, 'client-tls');
    await issueCertificate(ca, clientDir, 'client', { commonName: 'bench', usages: ['clientAuth'] });
    const read = (name: string) => readFile(join(clientDir, name), 'utf8');
    credentials = {
      ca: await read('ca-cert.pem'),
      cert: await read('client-cert.pem'),
      key: await read('client-key.pem'),
    };
  }

  // Every client an outsider (controllerPid: null), so each one takes the hook's whole path.
  const supervisor = new NbdServerSupervisor({
    stateDir: join(dir, 'state'),
    listenAddress: '127.0.0.1',
    port: hookPort,
    logger: pino({ level: 'warn' }),
    controllerPid: null,
    ...(tls ? { tlsDir } : {}),
  });
  await supervisor.writeExport(rawExportConfig('e', image, { readOnly: true, maxConnections: 128 }));
  await supervisor.start();

  const handConf = join(dir, 'hand.conf');
  const tlsLines = tls
    ? [
        `certfile = ${tlsDir}/server-cert.pem`,
        `keyfile = ${tlsDir}/server-key.pem`,
        `cacertfile = ${tlsDir}/ca-cert.pem`,
        'force_tls = true',
      ]
    : [];
  await writeFile(
    handConf,
    [
      '[generic]',
      `port = ${handPort}`,
      'listenaddr = 127.0.0.1',
      'allowlist = false',
      ...tlsLines,
      '[e]',
      `exportname = ${image}`,
      'readonly = true',
      'flush = true',
      'fua = true',
      '',
    ].join('\n'),
  );
  const handPid = join(dir, 'hand.pid');
  await execa('nbd-server', ['-C', handConf, '-p', handPid]);
  try {
    const samples: Record<'hook' | 'hand', number[]> = { hook: [], hand: [] };
    const one = async (which: 'hook' | 'hand') => {
      const started = performance.now();
      const result = await probeExport({
        host: '127.0.0.1',
        port: which === 'hook' ? hookPort : handPort,
        exportName: 'e',
        ...(credentials ? { tls: credentials } : {}),
      });
      if (!result.ok) throw new Error(`${which}: ${result.message}`);
      samples[which].push(performance.now() - started);
    };
    await one('hook');
    await one('hand'); // warm both
    samples.hook.length = 0;
    samples.hand.length = 0;
    // Interleaved, so that load on the machine hits both alike.
    for (let i = 0; i < handshakes; i++)
      for (const which of i % 2 === 0 ? (['hook', 'hand'] as const) : (['hand', 'hook'] as const))
        await one(which);
    const figures = (values: number[]) => {
      const sorted = [...values].sort((a, b) => a - b);
      const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? NaN;
      return { medianMs: round(at(0.5)), p95Ms: round(at(0.95)), perSecond: round(1000 / at(0.5)) };
    };
    const result = { tls, withHook: figures(samples.hook), byHand: figures(samples.hand) };
    console.log(
      `${tls ? 'TLS  ' : 'plain'}: with the hook ${result.withHook.medianMs} ms median ` +
        `(p95 ${result.withHook.p95Ms}, ${result.withHook.perSecond}/s one client after another); ` +
        `by hand ${result.byHand.medianMs} ms (p95 ${result.byHand.p95Ms}, ${result.byHand.perSecond}/s)`,
    );
    return result;
  } finally {
    const pid = Number((await readFile(handPid, 'utf8').catch(() => '')).trim());
    if (pid > 0) process.kill(pid, 'SIGTERM');
    await supervisor.stop({ disconnectClients: true });
  }
}

function round(value: number): number {
  return Math.round(value * 10) / 10;
}
