/**
 * YAML from a directory anyone with write access controls, parsed with bounds on
 * everything that can grow. js-yaml resolves an alias to the same object, so a 721-byte
 * "billion laughs" parses quickly into a small graph, and then explodes in whatever
 * walks it as a tree (comparing specs with JSON.stringify, dumping status with noRefs):
 * 4.3 GB in 26 s. So the parser's own limits (depth, aliases per document) are set, and
 * the result is walked once as a tree on a node budget before anyone else walks it.
 */
import { loadAll } from 'js-yaml';
import { SourceFileRefusal } from './source-file-refusal.js';

export interface YamlLimits {
  /** Deepest nesting of collections, aliases followed. An NbdExport needs about 6. */
  maxDepth: number;
  /** Alias nodes (`*name`) per document; an NbdExport needs none. */
  maxAliasesPerDocument: number;
  /** Nodes (scalars and collections, aliases expanded) in the whole file. */
  maxNodes: number;
}

export const DEFAULT_YAML_LIMITS: YamlLimits = {
  maxDepth: 32,
  maxAliasesPerDocument: 64,
  // About 40 per NbdExport: room for hundreds of exports in one file.
  maxNodes: 50_000,
};

/**
 * The documents of `text` (empty ones left out), as plain trees that share no objects.
 * Throws a SourceFileRefusal naming `label` and the limit that was hit.
 */
export function parseBoundedYaml(
  text: string,
  label: string,
  limits: YamlLimits = DEFAULT_YAML_LIMITS,
): unknown[] {
  let documents: unknown[];
  try {
    documents = loadAll(text, {
      maxDepth: limits.maxDepth,
      maxAliases: limits.maxAliasesPerDocument,
    });
  } catch (error) {
    throw classifyParseError(error, label);
  }
  const budget = { nodesLeft: limits.maxNodes };
  for (const document of documents) walkWithinBudget(document, 1, limits, budget, label);
  // Safe now that the expanded size is bounded: shared (aliased) objects become copies, so
  // that editing one place can never change another.
  return documents.filter((d) => d !== null && d !== undefined).map(copyTree);
}

/** A copy in which every alias is a separate object (structuredClone would keep them shared). */
function copyTree(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(copyTree);
  if (typeof value !== 'object' || value === null) return value;
  return Object.fromEntries(Object.entries(value).map(([key, child]) => [key, copyTree(child)]));
}

function walkWithinBudget(
  value: unknown,
  depth: number,
  limits: YamlLimits,
  budget: { nodesLeft: number },
  label: string,
): void {
  if (--budget.nodesLeft < 0)
    throw new SourceFileRefusal(
      label,
      'too-many-nodes',
      `expands to more than ${limits.maxNodes} nodes with its aliases followed`,
    );
  if (typeof value !== 'object' || value === null) return;
  if (depth > limits.maxDepth)
    throw new SourceFileRefusal(
      label,
      'too-deep',
      `nests deeper than ${limits.maxDepth} levels with its aliases followed`,
    );
  // A recursive alias makes a cycle; the node budget ends the walk.
  const children = Array.isArray(value) ? (value as unknown[]) : Object.values(value);
  for (const child of children) walkWithinBudget(child, depth + 1, limits, budget, label);
}

function classifyParseError(error: unknown, label: string): SourceFileRefusal {
  const reason = (error as { reason?: unknown }).reason;
  const firstLine = (error instanceof Error ? error.message.split('\n')[0] : undefined) ?? String(error);
  // js-yaml reports its limits as ordinary YAMLExceptions; these are its words (pinned by tests).
  if (typeof reason === 'string' && reason.startsWith('nesting exceeded maxDepth'))
    return new SourceFileRefusal(label, 'too-deep', firstLine, { cause: error });
  if (typeof reason === 'string' && reason.startsWith('aliases exceeded maxAliases'))
    return new SourceFileRefusal(label, 'too-many-aliases', firstLine, { cause: error });
  return new SourceFileRefusal(label, 'syntax', firstLine, { cause: error });
}
