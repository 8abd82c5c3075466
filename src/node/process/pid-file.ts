/**
 * The pid file a daemon writes (nbd-server `-p`, qemu-storage-daemon `--pidfile`): one
 * decimal pid, maybe followed by a newline. What it names may be long gone or a recycled
 * pid: callers check the process (proc-scan.ts) before trusting it.
 */
import { readFile } from 'node:fs/promises';

/** The pid in the file; undefined when the file is missing, unreadable, or holds anything but a positive pid. */
export async function readPidFile(path: string): Promise<number | undefined> {
  const text = await readFile(path, 'utf8').catch(() => '');
  const trimmed = text.trim();
  if (!/^[0-9]+$/.test(trimmed)) return undefined;
  const pid = Number(trimmed);
  return Number.isSafeInteger(pid) && pid > 0 ? pid : undefined;
}
