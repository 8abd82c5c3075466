/**
 * What a client sees when it connects exactly during a hand-over restart: the port is
 * closed for a few milliseconds between the old parent's death and the new parent's
 * bind. Such an attempt must fail fast and cleanly (ECONNREFUSED; ECONNRESET or a close
 * before the greeting when the old parent had queued or accepted it as it was killed),
 * never hang or reach a wrong export;
 * after the hand-over every attempt succeeds. The window is printed, never asserted.
 */
import { writeFile, mkdtemp, rm, truncate } from 'node:fs/promises';
import { Worker } from 'node:worker_threads';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterEach, expect, it } from 'vitest';
import type { ExportConfig } from '../../src/api/export-config.js';
import { NbdServerSupervisor } from '../../src/node/nbd-server/nbd-server-supervisor.js';
import { isServed } from '../support/nbd.js';
import { waitFor } from '../support/poll.js';
import { freePorts, requireBinary } from '../support/repo.js';

interface Attempt {
  at: number;
  ok: boolean;
  code?: string;
}

/**
 * Connects in a loop and waits for nbd-server's greeting ("NBDMAGIC") each time, in a
 * worker thread so that the supervisor's event loop is not slowed by the measurement.
 * `code` is the error, or "closed" for a connection closed before the greeting (one the
 * old parent had accepted when it was killed).
 */
const PROBE_LOOP = `
const { parentPort, workerData } = require('node:worker_threads');
const { connect } = require('node:net');
let running = true;
parentPort.on('message', () => { running = false; });
function attempt() {
  return new Promise((resolve) => {
    const at = performance.timeOrigin + performance.now();
    const socket = connect(workerData.port, '127.0.0.1');
    let done = false;
    const finish = (result) => { if (!done) { done = true; socket.destroy(); resolve({ at, ...result }); } };
    socket.setTimeout(30000, () => finish({ ok: false, code: 'timeout' }));
    socket.once('data', (data) => finish({ ok: data.subarray(0, 8).toString() === 'NBDMAGIC' }));
    socket.once('error', (error) => finish({ ok: false, code: error.code || error.message }));
    socket.once('close', () => finish({ ok: false, code: 'closed' }));
  });
}
(async () => {
  while (running) {
    parentPort.postMessage(await attempt());
    await new Promise((r) => setTimeout(r, 1));
  }
  parentPort.postMessage('done');
})();
`;

const now = () => performance.timeOrigin + performance.now();

let root = '';
let server: NbdServerSupervisor | undefined;

afterEach(async () => {
  await server?.stop({ disconnectClients: true });
  if (root) await rm(root, { recursive: true, force: true });
});

it('a connection attempted during a hand-over is refused at once, and the window is milliseconds', async () => {
  await requireBinary('nbd-server');
  await requireBinary('nbdinfo');
  root = await mkdtemp(join(tmpdir(), 'nbdx-window-'));
  const [port] = (await freePorts(1)) as [number];
  const file = join(root, 'a.raw');
  await writeFile(file, '');
  await truncate(file, 1 << 20);
  const config = (exportName: string): ExportConfig => ({
    exportName,
    server: 'nbd-server',
    path: file,
    format: 'raw',
    blockDevice: false,
    readOnly: true,
    maxConnections: 1,
    allowedClients: [],
  });
  server = new NbdServerSupervisor({
    stateDir: join(root, 'state'),
    listenAddress: '127.0.0.1',
    port,
    logger: pino({ level: process.env.NBDX_TEST_LOG ?? 'silent' }),
    debounceMs: 0,
  });
  await server.writeExport(config('kept'));
  await server.start();

  const attempts: Attempt[] = [];
  const worker = new Worker(PROBE_LOOP, { eval: true, workerData: { port } });
  const loop = new Promise<void>((resolve, reject) => {
    worker.on('message', (message: Attempt | 'done') =>
      message === 'done' ? resolve() : attempts.push(message),
    );
    worker.once('error', reject);
  });

  const windows: number[] = [];
  let refused = 0;
  for (let round = 0; round < 10; round++) {
    const name = `extra-${round}`;
    const before = server.status().restarts;
    const from = now();
    if (round % 2 === 0) await server.writeExport(config(name));
    else await server.removeExport(`extra-${round - 1}`);
    server.requestApply();
    await waitFor('the hand-over', () => (server?.status().restarts === before + 1 ? true : undefined), {
      intervalMs: 5,
    });
    await server.settled();
    // Some attempts after the hand-over, all of which must succeed.
    const after = attempts.length;
    await waitFor('attempts after the hand-over', () => (attempts.length >= after + 5 ? true : undefined), {
      intervalMs: 5,
    });
    const failed = attempts.filter((a) => a.at >= from && !a.ok);
    expect(failed.filter((a) => !['ECONNREFUSED', 'ECONNRESET', 'closed'].includes(a.code ?? ''))).toEqual(
      [],
    );
    expect(attempts.slice(after).filter((a) => !a.ok)).toEqual([]);
    refused += failed.length;
    if (failed.length > 0) windows.push((failed.at(-1)?.at ?? 0) - (failed[0]?.at ?? 0));
    if (process.env.NBDX_WINDOW_DETAIL)
      console.log(
        JSON.stringify({
          round,
          codes: failed.reduce<Record<string, number>>(
            (c, a) => ({ ...c, [a.code ?? '']: (c[a.code ?? ''] ?? 0) + 1 }),
            {},
          ),
          firstFailAfterMs: Math.round((failed[0]?.at ?? from) - from),
          spanMs: Math.round((failed.at(-1)?.at ?? 0) - (failed[0]?.at ?? 0)),
          from: Math.round(from),
          firstFail: Math.round(failed[0]?.at ?? 0),
          lastFail: Math.round(failed.at(-1)?.at ?? 0),
        }),
      );
  }
  worker.postMessage('stop');
  await loop;
  await worker.terminate();
  expect(await isServed(`nbd://127.0.0.1:${port}/kept`)).toBe(true);

  const total = attempts.length;
  console.log(
    `hand-over window: ${refused} of ${total} attempts refused over 10 hand-overs; ` +
      `refusals seen in ${windows.length} of them, spanning ${windows.map((w) => w.toFixed(1)).join(', ') || '-'} ms`,
  );
});
