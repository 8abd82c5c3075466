/**
 * A process's I/O counters from /proc/<pid>/io: bytes and system calls of reads and writes
 * (`rchar`, `wchar`, `syscr`, `syscw`). For qemu-storage-daemon these are, nearly all, its
 * image reads and writes: it talks NBD and QMP with sendmsg/recvmsg, which these do not count
 * (writing 8 MiB through an export moved `wchar` by 8.1 MiB, the rest being qcow2 metadata).
 */
import { readFile } from 'node:fs/promises';

export interface ProcessIo {
  readBytes: number;
  writtenBytes: number;
  readCalls: number;
  writeCalls: number;
}

/** Undefined when the process is gone or its counters cannot be read (another user's process). */
export async function readProcessIo(pid: number): Promise<ProcessIo | undefined> {
  let text: string;
  try {
    text = await readFile(`/proc/${pid}/io`, 'utf8');
  } catch {
    return undefined;
  }
  return parseProcessIo(text);
}

export function parseProcessIo(text: string): ProcessIo | undefined {
  const fields = new Map(
    text
      .split('\n')
      .map((line) => /^(\w+):\s*(\d+)$/.exec(line.trim()))
      .filter((match) => match !== null)
      .map((match) => [match[1], Number(match[2])] as const),
  );
  const [readBytes, writtenBytes, readCalls, writeCalls] = ['rchar', 'wchar', 'syscr', 'syscw'].map((name) =>
    fields.get(name),
  );
  if (
    readBytes === undefined ||
    writtenBytes === undefined ||
    readCalls === undefined ||
    writeCalls === undefined
  )
    return undefined;
  return { readBytes, writtenBytes, readCalls, writeCalls };
}
