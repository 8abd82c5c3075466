/**
 * The CRD's schema is well formed where the API server would otherwise find out first: every
 * property has a type (a YAML slip, such as a comma in an unquoted flow-style description,
 * turns into a stray property the server refuses), and status describes every field the
 * controller writes (the server prunes what it does not know).
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { load } from 'js-yaml';
import { describe, expect, it } from 'vitest';
import { REPO_ROOT } from '../../support/repo.js';

interface Schema {
  type?: string;
  'x-kubernetes-int-or-string'?: boolean;
  properties?: Record<string, Schema>;
  items?: Schema;
}

async function crdSchema(): Promise<Schema> {
  const crd = load(await readFile(join(REPO_ROOT, 'crds', 'nbd.dev_nbdexports.yaml'), 'utf8')) as {
    spec: { versions: { schema: { openAPIV3Schema: Schema } }[] };
  };
  const version = crd.spec.versions[0];
  if (!version) throw new Error('the CRD has no version');
  return version.schema.openAPIV3Schema;
}

/** The OpenAPI keywords this CRD uses; anything else is a slip the API server refuses. */
const KEYWORDS = new Set([
  'type',
  'description',
  'properties',
  'items',
  'required',
  'enum',
  'format',
  'pattern',
  'minimum',
  'maximum',
  'minLength',
  'maxLength',
  'maxItems',
  'x-kubernetes-int-or-string',
  'x-kubernetes-validations',
  'x-kubernetes-list-type',
  'x-kubernetes-list-map-keys',
  'x-kubernetes-preserve-unknown-fields',
]);

/** Properties without a type, and keys that are no schema keyword, with their paths. */
function untyped(schema: Schema, path: string): string[] {
  const found: string[] = [];
  for (const key of Object.keys(schema)) if (!KEYWORDS.has(key)) found.push(`${path} has "${key}"`);
  for (const [name, child] of Object.entries(schema.properties ?? {})) {
    if (typeof child !== 'object' || (child.type === undefined && !child['x-kubernetes-int-or-string']))
      found.push(`${path}.${name}`);
    else found.push(...untyped(child, `${path}.${name}`));
  }
  if (schema.items) found.push(...untyped(schema.items, `${path}[]`));
  return found;
}

describe('the CRD schema', () => {
  it('gives every property a type, and uses no key that is not a schema keyword', async () => {
    expect(untyped(await crdSchema(), '')).toEqual([]);
  });

  it('describes every status field the controller writes', async () => {
    const status = (await crdSchema()).properties?.status?.properties ?? {};
    for (const field of ['seal', 'verification', 'backingChain', 'uri', 'conditions'])
      expect(Object.keys(status)).toContain(field);
    expect(Object.keys(status.seal?.properties ?? {}).sort()).toEqual(
      [
        'algorithm',
        'bytes',
        'digest',
        'generation',
        'message',
        'progressPercent',
        'sealedAt',
        'state',
      ].sort(),
    );
    expect(Object.keys(status.verification?.properties ?? {}).sort()).toEqual(
      ['digest', 'message', 'progressPercent', 'state', 'token', 'verifiedAt'].sort(),
    );
  });
});
