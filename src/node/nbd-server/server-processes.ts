/**
 * nbd-server processes as /proc shows them. The parent and every per-client child it
 * forked (children keep the parent's command line, since nbd-server forks without
 * exec) carry `-C <config path>`, which ties them to one state directory; children
 * left by an earlier parent are found the same way. A child opens the export's file
 * once the client has chosen an export, so its open files tell which export it serves.
 */
import {
  allPids,
  commandLineOf,
  descendantsOf,
  descriptorTargetsOf,
  findProcesses,
  isRunning,
  parentOf,
  socketInodesOf,
  startTicksOf,
} from '../process/proc-scan.js';
import { parseTcpTable, readTcpSockets, TCP_LISTEN } from '../process/proc-net-tcp.js';

/** The hook is three levels below nbd-server's child (sh, flock, node); the rest is room. */
const HOOK_TREE = { depth: 4, limit: 64 };

export interface ServerProcess {
  pid: number;
  ppid: number;
  /** When it started, in clock ticks since boot (/proc/<pid>/stat field 22): comparable between processes. */
  startTicks: number;
  /** Regular files and devices it holds open (" (deleted)" removed). */
  paths: string[];
}

/** Whether `argv` is an nbd-server run with this config file. */
export function isServerCommandLine(argv: readonly string[] | undefined, configPath: string): boolean {
  if (!argv || argv.length < 3) return false;
  const program = argv[0] ?? '';
  if (!(program === 'nbd-server' || program.endsWith('/nbd-server'))) return false;
  return argv.some((arg, i) => arg === '-C' && argv[i + 1] === configPath);
}

/** Whether `pid` is alive and an nbd-server of this config (guards against recycled pids). */
export function isServerProcess(pid: number, configPath: string): boolean {
  return isRunning(pid) && isServerCommandLine(commandLineOf(pid), configPath);
}

/** Every live nbd-server process (parents and children) of this config. */
export async function listServerProcesses(configPath: string): Promise<ServerProcess[]> {
  const result: ServerProcess[] = [];
  for (const pid of findProcesses((argv, pid) => isRunning(pid) && isServerCommandLine(argv, configPath))) {
    const ppid = parentOf(pid);
    const startTicks = startTicksOf(pid);
    if (ppid === undefined || startTicks === undefined) continue;
    result.push({ pid, ppid, startTicks, paths: await openPathsOf(pid) });
  }
  return result;
}

async function openPathsOf(pid: number): Promise<string[]> {
  const paths = new Set<string>();
  for (const target of await descriptorTargetsOf(pid)) {
    if (!target.startsWith('/') || target === '/dev/null') continue;
    paths.add(target.replace(/ \(deleted\)$/, ''));
  }
  return [...paths];
}

/** The inodes of TCP sockets listening on `port` in one /proc/net/tcp or tcp6 table's text. */
export function listeningInodes(procNetTcp: string, port: number): Set<string> {
  return new Set(
    parseTcpTable(procNetTcp)
      .filter((row) => row.state === TCP_LISTEN && row.local.port === port)
      .map((row) => row.inode),
  );
}

/** The inodes of every socket listening on TCP `port`, IPv4 and IPv6. */
export async function listeningSocketsOnPort(port: number): Promise<Set<string>> {
  return new Set(
    (await readTcpSockets())
      .filter((row) => row.state === TCP_LISTEN && row.local.port === port)
      .map((row) => row.inode),
  );
}

/** The sockets `pid` holds that listen on TCP `port` (only nbd-server's parent has one). */
export async function listeningSocketsOf(pid: number, port: number): Promise<Set<string>> {
  const own = await socketInodesOf(pid);
  if (own.size === 0) return own;
  return new Set([...(await listeningSocketsOnPort(port))].filter((inode) => own.has(inode)));
}

/** Whether `pid` holds a socket listening on TCP `port`. */
export async function isListeningOn(pid: number, port: number): Promise<boolean> {
  return (await listeningSocketsOf(pid, port)).size > 0;
}

/**
 * The nbd-server processes of this config that hold a socket listening on TCP `port`, and
 * the processes such a child started that inherited it (its admission hook, run through sh
 * and flock), children first. With no parent running, only a child still negotiating can:
 * nbd-server 3.24 forks before the handshake and closes its copy of the listening socket
 * only after its client has chosen an export (measured), so such a child serves no client
 * yet. One whose client never finishes the handshake holds the port for as long as the
 * client likes (nbd-server has no deadline).
 */
export async function processesListeningOn(port: number, configPath: string): Promise<number[]> {
  const inodes = await listeningSocketsOnPort(port);
  if (inodes.size === 0) return [];
  const holds = async (pid: number): Promise<boolean> =>
    [...(await socketInodesOf(pid))].some((inode) => inodes.has(inode));
  const holders = new Set<number>();
  for (const pid of findProcesses((argv, pid) => isRunning(pid) && isServerCommandLine(argv, configPath))) {
    if (!(await holds(pid))) continue;
    for (const descendant of descendantsOf(pid, HOOK_TREE))
      if (await holds(descendant)) holders.add(descendant);
    holders.add(pid);
  }
  return [...holders];
}

/** Pids of whatever listens on TCP `port` (for an error message when the port is taken). */
export async function listenersOn(port: number): Promise<string[]> {
  const inodes = await listeningSocketsOnPort(port);
  if (inodes.size === 0) return [];
  const owners: string[] = [];
  for (const pid of allPids())
    for (const inode of await socketInodesOf(pid))
      if (inodes.has(inode)) owners.push(`${pid} (${commandLineOf(pid)?.join(' ') ?? '?'})`);
  return owners;
}
