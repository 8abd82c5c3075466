import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { age, renderExportTable } from '../../src/cli/get-command.js';

describe('get: the kubectl-like table of a status directory', () => {
  let dir: string | undefined;
  afterEach(async () => {
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('prints node, export, format, size, Ready and age, with reason and URI when wide', async () => {
    dir = await mkdtemp(join(tmpdir(), 'nbdx-get-'));
    await writeFile(
      join(dir, 'backups_a.yaml'),
      `apiVersion: nbd.dev/v1alpha1
kind: NbdExport
metadata: { name: a, namespace: backups, creationTimestamp: '2026-11-25T10:00:00Z' }
spec: { nodeName: n1 }
status:
  exportName: backups.a
  format: qcow2
  virtualSize: 1073741824
  uri: nbd://10.0.0.1:10810/backups.a
  conditions:
    - { type: Ready, status: 'True', reason: Served, message: ok, lastTransitionTime: '2026-11-25T10:00:01Z' }
`,
    );
    await writeFile(
      join(dir, 'backups_b.yaml'),
      `apiVersion: nbd.dev/v1alpha1
kind: NbdExport
metadata: { name: b, namespace: backups, creationTimestamp: '2026-11-23T10:00:00Z' }
spec: { nodeName: n1 }
`,
    );
    const now = new Date('2026-11-25T10:05:00Z');
    expect((await renderExportTable(dir, now)).split('\n')).toEqual([
      'NAMESPACE   NAME   NODE   EXPORT      FORMAT   SIZE         READY     AGE',
      'backups     a      n1     backups.a   qcow2    1073741824   True      5m',
      'backups     b      n1                                       Unknown   2d',
      '',
    ]);
    expect(await renderExportTable(dir, now, true)).toContain('Served   nbd://10.0.0.1:10810/backups.a');
  });

  it('says so when there is nothing', async () => {
    dir = await mkdtemp(join(tmpdir(), 'nbdx-get-'));
    expect(await renderExportTable(dir, new Date())).toBe('No resources found.\n');
  });

  it.each([
    [5, '5s'],
    [119, '119s'],
    [600, '10m'],
    [7200, '2h'],
    [3 * 86400, '3d'],
  ])('ages %d seconds as %s', (seconds, expected) => {
    const now = new Date('2026-11-25T10:00:00Z');
    expect(age(new Date(now.getTime() - seconds * 1000).toISOString(), now)).toBe(expected);
  });
});
