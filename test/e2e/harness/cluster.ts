/**
 * A private control plane for one test file: `hack/cluster.sh up` with its own CLUSTER_DIR in
 * a temporary directory and free ports, our kubectl bound to its admin kubeconfig, the CRD
 * applied and Established. `down()` stops everything `up` started and removes the directory.
 *
 * It can also stop and start the API server alone (etcd keeps running), for tests of what the
 * controllers do while the API is away: hack/cluster.sh has no such subcommand, so this reads
 * the running kube-apiserver's command line from /proc and starts the same one again, with the
 * same pid file, so that `hack/cluster.sh down` still finds and stops it.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { load } from 'js-yaml';
import { CLUSTER_SCRIPT, REPO_ROOT, freePorts, isRunning, requireBinary } from '../../support/repo.js';
import { waitFor } from '../../support/poll.js';

export const CRD_NAME = 'nbdexports.nbd.dev';

export interface KubectlOptions {
  /** Standard input (a manifest for `apply -f -`). */
  input?: string;
  /** Another kubeconfig than the admin one (a ServiceAccount's). */
  kubeconfig?: string;
  /** Default true: a non-zero exit throws, with kubectl's stderr in the message. */
  reject?: boolean;
}

export interface KubectlResult {
  exitCode: number;
  stdout: string;
  stderr: string;
}

export class Cluster {
  /** CLUSTER_DIR: etcd data, pki, kubeconfig, pid files, logs. */
  readonly dir: string;
  readonly kubectlPath: string;
  /** The admin kubeconfig (system:masters). */
  readonly kubeconfig: string;
  readonly env: Record<string, string>;
  #downed = false;

  constructor(init: { dir: string; kubectlPath: string; kubeconfig: string; env: Record<string, string> }) {
    this.dir = init.dir;
    this.kubectlPath = init.kubectlPath;
    this.kubeconfig = init.kubeconfig;
    this.env = init.env;
  }

  /** kubectl against this control plane; never the caller's KUBECONFIG. */
  async kubectl(args: string[], options: KubectlOptions = {}): Promise<KubectlResult> {
    const result = await execa(
      this.kubectlPath,
      ['--kubeconfig', options.kubeconfig ?? this.kubeconfig, ...args],
      {
        cwd: REPO_ROOT,
        input: options.input ?? '',
        reject: false,
        // A discovery cache of its own: another control plane on the same port earlier must not
        // answer for this one.
        env: { KUBECACHEDIR: join(this.dir, 'kubectl-cache'), KUBECONFIG: '' },
      },
    );
    const outcome = {
      exitCode: result.exitCode ?? -1,
      stdout: String(result.stdout),
      stderr: String(result.stderr),
    };
    if ((options.reject ?? true) && outcome.exitCode !== 0)
      throw new Error(
        `kubectl ${args.join(' ')} exited ${outcome.exitCode}: ${outcome.stderr || outcome.stdout}`,
      );
    return outcome;
  }

  /** `kubectl ... -o json`, parsed. */
  async kubectlJson<T = unknown>(args: string[], options: KubectlOptions = {}): Promise<T> {
    const { stdout } = await this.kubectl([...args, '-o', 'json'], options);
    return JSON.parse(stdout) as T;
  }

  /** The API server answers /readyz with ok. */
  async apiserverReady(): Promise<boolean> {
    const result = await this.kubectl(['get', '--raw', '/readyz', '--request-timeout=5s'], { reject: false });
    return result.exitCode === 0 && result.stdout.trim() === 'ok';
  }

  get #apiserverPidFile(): string {
    return join(this.dir, 'kube-apiserver.pid');
  }

  /** Stops kube-apiserver (SIGTERM, SIGKILL after 30 s); etcd keeps running. */
  async stopApiserver(): Promise<void> {
    const pid = Number((await readFile(this.#apiserverPidFile, 'utf8')).trim());
    if (!Number.isInteger(pid) || pid <= 0)
      throw new Error(`no kube-apiserver pid in ${this.#apiserverPidFile}`);
    const argv = (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0').filter((arg) => arg !== '');
    if (!argv[0]?.endsWith('/kube-apiserver'))
      throw new Error(`pid ${pid} is not a kube-apiserver: ${argv.join(' ')}`);
    await writeFile(join(this.dir, 'kube-apiserver.argv.json'), JSON.stringify(argv));
    process.kill(pid, 'SIGTERM');
    try {
      await waitFor(`kube-apiserver (pid ${pid}) to exit`, () => (isRunning(pid) ? undefined : true), {
        timeoutMs: 30_000,
        intervalMs: 200,
      });
    } catch {
      process.kill(pid, 'SIGKILL');
      await waitFor(`kube-apiserver (pid ${pid}) to die`, () => (isRunning(pid) ? undefined : true));
    }
  }

  /** Starts the kube-apiserver stopped by stopApiserver() again, and waits for /readyz. */
  async startApiserver(): Promise<void> {
    const argv = JSON.parse(await readFile(join(this.dir, 'kube-apiserver.argv.json'), 'utf8')) as string[];
    const [binary, ...args] = argv;
    if (binary === undefined) throw new Error('no saved kube-apiserver command line');
    const log = await open(join(this.dir, 'logs', 'kube-apiserver.log'), 'a');
    try {
      // Its own session, like hack/cluster.sh starts it, so it outlives nothing of ours.
      const child = spawn(binary, args, { detached: true, stdio: ['ignore', log.fd, log.fd] });
      if (child.pid === undefined) throw new Error(`could not start ${binary}`);
      child.unref();
      await writeFile(this.#apiserverPidFile, `${child.pid}\n`);
    } finally {
      await log.close();
    }
    await waitFor(
      'kube-apiserver to be ready again',
      async () => ((await this.apiserverReady()) ? true : undefined),
      {
        timeoutMs: 180_000,
        intervalMs: 500,
      },
    );
  }

  /** Stops the control plane and removes its directory (set E2E_KEEP=1 to keep it). Idempotent. */
  async down(): Promise<void> {
    if (this.#downed) return;
    this.#downed = true;
    await execa(CLUSTER_SCRIPT, ['down'], { env: this.env, reject: false, stdio: 'inherit' });
    if (process.env.E2E_KEEP === undefined) await rm(this.dir, { recursive: true, force: true });
    else process.stderr.write(`e2e: kept the control plane's directory ${this.dir}\n`);
  }

  /** The server URL and CA (base64) of the admin kubeconfig, for kubeconfigs of other users. */
  async clusterConnection(): Promise<{ server: string; certificateAuthorityData: string }> {
    const config = load(await readFile(this.kubeconfig, 'utf8')) as {
      clusters?: { cluster?: { server?: string; 'certificate-authority-data'?: string } }[];
    };
    const cluster = config.clusters?.[0]?.cluster;
    if (!cluster?.server || !cluster['certificate-authority-data'])
      throw new Error(`${this.kubeconfig} has no server or certificate-authority-data`);
    return { server: cluster.server, certificateAuthorityData: cluster['certificate-authority-data'] };
  }
}

/**
 * Starts a control plane of its own for this test file (building the binaries first if this
 * machine has never built them: several minutes), applies crds/ and waits until the CRD is
 * Established and served.
 */
export async function startCluster(): Promise<Cluster> {
  await requireBinary('go', 'the control plane is built from Go modules: install Go');
  await requireBinary('openssl');
  await requireBinary('curl');
  const dir = await mkdtemp(join(tmpdir(), 'nbdx-e2e-cluster-'));
  const [etcdPort, etcdPeerPort, apiserverPort] = await freePorts(3);
  const env: Record<string, string> = {
    CLUSTER_DIR: dir,
    ETCD_PORT: String(etcdPort),
    ETCD_PEER_PORT: String(etcdPeerPort),
    APISERVER_PORT: String(apiserverPort),
  };
  const kubectlPath = (await execa(CLUSTER_SCRIPT, ['kubectl'], { env })).stdout.trim();
  const up = await execa(CLUSTER_SCRIPT, ['up'], { env, reject: false });
  if (up.exitCode !== 0) {
    await execa(CLUSTER_SCRIPT, ['down'], { env, reject: false });
    throw new Error(`hack/cluster.sh up failed (exit ${up.exitCode}):\n${String(up.stderr)}`);
  }
  const kubeconfig = (await execa(CLUSTER_SCRIPT, ['kubeconfig'], { env })).stdout.trim();
  return withCrdInstalled(new Cluster({ dir, kubectlPath, kubeconfig, env }));
}

/**
 * Installs the CRD and waits until NbdExports are served (established, and known to discovery
 * and a list); a cluster where that fails is torn down.
 */
export async function withCrdInstalled<T extends Cluster>(cluster: T): Promise<T> {
  try {
    await cluster.kubectl(['apply', '-f', 'crds/']);
    await cluster.kubectl(['wait', '--for=condition=Established', `crd/${CRD_NAME}`, '--timeout=120s']);
    await waitFor('NbdExports to be served', async () =>
      (await cluster.kubectl(['get', 'nbdexports', '-A'], { reject: false })).exitCode === 0
        ? true
        : undefined,
    );
  } catch (error) {
    await cluster.down();
    throw error;
  }
  return cluster;
}
