import { describe, expect, it } from 'vitest';
import { decideConflicts, type Claim } from '../../../src/plan/conflicts.js';

const claim = (key: string, at: string, over: Partial<Claim> = {}): Claim => ({
  key,
  uid: `uid-${key}`,
  creationTimestamp: at,
  exportName: key,
  realPath: `/data/${key}`,
  writable: true,
  ...over,
});

describe('decideConflicts', () => {
  it('no overlap → no conflicts', () => {
    expect(
      decideConflicts([claim('a', '2026-01-01T00:00:00Z'), claim('b', '2026-01-02T00:00:00Z')]).size,
    ).toBe(0);
  });

  it('same export name: the oldest wins, whatever the input order', () => {
    const older = claim('ns/old', '2026-01-01T00:00:00Z', { exportName: 'x' });
    const newer = claim('ns/new', '2026-01-02T00:00:00Z', { exportName: 'x' });
    for (const input of [
      [older, newer],
      [newer, older],
    ]) {
      const conflicts = decideConflicts(input);
      expect([...conflicts.keys()]).toEqual(['ns/new']);
      expect(conflicts.get('ns/new')?.reason).toBe('ExportNameConflict');
      expect(conflicts.get('ns/new')?.message).toContain('ns/old');
    }
  });

  it('same creation time: the UID decides', () => {
    const a = claim('a', '2026-01-01T00:00:00Z', { exportName: 'x', uid: '2' });
    const b = claim('b', '2026-01-01T00:00:00Z', { exportName: 'x', uid: '1' });
    expect([...decideConflicts([a, b]).keys()]).toEqual(['a']);
  });

  it('one file with a writer: the newer gets ImageInUse', () => {
    const writer = claim('w', '2026-01-01T00:00:00Z', { realPath: '/data/f' });
    const reader = claim('r', '2026-01-02T00:00:00Z', { realPath: '/data/f', writable: false });
    expect(decideConflicts([reader, writer]).get('r')?.reason).toBe('ImageInUse');
  });

  it('one file, readers only → shared', () => {
    const r1 = claim('r1', '2026-01-01T00:00:00Z', { realPath: '/data/f', writable: false });
    const r2 = claim('r2', '2026-01-02T00:00:00Z', { realPath: '/data/f', writable: false });
    expect(decideConflicts([r1, r2]).size).toBe(0);
  });

  it('a loser claims nothing: a third resource competes only with the winner', () => {
    const a = claim('a', '2026-01-01T00:00:00Z', { exportName: 'x', realPath: '/data/1' });
    const b = claim('b', '2026-01-02T00:00:00Z', { exportName: 'x', realPath: '/data/2' });
    const c = claim('c', '2026-01-03T00:00:00Z', { exportName: 'y', realPath: '/data/2' });
    expect([...decideConflicts([c, b, a]).keys()]).toEqual(['b']);
  });
});
