import type { Condition, ConditionStatus } from './types.js';

/** A condition as the planner decides it; time and generation are stamped when it is set. */
export interface ConditionDraft {
  type: string;
  status: ConditionStatus;
  reason: string;
  message: string;
}

/**
 * Merges drafts into existing conditions with Kubernetes semantics: `lastTransitionTime`
 * moves only when a condition's status changes, so a reconcile that finds nothing new
 * produces a status equal to the stored one and writes nothing.
 * Conditions not named in `drafts` are kept as they are, in their order.
 */
export function setConditions(
  existing: readonly Condition[] | undefined,
  drafts: readonly ConditionDraft[],
  observedGeneration: number | undefined,
  now: Date,
): Condition[] {
  const result = [...(existing ?? [])];
  for (const draft of drafts) {
    const index = result.findIndex((c) => c.type === draft.type);
    const previous = index >= 0 ? result[index] : undefined;
    const next: Condition = {
      type: draft.type,
      status: draft.status,
      reason: draft.reason,
      message: draft.message,
      ...(observedGeneration === undefined ? {} : { observedGeneration }),
      lastTransitionTime:
        previous && previous.status === draft.status ? previous.lastTransitionTime : formatTime(now),
    };
    if (index >= 0) result[index] = next;
    else result.push(next);
  }
  return result;
}

export function findCondition(
  conditions: readonly Condition[] | undefined,
  type: string,
): Condition | undefined {
  return conditions?.find((c) => c.type === type);
}

/** RFC 3339 with second precision, as metav1.Time serialises. */
export function formatTime(date: Date): string {
  return date.toISOString().replace(/\.\d{3}Z$/, 'Z');
}
