import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { ApplyScheduler } from '../../../../src/node/nbd-server/apply-scheduler.js';

describe('ApplyScheduler', () => {
  beforeEach(() => {
    vi.useFakeTimers();
  });
  afterEach(() => {
    vi.useRealTimers();
  });

  function scheduler(run: () => Promise<void>, debounceMs = 200, maxDelayMs = 2_000) {
    return new ApplyScheduler({ debounceMs, maxDelayMs, run });
  }

  it('runs once for a burst of requests, after the quiet time', async () => {
    const run = vi.fn(() => Promise.resolve());
    const s = scheduler(run);
    for (let i = 0; i < 10; i++) {
      s.request();
      await vi.advanceTimersByTimeAsync(50);
    }
    expect(run).not.toHaveBeenCalled();
    await vi.advanceTimersByTimeAsync(200);
    expect(run).toHaveBeenCalledTimes(1);
    await vi.advanceTimersByTimeAsync(10_000);
    expect(run).toHaveBeenCalledTimes(1);
    expect(s.busy).toBe(false);
  });

  it('does not wait longer than maxDelayMs under a steady stream of requests', async () => {
    const run = vi.fn(() => Promise.resolve());
    const s = scheduler(run, 200, 1_000);
    for (let i = 0; i < 12; i++) {
      s.request();
      await vi.advanceTimersByTimeAsync(100);
    }
    expect(run).toHaveBeenCalledTimes(1);
  });

  it('schedules exactly one more run for any number of requests during a run', async () => {
    let finish: () => void = () => undefined;
    const run = vi.fn(() => new Promise<void>((resolve) => (finish = resolve)));
    const s = scheduler(run);
    s.request();
    await vi.advanceTimersByTimeAsync(200);
    expect(run).toHaveBeenCalledTimes(1);
    for (let i = 0; i < 5; i++) s.request();
    finish();
    await vi.advanceTimersByTimeAsync(200);
    expect(run).toHaveBeenCalledTimes(2);
    finish();
    await vi.advanceTimersByTimeAsync(10_000);
    expect(run).toHaveBeenCalledTimes(2);
  });

  it('survives a failing run', async () => {
    const run = vi.fn(() => Promise.reject(new Error('boom')));
    const s = scheduler(run);
    s.request();
    await vi.advanceTimersByTimeAsync(200);
    s.request();
    await vi.advanceTimersByTimeAsync(200);
    expect(run).toHaveBeenCalledTimes(2);
  });

  it('runs nothing after stop()', async () => {
    const run = vi.fn(() => Promise.resolve());
    const s = scheduler(run);
    s.request();
    await s.stop();
    s.request();
    await vi.advanceTimersByTimeAsync(10_000);
    expect(run).not.toHaveBeenCalled();
  });

  it('refuses a maxDelayMs shorter than debounceMs', () => {
    expect(() => scheduler(() => Promise.resolve(), 500, 100)).toThrow(TypeError);
  });
});
