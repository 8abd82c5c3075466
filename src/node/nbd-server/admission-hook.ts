/**
 * nbd-server's admission hook, run as its `prerun` for every client that chose an export:
 *
 *   flock -w 10 <lock> node admission-hook.js <rules file> <export path>
 *
 * nbd-server runs it after the handshake and before it opens the file, and serves the
 * client only when it exits 0. It enforces the export's rules (admission-rules.ts) at
 * connection time, which nbd-server 3.24 cannot: allowedClients without letting every local
 * process in for the controller's probe, maxConnections as clients at once (nbd-server's
 * own counts connections over its lifetime), and that the path still names the file the
 * controller checked (nbd-server opens by name at every connection).
 *
 * Who the client is comes from the connection itself: the client's socket is inherited from
 * nbd-server, /proc/net/tcp gives its peer, and a peer on this host whose socket the
 * controller's process (or a child of it) holds is the controller. Each admitted client
 * leaves a slot file named by the pid of the nbd-server child serving it; a slot whose
 * process is gone no longer counts. flock(1) runs one hook at a time per export, so two
 * clients cannot both take the last slot. Anything unexpected refuses the client.
 */
import {
  appendFileSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { dirname, join } from 'node:path';
import {
  commandNameOf,
  descendantsOf,
  parentOf,
  processState,
  socketInodesOf,
  startTicksOf,
} from '../process/proc-scan.js';
import { readTcpSockets, TCP_ESTABLISHED } from '../process/proc-net-tcp.js';
import { decideAdmission, type ConnectingClient, type FileAtPath } from './admission-decision.js';
import { parseAdmissionRules } from './admission-rules.js';
import { admissionLogOf, controllerFileOf, slotsDirOf } from './conf-file-name.js';

/** The log is rotated (one old file kept) past this size. */
const LOG_LIMIT = 1 << 20;
/** How far up from the hook nbd-server's child is (hook ← flock ← sh ← nbd-server), with room. */
const MAX_ANCESTRY = 6;
/** Bounds on the controller's process tree searched for the client's socket. */
const CONTROLLER_TREE = { depth: 4, limit: 256 };

let logPath: string | undefined;

async function main(argv: string[]): Promise<number> {
  const [rulesPath, path] = argv;
  if (rulesPath !== undefined) logPath = admissionLogOf(dirname(rulesPath));
  if (rulesPath === undefined || path === undefined) return refuse('usage: admission-hook <rules> <path>');
  const rules = parseAdmissionRules(readFileSync(rulesPath, 'utf8'));
  if (rules === undefined) return refuse(`${rulesPath} holds no admission rules`);
  if (path !== rules.path) return refuse(`nbd-server opens ${path}, but the rules are for ${rules.path}`);
  const server = servingProcess();
  if (server === undefined) return refuse('no nbd-server process above the hook', rules.exportName);
  const client = await identifyClient(controllerOf(dirname(rulesPath)));
  const slotsDir = slotsDirOf(rulesPath);
  const decision = decideAdmission(rules, client, fileAt(path), liveSlots(slotsDir));
  const who = client.kind === 'remote' ? client.address : client.kind;
  if (!decision.admit) return refuse(decision.reason, rules.exportName, who);
  const counted = decision.counted && takeSlot(slotsDir, server);
  report({ msg: 'client admitted', export: rules.exportName, client: who, counted });
  return 0;
}

/**
 * Records the admitted client. A state directory that has turned read-only must not stop
 * serving what is allowed (the controller reports that directory on its own): the client is
 * then served uncounted, the one way this hook fails open, and the log says so.
 */
function takeSlot(dir: string, server: { pid: number; startTicks: number }): boolean {
  try {
    writeFileSync(join(dir, String(server.pid)), String(server.startTicks));
    return true;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EROFS') throw error;
    report({ msg: 'client not counted: the state directory is read-only' });
    return false;
  }
}

function fileAt(path: string): FileAtPath {
  let info;
  try {
    info = lstatSync(path, { bigint: true });
  } catch {
    return { kind: 'missing' };
  }
  if (info.isSymbolicLink()) return { kind: 'symlink' };
  const kind = info.isFile() ? 'file' : info.isBlockDevice() ? 'block-device' : 'other';
  return { kind, fileId: `${info.dev}:${info.ino}`, nlink: Number(info.nlink) };
}

/** The nbd-server child that will serve this client: the slot is its. */
function servingProcess(): { pid: number; startTicks: number } | undefined {
  let pid: number | undefined = process.ppid;
  for (let hop = 0; hop < MAX_ANCESTRY && pid !== undefined && pid > 1; hop++) {
    if (commandNameOf(pid) === 'nbd-server') {
      const startTicks = startTicksOf(pid);
      return startTicks === undefined ? undefined : { pid, startTicks };
    }
    pid = parentOf(pid);
  }
  return undefined;
}

/** Slots whose nbd-server child still runs; the others are removed. */
function liveSlots(dir: string): number {
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EROFS') throw error;
    return 0; // read-only and never made: nobody was counted
  }
  let live = 0;
  for (const name of readdirSync(dir)) {
    const pid = /^[0-9]+$/.test(name) ? Number(name) : undefined;
    const ticks = Number(readIfFile(join(dir, name)));
    if (pid !== undefined && processState(pid) === 'running' && startTicksOf(pid) === ticks) {
      live++;
      continue;
    }
    try {
      rmSync(join(dir, name), { force: true, recursive: true });
    } catch {
      // Not counted either way; a read-only directory keeps it until it is writable.
    }
  }
  return live;
}

function readIfFile(path: string): string | undefined {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return undefined;
  }
}

/** The controller's process, as it wrote itself down; undefined when that process is gone. */
function controllerOf(authDir: string): number | undefined {
  let text: string;
  try {
    text = readFileSync(controllerFileOf(authDir), 'utf8');
  } catch {
    return undefined;
  }
  const [pid, ticks] = (text.trim().split('\n').at(-1) ?? '').split(' ').map(Number);
  if (pid === undefined || !Number.isInteger(pid) || pid < 1) return undefined;
  return startTicksOf(pid) === ticks ? pid : undefined;
}

async function identifyClient(controller: number | undefined): Promise<ConnectingClient> {
  const inherited = await socketInodesOf('self');
  const sockets = await readTcpSockets();
  const connected = sockets.filter((row) => row.state === TCP_ESTABLISHED && inherited.has(row.inode));
  const [connection] = connected;
  if (connection === undefined || connected.length > 1)
    return {
      kind: 'unidentified',
      problem: `${connected.length} connected TCP sockets came from nbd-server`,
    };
  if (controller !== undefined) {
    const clientEnd = sockets.find(
      (row) =>
        row.local.address === connection.remote.address &&
        row.local.port === connection.remote.port &&
        row.remote.address === connection.local.address &&
        row.remote.port === connection.local.port,
    );
    if (clientEnd !== undefined && (await treeHolds(controller, clientEnd.inode)))
      return { kind: 'controller' };
  }
  return { kind: 'remote', address: connection.remote.address };
}

/** Whether `root` or a process it started (bounded search) holds the socket `inode`. */
async function treeHolds(root: number, inode: string): Promise<boolean> {
  for (const pid of [root, ...descendantsOf(root, CONTROLLER_TREE)])
    if ((await socketInodesOf(pid)).has(inode)) return true;
  return false;
}

function refuse(reason: string, exportName?: string, client?: string): number {
  report({
    msg: 'client refused',
    reason,
    ...(exportName ? { export: exportName } : {}),
    ...(client ? { client } : {}),
  });
  return 1;
}

/** One JSON line in the admission log (and on stderr, for a hook run by hand). */
function report(fields: Record<string, unknown>): void {
  const entry = { time: new Date().toISOString(), component: 'admission-hook', pid: process.pid, ...fields };
  const line = `${JSON.stringify(entry)}\n`;
  process.stderr.write(line);
  if (logPath === undefined) return;
  try {
    if ((statSync(logPath, { throwIfNoEntry: false })?.size ?? 0) > LOG_LIMIT)
      renameSync(logPath, `${logPath}.1`);
    appendFileSync(logPath, line, { mode: 0o640 });
  } catch {
    // The decision stands without its log line.
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (error: unknown) =>
    process.exit(refuse(`admission hook failed: ${error instanceof Error ? error.message : String(error)}`)),
);
