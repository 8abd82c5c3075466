/**
 * What this node's controller owns, per resource UID, kept on disk so that a restarted
 * controller (or one whose resource vanished without cleanup) still knows which export
 * it serves for whom and which image files it created. Only a file recorded here as
 * created — with the same inode — may ever be deleted.
 */
import { mkdir, readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { LedgerEntry as OwnershipRecord } from '../plan/observed-state.js';
import { removeTemporaryFiles, writeFileAtomic } from '../shared/atomic-file.js';

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
    await this.#write(next);
    return next;
  }

  async #write(record: OwnershipRecord): Promise<void> {
    await writeFileAtomic(join(this.#dir, `${record.uid}.json`), `${JSON.stringify(record, null, 2)}\n`);
    this.#records.set(record.uid, record);
  }

  /**
   * Records that `uid` serves `exportName` on `server`, and takes that claim away from any
   * other record: one export has one owner, so a resource that lost the name can never
   * retire the export its new owner serves.
   */
  async claimExport(
    uid: string,
    key: string,
    server: OwnershipRecord['server'] & string,
    exportName: string,
  ) {
    for (const other of this.#records.values())
      if (other.uid !== uid && other.server === server && other.exportName === exportName)
        await this.#write({
          uid: other.uid,
          key: other.key,
          ...(other.createdImage ? { createdImage: other.createdImage } : {}),
        });
    return this.record(uid, key, { server, exportName });
  }

  /** Drops the export claim of `uid` (it serves nothing any more). */
  async releaseExport(uid: string): Promise<void> {
    const record = this.#records.get(uid);
    if (!record || record.exportName === undefined) return;
    await this.#write({
      uid: record.uid,
      key: record.key,
      ...(record.createdImage ? { createdImage: record.createdImage } : {}),
    });
  }

  /** Drops the created-image record of `uid`: that file is then never deleted by the controller. */
  async forgetCreatedImage(uid: string): Promise<void> {
    const record = this.#records.get(uid);
    if (!record?.createdImage) return;
    const { createdImage: _, ...rest } = record;
    await this.#write(rest);
  }

  async forget(uid: string): Promise<void> {
    if (!UID_PATTERN.test(uid)) return;
    await rm(join(this.#dir, `${uid}.json`), { force: true });
    this.#records.delete(uid);
  }
}
