/**
 * The real thing: three controller processes, as three nodes, against a real kube-apiserver,
 * each with the controller's own ServiceAccount (RBAC from manifests/), serving NbdExports
 * with real nbd-server and qemu-storage-daemon, checked with real NBD clients.
 *
 * The tests run in order and build on each other: the exports the first one creates are the
 * ones the later ones restart, change, starve of their API server and delete.
 */
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { EventReason } from '../../src/api/reasons.js';
import { FINALIZER, type Condition, type NbdExport } from '../../src/api/types.js';
import { REPORTING_CONTROLLER } from '../../src/kube/kube-export-store.js';
import { startCluster, type Cluster } from './harness/cluster.js';
import { ControllerNode, ensureBuilt } from './harness/controller.js';
import {
  HeldTransfer,
  canWrite,
  establishedConnections,
  exportSize,
  isServed,
  nbdcopy,
  requireNbdClients,
  sha256File,
  tryNbdcopy,
  writeRandomFile,
} from '../support/nbd.js';
import { waitFor } from '../support/poll.js';
import { isRunning, requireBinary } from '../support/repo.js';
import { serviceAccountKubeconfig } from './harness/service-account.js';

const NAMESPACE = 'e2e';
const MiB = 1024 * 1024;
const IMAGE_SIZE = 32 * MiB;
/** Generous: a slow, shared two-core machine makes everything slower, never wrong. */
const READY_TIMEOUT_S = 300;
const LONG = 900_000;

interface ExportCase {
  name: string;
  node: ControllerNode;
  format: 'qcow2' | 'raw';
  path: string;
  deletionPolicy: 'Retain' | 'Delete';
  size: number;
  /** sha256 of what was last written through NBD (the whole image). */
  sha256?: string;
}

interface KubeEvent {
  type?: string;
  reason?: string;
  note?: string;
  reportingController?: string;
  reportingInstance?: string;
  regarding?: { kind?: string; namespace?: string; name?: string };
}

let cluster: Cluster | undefined;
const nodes: ControllerNode[] = [];
let work: string;
const exports = new Map<string, ExportCase>();

function kube(): Cluster {
  if (!cluster) throw new Error('the control plane did not start (see beforeAll)');
  return cluster;
}

function exportCase(name: string): ExportCase {
  const found = exports.get(name);
  if (!found) throw new Error(`no export ${name}`);
  return found;
}

function manifestOf(c: ExportCase, extra: Record<string, unknown> = {}): string {
  return JSON.stringify({
    apiVersion: 'nbd.dev/v1alpha1',
    kind: 'NbdExport',
    metadata: { name: c.name, namespace: NAMESPACE },
    spec: {
      nodeName: c.node.nodeName,
      source: { file: { path: c.path, format: c.format, create: { size: `${c.size / MiB}Mi` } } },
      deletionPolicy: c.deletionPolicy,
      ...extra,
    },
  });
}

async function getExport(name: string): Promise<NbdExport> {
  return kube().kubectlJson<NbdExport>(['get', 'nbdexport', name, '-n', NAMESPACE]);
}

function condition(object: NbdExport, type: string): Condition | undefined {
  return object.status?.conditions?.find((c) => c.type === type);
}

/**
 * `kubectl wait --for=condition=Ready`, then polls until status describes the current
 * generation: status.observedGeneration and the Ready condition's both equal
 * metadata.generation, with Ready still True. Returns the object.
 */
async function waitReady(names: string[], timeoutS = READY_TIMEOUT_S): Promise<NbdExport[]> {
  await kube().kubectl([
    'wait',
    '--for=condition=Ready',
    ...names.map((name) => `nbdexport/${name}`),
    '-n',
    NAMESPACE,
    `--timeout=${timeoutS}s`,
  ]);
  return Promise.all(
    names.map((name) =>
      waitFor(
        `${name} to be Ready for its current generation`,
        async () => {
          const object = await getExport(name);
          const ready = condition(object, 'Ready');
          const generation = object.metadata.generation;
          if (
            ready?.status === 'True' &&
            object.status?.observedGeneration === generation &&
            ready.observedGeneration === generation
          )
            return object;
          throw new Error(
            `generation ${generation}, status.observedGeneration ${object.status?.observedGeneration}, Ready ${JSON.stringify(ready)}`,
          );
        },
        { timeoutMs: timeoutS * 1000 },
      ),
    ),
  );
}

function uriOf(object: NbdExport): string {
  const uri = object.status?.uri;
  if (!uri) throw new Error(`${object.metadata.name} has no status.uri`);
  return uri;
}

/** Adds what the cluster and the nodes say to a failure's message. */
async function withDiagnostics(body: () => Promise<void>): Promise<void> {
  try {
    await body();
  } catch (error) {
    const parts: string[] = [];
    if (cluster) {
      const listed = await cluster
        .kubectl(['get', 'nbdexports', '-A', '-o', 'wide'], { reject: false })
        .catch(() => undefined);
      parts.push(`--- kubectl get nbdexports -A -o wide\n${listed?.stdout ?? ''}${listed?.stderr ?? ''}`);
      const yaml = await cluster
        .kubectl(['get', 'nbdexports', '-n', NAMESPACE, '-o', 'yaml'], { reject: false })
        .catch(() => undefined);
      parts.push(`--- kubectl get nbdexports -o yaml\n${yaml?.stdout.slice(0, 12_000) ?? ''}`);
    }
    for (const node of nodes) parts.push(`--- ${node.nodeName} (${node.logFile})\n${await node.logTail(40)}`);
    if (error instanceof Error) {
      error.message = `${error.message}\n\n${parts.join('\n\n')}`;
      throw error;
    }
    throw new Error(`${String(error)}\n\n${parts.join('\n\n')}`, { cause: error });
  }
}

beforeAll(async () => {
  for (const program of ['nbd-server', 'qemu-storage-daemon', 'qemu-img']) await requireBinary(program);
  await requireNbdClients();
  await ensureBuilt();
  work = await mkdtemp(join(tmpdir(), 'nbdx-e2e-data-'));
  cluster = await startCluster();
  const kubeconfig = await serviceAccountKubeconfig(cluster);
  await cluster.kubectl(['create', 'namespace', NAMESPACE]);
  for (const nodeName of ['node1', 'node2', 'node3'])
    nodes.push(await ControllerNode.create(nodeName, kubeconfig));
  // One at a time: three Node.js processes starting at once on two cores is the slow path.
  for (const node of nodes) await node.start();
  for (const [index, node] of nodes.entries()) {
    const qcowPolicy = index === 1 ? 'Delete' : 'Retain';
    const rawPolicy = index === 1 ? 'Retain' : 'Delete';
    for (const c of [
      { name: `qcow-${node.nodeName}`, format: 'qcow2', file: 'qcow.qcow2', deletionPolicy: qcowPolicy },
      { name: `raw-${node.nodeName}`, format: 'raw', file: 'raw.img', deletionPolicy: rawPolicy },
    ] as const)
      exports.set(c.name, {
        name: c.name,
        node,
        format: c.format,
        path: join(node.allowedRoot, c.file),
        deletionPolicy: c.deletionPolicy,
        size: IMAGE_SIZE,
      });
  }
}, LONG);

afterAll(async () => {
  for (const node of nodes) await node.cleanup();
  await cluster?.down();
  if (work) await rm(work, { recursive: true, force: true });
}, LONG);

describe('three nodes, each with its own controller', () => {
  it(
    "serves every node's NbdExports: Ready, status filled in, data written through status.uri reads back",
    () =>
      withDiagnostics(async () => {
        const all = [...exports.values()];
        await kube().kubectl(['apply', '-f', '-'], { input: all.map((c) => manifestOf(c)).join('\n') });
        const objects = await waitReady(all.map((c) => c.name));

        for (const [index, object] of objects.entries()) {
          const c = all[index]!;
          const qcow2 = c.format === 'qcow2';
          const exportName = `${NAMESPACE}.${c.name}`;
          const port = qcow2 ? c.node.qemuPort : c.node.nbdPort;
          expect(object.metadata.finalizers).toContain(FINALIZER);
          expect(object.status).toMatchObject({
            observedGeneration: object.metadata.generation,
            exportName,
            uri: `nbd://127.0.0.1:${port}/${exportName}`,
            server: qcow2 ? 'qemu-storage-daemon' : 'nbd-server',
            format: c.format,
            virtualSize: IMAGE_SIZE,
          });
          for (const type of ['Ready', 'ImageReady', 'Exported'])
            expect(condition(object, type), `${c.name} ${type}`).toMatchObject({
              status: 'True',
              observedGeneration: object.metadata.generation,
            });
          expect(existsSync(c.path), `${c.path} was created`).toBe(true);
          const info = await execa('qemu-img', ['info', '-U', '--output=json', c.path]);
          expect(JSON.parse(info.stdout)).toMatchObject({ format: c.format, 'virtual-size': IMAGE_SIZE });

          const uri = uriOf(object);
          expect(await exportSize(uri)).toBe(IMAGE_SIZE);
          const source = join(work, `${c.name}.in`);
          const readBack = join(work, `${c.name}.out`);
          await writeRandomFile(source, IMAGE_SIZE);
          await nbdcopy(source, uri);
          await nbdcopy(uri, readBack);
          c.sha256 = await sha256File(source);
          expect(await sha256File(readBack), `${c.name}: what was written reads back`).toBe(c.sha256);
        }

        // Each controller said so in an event (events.k8s.io/v1, with its ServiceAccount).
        const events = await waitFor('a Served event for every export', async () => {
          const list = await kube().kubectlJson<{ items: KubeEvent[] }>([
            'get',
            'events.v1.events.k8s.io',
            '-n',
            NAMESPACE,
          ]);
          const served = list.items.filter(
            (e) => e.reason === EventReason.Served && e.reportingController === REPORTING_CONTROLLER,
          );
          return all.every((c) => served.some((e) => e.regarding?.name === c.name)) ? served : undefined;
        });
        for (const c of all) {
          const event = events.find((e) => e.regarding?.name === c.name)!;
          expect(event).toMatchObject({
            type: 'Normal',
            regarding: { kind: 'NbdExport', namespace: NAMESPACE, name: c.name },
            reportingInstance: c.node.nodeName,
          });
        }

        // The printer columns show what status says.
        const { stdout } = await kube().kubectl(['get', 'nbdx', '-n', NAMESPACE, '--no-headers']);
        const rows = stdout
          .trim()
          .split('\n')
          .map((row) => row.split(/\s+/));
        expect(rows.map((row) => row.slice(0, 6))).toEqual(
          all
            .map((c) => [
              c.name,
              c.node.nodeName,
              `${NAMESPACE}.${c.name}`,
              c.format,
              String(IMAGE_SIZE),
              'True',
            ])
            .sort((a, b) => a[0]!.localeCompare(b[0]!)),
        );
      }),
    LONG,
  );

  it(
    'a node serves only its own NbdExports: one for a node without a controller is left alone',
    () =>
      withDiagnostics(async () => {
        const lonely = join(nodes[0]!.allowedRoot, 'lonely.img');
        await kube().kubectl(['apply', '-f', '-'], {
          input: JSON.stringify({
            apiVersion: 'nbd.dev/v1alpha1',
            kind: 'NbdExport',
            metadata: { name: 'lonely', namespace: NAMESPACE },
            spec: {
              nodeName: 'node-without-controller',
              source: { file: { path: lonely, format: 'raw', create: { size: '1Mi' } } },
            },
          }),
        });
        // Give every controller a chance to (wrongly) act on it: a new export on node3 becomes
        // Ready after it, so node3's controller has seen both; node1's and node2's resync too.
        const probe: ExportCase = {
          name: 'probe-node3',
          node: nodes[2]!,
          format: 'raw',
          path: join(nodes[2]!.allowedRoot, 'probe.img'),
          deletionPolicy: 'Delete',
          size: MiB,
        };
        exports.set(probe.name, probe);
        await kube().kubectl(['apply', '-f', '-'], { input: manifestOf(probe) });
        await waitReady([probe.name]);

        const object = await getExport('lonely');
        expect(object.status).toBeUndefined();
        expect(object.metadata.finalizers ?? []).toEqual([]);
        expect(existsSync(lonely)).toBe(false);
        // Without a finalizer, it goes at once.
        await kube().kubectl(['delete', 'nbdexport', 'lonely', '-n', NAMESPACE, '--timeout=60s']);
      }),
    LONG,
  );

  it(
    'answers /healthz, /readyz and /metrics',
    () =>
      withDiagnostics(async () => {
        for (const node of nodes) {
          expect(await node.get('/healthz')).toMatchObject({ status: 200 });
          expect(await node.get('/readyz')).toMatchObject({ status: 200 });
          const metrics = await node.get('/metrics');
          expect(metrics.status).toBe(200);
          expect(metrics.body).toMatch(/^# TYPE nbdx_ready gauge$/m);
          expect(await node.metric('nbdx_ready')).toBe(1);
          expect(await node.metric('nbdx_reconciles_total')).toBeGreaterThanOrEqual(2);
          expect(await node.metric('nbdx_workqueue_depth')).toBeGreaterThanOrEqual(0);
          expect((await node.get('/no-such-page')).status).toBe(404);
        }
      }),
    LONG,
  );

  it(
    'restarting a controller cuts no client and restarts no server',
    () =>
      withDiagnostics(async () => {
        const node = nodes[0]!;
        const held = [exportCase(`raw-${node.nodeName}`), exportCase(`qcow-${node.nodeName}`)];
        const servers = {
          nbd: await node.listenerPid(node.nbdPort),
          qemu: await node.listenerPid(node.qemuPort),
        };
        expect(servers.nbd, 'nbd-server listens').toBeDefined();
        expect(servers.qemu, 'qemu-storage-daemon listens').toBeDefined();

        // One client per server, connected, half its data sent, the connection held open.
        const transfers = await Promise.all(
          held.map(async (c) => {
            const source = join(work, `${c.name}.restart.in`);
            await writeRandomFile(source, c.size);
            const uri = uriOf(await getExport(c.name));
            return { c, source, uri, transfer: new HeldTransfer(source, uri, c.size / 2) };
          }),
        );
        try {
          await waitFor('both clients to be connected', async () =>
            (await establishedConnections(node.nbdPort)) >= 1 &&
            (await establishedConnections(node.qemuPort)) >= 1
              ? true
              : undefined,
          );
          for (const { transfer } of transfers) await transfer.firstHalfWritten();

          expect(await node.stop('SIGTERM'), 'the controller exits 0 on SIGTERM').toBe(0);
          expect(isRunning(servers.nbd!), 'nbd-server outlives the controller').toBe(true);
          expect(isRunning(servers.qemu!), 'qemu-storage-daemon outlives the controller').toBe(true);
          expect(await establishedConnections(node.nbdPort)).toBeGreaterThanOrEqual(1);
          expect(await establishedConnections(node.qemuPort)).toBeGreaterThanOrEqual(1);

          await node.start();
          await waitFor(`${node.nodeName} to be ready again`, async () =>
            (await node.get('/readyz')).status === 200 ? true : undefined,
          );
          // The new process has reconciled this node's exports, with the clients connected.
          await waitFor(`${node.nodeName} to reconcile its exports after the restart`, async () => {
            const runs = await node.metric('nbdx_reconciles_total');
            return runs !== undefined && runs >= held.length ? true : undefined;
          });
          // While the clients are still connected, status should say Ready: each export is
          // served as specified. Noted here, asserted after the clients' own outcome below, so
          // that a status problem cannot hide whether a client was cut.
          const readyWhileConnected = await waitReady(
            held.map((c) => c.name),
            180,
          ).then(
            () => 'Ready',
            (error: unknown) => (error instanceof Error ? error.message.split('\n')[0]! : String(error)),
          );
          // The same servers, still listening: adopted, not restarted.
          expect(await node.listenerPid(node.nbdPort), 'the same nbd-server listens').toBe(servers.nbd);
          expect(await node.listenerPid(node.qemuPort), 'the same qemu-storage-daemon listens').toBe(
            servers.qemu,
          );

          for (const { c, source, uri, transfer } of transfers) {
            const result = await transfer.finish();
            expect(result, `${c.name}: the held transfer completes`).toEqual({ exitCode: 0, stderr: '' });
            const readBack = join(work, `${c.name}.restart.out`);
            await nbdcopy(uri, readBack);
            c.sha256 = await sha256File(source);
            expect(await sha256File(readBack), `${c.name}: every byte arrived`).toBe(c.sha256);
          }
          expect(await node.listenerPid(node.nbdPort)).toBe(servers.nbd);
          expect(await node.listenerPid(node.qemuPort)).toBe(servers.qemu);
          expect(
            readyWhileConnected,
            'Ready for the current generation while each export had its client',
          ).toBe('Ready');
          await waitReady(held.map((c) => c.name));
        } finally {
          for (const { transfer } of transfers) transfer.kill();
        }
      }),
    LONG,
  );

  it(
    'picks up a spec change: observedGeneration follows generation, and the export turns read-only',
    () =>
      withDiagnostics(async () => {
        const changed = [exportCase('raw-node2'), exportCase('qcow-node2')];
        for (const c of changed) {
          const before = await getExport(c.name);
          expect(await canWrite(uriOf(before)), `${c.name} is writable before`).toBe(true);
          await kube().kubectl(['apply', '-f', '-'], { input: manifestOf(c, { readOnly: true }) });
          const after = await getExport(c.name);
          expect(after.metadata.generation).toBe((before.metadata.generation ?? 0) + 1);
        }
        const objects = await waitReady(changed.map((c) => c.name));
        for (const [index, object] of objects.entries()) {
          const c = changed[index]!;
          const uri = uriOf(object);
          expect(object.spec.readOnly).toBe(true);
          expect(await canWrite(uri), `${c.name} is read-only once Ready for the new generation`).toBe(false);
          const attempt = await tryNbdcopy(join(work, `${c.name}.in`), uri);
          expect(attempt.exitCode, `${c.name}: a write fails`).not.toBe(0);
          const readBack = join(work, `${c.name}.ro.out`);
          await nbdcopy(uri, readBack);
          expect(await sha256File(readBack), `${c.name}: the data is unchanged`).toBe(c.sha256);
        }
      }),
    LONG,
  );

  it(
    'while the API server is away every node keeps serving; afterwards the controllers catch up',
    () =>
      withDiagnostics(async () => {
        const served = [...exports.values()];
        const uris = new Map<string, string>();
        for (const c of served) uris.set(c.name, uriOf(await getExport(c.name)));

        await kube().stopApiserver();
        try {
          expect(await kube().apiserverReady()).toBe(false);
          // Watch the nodes for a while with the API gone: a fixed number of rounds, not a
          // deadline, so a slow machine only makes this take longer.
          for (let round = 0; round < 8; round++) {
            for (const c of served)
              expect(await exportSize(uris.get(c.name)!), `${c.name} in round ${round}`).toBe(c.size);
            for (const node of nodes) expect((await node.get('/healthz')).status).toBe(200);
            await sleep(2500);
          }
          for (const node of nodes) expect((await node.get('/metrics')).status).toBe(200);
        } finally {
          await kube().startApiserver();
        }

        for (const node of nodes)
          await waitFor(
            `${node.nodeName}'s /readyz to recover`,
            async () => ((await node.get('/readyz')).status === 200 ? true : undefined),
            { timeoutMs: 300_000 },
          );
        // A new NbdExport becomes Ready: the watch is back.
        const late: ExportCase = {
          name: 'after-outage-node3',
          node: nodes[2]!,
          format: 'raw',
          path: join(nodes[2]!.allowedRoot, 'after-outage.img'),
          deletionPolicy: 'Delete',
          size: 8 * MiB,
        };
        exports.set(late.name, late);
        await kube().kubectl(['apply', '-f', '-'], { input: manifestOf(late) });
        const [object] = await waitReady([late.name]);
        expect(await exportSize(uriOf(object!))).toBe(late.size);
        // Everything else is as it was.
        await waitReady(served.map((c) => c.name));
        for (const c of served) expect(await exportSize(uris.get(c.name)!)).toBe(c.size);
      }),
    LONG,
  );

  it(
    'deleting runs the finalizer: the export stops, the image goes or stays as deletionPolicy says',
    () =>
      withDiagnostics(async () => {
        const all = [...exports.values()];
        const uris = new Map<string, string>();
        for (const c of all) uris.set(c.name, uriOf(await getExport(c.name)));
        expect(new Set(all.map((c) => c.deletionPolicy))).toEqual(new Set(['Retain', 'Delete']));

        // kubectl delete waits until the objects are gone, i.e. until every finalizer ran.
        await kube().kubectl([
          'delete',
          'nbdexports',
          ...all.map((c) => c.name),
          '-n',
          NAMESPACE,
          `--timeout=${READY_TIMEOUT_S}s`,
        ]);
        const left = await kube().kubectl(['get', 'nbdexports', '-n', NAMESPACE, '-o', 'name']);
        expect(left.stdout.trim()).toBe('');

        for (const c of all) {
          expect(await isServed(uris.get(c.name)!), `${c.name} is no longer served`).toBe(false);
          expect(existsSync(c.path), `${c.name} (${c.deletionPolicy}): ${c.path}`).toBe(
            c.deletionPolicy === 'Retain',
          );
          if (c.deletionPolicy === 'Retain') {
            // The kept image still holds what was written.
            const readBack = join(work, `${c.name}.retained`);
            if (c.format === 'raw') {
              expect(await sha256File(c.path)).toBe(c.sha256);
            } else {
              await execa('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', c.path, readBack]);
              expect(await sha256File(readBack)).toBe(c.sha256);
            }
          }
        }
        for (const node of nodes) {
          expect((await node.get('/healthz')).status).toBe(200);
          expect((await node.get('/readyz')).status).toBe(200);
        }
      }),
    LONG,
  );
});
