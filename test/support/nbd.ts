/**
 * NBD clients for the end-to-end tests, all real programs: nbdcopy and nbdinfo (libnbd-bin),
 * and ss to see a client's connection.
 */
import { spawn, type ChildProcessByStdio } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { open } from 'node:fs/promises';
import type { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { execa } from 'execa';
import { requireBinary } from './repo.js';

export const NBD_CLIENTS = ['nbdcopy', 'nbdinfo', 'ss'];

/** Fails with a clear message when a client program is missing. */
export async function requireNbdClients(): Promise<void> {
  for (const name of NBD_CLIENTS) await requireBinary(name);
}

/** Writes `bytes` of random data to `path`. */
export async function writeRandomFile(path: string, bytes: number): Promise<void> {
  const file = await open(path, 'w');
  try {
    for (let written = 0; written < bytes;) {
      const chunk = randomBytes(Math.min(1 << 20, bytes - written));
      await file.write(chunk);
      written += chunk.length;
    }
  } finally {
    await file.close();
  }
}

export async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256');
  await pipeline(createReadStream(path), hash);
  return hash.digest('hex');
}

/**
 * `nbdcopy SOURCE DESTINATION` over one connection (a read-write export allows one client).
 * Throws with nbdcopy's stderr when it fails.
 */
export async function nbdcopy(source: string, destination: string): Promise<void> {
  await execa('nbdcopy', ['--connections=1', source, destination]);
}

/** The same, returning the exit code and stderr instead of throwing. */
export async function tryNbdcopy(
  source: string,
  destination: string,
): Promise<{ exitCode: number; stderr: string }> {
  const result = await execa('nbdcopy', ['--connections=1', source, destination], { reject: false });
  return { exitCode: result.exitCode ?? -1, stderr: String(result.stderr) };
}

/** `nbdinfo --size URI`: the export's size after a real NBD_OPT_GO. Throws when not served. */
export async function exportSize(uri: string): Promise<number> {
  const { stdout } = await execa('nbdinfo', ['--size', uri], { timeout: 30_000 });
  return Number(stdout.trim());
}

/** Whether `nbdinfo --size` can connect to the export at all; `via` as for HeldTransfer. */
export async function isServed(uri: string, via: readonly string[] = []): Promise<boolean> {
  const [program = 'nbdinfo', ...args] = [...via, 'nbdinfo', '--size', uri];
  const result = await execa(program, args, { reject: false, timeout: 30_000 });
  return result.exitCode === 0;
}

/** `nbdinfo --can write URI`: exit 0 means yes, 2 means no; anything else is an error. */
export async function canWrite(uri: string): Promise<boolean> {
  const result = await execa('nbdinfo', ['--can', 'write', uri], { reject: false, timeout: 30_000 });
  if (result.exitCode === 0) return true;
  if (result.exitCode === 2) return false;
  throw new Error(`nbdinfo --can write ${uri} exited ${result.exitCode}: ${String(result.stderr)}`);
}

/** Established TCP connections to 127.0.0.1:port, as ss sees them. */
export async function establishedConnections(port: number): Promise<number> {
  const { stdout } = await execa('ss', ['-Htn', 'state', 'established', `( dport = :${port} )`]);
  return stdout.split('\n').filter((line) => line.trim() !== '').length;
}

/**
 * An nbdcopy that writes `file` into an export through a pipe, in two halves: it connects at
 * once and receives the first `firstBytes`, then holds its connection open until `finish()`
 * sends the rest. Its connection stays open across whatever happens in between.
 */
export class HeldTransfer {
  readonly #child: ChildProcessByStdio<Writable, null, Readable>;
  readonly #exited: Promise<number>;
  readonly #file: string;
  readonly #firstBytes: number;
  readonly #firstHalf: Promise<void>;
  #stderr = '';

  /** `via`: a command line nbdcopy runs under (a network namespace's `ip netns exec NAME`). */
  constructor(file: string, uri: string, firstBytes: number, via: readonly string[] = []) {
    this.#file = file;
    this.#firstBytes = firstBytes;
    const [program = 'nbdcopy', ...args] = [...via, 'nbdcopy', '--connections=1', '-', uri];
    this.#child = spawn(program, args, { stdio: ['pipe', 'ignore', 'pipe'] });
    this.#child.stderr.on('data', (chunk: Buffer) => (this.#stderr += chunk.toString()));
    this.#exited = new Promise((resolve) => {
      this.#child.once('error', (error) => {
        this.#stderr += `\n${error.message}`;
        resolve(-1);
      });
      this.#child.once('close', (code) => resolve(code ?? -1));
    });
    this.#firstHalf = pipeline(createReadStream(file, { start: 0, end: firstBytes - 1 }), this.#child.stdin, {
      end: false,
    });
    // A failure of the first half shows in finish(); don't let it be unhandled meanwhile.
    this.#firstHalf.catch(() => undefined);
  }

  get pid(): number | undefined {
    return this.#child.pid;
  }

  /** The first half has been written into the pipe (nbdcopy may still be sending it). */
  async firstHalfWritten(): Promise<void> {
    await this.#firstHalf;
  }

  /** Sends the rest, closes the pipe and returns nbdcopy's exit code and stderr. */
  async finish(): Promise<{ exitCode: number; stderr: string }> {
    let pipeError = '';
    try {
      await this.#firstHalf;
      await pipeline(createReadStream(this.#file, { start: this.#firstBytes }), this.#child.stdin);
    } catch (error) {
      // nbdcopy stopped reading (it failed): its exit code and stderr say why.
      pipeError = `\n(writing into its pipe failed: ${error instanceof Error ? error.message : String(error)})`;
      this.#child.stdin.destroy();
    }
    const exitCode = await this.#exited;
    return { exitCode, stderr: `${this.#stderr}${pipeError}` };
  }

  /** Ends it, whatever state it is in (cleanup after a failure). */
  kill(): void {
    this.#child.kill('SIGKILL');
  }
}
