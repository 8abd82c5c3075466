import { mkdir, mkdtemp, readdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { fingerprintOf, type ExportConfig } from '../../../../src/api/export-config.js';
import { ConfDir } from '../../../../src/node/nbd-server/conf-dir.js';
import { rawExportConfig } from '../../../support/export-config.js';

function config(exportName: string, overrides: Partial<ExportConfig> = {}): ExportConfig {
  return rawExportConfig(exportName, `/srv/${exportName.replace(/[^a-z0-9]/g, '_')}.raw`, overrides);
}

describe('ConfDir', () => {
  let root: string;
  let dir: ConfDir;

  beforeEach(async () => {
    root = await mkdtemp(join(tmpdir(), 'nbdx-confdir-'));
    dir = new ConfDir(join(root, 'conf.d'), join(root, 'auth'));
  });
  afterEach(async () => {
    await rm(root, { recursive: true, force: true });
  });

  it('reads back what it wrote, by export name with fingerprints, and writes only changes', async () => {
    const a = config('ns.a:1');
    const b = config('ns.b', { readOnly: true });
    expect(await dir.write(a)).toBe(true);
    expect(await dir.write(b)).toBe(true);
    expect(await dir.write(a)).toBe(false);
    const read = await dir.read();
    expect([...read.keys()].sort()).toEqual(['ns.a:1', 'ns.b']);
    expect(read.get('ns.a:1')).toMatchObject({
      fingerprint: fingerprintOf(a),
      path: a.path,
      file: 'ns.a%3A1.conf',
    });
    expect(await dir.write({ ...a, readOnly: true })).toBe(true);
    expect((await dir.read()).get('ns.a:1')?.fingerprint).toBe(fingerprintOf({ ...a, readOnly: true }));
  });

  it('ignores files that are not ours, symlinks, and other extensions, and never deletes them', async () => {
    await dir.ensure();
    await writeFile(join(dir.confDir, 'foreign.conf'), '[foreign]\nexportname = /srv/x\n');
    await writeFile(join(dir.confDir, 'notes.txt'), 'hello');
    await dir.write(config('mine'));
    await symlink(join(dir.confDir, 'mine.conf'), join(dir.confDir, 'link.conf'));
    expect([...(await dir.read()).keys()]).toEqual(['mine']);
    expect(await dir.remove('foreign')).toBe(false);
    expect(await dir.remove('mine')).toBe(true);
    expect((await readdir(dir.confDir)).sort()).toEqual(['foreign.conf', 'link.conf', 'notes.txt']);
  });

  it('refuses to overwrite a file it did not write', async () => {
    await dir.ensure();
    await writeFile(join(dir.confDir, 'taken.conf'), '[taken]\nexportname = /srv/y\n');
    await expect(dir.write(config('taken'))).rejects.toThrow(/not written by nbd-export-controller/);
  });

  it('writes the authfile and references it; keeps it on removal until it is unreferenced', async () => {
    await dir.write(config('fenced', { allowedClients: ['10.0.0.0/8'] }));
    const authPath = join(dir.authDir, 'fenced.allow');
    expect((await readFile(authPath, 'utf8')).split('\n').slice(1)).toEqual(['10.0.0.0/8', '']);
    expect((await dir.read()).get('fenced')?.authfile).toBe(authPath);
    expect(await readFile(join(dir.confDir, 'fenced.conf'), 'utf8')).toContain(`authfile = ${authPath}`);

    await dir.remove('fenced');
    await writeFile(join(dir.authDir, 'foreign.allow'), '10.0.0.1\n');
    expect(await dir.removeUnreferencedAuthfiles(new Set([authPath]))).toBe(0);
    expect(await dir.removeUnreferencedAuthfiles(new Set())).toBe(1);
    expect(await readdir(dir.authDir)).toEqual(['foreign.allow']);
  });

  it('leaves nothing behind when rendering fails, and cleans temporary leftovers', async () => {
    await expect(dir.write(config('bad]name'))).rejects.toThrow(TypeError);
    await dir.ensure();
    expect(await readdir(dir.confDir)).toEqual([]);
    await mkdir(dir.confDir, { recursive: true });
    await writeFile(join(dir.confDir, '.x.conf.0123abcd.tmp'), 'half');
    expect(await dir.removeTemporaryFiles()).toEqual(['.x.conf.0123abcd.tmp']);
  });
});
