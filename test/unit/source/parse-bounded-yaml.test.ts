import { describe, expect, it } from 'vitest';
import { DEFAULT_YAML_LIMITS, parseBoundedYaml } from '../../../src/source/parse-bounded-yaml.js';
import { SourceFileRefusal, type RefusalReason } from '../../../src/source/source-file-refusal.js';
import { aliasBomb } from './hostile-yaml.js';

function refusalOf(parse: () => unknown): { reason: RefusalReason; message: string } {
  try {
    parse();
  } catch (error) {
    if (error instanceof SourceFileRefusal) return { reason: error.reason, message: error.message };
    throw error;
  }
  throw new Error('expected a refusal');
}

describe('parseBoundedYaml', () => {
  it('parses several documents, leaving empty ones out', () => {
    expect(parseBoundedYaml('a: 1\n---\n---\nb: [x]\n', 'f.yaml')).toEqual([{ a: 1 }, { b: ['x'] }]);
  });

  it('refuses the classic alias bomb, quickly, naming the file', () => {
    const bomb = aliasBomb();
    expect(bomb.length).toBeLessThan(1024);
    const started = performance.now();
    const refusal = refusalOf(() => parseBoundedYaml(bomb, 'bomb.yaml'));
    expect(refusal.reason).toBe('too-many-aliases');
    expect(refusal.message).toContain('bomb.yaml');
    // Generous for a loaded machine; unbounded, this takes gigabytes and tens of seconds.
    expect(performance.now() - started).toBeLessThan(5_000);
  });

  it('refuses a bomb with few aliases by its expanded size', () => {
    // Six levels of 9: 45 aliases (within the limit of 64), 9^6 = 531441 nodes expanded.
    const slim = aliasBomb(6, 9);
    const started = performance.now();
    const refusal = refusalOf(() => parseBoundedYaml(slim, 'slim.yaml'));
    expect(refusal.reason).toBe('too-many-nodes');
    expect(refusal.message).toMatch(/^slim\.yaml: too-many-nodes: /);
    expect(performance.now() - started).toBeLessThan(5_000);
    // The same shape, small enough, is fine: the limit is on size, not on aliases as such.
    expect(parseBoundedYaml(aliasBomb(3, 9), 'small.yaml')).toHaveLength(1);
  });

  it('refuses too many aliases in one document', () => {
    const many = `a: &a x\nb: [${Array(DEFAULT_YAML_LIMITS.maxAliasesPerDocument + 1)
      .fill('*a')
      .join(', ')}]\n`;
    expect(refusalOf(() => parseBoundedYaml(many, 'many.yaml')).reason).toBe('too-many-aliases');
    const enough = `a: &a x\nb: [${Array(DEFAULT_YAML_LIMITS.maxAliasesPerDocument).fill('*a').join(', ')}]\n`;
    expect(parseBoundedYaml(enough, 'enough.yaml')).toHaveLength(1);
  });

  it('refuses nesting deeper than the limit, also when reached through aliases', () => {
    const depth = DEFAULT_YAML_LIMITS.maxDepth + 5;
    expect(
      refusalOf(() => parseBoundedYaml(`${'['.repeat(depth)}${']'.repeat(depth)}\n`, 'deep.yaml')).reason,
    ).toBe('too-deep');
    // Each level is shallow in the text; following the aliases makes it deep.
    let chained = 'l0: &l0 [x]\n';
    for (let i = 1; i < depth; i++) chained += `l${i}: &l${i} [*l${i - 1}]\n`;
    expect(refusalOf(() => parseBoundedYaml(chained, 'chained.yaml')).reason).toBe('too-deep');
  });

  it('refuses a recursive alias instead of walking it forever', () => {
    const refusal = refusalOf(() => parseBoundedYaml('a: &x\n  b: *x\n', 'loop.yaml'));
    expect(['too-deep', 'too-many-nodes']).toContain(refusal.reason);
  });

  it('reports a syntax error with the file name', () => {
    const refusal = refusalOf(() => parseBoundedYaml('spec: [unclosed\n  - : :', 'broken.yaml'));
    expect(refusal.reason).toBe('syntax');
    expect(refusal.message).toMatch(/^broken\.yaml: syntax: /);
  });

  it('turns a few harmless aliases into independent copies', () => {
    const [document] = parseBoundedYaml('base: &b { size: 1Gi }\none: *b\ntwo: *b\n', 'ok.yaml') as [
      Record<string, Record<string, string>>,
    ];
    expect(document['one']).toEqual({ size: '1Gi' });
    expect(document['one']).not.toBe(document['two']);
  });
});
