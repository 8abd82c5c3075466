/**
 * Signals a whole process group: a program started detached (its own group) and whatever
 * it forked that did not leave the group. A daemon that called setsid() has left it, which
 * is what lets the supervisors kill a launcher without touching the daemon it started.
 */

/** Sends `signal` to the group led by `leader`; false when no process of the group is left. */
export function signalGroup(leader: number, signal: NodeJS.Signals): boolean {
  try {
    process.kill(-leader, signal);
    return true;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ESRCH') return false;
    throw error;
  }
}
