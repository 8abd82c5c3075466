import { mkdir, mkdtemp, readdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { fingerprintOf, type ExportConfig } from '../../../../src/api/export-config.js';
import { parseAdmissionRules } from '../../../../src/node/nbd-server/admission-rules.js';
import { ConfDir } from '../../../../src/node/nbd-server/conf-dir.js';
import { admissionPathsOf } from '../../../../src/node/nbd-server/conf-file-name.js';
import { HEADER_PREFIX } from '../../../../src/node/nbd-server/render-export-config.js';
import { rawExportConfig } from '../../../support/export-config.js';

const HOOK = { flock: '/usr/bin/flock', node: '/usr/bin/node', script: '/opt/nbdx/admission-hook.js' };

function config(exportName: string, overrides: Partial<ExportConfig> = {}): ExportConfig {
  return rawExportConfig(exportName, `/srv/${exportName.replace(/[^a-z0-9]/g, '_')}.raw`, overrides);
}

describe('ConfDir', () => {
  let root: string;
  let dir: ConfDir;

  beforeEach(async () => {
    root = await mkdtemp(join(tmpdir(), 'nbdx-confdir-'));
    dir = new ConfDir(join(root, 'conf.d'), join(root, 'auth'), HOOK, process.pid);
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

  it('writes the rules before the conf that runs the hook on them; keeps them until unreferenced', async () => {
    const fenced = config('fenced', {
      allowedClients: ['10.0.0.0/8'],
      maxConnections: 2,
      fileId: '64768:131',
    });
    await dir.write(fenced);
    const { rulesPath, lockPath, slotsDir } = admissionPathsOf(dir.authDir, 'fenced');
    expect(parseAdmissionRules(await readFile(rulesPath, 'utf8'))).toEqual({
      exportName: 'fenced',
      path: fenced.path,
      fileId: '64768:131',
      allowedClients: ['10.0.0.0/8'],
      maxConnections: 2,
    });
    expect((await dir.read()).get('fenced')?.rules).toBe(rulesPath);
    expect(await readFile(join(dir.confDir, 'fenced.conf'), 'utf8')).toContain(
      `prerun = /usr/bin/flock -w 10 ${lockPath} /usr/bin/node /opt/nbdx/admission-hook.js ${rulesPath} %s`,
    );
    // The controller names itself for the hook.
    expect(await dir.nameController()).toBe(true);
    expect(await dir.nameController()).toBe(false);
    const controller = await readFile(join(dir.authDir, 'controller'), 'utf8');
    expect(controller.trimEnd().split('\n').at(-1)).toMatch(new RegExp(`^${process.pid} [0-9]+$`));

    // A rules-only change is written (it takes effect at the next connection).
    expect(await dir.write({ ...fenced, allowedClients: ['10.0.0.0/8', '192.0.2.1'] })).toBe(true);

    await dir.remove('fenced');
    await writeFile(lockPath, '');
    await mkdir(slotsDir);
    await writeFile(join(slotsDir, '4242'), '1');
    await writeFile(join(dir.authDir, 'foreign.rules'), 'not ours\n');
    await writeFile(join(dir.authDir, 'old.allow'), `${HEADER_PREFIX}authfile of old\n10.0.0.1\n`);
    expect(await dir.removeUnreferenced(new Set([rulesPath]))).toBe(1); // the old authfile
    expect(await dir.removeUnreferenced(new Set())).toBe(1);
    expect((await readdir(dir.authDir)).sort()).toEqual(['controller', 'foreign.rules']);
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
