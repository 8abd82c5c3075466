/** The shared corpus of NbdExport specs (test/fixtures/spec-corpus.yaml), as the unit tests load it. */
import { readFileSync } from 'node:fs';
import { load } from 'js-yaml';

export interface CorpusCase {
  name: string;
  valid: boolean;
  /** For an invalid case: the field the validation names. */
  path?: string;
  spec: Record<string, unknown>;
}

export function loadSpecCorpus(): CorpusCase[] {
  return load(readFileSync(new URL('../fixtures/spec-corpus.yaml', import.meta.url), 'utf8')) as CorpusCase[];
}
