/**
 * manifests/: the kustomization renders and a real API server accepts it; the ServiceAccount's
 * RBAC allows exactly what the controller sends and nothing more; the DaemonSet has what a
 * node needs; and its supervisor script restarts a crashed controller without ending the
 * container, and stops the servers when the pod goes.
 */
import { spawn } from 'node:child_process';
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadAll } from 'js-yaml';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startCluster, type Cluster } from './harness/cluster.js';
import { waitFor } from '../support/poll.js';
import { REPO_ROOT, isRunning } from '../support/repo.js';
import {
  CONTROLLER_NAMESPACE,
  CONTROLLER_SERVICE_ACCOUNT,
  RBAC_MANIFESTS,
  applyControllerRbac,
  serviceAccountKubeconfig,
} from './harness/service-account.js';

interface KubeObject {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string };
  [key: string]: unknown;
}

interface Container {
  name: string;
  image: string;
  command?: string[];
  args?: string[];
  env?: { name: string; value?: string; valueFrom?: { fieldRef?: { fieldPath: string } } }[];
  ports?: { name: string; containerPort: number }[];
  securityContext?: { privileged?: boolean };
  livenessProbe?: { httpGet: { path: string; port: string | number } };
  readinessProbe?: { httpGet: { path: string; port: string | number } };
  volumeMounts?: { name: string; mountPath: string }[];
}

interface DaemonSet extends KubeObject {
  spec: {
    updateStrategy?: { type: string };
    template: {
      spec: {
        serviceAccountName?: string;
        hostNetwork?: boolean;
        hostPID?: boolean;
        containers: Container[];
        volumes?: { name: string; hostPath?: { path: string } }[];
      };
    };
  };
}

async function renderKustomization(cluster: Cluster): Promise<KubeObject[]> {
  const { stdout } = await cluster.kubectl(['kustomize', 'manifests/']);
  return loadAll(stdout) as KubeObject[];
}

async function daemonSet(): Promise<DaemonSet> {
  const objects = loadAll(
    await readFile(join(REPO_ROOT, 'manifests', 'daemonset.yaml'), 'utf8'),
  ) as DaemonSet[];
  const found = objects.find((o) => o.kind === 'DaemonSet');
  if (!found) throw new Error('manifests/daemonset.yaml has no DaemonSet');
  return found;
}

describe('manifests/ on a real API server', () => {
  let cluster: Cluster;

  beforeAll(async () => {
    cluster = await startCluster();
  });

  afterAll(async () => {
    await cluster?.down();
  });

  it('kustomize renders the CRD (from ../crds), the namespace, RBAC and the DaemonSet', async () => {
    const objects = await renderKustomization(cluster);
    expect(objects.map((o) => `${o.kind}/${o.metadata.name}`).sort()).toEqual(
      [
        'ClusterRole/nbd-export-controller',
        'ClusterRoleBinding/nbd-export-controller',
        'CustomResourceDefinition/nbdexports.nbd.dev',
        'DaemonSet/nbd-export-controller',
        'Namespace/nbd-export-controller',
        'ServiceAccount/nbd-export-controller',
      ].sort(),
    );
    for (const o of objects)
      if (o.kind === 'ServiceAccount' || o.kind === 'DaemonSet')
        expect(o.metadata.namespace).toBe(CONTROLLER_NAMESPACE);
  });

  it('kubectl apply --dry-run=server -k manifests/ is accepted', async () => {
    // A server-side dry run does not create the namespace, and objects in it need it: so the
    // namespace first, for real.
    await cluster.kubectl(['apply', '-f', 'manifests/namespace.yaml']);
    const { stdout, stderr } = await cluster.kubectl(['apply', '--dry-run=server', '-k', 'manifests/']);
    expect(stderr).toBe('');
    const lines = stdout.trim().split('\n');
    expect(lines).toHaveLength(6);
    for (const line of lines) expect(line).toMatch(/ \(server dry run\)$/);
    expect(stdout).toContain('daemonset.apps/nbd-export-controller');
  });

  describe("the controller's ServiceAccount", () => {
    let kubeconfig: string;

    beforeAll(async () => {
      await applyControllerRbac(cluster);
      kubeconfig = await serviceAccountKubeconfig(cluster);
    });

    it('is who the minted token says', async () => {
      const { stdout } = await cluster.kubectl(
        ['auth', 'whoami', '-o', 'jsonpath={.status.userInfo.username}'],
        {
          kubeconfig,
        },
      );
      expect(stdout).toBe(`system:serviceaccount:${CONTROLLER_NAMESPACE}:${CONTROLLER_SERVICE_ACCOUNT}`);
    });

    const canI = async (...args: string[]) => {
      const result = await cluster.kubectl(['auth', 'can-i', ...args], { kubeconfig, reject: false });
      // Exit 0 "yes", 1 "no"; anything else is an error, not an answer.
      if (result.stdout.trim() !== 'yes' && result.stdout.trim() !== 'no')
        throw new Error(`kubectl auth can-i ${args.join(' ')}: ${result.stderr}`);
      return result.stdout.trim() === 'yes';
    };

    // Everything src/kube/kube-export-store.ts and watch-loop.ts send, in any namespace.
    const allowed = [
      ['list', 'nbdexports.nbd.dev', '--all-namespaces'],
      ['watch', 'nbdexports.nbd.dev', '--all-namespaces'],
      ['get', 'nbdexports.nbd.dev', '-n', 'backups'],
      ['patch', 'nbdexports.nbd.dev', '-n', 'backups'],
      ['patch', 'nbdexports.nbd.dev', '--subresource=status', '-n', 'backups'],
      ['create', 'events.events.k8s.io', '-n', 'backups'],
    ];
    for (const args of allowed)
      it(`can ${args.join(' ')}`, async () => {
        expect(await canI(...args)).toBe(true);
      });

    const refused = [
      ['get', 'secrets', '-n', CONTROLLER_NAMESPACE],
      ['list', 'secrets', '--all-namespaces'],
      ['list', 'pods', '--all-namespaces'],
      ['get', 'pods', '-n', CONTROLLER_NAMESPACE],
      ['delete', 'nbdexports.nbd.dev', '-n', 'backups'],
      ['create', 'nbdexports.nbd.dev', '-n', 'backups'],
      ['update', 'nbdexports.nbd.dev', '-n', 'backups'],
      ['delete', 'nbdexports.nbd.dev', '--subresource=status', '-n', 'backups'],
      ['patch', 'customresourcedefinitions.apiextensions.k8s.io'],
      ['create', 'serviceaccounts/token', '-n', CONTROLLER_NAMESPACE],
      ['get', 'nodes'],
      ['delete', 'events.events.k8s.io', '-n', 'backups'],
    ];
    for (const args of refused)
      it(`cannot ${args.join(' ')}`, async () => {
        expect(await canI(...args)).toBe(false);
      });

    it('the rights hold for real requests, not only in review', async () => {
      const listed = await cluster.kubectl(['get', 'nbdexports', '--all-namespaces'], {
        kubeconfig,
        reject: false,
      });
      expect(listed.stderr).not.toContain('Forbidden');
      expect(listed.exitCode).toBe(0);
      const secrets = await cluster.kubectl(['get', 'secrets', '-n', CONTROLLER_NAMESPACE], {
        kubeconfig,
        reject: false,
      });
      expect(secrets.exitCode).not.toBe(0);
      expect(secrets.stderr).toContain('Forbidden');
    });

    it('applying the RBAC again changes nothing', async () => {
      const { stdout } = await cluster.kubectl(['apply', ...RBAC_MANIFESTS.flatMap((file) => ['-f', file])]);
      for (const line of stdout.trim().split('\n')) expect(line).toMatch(/ unchanged$/);
    });
  });
});

describe('the DaemonSet', () => {
  it('runs privileged on the host network with the ServiceAccount, node name from the downward API', async () => {
    const ds = await daemonSet();
    const pod = ds.spec.template.spec;
    expect(pod.serviceAccountName).toBe(CONTROLLER_SERVICE_ACCOUNT);
    expect(pod.hostNetwork).toBe(true);
    // The servers outlive the pod (hostPID, their own cgroup): a rolling update cuts no client.
    expect(ds.spec.updateStrategy?.type).toBe('RollingUpdate');
    expect(pod.hostPID).toBe(true);
    expect(pod.containers).toHaveLength(1);
    const container = pod.containers[0]!;
    expect(container.securityContext?.privileged).toBe(true);
    const env = Object.fromEntries(
      (container.env ?? []).map((e) => [e.name, e.valueFrom?.fieldRef?.fieldPath ?? e.value]),
    );
    expect(env).toMatchObject({ NODE_NAME: 'spec.nodeName', HOST_IP: 'status.hostIP' });
    expect(container.args).toContain('--node-name=$(NODE_NAME)');
    expect(container.args).toContain('--advertise-address=$(HOST_IP)');
    expect(container.args).toContain('--allowed-root=/var/lib/nbd-exports');
    expect(container.args).toContain('--health-port=8080');
  });

  it('exposes 10809, 10810 and 8080, and probes /healthz and /readyz on 8080', async () => {
    const container = (await daemonSet()).spec.template.spec.containers[0]!;
    const ports = Object.fromEntries((container.ports ?? []).map((p) => [p.name, p.containerPort]));
    expect(ports).toEqual({ nbd: 10809, 'qemu-nbd': 10810, health: 8080 });
    expect(container.livenessProbe?.httpGet).toEqual({ path: '/healthz', port: 'health' });
    expect(container.readinessProbe?.httpGet).toEqual({ path: '/readyz', port: 'health' });
  });

  it('mounts the allowed root and the state directory from the host at the same paths', async () => {
    const pod = (await daemonSet()).spec.template.spec;
    const hostPaths = Object.fromEntries((pod.volumes ?? []).map((v) => [v.name, v.hostPath?.path]));
    const mounts = Object.fromEntries(
      (pod.containers[0]!.volumeMounts ?? []).map((m) => [m.mountPath, hostPaths[m.name]]),
    );
    expect(mounts).toMatchObject({
      '/var/lib/nbd-exports': '/var/lib/nbd-exports',
      '/var/lib/nbd-export-controller': '/var/lib/nbd-export-controller',
      '/dev': '/dev',
    });
  });
});

/**
 * The container's first process is a bash loop (the DaemonSet's command). Run here, outside a
 * container, with a stand-in controller: it starts the controller again after a crash while a
 * "server" the first one started keeps running; on SIGTERM it stops the controller and exits
 * 0, leaving the servers running for the next pod to adopt.
 */
describe("the DaemonSet's supervisor", () => {
  let dir: string;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'nbdx-e2e-supervisor-'));
  });

  afterAll(async () => {
    // The stand-in server, if a failure left it running.
    const pid = Number(await readFile(join(dir, 'server.pid'), 'utf8').catch(() => ''));
    if (pid > 0) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone
      }
    }
    await rm(dir, { recursive: true, force: true });
  });

  it('restarts a crashed controller in the same container, and leaves the servers running on SIGTERM', async () => {
    const container = (await daemonSet()).spec.template.spec.containers[0]!;
    const [shell, dashC, script, argv0] = container.command ?? [];
    expect([shell, dashC, argv0]).toEqual(['/bin/bash', '-c', 'supervisor']);
    expect(script).toContain('nbd-export-controller run --source kube "$@"');
    // Kubernetes would expand $(NAME) in the script: it must hold no such form.
    expect(script).not.toMatch(/\$\(/);

    const bin = join(dir, 'bin');
    await mkdir(bin);
    const log = join(dir, 'calls.log');
    // The first `run` starts a "server" in its own session and crashes; later ones run until
    // SIGTERM. `stop-servers` stops the server.
    await writeFile(
      join(bin, 'nbd-export-controller'),
      `#!/bin/bash
echo "$$ $*" >>"${log}"
case "$1" in
  run)
    if [[ ! -e "${dir}/crashed" ]]; then
      touch "${dir}/crashed"
      setsid sleep 3600 </dev/null >/dev/null 2>&1 &
      echo $! >"${dir}/server.pid"
      exit 3
    fi
    trap 'echo "$$ stopped by SIGTERM" >>"${log}"; exit 0' TERM
    while :; do sleep 0.1; done ;;
  stop-servers)
    kill "$(<"${dir}/server.pid")" ;;
esac
`,
    );
    await chmod(join(bin, 'nbd-export-controller'), 0o755);

    const args = (container.args ?? []).map((arg) =>
      arg.replace('$(NODE_NAME)', 'node-x').replace('$(STATE_DIR)', dir),
    );
    const supervisor = spawn('/bin/bash', ['-c', script!, 'supervisor', ...args], {
      env: { ...process.env, PATH: `${bin}:${process.env.PATH ?? ''}`, STATE_DIR: dir },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    supervisor.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const exited = new Promise<number | null>((resolve) => supervisor.once('exit', (code) => resolve(code)));
    const calls = async () =>
      (await readFile(log, 'utf8').catch(() => '')).trim().split('\n').filter(Boolean);

    try {
      const runs = await waitFor('the supervisor to start the controller a second time', async () => {
        const lines = (await calls()).filter((line) => / run /.test(line));
        return lines.length >= 2 ? lines : undefined;
      });
      expect(runs[0]).toContain(
        `run --source kube --node-name=node-x --advertise-address=$(HOST_IP) --state-dir=${dir}`,
      );
      expect(stderr).toContain('the controller exited with status 3');
      const serverPid = Number(await readFile(join(dir, 'server.pid'), 'utf8'));
      // The server the crashed controller started still runs.
      expect(isRunning(serverPid)).toBe(true);
      expect(supervisor.exitCode).toBeNull();

      supervisor.kill('SIGTERM');
      expect(await exited).toBe(0);
      const lines = await calls();
      expect(lines.some((line) => line.endsWith('stopped by SIGTERM'))).toBe(true);
      expect(lines.some((line) => line.includes(' stop-servers'))).toBe(false);
      expect(isRunning(serverPid)).toBe(true);
    } finally {
      supervisor.kill('SIGKILL');
    }
  });
});
