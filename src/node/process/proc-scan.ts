/**
 * Processes as /proc shows them: whether one still runs, its command line, its parent and
 * start time, and a scan of every process for the ones a caller recognises (by command
 * line: how a supervisor finds its own daemon when the pid file is lost or stale).
 * Reads are synchronous: /proc answers from memory, and a check must not interleave with
 * the process exiting between two awaits.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { readdir, readlink } from 'node:fs/promises';

export type ProcessState = 'running' | 'zombie' | 'gone';

/** Whether `pid` exists and has not exited (a zombie has exited: its files and sockets are closed). */
export function processState(pid: number): ProcessState {
  const fields = statFieldsOf(pid);
  if (fields === undefined) return 'gone';
  return fields[0] === 'Z' || fields[0] === 'X' ? 'zombie' : 'running';
}

/** Whether `pid` runs and has not exited (see processState). */
export function isRunning(pid: number): boolean {
  return processState(pid) === 'running';
}

/** The arguments `pid` was started with, or undefined when it is gone. */
export function commandLineOf(pid: number): string[] | undefined {
  try {
    const raw = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    return raw.split('\0').slice(0, raw.endsWith('\0') ? -1 : undefined);
  } catch {
    return undefined;
  }
}

/** When `pid` started, in clock ticks since boot (field 22 of /proc/<pid>/stat): comparable between processes. */
export function startTicksOf(pid: number): number | undefined {
  return numberField(pid, 19);
}

/** The parent of `pid`; undefined when it is gone. */
export function parentOf(pid: number): number | undefined {
  return numberField(pid, 1);
}

/** Every pid in /proc whose command line `matches`, in /proc's order. */
export function findProcesses(matches: (argv: readonly string[], pid: number) => boolean): number[] {
  const found: number[] = [];
  for (const pid of allPids()) {
    const argv = commandLineOf(pid);
    if (argv !== undefined && matches(argv, pid)) found.push(pid);
  }
  return found;
}

/** Every pid in /proc now (any may be gone by the time it is looked at). */
export function allPids(): number[] {
  let entries: string[];
  try {
    entries = readdirSync('/proc');
  } catch {
    return [];
  }
  return entries.filter((entry) => /^[0-9]+$/.test(entry)).map(Number);
}

/**
 * What each open descriptor of `pid` points to (/proc/<pid>/fd/* link targets): a path
 * for a file (" (deleted)" appended when unlinked), `socket:[inode]`, `pipe:[inode]`, ...
 * Empty when the process is gone or not ours to look at.
 */
export async function descriptorTargetsOf(pid: number | 'self'): Promise<string[]> {
  const targets: string[] = [];
  for (const fd of await readdir(`/proc/${pid}/fd`).catch(() => [])) {
    const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => undefined);
    if (target !== undefined) targets.push(target);
  }
  return targets;
}

/** Socket inodes `pid` holds open ('self': this process). */
export async function socketInodesOf(pid: number | 'self'): Promise<Set<string>> {
  const inodes = new Set<string>();
  for (const target of await descriptorTargetsOf(pid)) {
    const match = /^socket:\[([0-9]+)\]$/.exec(target);
    if (match?.[1] !== undefined) inodes.add(match[1]);
  }
  return inodes;
}

/** The pids `pid` forked that still run (/proc/<pid>/task/<tid>/children, every thread). */
export function childrenOf(pid: number): number[] {
  const children: number[] = [];
  let tasks: string[];
  try {
    tasks = readdirSync(`/proc/${pid}/task`);
  } catch {
    return [];
  }
  for (const tid of tasks) {
    try {
      for (const child of readFileSync(`/proc/${pid}/task/${tid}/children`, 'utf8').trim().split(/\s+/))
        if (/^[0-9]+$/.test(child)) children.push(Number(child));
    } catch {
      // the thread ended meanwhile
    }
  }
  return children;
}

/**
 * What `pid` started, and what those started, breadth first: at most `depth` levels down and
 * `limit` processes, so a fork storm cannot make the search unbounded.
 */
export function descendantsOf(pid: number, bounds: { depth: number; limit: number }): number[] {
  const found: number[] = [];
  let level = childrenOf(pid);
  for (let depth = 1; depth <= bounds.depth && level.length > 0; depth++) {
    for (const child of level) {
      if (found.length >= bounds.limit) return found;
      found.push(child);
    }
    level = level.flatMap(childrenOf);
  }
  return found;
}

/** The short command name of `pid` (/proc/<pid>/comm, at most 15 bytes); undefined when it is gone. */
export function commandNameOf(pid: number): string | undefined {
  try {
    return readFileSync(`/proc/${pid}/comm`, 'utf8').replace(/\n$/, '');
  } catch {
    return undefined;
  }
}

/**
 * The fields of /proc/<pid>/stat after the command name, so that index 0 is field 3
 * (state). The name is in parentheses and may itself hold spaces or parentheses, so the
 * fields start after the last ')'.
 */
function statFieldsOf(pid: number): string[] | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  } catch {
    return undefined;
  }
}

function numberField(pid: number, index: number): number | undefined {
  const value = Number(statFieldsOf(pid)?.[index]);
  return Number.isFinite(value) ? value : undefined;
}
