/**
 * Checksums of what an export serves, read through the server exactly as a client reads it
 * (nbdcopy to a pipe, hashed here), run in the background one at a time: reading a whole
 * disk takes minutes and must hold no reconcile worker. The planner asks for a job and reads
 * its progress and result as an observation; a finished job is kept until its resource asks
 * for another one, so a restored backup can be proven to read what was sealed.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import type { Logger } from 'pino';
import type { ChecksumJob, ChecksumRequest } from '../plan/observed-state.js';

export interface ChecksumJobsOptions {
  logger: Logger;
  /** The NBD client that reads an export to stdout. Default `nbdcopy`. */
  nbdcopy?: string;
  /**
   * The servers require TLS: `nbd://` URIs are read as `nbds://…?tls-certificates=DIR`
   * (DIR in libnbd's layout: ca-cert.pem, client-cert.pem, client-key.pem). Default: plain.
   */
  tlsCertificatesDir?: string;
  /** Wall-clock time of completion, for status. */
  now?: () => Date;
}

/** How often progress is reported to `onChange` while a job runs. */
const PROGRESS_EVERY_BYTES = 256 * 1024 * 1024;

export class ChecksumJobs {
  readonly #options: ChecksumJobsOptions;
  readonly #listeners: ((key: string) => void)[] = [];
  readonly #jobs = new Map<string, ChecksumJob>();
  readonly #waiting: { key: string; uri: string }[] = [];
  #running: { key: string; kill: () => void } | undefined;

  constructor(options: ChecksumJobsOptions) {
    this.#options = options;
  }

  /** Told whenever a job of `key` makes progress or ends, so the resource is looked at again. */
  onChange(listener: (key: string) => void): void {
    this.#listeners.push(listener);
  }

  #changed(key: string): void {
    for (const listener of this.#listeners) listener(key);
  }

  /** The job of a resource, running, queued or finished; undefined if it never asked. */
  get(key: string): ChecksumJob | undefined {
    return this.#jobs.get(key);
  }

  #withTls(uri: string): string {
    const dir = this.#options.tlsCertificatesDir;
    if (dir === undefined || !uri.startsWith('nbd://')) return uri;
    return `nbds://${uri.slice('nbd://'.length)}?tls-certificates=${encodeURIComponent(dir)}`;
  }

  /** Starts (or queues) a job for `key`, replacing any finished one; a running job of the same request stays. */
  start(key: string, request: ChecksumRequest, uri: string): void {
    const current = this.#jobs.get(key);
    if (current?.state === 'running' && sameRequest(current, request)) return;
    this.forget(key);
    this.#jobs.set(key, { ...request, state: 'running', bytesRead: 0, totalBytes: request.totalBytes });
    this.#waiting.push({ key, uri });
    this.#next();
  }

  /** Stops and forgets whatever runs for `key` (the resource is gone, or its export changed). */
  forget(key: string): void {
    const index = this.#waiting.findIndex((w) => w.key === key);
    if (index >= 0) this.#waiting.splice(index, 1);
    if (this.#running?.key === key) this.#running.kill();
    this.#jobs.delete(key);
  }

  /** Stops every job (the controller is stopping); nothing is recorded for them. */
  stop(): void {
    this.#waiting.length = 0;
    this.#running?.kill();
    this.#jobs.clear();
  }

  #next(): void {
    if (this.#running) return;
    const next = this.#waiting.shift();
    if (!next) return;
    const job = this.#jobs.get(next.key);
    if (!job) return this.#next();
    this.#run(next.key, job, next.uri);
  }

  #run(key: string, job: ChecksumJob, uri: string): void {
    const { logger } = this.#options;
    const log = logger.child({ key, checksum: job.kind });
    const hash = createHash('sha256');
    let bytesRead = 0;
    let reported = 0;
    let stderr = '';
    log.info({ uri, bytes: job.totalBytes }, 'reading the export to checksum it');
    const child = spawn(this.#options.nbdcopy ?? 'nbdcopy', ['--connections=1', this.#withTls(uri), '-'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let killed = false;
    this.#running = {
      key,
      kill: () => {
        killed = true;
        child.kill('SIGKILL');
      },
    };
    child.stdout.on('data', (chunk: Buffer) => {
      hash.update(chunk);
      bytesRead += chunk.length;
      const current = this.#jobs.get(key);
      if (current?.state === 'running') current.bytesRead = bytesRead;
      if (bytesRead - reported >= PROGRESS_EVERY_BYTES) {
        reported = bytesRead;
        this.#changed(key);
      }
    });
    child.stderr.on('data', (chunk: Buffer) => (stderr = `${stderr}${chunk.toString()}`.slice(-2000)));
    let finished = false;
    const finish = (failure: string | undefined) => {
      if (finished) return;
      finished = true;
      this.#running = undefined;
      if (!killed && this.#jobs.get(key) === job) {
        const completedAt = (this.#options.now?.() ?? new Date()).toISOString();
        const { kind, generation, token, totalBytes } = job;
        const request = { kind, generation, totalBytes, ...(token === undefined ? {} : { token }) };
        if (failure === undefined && bytesRead === totalBytes) {
          const digest = hash.digest('hex');
          this.#jobs.set(key, { ...request, state: 'done', digest, bytesRead, completedAt });
          log.info({ digest, bytes: bytesRead }, 'checksum done');
        } else {
          const message =
            failure ??
            `read ${bytesRead} bytes but the export has ${totalBytes}; the export changed underneath`;
          this.#jobs.set(key, { ...request, state: 'failed', message, bytesRead, completedAt });
          log.warn({ error: message }, 'checksum failed');
        }
        this.#changed(key);
      }
      this.#next();
    };
    child.once('error', (error) => finish(`could not run nbdcopy: ${error.message}`));
    child.once('close', (code, signal) =>
      finish(code === 0 ? undefined : `nbdcopy exited with ${code ?? signal}: ${stderr.trim()}`),
    );
  }
}

function sameRequest(job: ChecksumJob, request: ChecksumRequest): boolean {
  return job.kind === request.kind && job.generation === request.generation && job.token === request.token;
}
