/**
 * What this node's controller owns, per resource UID, kept on disk so that a restarted
 * controller (or one whose resource vanished without cleanup) still knows which export
 * it serves for whom and which image files it created. Only a file recorded here as
 * created — with the same inode — may ever be deleted.
 */
import { mkdir, readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { pino, type Logger } from 'pino';
import type { LedgerEntry as OwnershipRecord } from '../plan/observed-state.js';
import { removeTemporaryFiles, writeFileAtomic } from '../shared/atomic-file.js';
import { moveCorruptStateFileAside } from './corrupt-state-file.js';

const UID_PATTERN = /^[A-Za-z0-9-]{1,64}$/;

export class OwnershipLedger {
  readonly #dir: string;
  readonly #records = new Map<string, OwnershipRecord>();

  readonly #logger: Logger;

  /**
   * @param dir directory of one JSON file per UID; created when missing.
   * @param options.logger where a corrupt record is reported (default: silent).
   */
  constructor(dir: string, options: { logger?: Logger } = {}) {
    this.#dir = dir;
    this.#logger = (options.logger ?? pino({ level: 'silent' })).child({ component: 'ledger' });
  }

  /**
   * Reads every record. A record that does not parse is moved aside (never deleted) and
   * skipped: the reconciles claim their exports again, and an image it named as created is
   * then never deleted, which is the safe side. A directory that cannot be created or read
   * (read-only or missing file system) leaves the ledger empty rather than stopping the
   * controller; writes then fail, and those failures reach the resources' status.
   */
  async load(): Promise<void> {
    this.#records.clear();
    try {
      await mkdir(this.#dir, { recursive: true });
      await removeTemporaryFiles(this.#dir); // left by a write the controller did not live to finish
    } catch (error) {
      this.#logger.error({ dir: this.#dir, err: error }, 'could not prepare the ledger directory');
    }
    let names: string[];
    try {
      names = await readdir(this.#dir);
    } catch (error) {
      this.#logger.error({ dir: this.#dir, err: error }, 'could not read the ledger; starting empty');
      return;
    }
    for (const name of names) {
      if (!name.endsWith('.json')) continue;
      const path = join(this.#dir, name);
      let record: Partial<OwnershipRecord> | null;
      try {
        record = JSON.parse(await readFile(path, 'utf8')) as Partial<OwnershipRecord> | null;
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === 'ENOENT') continue;
        await moveCorruptStateFileAside(path, error, this.#logger);
        continue;
      }
      if (!isRecordOf(record, name)) {
        await moveCorruptStateFileAside(path, 'not a ledger record for its file name', this.#logger);
        continue;
      }
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
    // The directory may have been deleted under us: recreate it (a no-op when present).
    await mkdir(this.#dir, { recursive: true });
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

/** A parsed record is usable when it names its own UID (the file's name) and a key. */
function isRecordOf(record: Partial<OwnershipRecord> | null, fileName: string): record is OwnershipRecord {
  return (
    typeof record === 'object' &&
    record !== null &&
    typeof record.uid === 'string' &&
    UID_PATTERN.test(record.uid) &&
    fileName === `${record.uid}.json` &&
    typeof record.key === 'string'
  );
}
