/**
 * The controller as a node runs it: `bin/nbd-export-controller run --source kube` with a node
 * name, a private allowed root and state directory, and free loopback ports. Each instance is
 * one "node" of the end-to-end tests.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { access, mkdir, mkdtemp, open, readFile, realpath, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { execa } from 'execa';
import { REPO_ROOT, freePorts, isRunning } from '../../support/repo.js';
import { waitFor } from '../../support/poll.js';

export const CONTROLLER_BIN = join(REPO_ROOT, 'bin', 'nbd-export-controller');

let build: Promise<void> | undefined;

/**
 * Builds dist/ from the current src/ (`npm run build`), once per test process. Always, not
 * only when dist/ looks stale: tsc writes its output even when it reports errors, so a fresh
 * dist/ proves nothing. A failed build fails the test with the compiler's output.
 */
export function ensureBuilt(): Promise<void> {
  build ??= (async () => {
    const tsc = join(REPO_ROOT, 'node_modules', 'typescript', 'bin', 'tsc');
    const result = await execa(process.execPath, [tsc, '-p', 'tsconfig.build.json'], {
      cwd: REPO_ROOT,
      reject: false,
      all: true,
    });
    if (result.exitCode !== 0)
      throw new Error(`npm run build failed, so the controller cannot run:\n${String(result.all)}`);
    await access(join(REPO_ROOT, 'dist', 'main.js'));
  })();
  return build;
}

/** The NBD servers the controller starts. */
const SERVER_PROGRAMS = ['nbd-server', 'qemu-storage-daemon'];

/** The file name of a process's executable ('' when unknown). */
export function programOf(pid: number): string {
  try {
    return basename(readlinkSync(`/proc/${pid}/exe`).replace(/ \(deleted\)$/, ''));
  } catch {
    return '';
  }
}

export interface HttpAnswer {
  status: number;
  body: string;
}

/** One node: a controller process, its directories and ports. */
export class ControllerNode {
  readonly nodeName: string;
  /** Private to this node: the allowed root (images live here) and the state directory. */
  readonly baseDir: string;
  readonly allowedRoot: string;
  readonly stateDir: string;
  readonly nbdPort: number;
  readonly qemuPort: number;
  readonly healthPort: number;
  /** stdout and stderr of every run of the controller, appended. */
  readonly logFile: string;
  readonly #kubeconfig: string;
  #child: ChildProcess | undefined;
  #exited: Promise<number | null> | undefined;

  private constructor(init: {
    nodeName: string;
    kubeconfig: string;
    baseDir: string;
    ports: [number, number, number];
  }) {
    this.nodeName = init.nodeName;
    this.#kubeconfig = init.kubeconfig;
    this.baseDir = init.baseDir;
    this.allowedRoot = join(init.baseDir, 'exports');
    this.stateDir = join(init.baseDir, 'state');
    this.logFile = join(init.baseDir, 'controller.log');
    [this.nbdPort, this.qemuPort, this.healthPort] = init.ports;
  }

  /** Directories and ports for a node; nothing runs yet. */
  static async create(nodeName: string, kubeconfig: string): Promise<ControllerNode> {
    const baseDir = await realpath(await mkdtemp(join(tmpdir(), `nbdx-e2e-${nodeName}-`)));
    const [nbd, qemu, health] = await freePorts(3);
    const node = new ControllerNode({
      nodeName,
      kubeconfig,
      baseDir,
      ports: [nbd!, qemu!, health!],
    });
    await mkdir(node.allowedRoot);
    await mkdir(node.stateDir);
    return node;
  }

  /** The command line, exactly as a node would run it (plus loopback addresses). */
  get args(): string[] {
    return [
      'run',
      '--source',
      'kube',
      '--kubeconfig',
      this.#kubeconfig,
      '--node-name',
      this.nodeName,
      '--allowed-root',
      this.allowedRoot,
      '--state-dir',
      this.stateDir,
      '--listen-address',
      '127.0.0.1',
      '--nbd-port',
      String(this.nbdPort),
      '--qemu-port',
      String(this.qemuPort),
      '--health-address',
      '127.0.0.1',
      '--health-port',
      String(this.healthPort),
    ];
  }

  get running(): boolean {
    return this.#child !== undefined;
  }

  get pid(): number | undefined {
    return this.#child?.pid;
  }

  /** Starts the controller and waits until /healthz answers. */
  async start(): Promise<void> {
    if (this.#child) throw new Error(`the controller of ${this.nodeName} already runs`);
    const log = await open(this.logFile, 'a');
    try {
      await log.write(`\n===== ${new Date().toISOString()} ${CONTROLLER_BIN} ${this.args.join(' ')}\n`);
      const child = spawn(CONTROLLER_BIN, this.args, {
        cwd: this.baseDir,
        stdio: ['ignore', log.fd, log.fd],
        env: { ...process.env, KUBECONFIG: '' },
      });
      this.#child = child;
      this.#exited = new Promise((resolve) => {
        child.once('exit', (code, signal) => {
          if (this.#child === child) this.#child = undefined;
          resolve(code ?? (signal === null ? null : -1));
        });
      });
    } finally {
      await log.close();
    }
    await waitFor(
      `the controller of ${this.nodeName} to answer /healthz (log: ${this.logFile})`,
      async () => {
        if (!this.#child) throw new Error(`it exited:\n${await this.logTail()}`);
        return (await this.get('/healthz')).status === 200 ? true : undefined;
      },
      { timeoutMs: 120_000 },
    );
  }

  /**
   * Sends `signal` and waits for the process to exit (60 s, then SIGKILL). Returns its exit
   * code; null when it was not running.
   */
  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
    const child = this.#child;
    const exited = this.#exited;
    if (!child || !exited) return null;
    child.kill(signal);
    const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
    try {
      return await exited;
    } finally {
      clearTimeout(timer);
    }
  }

  /** A GET on the health server: /healthz, /readyz or /metrics. */
  async get(path: string): Promise<HttpAnswer> {
    const response = await fetch(`http://127.0.0.1:${this.healthPort}${path}`, {
      signal: AbortSignal.timeout(10_000),
    });
    return { status: response.status, body: await response.text() };
  }

  /** One value of /metrics (a line "name value"), or undefined when absent. */
  async metric(name: string): Promise<number | undefined> {
    const { body } = await this.get('/metrics');
    const line = body.split('\n').find((l) => l.startsWith(`${name} `));
    return line === undefined ? undefined : Number(line.slice(name.length + 1));
  }

  /**
   * The pid of the process listening on 127.0.0.1:port (one of this node's NBD servers), or
   * undefined when nothing listens there.
   */
  async listenerPid(port: number): Promise<number | undefined> {
    const { stdout } = await execa('ss', ['-Htlnp', 'state', 'listening', `( sport = :${port} )`]);
    const pid = /pid=(\d+)/.exec(stdout)?.[1];
    return pid === undefined ? undefined : Number(pid);
  }

  /**
   * Processes other than the controller whose command line names this node's state directory
   * or allowed root (its servers, their per-client children, a qemu-img it runs), plus
   * whatever listens on its NBD ports: everything cleanup() must not leave behind.
   */
  async leftoverPids(): Promise<number[]> {
    const pids = new Set<number>();
    for (const entry of readdirSync('/proc')) {
      if (!/^\d+$/.test(entry)) continue;
      const pid = Number(entry);
      if (pid === this.pid || pid === process.pid) continue;
      let cmdline: string;
      try {
        cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      } catch {
        continue; // gone meanwhile
      }
      const argv = cmdline.split('\0');
      if (argv.includes(CONTROLLER_BIN) || argv.some((arg) => arg.endsWith('/dist/main.js'))) continue;
      if (cmdline.includes(this.stateDir) || cmdline.includes(this.allowedRoot)) pids.add(pid);
    }
    for (const port of [this.nbdPort, this.qemuPort]) {
      const pid = await this.listenerPid(port).catch(() => undefined);
      if (pid !== undefined && SERVER_PROGRAMS.includes(programOf(pid))) pids.add(pid);
    }
    return [...pids].filter(isRunning).sort((a, b) => a - b);
  }

  async logTail(lines = 60): Promise<string> {
    const text = await readFile(this.logFile, 'utf8').catch(() => '');
    return text.split('\n').slice(-lines).join('\n');
  }

  /**
   * Stops the controller, then its servers (`stop-servers`), then kills whatever process of
   * this node is still left, and removes the node's directory (kept with E2E_KEEP=1).
   * Never throws: it runs in afterAll, after failures too.
   */
  async cleanup(): Promise<void> {
    try {
      await this.stop('SIGTERM');
    } catch {
      // best effort
    }
    await execa(CONTROLLER_BIN, ['stop-servers', '--state-dir', this.stateDir], {
      reject: false,
      timeout: 60_000,
    });
    for (const pid of await this.leftoverPids()) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
    await waitFor(
      `the servers of ${this.nodeName} to be gone`,
      async () => ((await this.leftoverPids()).length === 0 ? true : undefined),
      { timeoutMs: 30_000 },
    ).catch(() => undefined);
    if (process.env.E2E_KEEP === undefined) await rm(this.baseDir, { recursive: true, force: true });
    else process.stderr.write(`e2e: kept ${this.nodeName}'s directory ${this.baseDir}\n`);
  }
}
