/**
 * What a hostile case may not change on a node, read from the outside: the files under the
 * test's root (size, mtime, type; the controller's own state and status excluded), nbd-server's
 * conf.d, and the exports qemu-storage-daemon offers (NBD_OPT_LIST through nbdinfo).
 */
import { lstat, readdir } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { execa } from 'execa';

export interface NodeSnapshot {
  /** `relative path → type:size:mtime` of every entry under the root, except the excluded ones. */
  files: Record<string, string>;
  /** File names in nbd-server's conf.d. */
  confFiles: string[];
  /** Export names qemu-storage-daemon lists. */
  qemuExports: string[];
}

export interface SnapshotPlaces {
  root: string;
  /** Directories under root whose contents the controller changes by design (state, status, sources). */
  exclude: string[];
  confDir: string;
  qemuPort: number;
}

export async function snapshotNode(places: SnapshotPlaces): Promise<NodeSnapshot> {
  return {
    files: await describeTree(places.root, places.root, new Set(places.exclude)),
    confFiles: (await readdir(places.confDir).catch(() => [])).sort(),
    qemuExports: await listQemuExports(places.qemuPort),
  };
}

async function describeTree(
  root: string,
  dir: string,
  exclude: Set<string>,
): Promise<Record<string, string>> {
  const described: Record<string, string> = {};
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (exclude.has(path)) continue;
    if (dir === root && /^controller-\d+\.log$/.test(entry.name)) continue;
    const stats = await lstat(path);
    const type = entry.isDirectory()
      ? 'dir'
      : entry.isSymbolicLink()
        ? 'link'
        : entry.isFile()
          ? 'file'
          : entry.isFIFO()
            ? 'fifo'
            : 'other';
    // A directory's mtime changes when a case's fixture is made in it; its entries tell the rest.
    described[relative(root, path)] =
      type === 'dir' ? 'dir' : `${type}:${stats.size}:${stats.mtimeMs}:${stats.nlink}`;
    if (entry.isDirectory()) Object.assign(described, await describeTree(root, path, exclude));
  }
  return described;
}

/** The export names qemu-storage-daemon answers NBD_OPT_LIST with. */
export async function listQemuExports(port: number): Promise<string[]> {
  const { stdout } = await execa('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${port}`], {
    timeout: 60_000,
  });
  const listed = JSON.parse(stdout) as { exports?: { 'export-name': string }[] };
  return (listed.exports ?? []).map((e) => e['export-name']).sort();
}
