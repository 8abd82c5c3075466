/**
 * The CRD on a real kube-apiserver agrees with the TypeScript validation: every spec of the
 * shared corpus is accepted by both or refused by both, and a refused one is refused for the
 * same field. Also what the CRD promises kubectl users: descriptions in `kubectl explain`, the
 * short name, printer columns, a selectable spec.nodeName, an immutable nodeName and a status
 * subresource.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadAll } from 'js-yaml';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { validateSpec } from '../../src/api/validate-spec.js';
import { startCluster, type Cluster } from './harness/cluster.js';
import { REPO_ROOT } from '../support/repo.js';
import { loadSpecCorpus } from '../support/spec-corpus.js';

const NAMESPACE = 'crd-agreement';

let cluster: Cluster;

beforeAll(async () => {
  cluster = await startCluster();
  await cluster.kubectl(['create', 'namespace', NAMESPACE]);
});

afterAll(async () => {
  await cluster?.down();
});

function nbdExport(name: string, spec: unknown, namespace = NAMESPACE): string {
  return JSON.stringify({
    apiVersion: 'nbd.dev/v1alpha1',
    kind: 'NbdExport',
    metadata: { name, namespace },
    spec,
  });
}

async function dryRun(manifest: string) {
  return cluster.kubectl(['apply', '--dry-run=server', '-f', '-'], { input: manifest, reject: false });
}

describe('the shared spec corpus, on the API server', () => {
  const corpus = loadSpecCorpus();

  it('has valid and invalid cases', () => {
    expect(corpus.filter((c) => c.valid).length).toBeGreaterThan(3);
    expect(corpus.filter((c) => !c.valid).length).toBeGreaterThan(10);
  });

  corpus.forEach((testCase, index) => {
    it(`${testCase.valid ? 'accepts' : 'refuses'}: ${testCase.name}`, async () => {
      // The TypeScript side of the agreement, on the same spec.
      expect(validateSpec(testCase.spec).ok).toBe(testCase.valid);

      const result = await dryRun(nbdExport(`corpus-${index}`, testCase.spec));
      if (testCase.valid) {
        expect(result.stderr).toBe('');
        expect(result.exitCode).toBe(0);
        expect(result.stdout).toContain('created (server dry run)');
      } else {
        expect(result.exitCode).not.toBe(0);
        // Refused by validation (not by anything else), and for the field TypeScript names.
        expect(result.stderr).toContain('is invalid');
        expect(result.stderr).toContain(testCase.path);
      }
    });
  });
});

describe('the example NbdExports in manifests/examples', () => {
  const dir = join(REPO_ROOT, 'manifests', 'examples');
  const files = readdirSync(dir).filter((file) => file.endsWith('.yaml'));

  it('has the four examples', () => {
    expect(files.sort()).toEqual([
      'block-device.yaml',
      'qcow2-full-backup.yaml',
      'qcow2-incremental-backup.yaml',
      'raw-file.yaml',
    ]);
  });

  for (const file of files) {
    it(`${file} is valid to TypeScript and to the API server`, async () => {
      const text = readFileSync(join(dir, file), 'utf8');
      const objects = loadAll(text) as { kind: string; metadata: { namespace: string }; spec: unknown }[];
      expect(objects).toHaveLength(1);
      const [object] = objects;
      expect(object?.kind).toBe('NbdExport');
      const validation = validateSpec(object?.spec);
      expect(validation.ok ? [] : validation.errors).toEqual([]);
      await cluster.kubectl(['create', 'namespace', object!.metadata.namespace], { reject: false });
      const result = await dryRun(text);
      expect(result.stderr).toBe('');
      expect(result.stdout).toContain('created (server dry run)');
    });
  }
});

describe('the CRD for kubectl users', () => {
  const spec = (nodeName: string) => ({
    nodeName,
    source: {
      file: { path: `/var/lib/nbd-exports/${nodeName}.qcow2`, format: 'qcow2', create: { size: '1Gi' } },
    },
  });

  beforeAll(async () => {
    const manifest = [
      nbdExport('on-alpha-1', spec('alpha')),
      nbdExport('on-alpha-2', spec('alpha')),
      nbdExport('on-beta', spec('beta')),
    ].join('\n');
    await cluster.kubectl(['apply', '-f', '-'], { input: manifest });
  });

  it('kubectl explain shows the descriptions of spec.source.file.create', async () => {
    const { stdout } = await cluster.kubectl(['explain', 'nbdexport.spec.source.file.create']);
    expect(stdout).toContain('KIND:       NbdExport');
    expect(stdout).toContain('VERSION:    v1alpha1');
    expect(stdout).toContain('Create the image when it is missing');
    for (const field of ['size', 'backingFile', 'backingFormat', 'preallocation'])
      expect(stdout).toContain(field);
    expect(stdout).toContain('Virtual size as a quantity');
    expect(stdout).toContain('Backing image for an incremental');
  });

  it('kubectl get nbdx (the short name) lists them with the printer columns', async () => {
    const { stdout } = await cluster.kubectl(['get', 'nbdx', '-n', NAMESPACE]);
    const [header, ...rows] = stdout.trim().split('\n');
    expect(header?.split(/\s+/)).toEqual(['NAME', 'NODE', 'EXPORT', 'FORMAT', 'SIZE', 'READY', 'AGE']);
    expect(rows.map((row) => row.split(/\s+/).slice(0, 2))).toEqual([
      ['on-alpha-1', 'alpha'],
      ['on-alpha-2', 'alpha'],
      ['on-beta', 'beta'],
    ]);
    const wide = await cluster.kubectl(['get', 'nbdexports.nbd.dev', '-n', NAMESPACE, '-o', 'wide']);
    expect(wide.stdout.split('\n')[0]?.split(/\s+/)).toEqual([
      'NAME',
      'NODE',
      'EXPORT',
      'FORMAT',
      'SIZE',
      'READY',
      'REASON',
      'URI',
      'AGE',
    ]);
  });

  it('a field selector on spec.nodeName selects one node’s NbdExports (selectableFields)', async () => {
    const alpha = await cluster.kubectl([
      'get',
      'nbdx',
      '-A',
      '--field-selector',
      'spec.nodeName=alpha',
      '-o',
      'name',
    ]);
    expect(alpha.stdout.trim().split('\n')).toEqual([
      'nbdexport.nbd.dev/on-alpha-1',
      'nbdexport.nbd.dev/on-alpha-2',
    ]);
    const beta = await cluster.kubectl([
      'get',
      'nbdx',
      '-A',
      '--field-selector',
      'spec.nodeName=beta',
      '-o',
      'name',
    ]);
    expect(beta.stdout.trim()).toBe('nbdexport.nbd.dev/on-beta');
    const none = await cluster.kubectl([
      'get',
      'nbdx',
      '-A',
      '--field-selector',
      'spec.nodeName=gamma',
      '-o',
      'name',
    ]);
    expect(none.stdout.trim()).toBe('');
    // A field that is not selectable is refused, not ignored.
    const refused = await cluster.kubectl(
      ['get', 'nbdx', '-A', '--field-selector', 'spec.exportName=x', '-o', 'name'],
      { reject: false },
    );
    expect(refused.exitCode).not.toBe(0);
    expect(refused.stderr).toContain('field label not supported');
  });

  it('nodeName cannot be changed; other fields can, and bump the generation', async () => {
    const before = await cluster.kubectlJson<{ metadata: { generation: number } }>([
      'get',
      'nbdx',
      'on-beta',
      '-n',
      NAMESPACE,
    ]);
    const moved = await cluster.kubectl(
      ['patch', 'nbdx', 'on-beta', '-n', NAMESPACE, '--type=merge', '-p', '{"spec":{"nodeName":"alpha"}}'],
      { reject: false },
    );
    expect(moved.exitCode).not.toBe(0);
    expect(moved.stderr).toContain('spec.nodeName');
    expect(moved.stderr).toContain('nodeName cannot be changed');

    await cluster.kubectl([
      'patch',
      'nbdx',
      'on-beta',
      '-n',
      NAMESPACE,
      '--type=merge',
      '-p',
      '{"spec":{"readOnly":true}}',
    ]);
    const after = await cluster.kubectlJson<{
      metadata: { generation: number };
      spec: { nodeName: string; readOnly: boolean };
    }>(['get', 'nbdx', 'on-beta', '-n', NAMESPACE]);
    expect(after.spec).toMatchObject({ nodeName: 'beta', readOnly: true });
    expect(after.metadata.generation).toBe(before.metadata.generation + 1);
  });

  it('status is a subresource: written through /status only, without a new generation', async () => {
    const status = { observedGeneration: 1, exportName: 'crd-agreement.on-alpha-1', format: 'qcow2' };
    // Through the main resource, status is dropped.
    await cluster.kubectl([
      'patch',
      'nbdx',
      'on-alpha-1',
      '-n',
      NAMESPACE,
      '--type=merge',
      '-p',
      JSON.stringify({ status }),
    ]);
    let object = await cluster.kubectlJson<{ metadata: { generation: number }; status?: unknown }>([
      'get',
      'nbdx',
      'on-alpha-1',
      '-n',
      NAMESPACE,
    ]);
    expect(object.status).toBeUndefined();
    const generation = object.metadata.generation;

    await cluster.kubectl([
      'patch',
      'nbdx',
      'on-alpha-1',
      '-n',
      NAMESPACE,
      '--subresource=status',
      '--type=merge',
      '-p',
      JSON.stringify({ status }),
    ]);
    object = await cluster.kubectlJson(['get', 'nbdx', 'on-alpha-1', '-n', NAMESPACE]);
    expect(object.status).toEqual(status);
    expect(object.metadata.generation).toBe(generation);
    const { stdout } = await cluster.kubectl(['get', 'nbdx', 'on-alpha-1', '-n', NAMESPACE, '--no-headers']);
    expect(stdout.split(/\s+/).slice(0, 4)).toEqual([
      'on-alpha-1',
      'alpha',
      'crd-agreement.on-alpha-1',
      'qcow2',
    ]);
  });
});
