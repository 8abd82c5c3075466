/**
 * Whether the controller's state directory can hold its state now: present, writable and
 * not full. The executors' own writes fail loudly when it cannot (and those failures reach
 * the resources' status); this check is what /metrics shows, and it heals what it can: a
 * deleted directory is created again.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, open, rm, stat, statfs } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';

export type StateDirectoryCondition = 'ok' | 'missing' | 'read_only' | 'full' | 'error';

/** Below this much free space a state write (a few KiB, plus the temporary) may fail: counted as full. */
const MIN_FREE_BYTES = 64 * 1024;
const READ_ONLY_CODES = new Set(['EROFS', 'EACCES', 'EPERM']);
const FULL_CODES = new Set(['ENOSPC', 'EDQUOT']);

export class StateDirectoryHealth {
  readonly #dir: string;
  readonly #logger: Logger;
  #condition: StateDirectoryCondition = 'ok';
  #detail = '';
  #timer: NodeJS.Timeout | undefined;
  #checking: Promise<StateDirectoryCondition> | undefined;

  constructor(dir: string, logger: Logger) {
    this.#dir = dir;
    this.#logger = logger.child({ component: 'state-directory' });
  }

  /** The condition found by the last check. */
  condition(): StateDirectoryCondition {
    return this.#condition;
  }

  /** Checks now (recreating a missing directory); logs every change of condition. */
  check(): Promise<StateDirectoryCondition> {
    this.#checking ??= this.#check().finally(() => (this.#checking = undefined));
    return this.#checking;
  }

  /** Checks every `intervalMs` until stopped (the timer keeps no process alive). */
  startChecking(intervalMs: number): void {
    this.stop();
    this.#timer = setInterval(() => void this.check(), intervalMs);
    this.#timer.unref();
  }

  stop(): void {
    if (this.#timer !== undefined) clearInterval(this.#timer);
    this.#timer = undefined;
  }

  async #check(): Promise<StateDirectoryCondition> {
    const [condition, detail] = await this.#probe();
    if (condition !== this.#condition || detail !== this.#detail) {
      const fields = { dir: this.#dir, condition, was: this.#condition, detail };
      if (condition === 'ok') this.#logger.info(fields, 'the state directory is usable again');
      else this.#logger.error(fields, 'the state directory cannot hold the controller state');
    }
    this.#condition = condition;
    this.#detail = detail;
    return condition;
  }

  async #probe(): Promise<[StateDirectoryCondition, string]> {
    if ((await stat(this.#dir).catch(() => undefined)) === undefined) {
      try {
        await mkdir(this.#dir, { recursive: true, mode: 0o700 });
        this.#logger.warn({ dir: this.#dir }, 'the state directory was missing; created it again');
      } catch (error) {
        return [classify(error, 'missing'), describe(error)];
      }
    }
    // A real write, fsynced: the only test that a read-only mount, a quota or a full disk
    // gives the same answer as the executors' writes will get. The name is one that
    // removeTemporaryFiles cleans up should the controller die right here.
    const probe = join(this.#dir, `.health-probe.${randomBytes(4).toString('hex')}.tmp`);
    try {
      const handle = await open(probe, 'wx', 0o600);
      try {
        await handle.writeFile('ok\n');
        await handle.sync();
      } finally {
        await handle.close();
      }
    } catch (error) {
      return [classify(error, 'error'), describe(error)];
    } finally {
      await rm(probe, { force: true }).catch(() => undefined);
    }
    const space = await statfs(this.#dir).catch(() => undefined);
    if (space !== undefined && space.bavail * space.bsize < MIN_FREE_BYTES)
      return ['full', `${space.bavail * space.bsize} bytes free`];
    return ['ok', ''];
  }
}

function classify(error: unknown, otherwise: StateDirectoryCondition): StateDirectoryCondition {
  const code = (error as NodeJS.ErrnoException).code ?? '';
  if (READ_ONLY_CODES.has(code)) return 'read_only';
  if (FULL_CODES.has(code)) return 'full';
  if (code === 'ENOENT') return 'missing';
  return otherwise;
}

function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
