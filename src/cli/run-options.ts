/**
 * The `run` command's flags, with defaults. Parsing fails with a message naming the
 * flag; nothing here touches the node.
 */
import { DEFAULT_CONTROLLER_GROUP } from '../controller/create-node-services.js';
import { DEFAULT_DEDICATED_PORTS } from '../node/qemu-storage-daemon/qemu-export-fleet.js';
import { DEFAULT_MAX_BACKING_DEPTH } from '../plan/image-header.js';
import { hostname, networkInterfaces } from 'node:os';
import { isAbsolute, join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import type { ServerKind } from '../api/types.js';

export interface RunOptions {
  source: { kind: 'dir'; path: string } | { kind: 'kube' };
  kubeconfig?: string;
  nodeName: string;
  allowedRoots: string[];
  allowedDevices: string[];
  stateDir: string;
  statusDir: string;
  listenAddress: string;
  advertiseAddress: string;
  probeAddress: string;
  nbdPort: number;
  qemuPort: number;
  /** Ports for qemu-storage-daemons of one export (exports with client rules). */
  dedicatedPorts: { first: number; last: number };
  /** iptables: the node's firewall enforces client rules on those ports; none: such exports are refused. */
  clientFirewall: 'iptables' | 'none';
  /** The group id the controller adds to its own groups; the firewall lets its connections through unlisted. */
  controllerGroup: number;
  healthPort: number;
  healthAddress: string;
  rawServer: ServerKind;
  concurrency: number;
  maxBackingDepth: number;
  allowRawOverForeignHeader: boolean;
  /**
   * TLS for every export on both servers: ca-cert.pem, server-cert.pem, server-key.pem (the
   * layout QEMU and libnbd read), optionally client-cert.pem/client-key.pem for the
   * controller's own probe and checksum reader. Absent: plain NBD.
   */
  tlsDir?: string;
  /** SIGTERM ends the process within this long, whatever is still running (a wedged step). */
  shutdownTimeoutMs: number;
  logLevel: string;
}

export const RUN_USAGE = `usage: nbd-export-controller run [flags]
  --source dir:PATH | kube     where desired state comes from (default kube)
  --kubeconfig PATH            kube source: credentials (default $KUBECONFIG, then in-cluster)
  --node-name NAME             this node (default: the host name)
  --allowed-root DIR           image files must resolve inside one of these (repeatable; default /var/lib/nbd-exports)
  --allowed-device GLOB        block devices must match one of these (repeatable; default none)
  --state-dir DIR              the controller's and servers' state (default /var/lib/nbd-export-controller)
  --status-dir DIR             dir source: where status files go (default STATE_DIR/status)
  --listen-address ADDR        address the NBD servers listen on (default 0.0.0.0)
  --advertise-address ADDR     host written into status.uri (default: the listen address, or this host's first address)
  --nbd-port N                 nbd-server port (default 10809)
  --qemu-port N                qemu-storage-daemon port (default 10810)
  --dedicated-ports N-M        ports for the qemu-storage-daemon of an export with allowedClients or
                               maxConnections, one each (default ${DEFAULT_DEDICATED_PORTS.first}-${DEFAULT_DEDICATED_PORTS.last})
  --client-firewall KIND       iptables: enforce those exports' client rules on their ports (needs root);
                               none: refuse such exports as Unsupported (default iptables)
  --controller-group GID       a group id the controller adds to its own groups; the firewall lets its
                               probe and checksum reader through by it, unlisted. Give it to no one else
                               (default ${DEFAULT_CONTROLLER_GROUP})
  --health-port N              /healthz, /readyz, /metrics (default 8080; 0 picks a free port)
  --health-address ADDR        address of the health server (default 0.0.0.0)
  --raw-server KIND            who serves raw files and devices: nbd-server or qemu-storage-daemon (default nbd-server)
  --concurrency N              reconciles at once (default 4)
  --max-backing-depth N        backing images allowed below an image (default 16)
  --allow-raw-over-foreign-header
                               serve a raw spec even when its bytes start with another format's header
                               (a guest disk holding a QCOW2/LUKS image); off: refused as ImageFormatMismatch
  --tls-dir DIR                every export requires TLS and a client certificate signed by DIR/ca-cert.pem;
                               DIR holds ca-cert.pem, server-cert.pem, server-key.pem and, for the
                               controller's own probe, client-cert.pem/client-key.pem (else the server
                               certificate is used as client certificate); status.uri reads nbds://
  --shutdown-timeout SECONDS   a stop signal ends the process within this long (default 20; the pod's grace is 60)
  --log-level LEVEL            pino level (default info)`;

export function parseRunOptions(argv: string[]): RunOptions {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    options: {
      source: { type: 'string', default: 'kube' },
      kubeconfig: { type: 'string' },
      'node-name': { type: 'string' },
      'allowed-root': { type: 'string', multiple: true },
      'allowed-device': { type: 'string', multiple: true },
      'state-dir': { type: 'string', default: '/var/lib/nbd-export-controller' },
      'status-dir': { type: 'string' },
      'listen-address': { type: 'string', default: '0.0.0.0' },
      'advertise-address': { type: 'string' },
      'nbd-port': { type: 'string', default: '10809' },
      'qemu-port': { type: 'string', default: '10810' },
      'dedicated-ports': {
        type: 'string',
        default: `${DEFAULT_DEDICATED_PORTS.first}-${DEFAULT_DEDICATED_PORTS.last}`,
      },
      'client-firewall': { type: 'string', default: 'iptables' },
      'controller-group': { type: 'string', default: String(DEFAULT_CONTROLLER_GROUP) },
      'health-port': { type: 'string', default: '8080' },
      'health-address': { type: 'string', default: '0.0.0.0' },
      'raw-server': { type: 'string', default: 'nbd-server' },
      concurrency: { type: 'string', default: '4' },
      'shutdown-timeout': { type: 'string', default: '20' },
      'max-backing-depth': { type: 'string', default: String(DEFAULT_MAX_BACKING_DEPTH) },
      'allow-raw-over-foreign-header': { type: 'boolean', default: false },
      'tls-dir': { type: 'string' },
      'log-level': { type: 'string', default: 'info' },
    },
  });

  const source = values.source;
  let parsedSource: RunOptions['source'];
  if (source === 'kube') parsedSource = { kind: 'kube' };
  else if (source.startsWith('dir:') && source.length > 4)
    parsedSource = { kind: 'dir', path: resolve(source.slice(4)) };
  else throw new UsageError(`--source must be "kube" or "dir:PATH", got "${source}"`);

  const rawServer = values['raw-server'];
  if (rawServer !== 'nbd-server' && rawServer !== 'qemu-storage-daemon')
    throw new UsageError(`--raw-server must be nbd-server or qemu-storage-daemon, got "${rawServer}"`);

  const clientFirewall = values['client-firewall'];
  if (clientFirewall !== 'iptables' && clientFirewall !== 'none')
    throw new UsageError(`--client-firewall must be iptables or none, got "${clientFirewall}"`);

  const stateDir = absolute('--state-dir', values['state-dir']);
  const listenAddress = values['listen-address'];
  const wildcard = listenAddress === '0.0.0.0' || listenAddress === '::';
  const allowedRoots = (values['allowed-root'] ?? ['/var/lib/nbd-exports']).map((dir) =>
    absolute('--allowed-root', dir),
  );
  return {
    source: parsedSource,
    ...(values.kubeconfig === undefined ? {} : { kubeconfig: values.kubeconfig }),
    nodeName: values['node-name'] ?? hostname(),
    allowedRoots,
    allowedDevices: values['allowed-device'] ?? [],
    stateDir,
    statusDir:
      values['status-dir'] === undefined
        ? join(stateDir, 'status')
        : absolute('--status-dir', values['status-dir']),
    listenAddress,
    advertiseAddress: values['advertise-address'] ?? (wildcard ? firstHostAddress() : listenAddress),
    probeAddress: wildcard ? (listenAddress === '::' ? '::1' : '127.0.0.1') : listenAddress,
    nbdPort: port('--nbd-port', values['nbd-port']),
    qemuPort: port('--qemu-port', values['qemu-port']),
    dedicatedPorts: portRange('--dedicated-ports', values['dedicated-ports']),
    clientFirewall,
    controllerGroup: positive('--controller-group', values['controller-group']),
    healthPort: port('--health-port', values['health-port'], true),
    healthAddress: values['health-address'],
    rawServer,
    concurrency: positive('--concurrency', values.concurrency),
    shutdownTimeoutMs: 1000 * positive('--shutdown-timeout', values['shutdown-timeout']),
    maxBackingDepth: positive('--max-backing-depth', values['max-backing-depth']),
    allowRawOverForeignHeader: values['allow-raw-over-foreign-header'],
    ...(values['tls-dir'] === undefined ? {} : { tlsDir: absolute('--tls-dir', values['tls-dir']) }),
    logLevel: values['log-level'],
  };
}

export class UsageError extends Error {
  override readonly name = 'UsageError';
}

function absolute(flag: string, value: string): string {
  if (!isAbsolute(value)) throw new UsageError(`${flag} must be an absolute path, got "${value}"`);
  return resolve(value);
}

function port(flag: string, value: string, allowZero = false): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < (allowZero ? 0 : 1) || n > 65535)
    throw new UsageError(`${flag} must be a port number, got "${value}"`);
  return n;
}

function portRange(flag: string, value: string): { first: number; last: number } {
  const match = /^([0-9]+)-([0-9]+)$/.exec(value);
  const first = match ? port(flag, match[1] ?? '') : NaN;
  const last = match ? port(flag, match[2] ?? '') : NaN;
  if (!match || first > last)
    throw new UsageError(`${flag} must be a port range like 10900-10999, got "${value}"`);
  return { first, last };
}

function positive(flag: string, value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1)
    throw new UsageError(`${flag} must be a positive whole number, got "${value}"`);
  return n;
}

function firstHostAddress(): string {
  for (const addresses of Object.values(networkInterfaces()))
    for (const address of addresses ?? [])
      if (address.family === 'IPv4' && !address.internal) return address.address;
  return '127.0.0.1';
}
