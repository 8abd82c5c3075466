import type { ImageFormat, ServerKind } from '../api/types.js';

/** The node's own rules and addresses: flags of the controller, never from a resource. */
export interface NodePolicy {
  nodeName: string;
  /** Real paths (symlinks resolved) under which image files may live. */
  allowedRoots: readonly string[];
  /** Glob patterns (`*` within a path component, `**` across) for block devices. */
  allowedDevices: readonly string[];
  /** Host clients use, in status.uri. */
  advertiseHost: string;
  /** Address the probe connects from and to. (nbd-server's admission hook knows the probe by its process, not its address.) */
  probeHost: string;
  nbdServerPort: number;
  qemuPort: number;
  /** Who serves raw files and block devices. QCOW2 always goes to qemu-storage-daemon. */
  rawServer: ServerKind;
  /** Backing images allowed below an image (src/plan/image-header.ts: DEFAULT_MAX_BACKING_DEPTH). */
  maxBackingDepth: number;
  /**
   * The operator's consent to serve, as raw, bytes that begin with another format's header
   * (a guest disk that itself holds a QCOW2 or LUKS image). Off: such a file is refused.
   */
  allowRawOverForeignHeader: boolean;
  /** Both servers require TLS with a client certificate (`run --tls-dir`): status.uri reads nbds://. Absent: false. */
  tls?: boolean;
  /**
   * The node's firewall enforces client rules on the ports of qemu-storage-daemons of one
   * export (`run --client-firewall`); a string says why it cannot. Absent: no firewall.
   */
  clientFirewall?: true | string;
}

/** Who serves an image of this format (block devices are raw): QCOW2 needs a format-aware server. */
export function serverFor(format: ImageFormat, policy: Pick<NodePolicy, 'rawServer'>): ServerKind {
  return format === 'qcow2' ? 'qemu-storage-daemon' : policy.rawServer;
}

/** True when `path` is `root` or lies below it. Both must be real, normalised paths. */
export function isInsideRoot(path: string, root: string): boolean {
  if (root === '/') return path.startsWith('/');
  return path === root || path.startsWith(`${root}/`);
}

export function isInsideAnyRoot(path: string, roots: readonly string[]): boolean {
  return roots.some((root) => isInsideRoot(path, root));
}

/** Matches a path against a glob: `*` and `?` stay within one component, `**` spans them. */
export function matchesDevicePattern(path: string, pattern: string): boolean {
  let source = '';
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i] ?? '';
    if (c === '*' && pattern[i + 1] === '*') {
      source += '.*';
      i++;
    } else if (c === '*') source += '[^/]*';
    else if (c === '?') source += '[^/]';
    else source += c.replace(/[.+^${}()|[\]\\]/g, '\\$&');
  }
  return new RegExp(`^${source}$`).test(path);
}

/**
 * Whether the node's rules let a resource use this real path at all: a file inside an
 * allowed root, a block device matching an allowed pattern (on its real path: a symlink a
 * pattern happens to cover may point anywhere).
 */
export function isPathAllowed(
  realPath: string,
  isDevice: boolean,
  policy: Pick<NodePolicy, 'allowedRoots' | 'allowedDevices'>,
): boolean {
  return isDevice
    ? policy.allowedDevices.some((pattern) => matchesDevicePattern(realPath, pattern))
    : isInsideAnyRoot(realPath, policy.allowedRoots);
}

/**
 * Where a server of this node serves an export, as an NBD URI: `host` is the address clients
 * use (status.uri: the advertised one) or the node's own (the probe's, for its own readers).
 * `dedicatedPort`: the port of the export's own qemu-storage-daemon, when it has one.
 */
export function exportUri(
  policy: Pick<NodePolicy, 'nbdServerPort' | 'qemuPort'>,
  host: string,
  server: ServerKind,
  exportName: string,
  scheme: 'nbd' | 'nbds' = 'nbd',
  dedicatedPort?: number,
): string {
  const bracketed = host.includes(':') ? `[${host}]` : host;
  const port = dedicatedPort ?? (server === 'nbd-server' ? policy.nbdServerPort : policy.qemuPort);
  return `${scheme}://${bracketed}:${port}/${exportName}`;
}
