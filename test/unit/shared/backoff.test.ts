import { describe, expect, it } from 'vitest';
import { exponentialBackoff } from '../../../src/shared/backoff.js';

describe('exponentialBackoff', () => {
  const exact = { baseMs: 1000, maxMs: 30_000, jitter: 0 };

  it.each([
    { failures: 0, expected: 1000 },
    { failures: 1, expected: 1000 },
    { failures: 2, expected: 2000 },
    { failures: 5, expected: 16_000 },
    { failures: 6, expected: 30_000 },
    { failures: 10_000, expected: 30_000 },
  ])('doubles from the base up to the cap: failure $failures → $expected ms', ({ failures, expected }) => {
    expect(exponentialBackoff(failures, exact, () => 0.99)).toBe(expected);
  });

  it.each([
    { random: 0, expected: 1500 },
    { random: 0.5, expected: 2000 },
    { random: 0.75, expected: 2250 },
  ])('jitter ±25 %: random $random → $expected ms', ({ random, expected }) => {
    expect(exponentialBackoff(2, { baseMs: 1000, maxMs: 30_000, jitter: 0.25 }, () => random)).toBe(expected);
  });

  it('jitter never pushes a delay above the cap', () => {
    expect(exponentialBackoff(50, { baseMs: 1000, maxMs: 30_000, jitter: 1 }, () => 0.999)).toBe(30_000);
  });

  it('a zero base stays zero', () => {
    expect(exponentialBackoff(3, { baseMs: 0, maxMs: 30_000, jitter: 0.5 }, () => 0.9)).toBe(0);
  });
});
