/**
 * Runs the real controller, built, as a separate process in plain-host mode (a
 * directory of NbdExport YAML files), and reads what it reports from its status files.
 * The servers it starts outlive it, as in production; `stopServers()` ends them.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { openSync, closeSync } from 'node:fs';
import { once } from 'node:events';
import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { load } from 'js-yaml';
import type { Condition, NbdExport } from '../../../src/api/types.js';
import { waitFor } from '../../support/poll.js';
import { freePortRange, freePorts, REPO_ROOT } from '../../support/repo.js';

export const MAIN_JS = join(REPO_ROOT, 'dist', 'main.js');

/** Builds dist/ when it is missing or older than a source file: tests run what they test. */
export async function ensureBuilt(): Promise<void> {
  const built = await stat(MAIN_JS).then(
    (s) => s.mtimeMs,
    () => 0,
  );
  const { stdout } = await execa('find', [
    join(REPO_ROOT, 'src'),
    '-name',
    '*.ts',
    '-newermt',
    `@${Math.floor(built / 1000)}`,
  ]);
  if (built > 0 && stdout.trim() === '') return;
  await execa(join(REPO_ROOT, 'node_modules', '.bin', 'tsc'), ['-p', join(REPO_ROOT, 'tsconfig.build.json')]);
}

export class PlainHostNode {
  readonly root: string;
  readonly images: string;
  readonly exportsDir: string;
  readonly stateDir: string;
  readonly statusDir: string;
  readonly nbdPort: number;
  readonly qemuPort: number;
  readonly healthPort: number;
  /** For qemu-storage-daemons of one export (exports with client rules). */
  readonly dedicatedPorts: { first: number; last: number };
  #process: ChildProcess | undefined;
  #starts = 0;

  private constructor(root: string, ports: number[], dedicatedPorts: { first: number; last: number }) {
    this.dedicatedPorts = dedicatedPorts;
    this.root = root;
    this.images = join(root, 'images');
    this.exportsDir = join(root, 'exports');
    this.stateDir = join(root, 'state');
    this.statusDir = join(root, 'status');
    [this.nbdPort, this.qemuPort, this.healthPort] = ports as [number, number, number];
  }

  static async create(): Promise<PlainHostNode> {
    await ensureBuilt();
    const node = new PlainHostNode(
      await mkdtemp(join(tmpdir(), 'nbdx-it-')),
      await freePorts(3),
      await freePortRange(4),
    );
    await mkdir(node.images);
    await mkdir(node.exportsDir);
    return node;
  }

  get pid(): number | undefined {
    return this.#process?.pid;
  }

  /** `allowedRoot`: the root to allow instead of `images` (a narrower one, say). */
  async start(extraArgs: string[] = [], options: { allowedRoot?: string } = {}): Promise<void> {
    const log = openSync(join(this.root, `controller-${++this.#starts}.log`), 'w');
    this.#process = spawn(
      process.execPath,
      [
        MAIN_JS,
        'run',
        `--source=dir:${this.exportsDir}`,
        '--node-name=it-node',
        `--allowed-root=${options.allowedRoot ?? this.images}`,
        `--state-dir=${this.stateDir}`,
        `--status-dir=${this.statusDir}`,
        '--listen-address=127.0.0.1',
        `--nbd-port=${this.nbdPort}`,
        `--qemu-port=${this.qemuPort}`,
        `--dedicated-ports=${this.dedicatedPorts.first}-${this.dedicatedPorts.last}`,
        '--health-address=127.0.0.1',
        `--health-port=${this.healthPort}`,
        '--log-level=debug',
        ...extraArgs,
      ],
      { stdio: ['ignore', log, log] },
    );
    closeSync(log);
    await waitFor(
      'the controller to be ready',
      async () => {
        if (this.#process?.exitCode !== null && this.#process?.exitCode !== undefined)
          throw new Error(`controller exited with ${this.#process.exitCode}`);
        const response = await fetch(`http://127.0.0.1:${this.healthPort}/readyz`);
        return response.ok ? true : undefined;
      },
      { timeoutMs: 60_000, intervalMs: 200 },
    );
  }

  /** SIGTERM (a clean stop) or SIGKILL (a crash). Either way the servers keep running. */
  async stop(signal: 'SIGTERM' | 'SIGKILL' = 'SIGTERM'): Promise<void> {
    const child = this.#process;
    this.#process = undefined;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = once(child, 'exit');
    child.kill(signal);
    await exited;
  }

  async stopServers(): Promise<void> {
    await execa(process.execPath, [MAIN_JS, 'stop-servers', `--state-dir=${this.stateDir}`], {
      reject: false,
    });
  }

  async destroy(): Promise<void> {
    await this.stop('SIGKILL');
    await this.stopServers();
    if (process.env.KEEP_TEST_DIRS !== '1') await rm(this.root, { recursive: true, force: true });
  }

  async writeExports(file: string, documents: object[]): Promise<void> {
    const yaml = documents.map((d) => JSON.stringify(d)).join('\n---\n');
    const temporary = join(this.exportsDir, `.${file}.tmp`);
    await writeFile(temporary, yaml);
    await import('node:fs/promises').then((fs) => fs.rename(temporary, join(this.exportsDir, file)));
  }

  async removeExports(file: string): Promise<void> {
    await rm(join(this.exportsDir, file), { force: true });
  }

  async object(name: string, namespace = 'it'): Promise<NbdExport | undefined> {
    try {
      return load(await readFile(join(this.statusDir, `${namespace}_${name}.yaml`), 'utf8')) as NbdExport;
    } catch {
      return undefined;
    }
  }

  async condition(name: string, type = 'Ready'): Promise<Condition | undefined> {
    return (await this.object(name))?.status?.conditions?.find((c) => c.type === type);
  }

  /** Waits until Ready has `status` (and `reason`, if given) for the current generation. */
  async waitForReady(name: string, status: 'True' | 'False' = 'True', reason?: string, timeoutMs = 120_000) {
    return this.#explainTimeout(name, () => this.#waitForReady(name, status, reason, timeoutMs));
  }

  async #waitForReady(name: string, status: 'True' | 'False', reason: string | undefined, timeoutMs: number) {
    return waitFor(
      `${name} Ready=${status}${reason ? ` (${reason})` : ''}`,
      async () => {
        const object = await this.object(name);
        const ready = object?.status?.conditions?.find((c) => c.type === 'Ready');
        if (!object || !ready || ready.observedGeneration !== object.metadata.generation) return undefined;
        return ready.status === status && (reason === undefined || ready.reason === reason)
          ? object
          : undefined;
      },
      { timeoutMs, intervalMs: 200 },
    );
  }

  /** A timeout says what the resource showed last and what the controller logged. */
  async #explainTimeout<T>(name: string, wait: () => Promise<T>): Promise<T> {
    try {
      return await wait();
    } catch (error) {
      const ready = await this.condition(name);
      const log = await readFile(join(this.root, `controller-${this.#starts}.log`), 'utf8').catch(() => '');
      const tail = log.trimEnd().split('\n').slice(-15).join('\n');
      throw new Error(
        `${error instanceof Error ? error.message : String(error)}\nlast Ready: ${JSON.stringify(ready)}\ncontroller log tail:\n${tail}`,
        { cause: error },
      );
    }
  }

  async waitForGone(name: string): Promise<void> {
    await waitFor(`${name} to be cleaned up`, async () => ((await this.object(name)) ? undefined : true), {
      intervalMs: 200,
    });
  }

  /** Where a resource's export would be on nbd-server (for one that shows no status.uri, being refused). */
  nbdServerUri(name: string, namespace = 'it'): string {
    return `nbd://127.0.0.1:${this.nbdPort}/${namespace}.${name}`;
  }

  uri(object: NbdExport): string {
    const uri = object.status?.uri;
    if (!uri) throw new Error(`${object.metadata.name} has no status.uri`);
    return uri;
  }
}

/** An NbdExport document for the integration tests' namespace. */
export function nbdExport(name: string, spec: Record<string, unknown>): object {
  return {
    apiVersion: 'nbd.dev/v1alpha1',
    kind: 'NbdExport',
    metadata: { name, namespace: 'it' },
    spec: { nodeName: 'it-node', ...spec },
  };
}
