/**
 * The DaemonSet on a real node: `hack/cluster.sh up --with-node` runs a kubelet on containerd
 * and runc (node-1, its address on lo) with the image hack/image.sh built, and
 * `kubectl apply -k manifests/` installs the controller there unchanged. Its pod must run Ready
 * through its probes on its ServiceAccount's in-cluster config; NbdExports on node-1 become
 * Ready and carry data through status.uri; `kubectl logs` shows JSON; and neither deleting the
 * pod nor rolling the DaemonSet to another image cuts a client in the middle of a transfer
 * (the servers are outside the pod: manifests/daemonset.yaml, docs/kubernetes.md).
 *
 * The tests run in order and build on each other. Images live in the host's
 * /var/lib/nbd-exports (the manifests' allowed root), under a directory of this run's own.
 */
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { NbdExport } from '../../src/api/types.js';
import {
  HeldTransfer,
  isServed,
  nbdcopy,
  requireNbdClients,
  sha256File,
  writeRandomFile,
} from '../support/nbd.js';
import { waitFor } from '../support/poll.js';
import { isRunning } from '../support/repo.js';
import { NODE_IP, NODE_NAME, startNodeCluster, type NodeCluster } from './harness/node.js';

const CONTROLLER_NAMESPACE = 'nbd-export-controller';
const NAMESPACE = 'e2e-node';
const MiB = 1024 * 1024;
const IMAGE_SIZE = 32 * MiB;
const ALLOWED_ROOT = '/var/lib/nbd-exports';
const STATE_DIR = '/var/lib/nbd-export-controller';
const LONG = 900_000;
const WAIT = { timeoutMs: 300_000, intervalMs: 1000 };

interface Pod {
  metadata: { name: string; uid: string; deletionTimestamp?: string };
  spec: { serviceAccountName?: string; nodeName?: string; containers: { image: string }[] };
  status: {
    phase?: string;
    hostIP?: string;
    conditions?: { type: string; status: string }[];
    containerStatuses?: { ready: boolean; restartCount: number }[];
  };
}

let cluster: NodeCluster | undefined;
let work = '';
let imagesDir = '';

function kube(): NodeCluster {
  if (!cluster) throw new Error('the cluster did not start');
  return cluster;
}

const exports = [
  { name: 'raw-disk', format: 'raw' as const, file: 'raw-disk.img' },
  { name: 'qcow2-disk', format: 'qcow2' as const, file: 'qcow2-disk.qcow2' },
];

async function controllerPods(): Promise<Pod[]> {
  const list = await kube().kubectlJson<{ items: Pod[] }>([
    'get',
    'pods',
    '-n',
    CONTROLLER_NAMESPACE,
    '-l',
    'app.kubernetes.io/name=nbd-export-controller',
  ]);
  return list.items;
}

function isReady(pod: Pod): boolean {
  return (
    pod.metadata.deletionTimestamp === undefined &&
    pod.status.phase === 'Running' &&
    pod.status.conditions?.some((c) => c.type === 'Ready' && c.status === 'True') === true
  );
}

/** Waits for exactly one controller pod, Ready, other than `previousUid`, and returns it. */
async function readyPod(description: string, previousUid?: string, image?: string): Promise<Pod> {
  return waitFor(
    description,
    async () => {
      const pods = await controllerPods();
      if (pods.length !== 1) return undefined;
      const [pod] = pods as [Pod];
      if (pod.metadata.uid === previousUid || !isReady(pod)) return undefined;
      if (image !== undefined && pod.spec.containers[0]?.image !== image) return undefined;
      return pod;
    },
    WAIT,
  );
}

async function readyExport(name: string): Promise<NbdExport> {
  return waitFor(
    `NbdExport ${name} to be Ready for its generation`,
    async () => {
      const object = await kube().kubectlJson<NbdExport>(['get', 'nbdexport', name, '-n', NAMESPACE]);
      const ready = object.status?.conditions?.find((c) => c.type === 'Ready');
      return ready?.status === 'True' &&
        ready.observedGeneration === object.metadata.generation &&
        object.status?.uri
        ? object
        : undefined;
    },
    WAIT,
  );
}

/** The pids of the NBD servers the controller runs, from their pid files in the state dir. */
async function serverPids(): Promise<number[]> {
  const pids: number[] = [];
  for (const file of ['nbd-server/nbd-server.pid', 'qemu-storage-daemon/qemu-storage-daemon.pid']) {
    const text = await readFile(join(STATE_DIR, file), 'utf8').catch(() => '');
    const pid = Number(text.trim());
    if (Number.isInteger(pid) && pid > 0) pids.push(pid);
  }
  return pids;
}

beforeAll(async () => {
  await requireNbdClients();
  work = await mkdtemp(join(tmpdir(), 'nbdx-e2e-node-data-'));
  imagesDir = join(ALLOWED_ROOT, `e2e-node-${process.pid}`);
  await mkdir(imagesDir, { recursive: true });
  cluster = await startNodeCluster();
  await kube().kubectl(['apply', '-k', 'manifests/']);
  await kube().kubectl(['create', 'namespace', NAMESPACE]);
}, LONG);

afterAll(async () => {
  if (cluster) {
    // While the controller still runs: it stops serving them, deletes the images it created
    // (deletionPolicy Delete) and forgets them in the host's state directory, which outlives
    // this cluster; then lets the finalizer go.
    await cluster.kubectl(['delete', 'nbdexports', '--all', '-n', NAMESPACE, '--timeout=120s'], {
      reject: false,
    });
    await cluster.down();
  }
  if (imagesDir !== '') await rm(imagesDir, { recursive: true, force: true });
  if (work !== '') await rm(work, { recursive: true, force: true });
}, LONG);

describe('the DaemonSet on a real node', () => {
  let pod: Pod;

  it(
    'runs Ready through its probes, as its ServiceAccount, with the image built here',
    { timeout: LONG },
    async () => {
      pod = await readyPod('the controller pod to be Running and Ready');
      expect(pod.spec.nodeName).toBe(NODE_NAME);
      expect(pod.spec.serviceAccountName).toBe('nbd-export-controller');
      expect(pod.spec.containers[0]?.image).toBe('nbd-export-controller:0.1.0');
      expect(pod.status.hostIP).toBe(NODE_IP);
      // The in-cluster config: the kubelet projected the ServiceAccount's token into the pod.
      const mounted = await kube().kubectl([
        'exec',
        '-n',
        CONTROLLER_NAMESPACE,
        pod.metadata.name,
        '--',
        'cat',
        '/var/run/secrets/kubernetes.io/serviceaccount/namespace',
      ]);
      expect(mounted.stdout.trim()).toBe(CONTROLLER_NAMESPACE);
    },
  );

  it(
    'serves NbdExports of its node at status.uri, and data goes through them',
    { timeout: LONG },
    async () => {
      for (const e of exports)
        await kube().kubectl(['apply', '-f', '-'], {
          input: JSON.stringify({
            apiVersion: 'nbd.dev/v1alpha1',
            kind: 'NbdExport',
            metadata: { name: e.name, namespace: NAMESPACE },
            spec: {
              nodeName: NODE_NAME,
              source: { file: { path: join(imagesDir, e.file), format: e.format, create: { size: '32Mi' } } },
              deletionPolicy: 'Delete',
            },
          }),
        });
      for (const e of exports) {
        const object = await readyExport(e.name);
        const uri = object.status?.uri ?? '';
        expect(uri.startsWith(`nbd://${NODE_IP}:${e.format === 'raw' ? 10809 : 10810}/`)).toBe(true);
        const data = join(work, `${e.name}.data`);
        await writeRandomFile(data, IMAGE_SIZE);
        await nbdcopy(data, uri);
        const back = join(work, `${e.name}.back`);
        await nbdcopy(uri, back);
        expect(await sha256File(back)).toBe(await sha256File(data));
      }
    },
  );

  it('logs JSON that kubectl logs shows', { timeout: LONG }, async () => {
    const { stdout } = await kube().kubectl(['logs', '-n', CONTROLLER_NAMESPACE, pod.metadata.name]);
    const records = stdout
      .split('\n')
      .filter((line) => line.startsWith('{'))
      .map((line) => JSON.parse(line) as { level?: number; msg?: string });
    expect(records.length).toBeGreaterThan(0);
    expect(records.every((r) => typeof r.level === 'number' && typeof r.msg === 'string')).toBe(true);
  });

  it(
    'keeps every export served when its pod is deleted, and the next pod adopts the servers',
    { timeout: LONG },
    async () => {
      const before = await serverPids();
      expect(before.length).toBe(2);
      await kube().kubectl(['delete', 'pod', '-n', CONTROLLER_NAMESPACE, pod.metadata.name, '--wait=true']);
      // No controller runs now; the servers do.
      for (const e of exports)
        expect(await isServed((await readyExport(e.name)).status?.uri ?? '')).toBe(true);
      pod = await readyPod('a new controller pod to be Ready', pod.metadata.uid);
      for (const e of exports) {
        const uri = (await readyExport(e.name)).status?.uri ?? '';
        expect(await isServed(uri)).toBe(true);
        const back = join(work, `${e.name}.after-delete`);
        await nbdcopy(uri, back);
        expect(await sha256File(back)).toBe(await sha256File(join(work, `${e.name}.data`)));
      }
      // Adopted, not restarted.
      expect(await serverPids()).toEqual(before);
      expect(before.every((pid) => isRunning(pid))).toBe(true);
    },
  );

  it(
    'rolls to another image with transfers held open on both servers, bit-exact, without a disconnect',
    { timeout: LONG },
    async () => {
      const nextImage = 'nbd-export-controller:0.1.0-next';
      // Another image reference for the same content, in the node's containerd: a new pod spec,
      // so the DaemonSet replaces the pod, as an upgrade does.
      const normalized = (await kube().ctr(['images', 'ls', '-q']))
        .split('\n')
        .find((n) => n.endsWith('/nbd-export-controller:0.1.0'));
      if (normalized === undefined) throw new Error('the node holds no nbd-export-controller:0.1.0');
      await kube().ctr([
        'images',
        'tag',
        '--force',
        normalized,
        normalized.replace(/:0\.1\.0$/, ':0.1.0-next'),
      ]);

      const transfers = exports.map((e) => ({ e, data: join(work, `${e.name}.upgrade`) }));
      const held: HeldTransfer[] = [];
      try {
        for (const t of transfers) {
          await writeRandomFile(t.data, IMAGE_SIZE);
          const uri = (await readyExport(t.e.name)).status?.uri ?? '';
          const transfer = new HeldTransfer(t.data, uri, IMAGE_SIZE / 2);
          held.push(transfer);
          await transfer.firstHalfWritten();
        }
        const before = await serverPids();
        await kube().kubectl([
          'set',
          'image',
          '-n',
          CONTROLLER_NAMESPACE,
          'daemonset/nbd-export-controller',
          `controller=${nextImage}`,
        ]);
        pod = await readyPod('the pod of the new image to be Ready', pod.metadata.uid, nextImage);
        expect(await serverPids()).toEqual(before);
        for (const transfer of held) {
          const { exitCode, stderr } = await transfer.finish();
          expect(stderr).toBe('');
          expect(exitCode).toBe(0);
        }
      } finally {
        for (const transfer of held) transfer.kill();
      }
      for (const t of transfers) {
        const uri = (await readyExport(t.e.name)).status?.uri ?? '';
        const back = join(work, `${t.e.name}.upgrade.back`);
        await nbdcopy(uri, back);
        expect(await sha256File(back)).toBe(await sha256File(t.data));
      }
    },
  );
});
