/**
 * A control plane with a real node for one test file: `hack/cluster.sh up --with-node` with its
 * own CLUSTER_DIR and free ports, so node-1 (address NODE_IP, on lo) runs a kubelet on
 * containerd and runc with the
 * controller's image (hack/image.sh) already imported. The image archive is IMAGE_ARCHIVE when
 * set (hack/test.sh builds it once), else this builds it. `down()` stops all of it.
 *
 * The node's pods use the host's network and directories: the DaemonSet's NBD servers listen on
 * the host's 10809 and 10810, its health server on 8080, and its images live in the host's
 * /var/lib/nbd-exports, as manifests/ says. So one such cluster runs on a machine at a time.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { CLUSTER_SCRIPT, REPO_ROOT, freePorts, requireBinary } from '../../support/repo.js';
import { Cluster, withCrdInstalled } from './cluster.js';

export const NODE_NAME = 'node-1';
/** The node's address (hack/cluster-node.sh puts it on lo: the kubelet refuses 127.0.0.0/8). */
export const NODE_IP = '198.51.100.10';

export class NodeCluster extends Cluster {
  /** containerd's socket on the node (`ctr --address`). */
  get containerdSocket(): string {
    return join(this.dir, 'node', 'containerd', 'containerd.sock');
  }

  /** `ctr` in the CRI's namespace of the node's containerd. */
  async ctr(args: string[]): Promise<string> {
    const { stdout } = await execa('ctr', [
      '--address',
      this.containerdSocket,
      '--namespace',
      'k8s.io',
      ...args,
    ]);
    return stdout;
  }
}

/** The OCI archive of the controller's image: IMAGE_ARCHIVE, or one hack/image.sh builds now. */
export async function imageArchive(): Promise<string> {
  const given = process.env.IMAGE_ARCHIVE;
  if (given !== undefined && given !== '') return given;
  const built = await execa(join(REPO_ROOT, 'hack', 'image.sh'), [], { reject: false });
  const archive = String(built.stdout).trim().split('\n').at(-1) ?? '';
  if (built.exitCode !== 0 || archive === '')
    throw new Error(`hack/image.sh failed (exit ${built.exitCode}):\n${String(built.stderr)}`);
  return archive;
}

export async function startNodeCluster(): Promise<NodeCluster> {
  for (const binary of ['go', 'openssl', 'curl', 'containerd', 'runc', 'ctr', 'iptables', 'mmdebstrap'])
    await requireBinary(binary);
  const archive = await imageArchive();
  const dir = await mkdtemp(join(tmpdir(), 'nbdx-e2e-node-'));
  const [etcd, etcdPeer, apiserver, kubelet, kubeletHealthz, controllerManager, scheduler] =
    await freePorts(7);
  const env: Record<string, string> = {
    CLUSTER_DIR: dir,
    ETCD_PORT: String(etcd),
    ETCD_PEER_PORT: String(etcdPeer),
    APISERVER_PORT: String(apiserver),
    KUBELET_PORT: String(kubelet),
    KUBELET_HEALTHZ_PORT: String(kubeletHealthz),
    CONTROLLER_MANAGER_PORT: String(controllerManager),
    SCHEDULER_PORT: String(scheduler),
    IMAGE_ARCHIVE: archive,
    READY_TIMEOUT: '300',
    NODE_IP,
  };
  const kubectlPath = (await execa(CLUSTER_SCRIPT, ['kubectl'], { env })).stdout.trim();
  const up = await execa(CLUSTER_SCRIPT, ['up', '--with-node'], { env, reject: false });
  if (up.exitCode !== 0) {
    await execa(CLUSTER_SCRIPT, ['down'], { env, reject: false });
    await rm(dir, { recursive: true, force: true });
    throw new Error(`hack/cluster.sh up --with-node failed (exit ${up.exitCode}):\n${String(up.stderr)}`);
  }
  process.stderr.write(`${String(up.stderr)}\n`);
  const kubeconfig = (await execa(CLUSTER_SCRIPT, ['kubeconfig'], { env })).stdout.trim();
  return withCrdInstalled(new NodeCluster({ dir, kubectlPath, kubeconfig, env }));
}
