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
  /** Address the probe connects from and to; added to an allow-list so probes get in. */
  probeHost: string;
  nbdServerPort: number;
  qemuPort: number;
  /** Who serves raw files and block devices. QCOW2 always goes to qemu-storage-daemon. */
  rawServer: ServerKind;
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
