import { describe, expect, it } from 'vitest';
import { validateSpec } from '../../../src/api/validate-spec.js';
import { loadSpecCorpus } from '../../support/spec-corpus.js';

describe('validateSpec on the shared corpus', () => {
  const corpus = loadSpecCorpus();

  it('has both valid and invalid cases', () => {
    expect(corpus.filter((c) => c.valid).length).toBeGreaterThan(3);
    expect(corpus.filter((c) => !c.valid).length).toBeGreaterThan(10);
  });

  for (const testCase of corpus) {
    it(`${testCase.valid ? 'accepts' : 'rejects'}: ${testCase.name}`, () => {
      const result = validateSpec(testCase.spec);
      if (testCase.valid) {
        expect(result).toEqual({ ok: true, spec: testCase.spec });
      } else {
        expect(result.ok).toBe(false);
        if (!result.ok) expect(result.errors.map((e) => e.path)).toContain(testCase.path);
      }
    });
  }
});

describe('validateSpec messages', () => {
  it('names every problem with its field path, not just the first', () => {
    const result = validateSpec({
      nodeName: 'BAD',
      source: { file: { path: 'rel', format: 'vmdk' } },
      extra: 1,
    });
    expect(result.ok).toBe(false);
    if (result.ok) return;
    expect(result.errors.map((e) => e.path).sort()).toEqual(
      ['spec.extra', 'spec.nodeName', 'spec.source.file.format', 'spec.source.file.path'].sort(),
    );
    for (const error of result.errors) expect(error.message.length).toBeGreaterThan(5);
  });

  it('rejects a spec that is not an object', () => {
    expect(validateSpec('hello')).toEqual({
      ok: false,
      errors: [{ path: 'spec', message: 'must be an object' }],
    });
    expect(validateSpec(undefined)).toEqual({
      ok: false,
      errors: [{ path: 'spec', message: 'is required' }],
    });
  });
});
