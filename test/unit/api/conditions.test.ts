import { describe, expect, it } from 'vitest';
import { setConditions } from '../../../src/api/conditions.js';

const t0 = new Date('2026-11-25T10:00:00.000Z');
const t1 = new Date('2026-11-25T10:05:00.000Z');

describe('setConditions', () => {
  it('stamps a new condition with the time and generation', () => {
    expect(
      setConditions(undefined, [{ type: 'Ready', status: 'False', reason: 'A', message: 'a' }], 3, t0),
    ).toEqual([
      {
        type: 'Ready',
        status: 'False',
        reason: 'A',
        message: 'a',
        observedGeneration: 3,
        lastTransitionTime: '2026-11-25T10:00:00Z',
      },
    ]);
  });

  it('keeps lastTransitionTime when only the reason or message changes', () => {
    const first = setConditions(
      undefined,
      [{ type: 'Ready', status: 'False', reason: 'A', message: 'a' }],
      1,
      t0,
    );
    const second = setConditions(
      first,
      [{ type: 'Ready', status: 'False', reason: 'B', message: 'b' }],
      2,
      t1,
    );
    expect(second[0]).toMatchObject({
      reason: 'B',
      observedGeneration: 2,
      lastTransitionTime: '2026-11-25T10:00:00Z',
    });
  });

  it('moves lastTransitionTime when the status changes', () => {
    const first = setConditions(
      undefined,
      [{ type: 'Ready', status: 'False', reason: 'A', message: 'a' }],
      1,
      t0,
    );
    const second = setConditions(
      first,
      [{ type: 'Ready', status: 'True', reason: 'Served', message: 'ok' }],
      1,
      t1,
    );
    expect(second[0]?.lastTransitionTime).toBe('2026-11-25T10:05:00Z');
  });

  it('is idempotent: the same drafts give an equal result', () => {
    const drafts = [
      { type: 'Ready', status: 'True', reason: 'Served', message: 'ok' },
      { type: 'Exported', status: 'True', reason: 'Served', message: 'ok' },
    ] as const;
    const first = setConditions(undefined, drafts, 4, t0);
    expect(setConditions(first, drafts, 4, t1)).toEqual(first);
  });

  it('keeps conditions it was not given', () => {
    const first = setConditions(
      undefined,
      [{ type: 'Custom', status: 'True', reason: 'X', message: 'x' }],
      1,
      t0,
    );
    const second = setConditions(
      first,
      [{ type: 'Ready', status: 'True', reason: 'Served', message: 'ok' }],
      1,
      t1,
    );
    expect(second.map((c) => c.type)).toEqual(['Custom', 'Ready']);
  });
});
