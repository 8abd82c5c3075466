/**
 * The fault suite: the built controller, real servers and real NBD clients on loopback, hit
 * by what goes wrong on a storage host. Every case asserts that no acknowledged data is lost,
 * that nothing is served that should not be, and that the node converges afterwards; the
 * file prints how many cases passed.
 *
 * "Disk full" and "read-only" are real: small tmpfs mounts this file creates (and removes)
 * under the node's directory, used as the state directory and as the allowed root.
 */
import { readdir, readFile, rm, stat, writeFile, open } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { canWrite, HeldTransfer, isServed, nbdcopy, sha256File, writeRandomFile } from '../support/nbd.js';
import { waitFor } from '../support/poll.js';
import { parseExposition, samplesOf } from '../support/prometheus-text.js';
import { requireBinary } from '../support/repo.js';
import { commandLineOf, findProcesses, isRunning } from '../../src/node/process/proc-scan.js';
import { nbdExport, PlainHostNode } from './harness/plain-host-controller.js';

const MiB = 1024 * 1024;
const cases: string[] = [];
const passed: string[] = [];

/** A fault case: counted when it passes, so the closing line says how many did. */
function fault(name: string, body: () => Promise<void>): void {
  cases.push(name);
  it(name, async () => {
    await body();
    passed.push(name);
  });
}

afterAll(() => {
  console.log(`fault suite: ${passed.length} of ${cases.length} cases passed`);
});

// ---- helpers ----

function raw(path: string, size: string, extra: Record<string, unknown> = {}) {
  return { source: { file: { path, format: 'raw', create: { size, ...extra } } } };
}

function qcow2(path: string, size: string) {
  return { source: { file: { path, format: 'qcow2', create: { size } } } };
}

async function metrics(node: PlainHostNode) {
  const response = await fetch(`http://127.0.0.1:${node.healthPort}/metrics`);
  return parseExposition(await response.text());
}

/** Waits until /metrics shows the state directory in `condition`. */
async function waitForStateCondition(node: PlainHostNode, condition: string): Promise<void> {
  await waitFor(`nbdx_state_directory_condition{condition="${condition}"} = 1`, async () => {
    const found = samplesOf(await metrics(node), 'nbdx_state_directory_condition', { condition });
    return found[0]?.value === 1 ? true : undefined;
  });
}

/** The pids of this node's nbd-server processes (parent and children) or qemu-storage-daemon. */
function serverPids(node: PlainHostNode, server: 'nbd-server' | 'qemu-storage-daemon'): number[] {
  const marker =
    server === 'nbd-server'
      ? join(node.stateDir, 'nbd-server', 'config')
      : `path=${join(node.stateDir, 'qemu-storage-daemon', 'qmp.sock')},`;
  return findProcesses(
    (argv) => (argv[0] ?? '').endsWith(server) && argv.some((arg) => arg === marker || arg.includes(marker)),
  );
}

async function pidFile(path: string): Promise<number | undefined> {
  const text = await readFile(path, 'utf8').catch(() => undefined);
  const pid = Number(text?.trim());
  return Number.isInteger(pid) && pid > 0 && isRunning(pid) ? pid : undefined;
}

const nbdServerParent = (node: PlainHostNode) => pidFile(join(node.stateDir, 'nbd-server', 'nbd-server.pid'));
const qemuDaemon = (node: PlainHostNode) =>
  pidFile(join(node.stateDir, 'qemu-storage-daemon', 'qemu-storage-daemon.pid'));

/** Files below `dir` left by an interrupted write or create (none may survive a convergence). */
async function leftoverTemporaries(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { recursive: true }).catch(() => []);
  return entries.filter((name) => /\.nbdx-tmp-[0-9a-f]{12}$|\.[0-9a-f]{8}\.tmp$/.test(name));
}

/**
 * Writes `file` into the export, flushed (only flushed data is acknowledged as durable: a
 * qemu-storage-daemon killed before a flush loses the qcow2 metadata of unflushed writes),
 * and reads it back through NBD: the export holds exactly it.
 */
async function writeAndVerify(uri: string, file: string, scratch: string): Promise<void> {
  await execa('nbdcopy', ['--connections=1', '--flush', file, uri]);
  await expectHolds(uri, file, scratch);
}

async function expectHolds(uri: string, file: string, scratch: string): Promise<void> {
  await rm(scratch, { force: true });
  await nbdcopy(uri, scratch);
  expect(await sha256File(scratch)).toBe(await sha256File(file));
}

async function mountTmpfs(dir: string, sizeMiB: number): Promise<void> {
  await execa('mount', ['-t', 'tmpfs', '-o', `size=${sizeMiB}m,mode=0755`, 'tmpfs', dir]);
}

/** Unmounts everything mounted on `dir` (a bind mount may sit on the tmpfs). */
async function unmount(dir: string): Promise<void> {
  for (let i = 0; i < 3; i++)
    if ((await execa('umount', ['-l', dir], { reject: false })).exitCode !== 0) break;
}

/** Fills the file system of `dir` with one file until it is full; returns its path. */
async function fill(dir: string): Promise<string> {
  const path = join(dir, 'filler');
  const file = await open(path, 'w');
  const chunk = Buffer.alloc(64 * 1024, 0xab);
  try {
    for (let i = 0; i < 1 << 16; i++) await file.write(chunk);
    throw new Error(`${dir} did not fill up`);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'ENOSPC') throw error;
  } finally {
    await file.close();
  }
  // Also the last blocks a small write could still take.
  for (let i = 0; ; i++) {
    try {
      await writeFile(join(dir, `filler-${i}`), 'x');
    } catch {
      break;
    }
  }
  return path;
}

async function unfill(dir: string): Promise<void> {
  for (const name of await readdir(dir))
    if (name === 'filler' || name.startsWith('filler-')) await rm(join(dir, name), { force: true });
}

/** The reconciler's log lines that mark the steps of creating and serving an export. */
const STEP_MESSAGES = new Set([
  'executing plan',
  'creating image',
  'image created',
  'nbd-server export configured',
  'qemu-storage-daemon export added',
  'export ready',
]);

/** The log of the controller process started last. */
async function latestLog(node: PlainHostNode): Promise<string> {
  const logs = (await readdir(node.root)).filter((n) => /^controller-\d+\.log$/.test(n));
  const last = logs.sort((a, b) => Number(/\d+/.exec(a)?.[0]) - Number(/\d+/.exec(b)?.[0])).at(-1);
  return last === undefined ? '' : readFile(join(node.root, last), 'utf8');
}

/** Sends a signal, ignoring a process that is gone. */
function signal(pid: number, name: NodeJS.Signals): void {
  try {
    process.kill(pid, name);
  } catch {
    // gone
  }
}

beforeAll(async () => {
  for (const name of ['nbd-server', 'qemu-img', 'qemu-storage-daemon', 'nbdcopy', 'nbdinfo', 'mount'])
    await requireBinary(name);
});

// ---- a node whose state directory is on the ordinary disk ----

describe('faults of servers, the controller and its state files', () => {
  let node: PlainHostNode;
  const documents: object[] = [];
  const put = async (name: string, spec: Record<string, unknown>) => {
    documents.push(nbdExport(name, spec));
    await node.writeExports('faults.yaml', documents);
  };
  let rawData: string;
  let qcowData: string;

  beforeAll(async () => {
    node = await PlainHostNode.create();
    await node.start();
    rawData = join(node.root, 'raw-data.bin');
    qcowData = join(node.root, 'qcow-data.bin');
    await writeRandomFile(rawData, 16 * MiB);
    await writeRandomFile(qcowData, 16 * MiB);
    await put('raw-a', raw(join(node.images, 'raw-a.raw'), '16Mi'));
    await put('q-a', qcow2(join(node.images, 'q-a.qcow2'), '16Mi'));
    await put('q-b', qcow2(join(node.images, 'q-b.qcow2'), '16Mi'));
    await writeAndVerify(node.uri(await node.waitForReady('raw-a')), rawData, join(node.root, 'check.bin'));
    await writeAndVerify(node.uri(await node.waitForReady('q-a')), qcowData, join(node.root, 'check.bin'));
    await node.waitForReady('q-b');
  });

  afterAll(async () => {
    await node?.destroy();
  });

  const check = () => join(node.root, 'check.bin');

  fault(
    'kill -9 of the nbd-server parent with a client connected: the client finishes, a new parent serves',
    async () => {
      const uri = node.uri(await node.waitForReady('raw-a'));
      const transfer = new HeldTransfer(rawData, uri, 8 * MiB);
      try {
        await transfer.firstHalfWritten();
        const parent = await waitFor('the nbd-server parent', () => nbdServerParent(node));
        signal(parent, 'SIGKILL');
        await waitFor('a new nbd-server parent', async () => {
          const next = await nbdServerParent(node);
          return next !== undefined && next !== parent ? next : undefined;
        });
        expect(await transfer.finish()).toMatchObject({ exitCode: 0 });
      } finally {
        transfer.kill();
      }
      await expectHolds(uri, rawData, check());
      await node.waitForReady('raw-a');
    },
  );

  fault(
    'kill -9 of qemu-storage-daemon with a client connected: the client is told, acknowledged data survives, exports come back',
    async () => {
      const uriA = node.uri(await node.waitForReady('q-a'));
      const uriB = node.uri(await node.waitForReady('q-b'));
      const transfer = new HeldTransfer(rawData, uriB, 8 * MiB);
      try {
        await transfer.firstHalfWritten();
        const daemon = await waitFor('qemu-storage-daemon', () => qemuDaemon(node));
        signal(daemon, 'SIGKILL');
        // A cut client must fail, never report a write that did not happen.
        expect((await transfer.finish()).exitCode).not.toBe(0);
        // The controller must notice, not wait for each export's next periodic check (60 s).
        await waitFor('the controller to reconcile every export after the daemon came back', async () =>
          /qemu-storage-daemon (is gone|was started again); reconciling every export/.test(
            await latestLog(node),
          )
            ? true
            : undefined,
        );
        await waitFor('q-a served again', async () => ((await isServed(uriA)) ? true : undefined));
        expect(await qemuDaemon(node)).not.toBe(daemon);
      } finally {
        transfer.kill();
      }
      await node.waitForReady('q-a');
      await node.waitForReady('q-b');
      await expectHolds(uriA, qcowData, check());
    },
  );

  fault('SIGSTOP of the nbd-server parent: the next change replaces it, everything is served', async () => {
    const parent = await waitFor('the nbd-server parent', () => nbdServerParent(node));
    signal(parent, 'SIGSTOP');
    try {
      await put('raw-b', raw(join(node.images, 'raw-b.raw'), '4Mi'));
      const b = await node.waitForReady('raw-b');
      expect(isRunning(parent)).toBe(false);
      expect(await isServed(node.uri(b))).toBe(true);
    } finally {
      signal(parent, 'SIGCONT');
    }
    await expectHolds(node.uri(await node.waitForReady('raw-a')), rawData, check());
  });

  fault(
    'idle and hostile connections that never negotiate do not keep nbd-server from its hand-over',
    async () => {
      // nbd-server forks a child per connection, and 3.24's child keeps the listening socket
      // until its client has negotiated: these would keep the port bound after the parent dies.
      const held: Socket[] = [];
      try {
        for (let i = 0; i < 4; i++) {
          const socket = connect({ host: '127.0.0.1', port: node.nbdPort });
          socket.on('error', () => undefined);
          if (i % 2 === 1)
            socket.once('data', () => socket.write(Buffer.from('0000000349484156454f5054', 'hex')));
          held.push(socket);
        }
        const parent = await waitFor('the nbd-server parent', () => nbdServerParent(node));
        await waitFor('a child per held connection', () =>
          serverPids(node, 'nbd-server').filter((pid) => pid !== parent).length >= 4 ? true : undefined,
        );
        await put('raw-e', raw(join(node.images, 'raw-e.raw'), '4Mi'));
        const e = await node.waitForReady('raw-e');
        expect(await isServed(node.uri(e))).toBe(true);
        expect(await nbdServerParent(node)).not.toBe(parent);
      } finally {
        for (const socket of held) socket.destroy();
      }
      await expectHolds(node.uri(await node.waitForReady('raw-a')), rawData, check());
    },
  );

  fault('SIGSTOP of qemu-storage-daemon: a change waits, converges after SIGCONT, nothing lost', async () => {
    const daemon = await waitFor('qemu-storage-daemon', () => qemuDaemon(node));
    signal(daemon, 'SIGSTOP');
    try {
      await put('q-c', qcow2(join(node.images, 'q-c.qcow2'), '4Mi'));
      // The controller reaches the stopped daemon, times out on it and keeps running.
      await waitFor('a QMP command to time out', async () =>
        /no answer within/.test(await latestLog(node)) ? true : undefined,
      );
      expect((await node.condition('q-c'))?.status).not.toBe('True');
    } finally {
      signal(daemon, 'SIGCONT');
    }
    await node.waitForReady('q-c');
    await expectHolds(node.uri(await node.waitForReady('q-a')), qcowData, check());
  });

  fault(
    'kill -9 of the controller at each step of a reconcile: every restart converges, nothing is left half-done',
    async () => {
      // Delays after the change reaches the directory: from before the source has read it,
      // through ledger intent, qemu-img create, publish, conf.d write, hand-over and QMP adds,
      // to the probe and the status write.
      const delays = [0, 20, 40, 60, 80, 100, 130, 160, 250, 1_000];
      const reached = new Set<string>();
      for (const [i, delay] of delays.entries()) {
        const before = (await latestLog(node)).length;
        await put(`k${i}-raw`, raw(join(node.images, `k${i}.raw`), '4Mi'));
        await put(`k${i}-q`, qcow2(join(node.images, `k${i}.qcow2`), '4Mi'));
        // Not a wait for a state: the delay is where the crash lands.
        await new Promise((resolve) => setTimeout(resolve, delay));
        await node.stop('SIGKILL');
        const steps = [...(await latestLog(node)).slice(before).matchAll(/"msg":"([^"]+)"/g)]
          .map((match) => match[1] ?? '')
          .filter((message) => STEP_MESSAGES.has(message));
        reached.add(`${delay} ms: ${steps.at(-1) ?? 'nothing yet'}`);
        await node.start();
        for (const name of [`k${i}-raw`, `k${i}-q`]) {
          const ready = await node.waitForReady(name);
          expect(await isServed(node.uri(ready))).toBe(true);
        }
        expect((await stat(join(node.images, `k${i}.raw`))).size).toBe(4 * MiB);
      }
      expect(await leftoverTemporaries(node.images)).toEqual([]);
      console.log(
        `kill -9 of the controller, the last step logged before each kill: ${[...reached].join('; ')}`,
      );
      await expectHolds(node.uri(await node.waitForReady('raw-a')), rawData, check());
      await expectHolds(node.uri(await node.waitForReady('q-a')), qcowData, check());
    },
  );

  fault(
    'kill -9 during a preallocated create: the orphaned qemu-img is killed, the create runs once',
    async () => {
      const image = join(node.images, 'prealloc.raw');
      await put('prealloc', raw(image, '64Mi', { preallocation: 'full' }));
      const isCreate = (argv: readonly string[]) =>
        (argv[0] ?? '').endsWith('qemu-img') && argv.some((a) => a.includes('.prealloc.raw.nbdx-tmp-'));
      const orphan = await waitFor('qemu-img creating prealloc.raw', () => findProcesses(isCreate)[0], {
        intervalMs: 5,
      });
      // Frozen mid-create, so the kill below lands while it runs, however fast the disk is.
      signal(orphan, 'SIGSTOP');
      await node.stop('SIGKILL');
      expect(isRunning(orphan)).toBe(true);
      const creates = new Set<number>();
      const watcher = setInterval(() => {
        for (const pid of findProcesses(isCreate)) if (pid !== orphan) creates.add(pid);
      }, 20);
      try {
        await node.start();
        const ready = await node.waitForReady('prealloc');
        expect(await isServed(node.uri(ready))).toBe(true);
      } finally {
        clearInterval(watcher);
        signal(orphan, 'SIGKILL');
      }
      expect(isRunning(orphan)).toBe(false);
      expect(creates.size).toBeLessThanOrEqual(1);
      expect((await stat(image)).size).toBe(64 * MiB);
      expect(await leftoverTemporaries(node.images)).toEqual([]);
    },
  );

  fault(
    'corrupt ledger, exports.json and loaded.json: moved aside, rebuilt, a QCOW2 client is not cut',
    async () => {
      const uriB = node.uri(await node.waitForReady('q-b'));
      await node.stop('SIGKILL');
      const transfer = new HeldTransfer(rawData, uriB, 8 * MiB);
      try {
        await transfer.firstHalfWritten();
        const ledgerDir = join(node.stateDir, 'ledger');
        const records = (await readdir(ledgerDir)).filter((n) => n.endsWith('.json'));
        expect(records.length).toBeGreaterThan(0);
        await writeFile(join(ledgerDir, records[0] ?? ''), '{"uid": "torn');
        await writeFile(join(node.stateDir, 'qemu-storage-daemon', 'exports.json'), '\0\0\0garbage');
        await writeFile(join(node.stateDir, 'nbd-server', 'loaded.json'), '[1, 2');
        await node.start();
        for (const name of ['raw-a', 'q-a', 'q-b', 'raw-b', 'q-c']) await node.waitForReady(name);
        const state = await readdir(node.stateDir, { recursive: true });
        expect(state.filter((n) => /\.corrupt-\d{8}T\d{9}Z$/.test(n))).toHaveLength(3);
        const exposition = await metrics(node);
        expect(samplesOf(exposition, 'nbdx_state_files_moved_aside_total')[0]?.value).toBe(3);
        // The daemon's export was adopted, not re-added: the held client still writes.
        expect(await transfer.finish()).toMatchObject({ exitCode: 0 });
      } finally {
        transfer.kill();
      }
      await expectHolds(uriB, rawData, check());
      await expectHolds(node.uri(await node.waitForReady('q-a')), qcowData, check());
    },
  );

  fault(
    'the state directory deleted while running: changes still apply, a restart and stop-servers recover',
    async () => {
      // As an operator's `rm -rf`, again when it meets a file the running controller (or a
      // client's admission) has just written there: a single pass then fails with ENOTEMPTY.
      const deleteStateDirectory = () =>
        rm(node.stateDir, { recursive: true, force: true, maxRetries: 20, retryDelay: 50 });
      await deleteStateDirectory();
      await put('raw-d', raw(join(node.images, 'raw-d.raw'), '4Mi'));
      await put('q-d', qcow2(join(node.images, 'q-d.qcow2'), '4Mi'));
      await node.waitForReady('raw-d');
      await node.waitForReady('q-d');
      await expectHolds(node.uri(await node.waitForReady('raw-a')), rawData, check());
      await expectHolds(node.uri(await node.waitForReady('q-a')), qcowData, check());

      // Once more, and this time a restart must recover it.
      await deleteStateDirectory();
      await node.stop('SIGKILL');
      await node.start();
      // Right after the restart the statuses still say what the last controller saw: wait for
      // the exports themselves, re-added from conf.d and exports.json rebuilt from scratch.
      for (const name of ['raw-a', 'q-a', 'raw-d', 'q-d']) {
        const uri = node.uri(await node.waitForReady(name));
        await waitFor(`${name} served again`, async () => ((await isServed(uri)) ? true : undefined));
      }
      await expectHolds(node.uri(await node.waitForReady('raw-a')), rawData, check());
      await expectHolds(node.uri(await node.waitForReady('q-a')), qcowData, check());

      // And stop-servers must end both servers even when the directory is gone again.
      await node.stop('SIGKILL');
      await deleteStateDirectory();
      await node.stopServers();
      await waitFor('no server of this node left', () =>
        serverPids(node, 'nbd-server').length + serverPids(node, 'qemu-storage-daemon').length === 0
          ? true
          : undefined,
      );
      expect(commandLineOf(process.pid)).toBeDefined();
    },
  );
});

// ---- a node whose state directory and images are on small file systems ----

describe('full and read-only file systems', () => {
  let node: PlainHostNode;
  const documents: object[] = [];
  const put = async (name: string, spec: Record<string, unknown>) => {
    const index = documents.findIndex((d) => (d as { metadata: { name: string } }).metadata.name === name);
    if (index >= 0) documents[index] = nbdExport(name, spec);
    else documents.push(nbdExport(name, spec));
    await node.writeExports('small.yaml', documents);
  };
  const mounts: string[] = [];

  beforeAll(async () => {
    node = await PlainHostNode.create();
    await import('node:fs/promises').then((fs) => fs.mkdir(node.stateDir));
    await mountTmpfs(node.stateDir, 4);
    mounts.push(node.stateDir);
    await mountTmpfs(node.images, 16);
    mounts.push(node.images);
    await node.start();
    await put('f-a', raw(join(node.images, 'f-a.raw'), '1Mi'));
    await node.waitForReady('f-a');
  });

  afterAll(async () => {
    await node?.stop('SIGKILL');
    await node?.stopServers();
    for (const dir of mounts.reverse()) await unmount(dir);
    await node?.destroy();
  });

  fault(
    'the state file system full during a config write: the change shows not applied, then applies',
    async () => {
      const uri = node.uri(await node.waitForReady('f-a'));
      expect(await canWrite(uri)).toBe(true);
      await fill(node.stateDir);
      try {
        await waitForStateCondition(node, 'full');
        await put('f-a', { ...raw(join(node.images, 'f-a.raw'), '1Mi'), readOnly: true });
        const failed = await node.waitForReady('f-a', 'False');
        expect(failed.status?.conditions?.find((c) => c.type === 'Ready')?.message).toMatch(
          /ENOSPC|no space/i,
        );
        // Not applied, and not served as if it were: still the old, writable export.
        expect(await canWrite(uri)).toBe(true);
      } finally {
        await unfill(node.stateDir);
      }
      await waitForStateCondition(node, 'ok');
      await node.waitForReady('f-a');
      await waitFor('f-a read-only', async () => ((await canWrite(uri)) ? undefined : true));
      expect(await leftoverTemporaries(node.stateDir)).toEqual([]);
    },
  );

  fault(
    'disk full during create: ImageCreateFailed, no temporary left, created once space is back',
    async () => {
      await fill(node.images);
      try {
        await put('f-c', raw(join(node.images, 'f-c.raw'), '4Mi', { preallocation: 'full' }));
        const failed = await node.waitForReady('f-c', 'False', 'ImageCreateFailed');
        expect(failed.status?.conditions?.find((c) => c.type === 'Ready')?.message).toMatch(/space/i);
        expect(await leftoverTemporaries(node.images)).toEqual([]);
        await expect(stat(join(node.images, 'f-c.raw'))).rejects.toThrow(/ENOENT/);
      } finally {
        await unfill(node.images);
      }
      const ready = await node.waitForReady('f-c');
      expect(await isServed(node.uri(ready))).toBe(true);
      expect((await stat(join(node.images, 'f-c.raw'))).size).toBe(4 * MiB);
    },
  );

  fault(
    'a read-only state directory: the controller starts anyway, reports it, and recovers when it is writable',
    async () => {
      await node.stop('SIGKILL');
      // A read-only bind mount over it: the servers' open log files keep the file system
      // itself from being remounted read-only, and what matters is what the controller sees.
      await execa('mount', ['--bind', node.stateDir, node.stateDir]);
      await execa('mount', ['-o', 'remount,ro,bind', node.stateDir]);
      try {
        await node.start();
        await waitForStateCondition(node, 'read_only');
        await put('f-b', raw(join(node.images, 'f-b.raw'), '1Mi'));
        await node.waitForReady('f-b', 'False');
        // What was served before stays served.
        expect(await isServed(node.uri(await node.waitForReady('f-a')))).toBe(true);
      } finally {
        await execa('umount', [node.stateDir]);
      }
      await waitForStateCondition(node, 'ok');
      const ready = await node.waitForReady('f-b');
      expect(await isServed(node.uri(ready))).toBe(true);
    },
  );
});
