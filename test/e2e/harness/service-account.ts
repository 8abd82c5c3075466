/**
 * The controller's identity as the manifests define it: namespace, ServiceAccount, ClusterRole
 * and ClusterRoleBinding from manifests/, applied for real, and a kubeconfig that carries a
 * token of that ServiceAccount (no controller-manager runs, so the token comes from the
 * TokenRequest API through `kubectl create token`).
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { dump } from 'js-yaml';
import type { Cluster } from './cluster.js';

export const CONTROLLER_NAMESPACE = 'nbd-export-controller';
export const CONTROLLER_SERVICE_ACCOUNT = 'nbd-export-controller';

/** The manifests that give the controller its identity and rights (not the DaemonSet). */
export const RBAC_MANIFESTS = [
  'manifests/namespace.yaml',
  'manifests/serviceaccount.yaml',
  'manifests/clusterrole.yaml',
  'manifests/clusterrolebinding.yaml',
];

/** Applies the namespace, the ServiceAccount and its RBAC from manifests/. Idempotent. */
export async function applyControllerRbac(cluster: Cluster): Promise<void> {
  await cluster.kubectl(['apply', ...RBAC_MANIFESTS.flatMap((file) => ['-f', file])]);
}

/**
 * Applies the controller's RBAC, mints a token for its ServiceAccount and writes a kubeconfig
 * with it (server and CA from the admin kubeconfig) into the cluster's directory. Returns its
 * path.
 */
export async function serviceAccountKubeconfig(cluster: Cluster): Promise<string> {
  await applyControllerRbac(cluster);
  const { stdout } = await cluster.kubectl([
    'create',
    'token',
    CONTROLLER_SERVICE_ACCOUNT,
    '--namespace',
    CONTROLLER_NAMESPACE,
    '--duration=6h',
  ]);
  const token = stdout.trim();
  if (token.split('.').length !== 3) throw new Error(`kubectl create token printed no JWT: ${stdout}`);
  const { server, certificateAuthorityData } = await cluster.clusterConnection();
  const config = {
    apiVersion: 'v1',
    kind: 'Config',
    clusters: [
      { name: 'local', cluster: { server, 'certificate-authority-data': certificateAuthorityData } },
    ],
    users: [{ name: CONTROLLER_SERVICE_ACCOUNT, user: { token } }],
    contexts: [
      {
        name: CONTROLLER_SERVICE_ACCOUNT,
        context: { cluster: 'local', user: CONTROLLER_SERVICE_ACCOUNT, namespace: CONTROLLER_NAMESPACE },
      },
    ],
    'current-context': CONTROLLER_SERVICE_ACCOUNT,
  };
  const path = join(cluster.dir, 'controller.kubeconfig');
  await writeFile(path, dump(config), { mode: 0o600 });
  return path;
}
