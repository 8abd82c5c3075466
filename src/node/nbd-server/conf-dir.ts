/**
 * nbd-server's conf.d (one `<stem>.conf` per export) and each export's admission files in
 * auth/ (rules, the hook's lock, the slots of connected clients). Files are written
 * atomically and only when their content changes; only files carrying our header are
 * ever read back or replaced, and only ours (or what our hook made) is deleted.
 */
import { mkdir, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { ExportConfig } from '../../api/export-config.js';
import { removeTemporaryFiles, syncDirectory, writeFileAtomic } from '../../shared/atomic-file.js';
import { readFileIfPresent } from '../../shared/read-file-if-present.js';
import { renderAdmissionRules } from './admission-rules.js';
import { startTicksOf } from '../process/proc-scan.js';
import {
  admissionPathsOf,
  confFileNameOf,
  controllerFileOf,
  RULES_SUFFIX,
  slotsDirOf,
} from './conf-file-name.js';
import {
  HEADER_PREFIX,
  isOurs,
  parseConfHeader,
  renderExportConf,
  type AdmissionHookCommand,
  type ConfHeader,
} from './render-export-config.js';

/** An export as its conf.d file describes it. */
export interface ConfiguredExport extends ConfHeader {
  /** The conf file's name in conf.d. */
  file: string;
}

export class ConfDir {
  readonly confDir: string;
  readonly authDir: string;
  readonly #hook: AdmissionHookCommand;
  readonly #controllerPid: number | null;

  /** `controllerPid`: the process the hook lets in unfiltered and uncounted, with its children; null: none. */
  constructor(confDir: string, authDir: string, hook: AdmissionHookCommand, controllerPid: number | null) {
    this.confDir = confDir;
    this.authDir = authDir;
    this.#hook = hook;
    this.#controllerPid = controllerPid;
  }

  async ensure(): Promise<void> {
    await mkdir(this.confDir, { recursive: true });
    await mkdir(this.authDir, { recursive: true, mode: 0o755 });
  }

  /**
   * Names the controller's process for the admission hook, which lets it and its children in
   * unfiltered and uncounted; returns whether the file changed.
   */
  async nameController(): Promise<boolean> {
    const pid = this.#controllerPid;
    const identity = pid === null ? '0 0' : `${pid} ${startTicksOf(pid) ?? 0}`;
    await this.ensure();
    return writeIfChanged(
      controllerFileOf(this.authDir),
      `${HEADER_PREFIX}controller process\n${identity}\n`,
    );
  }

  /** Removes what interrupted atomic writes left behind; returns the names removed. */
  async removeTemporaryFiles(): Promise<string[]> {
    return [...(await removeTemporaryFiles(this.confDir)), ...(await removeTemporaryFiles(this.authDir))];
  }

  /** Every export our conf files describe, by export name. Files without our header are ignored. */
  async read(): Promise<Map<string, ConfiguredExport>> {
    const result = new Map<string, ConfiguredExport>();
    // nbd-server reads regular `*.conf` files only (it skips symlinks): so do we.
    const entries = await readdir(this.confDir, { withFileTypes: true }).catch((error: unknown) => {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw error;
    });
    const files = entries.filter((e) => e.isFile() && e.name.endsWith('.conf')).map((e) => e.name);
    for (const file of files.sort()) {
      const text = await readFileIfPresent(join(this.confDir, file));
      const header = text === undefined ? undefined : parseConfHeader(text);
      if (!header) continue;
      // Two files claiming one name cannot come from us; the name's own file wins.
      if (result.has(header.exportName) && confFileNameOf(header.exportName) !== file) continue;
      result.set(header.exportName, { ...header, file });
    }
    return result;
  }

  /**
   * Writes the export's rules, then its conf; returns whether anything changed. The rules
   * take effect at the next connection, before any hand-over; a conf whose rules are
   * missing refuses every client (the hook fails closed).
   */
  async write(config: ExportConfig): Promise<boolean> {
    const { rulesPath, lockPath } = admissionPathsOf(this.authDir, config.exportName);
    const conf = renderExportConf(config, { hook: this.#hook, rulesPath, lockPath });
    await this.ensure();
    const rules = renderAdmissionRules({
      exportName: config.exportName,
      path: config.path,
      ...(config.fileId === undefined ? {} : { fileId: config.fileId }),
      allowedClients: config.allowedClients,
      maxConnections: config.maxConnections,
    });
    const rulesChanged = await writeIfChanged(rulesPath, rules);
    return (
      (await writeIfChanged(join(this.confDir, confFileNameOf(config.exportName)), conf)) || rulesChanged
    );
  }

  /**
   * Removes the export's conf file; returns whether it was there. Its rules stay: a running
   * nbd-server may still serve the export until the next restart (without them the hook
   * refuses everyone, which is safe but abrupt). `removeUnreferenced` retires them later.
   */
  async remove(exportName: string): Promise<boolean> {
    const path = join(this.confDir, confFileNameOf(exportName));
    const text = await readFileIfPresent(path);
    if (text === undefined || parseConfHeader(text)?.exportName !== exportName) return false;
    await rm(path, { force: true });
    await syncDirectory(this.confDir);
    return true;
  }

  /**
   * Deletes our rules files (and authfiles of earlier versions) that no path in
   * `referenced` names, with the lock and slots that go with them; returns how many.
   */
  async removeUnreferenced(referenced: ReadonlySet<string>): Promise<number> {
    let removed = 0;
    for (const file of await readdir(this.authDir).catch(() => [])) {
      const path = join(this.authDir, file);
      const rules = file.endsWith(RULES_SUFFIX);
      if (!(rules || file.endsWith('.allow')) || referenced.has(path)) continue;
      const text = await readFileIfPresent(path);
      if (text === undefined || !isOurs(text)) continue;
      await rm(path, { force: true });
      if (rules) {
        await rm(`${path.slice(0, -RULES_SUFFIX.length)}.lock`, { force: true });
        await rm(slotsDirOf(path), { recursive: true, force: true });
      }
      removed++;
    }
    if (removed > 0) await syncDirectory(this.authDir);
    return removed;
  }
}

/** Writes atomically unless the file already holds `content`; refuses to replace a file not ours. */
async function writeIfChanged(path: string, content: string): Promise<boolean> {
  const current = await readFileIfPresent(path);
  if (current === content) return false;
  if (current !== undefined && !isOurs(current))
    throw new Error(`refusing to replace ${path}: it was not written by nbd-export-controller`);
  await writeFileAtomic(path, content, { mode: 0o644 });
  return true;
}
