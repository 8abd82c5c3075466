/**
 * nbd-server processes as /proc shows them. The parent and every per-client child it
 * forked (children keep the parent's command line, since nbd-server forks without
 * exec) carry `-C <config path>`, which ties them to one state directory; children
 * left by an earlier parent are found the same way. A child opens the export's file
 * once the client has chosen an export, so its open files tell which export it serves.
 */
import { readFile } from 'node:fs/promises';
import {
  allPids,
  commandLineOf,
  descriptorTargetsOf,
  findProcesses,
  isRunning,
  parentOf,
  startTicksOf,
} from '../process/proc-scan.js';

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

/** Socket inodes `pid` holds open. */
async function socketInodesOf(pid: number): Promise<Set<string>> {
  const inodes = new Set<string>();
  for (const target of await descriptorTargetsOf(pid)) {
    const match = /^socket:\[([0-9]+)\]$/.exec(target);
    if (match?.[1] !== undefined) inodes.add(match[1]);
  }
  return inodes;
}

/**
 * The inodes of TCP sockets listening on `port`, from /proc/net/tcp or tcp6 text
 * (columns: sl, local_address, rem_address, st, ..., inode; LISTEN is st 0A).
 */
export function listeningInodes(procNetTcp: string, port: number): Set<string> {
  const inodes = new Set<string>();
  const wanted = port.toString(16).toUpperCase().padStart(4, '0');
  for (const line of procNetTcp.split('\n').slice(1)) {
    const fields = line.trim().split(/\s+/);
    if (fields.length < 10) continue;
    const local = fields[1] ?? '';
    if (fields[3] === '0A' && local.slice(local.lastIndexOf(':') + 1) === wanted) inodes.add(fields[9] ?? '');
  }
  return inodes;
}

/** The inodes of every socket listening on TCP `port`, IPv4 and IPv6. */
export async function listeningSocketsOnPort(port: number): Promise<Set<string>> {
  const inodes = new Set<string>();
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6'])
    for (const inode of listeningInodes(await readFile(table, 'utf8').catch(() => ''), port))
      inodes.add(inode);
  return inodes;
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
 * The nbd-server processes of this config that hold a socket listening on TCP `port`. With no
 * parent running, only a child still negotiating can: nbd-server 3.24 forks before the
 * handshake and closes its copy of the listening socket only after its client has chosen an
 * export (measured), so such a child serves no client yet. One whose client never finishes
 * the handshake holds the port for as long as the client likes (nbd-server has no deadline).
 */
export async function processesListeningOn(port: number, configPath: string): Promise<number[]> {
  const inodes = await listeningSocketsOnPort(port);
  if (inodes.size === 0) return [];
  const holders: number[] = [];
  for (const pid of findProcesses((argv, pid) => isRunning(pid) && isServerCommandLine(argv, configPath)))
    for (const inode of await socketInodesOf(pid))
      if (inodes.has(inode)) {
        holders.push(pid);
        break;
      }
  return holders;
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
