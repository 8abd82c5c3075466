import { describe, expect, it } from 'vitest';
import {
  pollUntil,
  waitFor,
  waitUntil,
  withDeadline,
  WaitTimeoutError,
} from '../../../../src/node/process/wait-until.js';
import { ManualClock, flushPromises as settle } from '../../../support/manual-clock.js';

/** Settles, then moves the clock, `times` times. */
async function tick(clock: ManualClock, ms: number, times: number): Promise<void> {
  for (let i = 0; i < times; i++) {
    await settle();
    await clock.advance(ms);
  }
  await settle();
}

describe('waitFor', () => {
  it('resolves with the first value the poll returns', async () => {
    const clock = new ManualClock();
    let calls = 0;
    const waiting = waitFor(() => (++calls === 3 ? 'found' : undefined), {
      timeoutMs: 1_000,
      intervalMs: 100,
      what: 'the third call',
      clock,
    });
    await tick(clock, 100, 2);
    await expect(waiting).resolves.toBe('found');
    expect(calls).toBe(3);
  });

  it('gives up at the deadline, saying what it waited for and how long', async () => {
    const clock = new ManualClock();
    const waiting = waitUntil(() => false, { timeoutMs: 500, intervalMs: 100, what: 'a pid to exit', clock });
    const outcome = waiting.catch((error: unknown) => error);
    await tick(clock, 100, 5);
    const error = await outcome;
    expect(error).toBeInstanceOf(WaitTimeoutError);
    expect((error as Error).message).toBe('timed out after 500 ms waiting for a pid to exit');
  });

  it('ends with the error a poll throws', async () => {
    const failure = new Error('daemon died');
    await expect(
      waitFor(
        () => {
          throw failure;
        },
        { timeoutMs: 1_000, what: 'x', clock: new ManualClock() },
      ),
    ).rejects.toBe(failure);
  });

  it('takes the pause from a function of the attempt', async () => {
    const clock = new ManualClock();
    let calls = 0;
    const pauses: number[] = [];
    const waiting = waitUntil(() => ++calls > 3, {
      timeoutMs: 10_000,
      intervalMs: (attempt) => (attempt < 2 ? 10 : 1_000),
      what: 'x',
      clock,
    });
    for (let i = 0; i < 3; i++) {
      await settle();
      pauses.push(...clock.pending());
      await clock.advance(clock.pending()[0] ?? 0);
    }
    await waiting;
    expect(pauses).toEqual([10, 10, 1_000]);
  });
});

describe('pollUntil', () => {
  it('resolves false instead of throwing at the deadline', async () => {
    const clock = new ManualClock();
    const waiting = pollUntil(() => false, { timeoutMs: 300, intervalMs: 100, what: 'x', clock });
    await tick(clock, 100, 3);
    await expect(waiting).resolves.toBe(false);
  });

  it('resolves true as soon as the check holds', async () => {
    await expect(
      pollUntil(() => true, { timeoutMs: 300, what: 'x', clock: new ManualClock() }),
    ).resolves.toBe(true);
  });
});

describe('withDeadline', () => {
  it('passes the promise through when it settles in time', async () => {
    const clock = new ManualClock();
    await expect(withDeadline(Promise.resolve(7), { timeoutMs: 100, what: 'x', clock })).resolves.toBe(7);
    expect(clock.pending()).toEqual([]);
  });

  it('rejects with WaitTimeoutError when the promise never settles', async () => {
    const clock = new ManualClock();
    const waiting = withDeadline(new Promise(() => undefined), {
      timeoutMs: 100,
      what: 'nbd-server to daemonize',
      clock,
    }).catch((error: unknown) => error);
    await clock.advance(100);
    expect(await waiting).toEqual(new WaitTimeoutError('nbd-server to daemonize', 100));
  });
});
