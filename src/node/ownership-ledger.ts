/**
 * What this node's controller owns, per resource UID, kept on disk so that a restarted
 * controller (or one whose resource vanished without cleanup) still knows which export
 * it serves for whom and which image files it created. Only a file recorded here as
 * created — with the same inode — may ever be deleted.
 */
import { mkdir, readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { removeTemporaryFiles, writeFileAtomic } from './atomic-file.js';

export interface OwnershipRecord {
  uid: string;
  key: string;
  exportName?: string;
  server?: 'nbd-server' | 'qemu-storage-daemon';
  createdImage?: { path: string; inode?: number };
}

const UID_PATTERN = /^[A-Za-z0-9-]{1,64}$/;

export class OwnershipLedger {
  readonly #dir: string;
  readonly #records = new Map<string, OwnershipRecord>();

  /** @param dir directory of one JSON file per UID; created when missing. */
  constructor(dir: string) {
    this.#dir = dir;
  }

  async load(): Promise<void> {
    await mkdir(this.#dir, { recursive: true });
    await removeTemporaryFiles(this.#dir); // left by a write the controller did not live to finish
    this.#records.clear();
    for (const name of await readdir(this.#dir)) {
      if (!name.endsWith('.json')) continue;
      const record = JSON.parse(await readFile(join(this.#dir, name), 'utf8')) as OwnershipRecord;
      if (typeof record.uid === 'string' && UID_PATTERN.test(record.uid))
        this.#records.set(record.uid, record);
    }
  }

  get(uid: string): OwnershipRecord | undefined {
    return this.#records.get(uid);
  }

  all(): OwnershipRecord[] {
    return [...this.#records.values()];
  }

  /** Merges `patch` into the record of `uid` and persists it before returning. */
  async record(
    uid: string,
    key: string,
    patch: Omit<Partial<OwnershipRecord>, 'uid' | 'key'>,
  ): Promise<OwnershipRecord> {
    if (!UID_PATTERN.test(uid))
      throw new TypeError(`uid ${JSON.stringify(uid)} must match ${UID_PATTERN.source}`);
    const next: OwnershipRecord = { ...this.#records.get(uid), ...patch, uid, key };
    await writeFileAtomic(join(this.#dir, `${uid}.json`), `${JSON.stringify(next, null, 2)}\n`);
    this.#records.set(uid, next);
    return next;
  }

  async forget(uid: string): Promise<void> {
    if (!UID_PATTERN.test(uid)) return;
    await rm(join(this.#dir, `${uid}.json`), { force: true });
    this.#records.delete(uid);
  }
}
