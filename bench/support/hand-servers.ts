/**
 * The same servers the controller runs, started by hand for the side-by-side benchmark: one
 * nbd-server or qemu-storage-daemon per image, on its own loopback port, with the settings
 * named in the call. `stop()` ends it; `stopAll()` ends whatever is still running (the
 * benchmark's cleanup, also on an interrupt).
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { DEFAULT_GLIBC_TUNABLES } from '../../src/node/qemu-storage-daemon/qemu-storage-daemon.js';
import { waitFor } from '../../test/support/poll.js';
import { freePorts } from '../../test/support/repo.js';

export const HAND_EXPORT_NAME = 'bench';

export interface HandServer {
  uri: string;
  stop(): Promise<void>;
}

export interface NbdServerByHand {
  path: string;
  /** Render `flush = true` (the controller does): the client's flush reaches the disk. */
  flush: boolean;
  /** Working directory for the config and pid files. */
  directory: string;
}

export interface QemuStorageDaemonByHand {
  path: string;
  format: 'raw' | 'qcow2';
  blockDevice: boolean;
  /** Extra `--blockdev` options of the protocol (file/host_device) node, e.g. `aio=native`. */
  protocolOptions?: string;
  /** Insert QEMU's `preallocate` filter over the protocol node (extends the file in large steps). */
  preallocateFilter?: boolean;
  directory: string;
}

const running = new Set<number>();

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function stopPid(pid: number): Promise<void> {
  if (isAlive(pid)) process.kill(pid, 'SIGTERM');
  await waitFor(`pid ${pid} to exit`, () => (isAlive(pid) ? undefined : true), {
    timeoutMs: 30_000,
    intervalMs: 50,
  }).catch(() => {
    if (isAlive(pid)) process.kill(pid, 'SIGKILL');
  });
  running.delete(pid);
}

async function waitForExport(uri: string, pid: number, log: string): Promise<void> {
  await waitFor(
    `${uri} to answer`,
    async () => {
      if (!isAlive(pid))
        throw new Error(`server ${pid} exited: ${await readFile(log, 'utf8').catch(() => '')}`);
      const { exitCode } = await execa('nbdinfo', ['--size', uri], { reject: false });
      return exitCode === 0 ? true : undefined;
    },
    { timeoutMs: 60_000, intervalMs: 100 },
  );
}

export async function startNbdServerByHand(options: NbdServerByHand): Promise<HandServer> {
  const [port] = (await freePorts(1)) as [number];
  const config = join(options.directory, `nbd-server-${port}.conf`);
  const pidFile = join(options.directory, `nbd-server-${port}.pid`);
  const log = join(options.directory, `nbd-server-${port}.log`);
  const lines = [
    '[generic]',
    `port = ${port}`,
    'listenaddr = 127.0.0.1',
    'allowlist = false',
    `[${HAND_EXPORT_NAME}]`,
    `exportname = ${options.path}`,
    ...(options.flush ? ['flush = true', 'fua = true'] : []),
  ];
  await writeFile(config, `${lines.join('\n')}\n`);
  // nbd-server daemonizes: the launcher exits once it has forked, the pid file names the server.
  await execa('nbd-server', ['-C', config, '-p', pidFile], { stdout: { file: log }, stderr: { file: log } });
  const pid = await waitFor(
    'the nbd-server pid file',
    async () => Number((await readFile(pidFile, 'utf8')).trim()) || undefined,
    { timeoutMs: 30_000, intervalMs: 50 },
  );
  running.add(pid);
  const uri = `nbd://127.0.0.1:${port}/${HAND_EXPORT_NAME}`;
  await waitForExport(uri, pid, log);
  return { uri, stop: () => stopPid(pid) };
}

export async function startQemuStorageDaemonByHand(options: QemuStorageDaemonByHand): Promise<HandServer> {
  const [port] = (await freePorts(1)) as [number];
  const log = join(options.directory, `qemu-storage-daemon-${port}.log`);
  const protocol = `driver=${options.blockDevice ? 'host_device' : 'file'},filename=${options.path},locking=on${
    options.protocolOptions ? `,${options.protocolOptions}` : ''
  }`;
  const nodes = options.preallocateFilter
    ? ['--blockdev', `${protocol},node-name=p`, '--blockdev', 'driver=preallocate,node-name=f,file=p']
    : ['--blockdev', `${protocol},node-name=f`];
  const child = execa(
    'qemu-storage-daemon',
    [
      ...nodes,
      '--blockdev',
      `driver=${options.format},node-name=d,file=f`,
      '--nbd-server',
      `addr.type=inet,addr.host=127.0.0.1,addr.port=${port}`,
      '--export',
      `type=nbd,id=e,node-name=d,name=${HAND_EXPORT_NAME},writable=on`,
    ],
    {
      env: { GLIBC_TUNABLES: DEFAULT_GLIBC_TUNABLES },
      stdout: { file: log },
      stderr: { file: log },
      reject: false,
    },
  );
  const pid = child.pid;
  if (pid === undefined)
    throw new Error(`qemu-storage-daemon did not start: ${String((await child).stderr ?? '')}, see ${log}`);
  running.add(pid);
  const uri = `nbd://127.0.0.1:${port}/${HAND_EXPORT_NAME}`;
  await waitForExport(uri, pid, log);
  return {
    uri,
    stop: async () => {
      await stopPid(pid);
      await child;
    },
  };
}

/** Ends every server started here that is still running. */
export async function stopAllHandServers(): Promise<void> {
  await Promise.all([...running].map(stopPid));
}
