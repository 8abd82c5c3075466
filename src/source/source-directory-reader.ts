/**
 * Reads the source directory the cheap way: every scan is a readdir and one lstat per
 * `*.yaml`/`*.yml` name; a file is opened, read and parsed only when its identity
 * (dev, ino, size, mtime, ctime) differs from the version last handled. A refused or
 * broken version is remembered too, so it is neither re-read nor re-logged every second.
 */
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { DEFAULT_YAML_LIMITS, parseBoundedYaml, type YamlLimits } from './parse-bounded-yaml.js';
import { inspectEntry, readRegularFile, type FileIdentity } from './read-regular-file.js';
import { REFUSAL_REASONS, SourceFileRefusal, type RefusalReason } from './source-file-refusal.js';

/** 1 MiB: thousands of NbdExports. Larger files are refused unread. */
export const DEFAULT_MAX_SOURCE_FILE_BYTES = 1024 * 1024;

export interface SourceDirectoryReaderOptions {
  dir: string;
  log: Logger;
  maxFileBytes?: number;
  yamlLimits?: YamlLimits;
}

/** One source file as of the latest scan. */
export interface SourceFileReading {
  file: string;
  /**
   * The documents it defines now; for a file whose current version is refused, those of
   * its last good version since start (none if it never parsed).
   */
  documents: unknown[];
  /** Set when the current version is not usable. */
  refusal?: SourceFileRefusal;
}

export interface SourceDirectoryReaderCounters {
  /** Files opened and read (each version at most once). */
  filesRead: number;
  /** Versions refused, by reason (an unchanged refused file counts again after each resync). */
  refusals: Record<RefusalReason, number>;
}

interface FileState {
  /** The version last handled; undefined forces a read on the next scan. */
  identity: FileIdentity | undefined;
  lastGoodDocuments: unknown[] | undefined;
  refusal: SourceFileRefusal | undefined;
}

export class SourceDirectoryReader {
  readonly #dir: string;
  readonly #log: Logger;
  readonly #maxFileBytes: number;
  readonly #yamlLimits: YamlLimits;
  readonly #files = new Map<string, FileState>();
  readonly #counters: SourceDirectoryReaderCounters = {
    filesRead: 0,
    refusals: Object.fromEntries(REFUSAL_REASONS.map((r) => [r, 0])) as Record<RefusalReason, number>,
  };

  constructor(options: SourceDirectoryReaderOptions) {
    this.#dir = options.dir;
    this.#log = options.log;
    this.#maxFileBytes = options.maxFileBytes ?? DEFAULT_MAX_SOURCE_FILE_BYTES;
    this.#yamlLimits = options.yamlLimits ?? DEFAULT_YAML_LIMITS;
  }

  get counters(): SourceDirectoryReaderCounters {
    return { filesRead: this.#counters.filesRead, refusals: { ...this.#counters.refusals } };
  }

  /** Makes the next scan read every file again (a periodic guard against coarse timestamps). */
  forgetIdentities(): void {
    for (const state of this.#files.values()) state.identity = undefined;
  }

  /**
   * All source files, sorted by name. Throws when the directory itself cannot be listed:
   * then nothing is known, and the caller must decide nothing.
   */
  async read(): Promise<SourceFileReading[]> {
    const names = (await readdir(this.#dir)).filter((n) => /\.ya?ml$/.test(n) && !n.startsWith('.')).sort();
    const readings: SourceFileReading[] = [];
    const present = new Set<string>();
    for (const file of names) {
      const state = await this.#refresh(file);
      if (!state) continue;
      present.add(file);
      readings.push({
        file,
        documents: state.lastGoodDocuments ?? [],
        ...(state.refusal ? { refusal: state.refusal } : {}),
      });
    }
    for (const file of this.#files.keys()) if (!present.has(file)) this.#files.delete(file);
    return readings;
  }

  /** The file's state after looking at it; undefined when it is gone. */
  async #refresh(file: string): Promise<FileState | undefined> {
    const path = join(this.#dir, file);
    const entry = await inspectEntry(path, file);
    if (entry.kind === 'missing') return undefined;
    const known = this.#files.get(file);
    if (known && known.identity === entry.identity) return known;
    const state: FileState = known ?? {
      identity: undefined,
      lastGoodDocuments: undefined,
      refusal: undefined,
    };
    this.#files.set(file, state);
    if (entry.kind === 'refused') {
      this.#refuse(state, entry.identity, entry.refusal);
      return state;
    }
    let identity = entry.identity;
    try {
      const content = await readRegularFile(path, file, this.#maxFileBytes);
      identity = content.identity;
      this.#counters.filesRead++;
      const documents = parseBoundedYaml(content.text, file, this.#yamlLimits);
      state.identity = identity;
      state.lastGoodDocuments = documents;
      if (state.refusal) this.#log.info({ file }, 'file parses again');
      state.refusal = undefined;
    } catch (error) {
      if (!(error instanceof SourceFileRefusal)) throw error;
      // A file caught mid-write is read again next time, whatever its identity says.
      this.#refuse(
        state,
        error.reason === 'changed-while-reading' ? undefined : (error.identity ?? identity),
        error,
      );
    }
    return state;
  }

  #refuse(state: FileState, identity: FileIdentity | undefined, refusal: SourceFileRefusal): void {
    state.identity = identity;
    state.refusal = refusal;
    this.#counters.refusals[refusal.reason]++;
    this.#log.error(
      { file: refusal.file, reason: refusal.reason, error: refusal.message },
      state.lastGoodDocuments
        ? 'source file refused; the resources of its last good version are kept'
        : 'source file refused; it defines nothing and deletes nothing',
    );
  }
}
