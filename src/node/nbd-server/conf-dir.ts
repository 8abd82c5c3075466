/**
 * nbd-server's conf.d (one `<stem>.conf` per export) and the authfiles next to it
 * (auth/<stem>.allow). Files are written atomically and only when their content
 * changes; only files carrying our header are ever read back, replaced or deleted.
 */
import { mkdir, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { ExportConfig } from '../../api/export-config.js';
import { removeTemporaryFiles, syncDirectory, writeFileAtomic } from '../../shared/atomic-file.js';
import { readFileIfPresent } from '../../shared/read-file-if-present.js';
import { authFileNameOf, confFileNameOf } from './conf-file-name.js';
import { isOurs, parseConfHeader, renderExportFiles, type ConfHeader } from './render-export-config.js';

/** An export as its conf.d file describes it. */
export interface ConfiguredExport extends ConfHeader {
  /** The conf file's name in conf.d. */
  file: string;
}

export class ConfDir {
  readonly confDir: string;
  readonly authDir: string;

  constructor(confDir: string, authDir: string) {
    this.confDir = confDir;
    this.authDir = authDir;
  }

  async ensure(): Promise<void> {
    await mkdir(this.confDir, { recursive: true });
    await mkdir(this.authDir, { recursive: true, mode: 0o755 });
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
   * Writes the export's files; returns whether anything changed. The authfile goes
   * first: nbd-server lets everyone in when a referenced authfile is missing.
   */
  async write(config: ExportConfig): Promise<boolean> {
    const authPath = join(this.authDir, authFileNameOf(config.exportName));
    const files = renderExportFiles(config, authPath);
    await this.ensure();
    let changed = false;
    if (files.authfile !== undefined) changed = await writeIfChanged(authPath, files.authfile);
    return (
      (await writeIfChanged(join(this.confDir, confFileNameOf(config.exportName)), files.conf)) || changed
    );
  }

  /**
   * Removes the export's conf file; returns whether it was there. Its authfile stays: a
   * running nbd-server may still serve the export until the next restart, and without
   * the file it would let everyone in. `removeUnreferencedAuthfiles` retires it later.
   */
  async remove(exportName: string): Promise<boolean> {
    const path = join(this.confDir, confFileNameOf(exportName));
    const text = await readFileIfPresent(path);
    if (text === undefined || parseConfHeader(text)?.exportName !== exportName) return false;
    await rm(path, { force: true });
    await syncDirectory(this.confDir);
    return true;
  }

  /** Deletes our authfiles that no path in `referenced` names; returns how many. */
  async removeUnreferencedAuthfiles(referenced: ReadonlySet<string>): Promise<number> {
    let removed = 0;
    for (const file of await readdir(this.authDir).catch(() => [])) {
      const path = join(this.authDir, file);
      if (!file.endsWith('.allow') || referenced.has(path)) continue;
      const text = await readFileIfPresent(path);
      if (text === undefined || !isOurs(text)) continue;
      await rm(path, { force: true });
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
