import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  PermanentError,
  WorkQueue,
  backoffDelay,
  type WorkQueueOptions,
  type WorkResult,
} from '../../../src/controller/work-queue.js';
import { ManualClock, flushPromises as settle } from '../../support/manual-clock.js';

interface Deferred {
  resolve(result?: WorkResult): void;
  reject(error: Error): void;
}

/** A handler whose runs end when the test says, recording what ran. */
function controlledHandler() {
  const open = new Map<string, Deferred[]>();
  const started: string[] = [];
  let concurrent = 0;
  let maxConcurrent = 0;
  let selfOverlap = false;
  const handler: WorkQueueOptions['handler'] = (key) => {
    started.push(key);
    concurrent++;
    maxConcurrent = Math.max(maxConcurrent, concurrent);
    const runs = open.get(key) ?? [];
    if (runs.length > 0) selfOverlap = true;
    return new Promise<WorkResult | void>((resolve, reject) => {
      const deferred: Deferred = {
        resolve: (result) => {
          concurrent--;
          resolve(result);
        },
        reject: (error) => {
          concurrent--;
          reject(error);
        },
      };
      runs.push(deferred);
      open.set(key, runs);
    });
  };
  const take = (key: string): Deferred => {
    const runs = open.get(key);
    const deferred = runs?.shift();
    if (deferred === undefined) throw new Error(`${key} is not running`);
    return deferred;
  };
  return {
    handler,
    started,
    running: (key: string) => open.get(key)?.length ?? 0,
    get maxConcurrent() {
      return maxConcurrent;
    },
    get selfOverlap() {
      return selfOverlap;
    },
    succeed: async (key: string, result?: WorkResult) => {
      take(key).resolve(result);
      await settle();
    },
    fail: async (key: string, error: Error = new Error('boom')) => {
      take(key).reject(error);
      await settle();
    },
  };
}

function makeQueue(options: Partial<WorkQueueOptions> = {}) {
  const clock = new ManualClock();
  const h = controlledHandler();
  const queue = new WorkQueue({ handler: h.handler, clock, random: () => 0.5, ...options });
  return { queue, clock, h };
}

describe('backoffDelay', () => {
  const noJitter = () => 0.5;
  it.each([
    { failures: 1, options: {}, expected: 500 },
    { failures: 2, options: {}, expected: 1000 },
    { failures: 3, options: {}, expected: 2000 },
    { failures: 10, options: {}, expected: 256_000 },
    { failures: 11, options: {}, expected: 300_000 },
    { failures: 1000, options: {}, expected: 300_000 },
    { failures: 1, options: { baseDelayMs: 100, maxDelayMs: 150 }, expected: 100 },
    { failures: 2, options: { baseDelayMs: 100, maxDelayMs: 150 }, expected: 150 },
    { failures: 0, options: {}, expected: 500 },
  ])('failure $failures with $options → $expected ms', ({ failures, options, expected }) => {
    expect(backoffDelay(failures, options, noJitter)).toBe(expected);
  });

  it.each([
    { random: 0, expected: 800 },
    { random: 0.999999, expected: 1200 },
  ])('jitter ±20 %: random $random → $expected ms', ({ random, expected }) => {
    expect(backoffDelay(2, {}, () => random)).toBe(expected);
  });

  it('jitter never exceeds the cap', () => {
    expect(backoffDelay(20, { maxDelayMs: 1000 }, () => 0.999)).toBe(1000);
  });
});

describe('WorkQueue', () => {
  it.each([
    { options: { concurrency: 0 }, message: /concurrency/ },
    { options: { concurrency: 1.5 }, message: /concurrency/ },
    { options: { baseDelayMs: -1 }, message: /baseDelayMs/ },
    { options: { jitter: 2 }, message: /jitter/ },
  ])('rejects $options', ({ options, message }) => {
    expect(() => new WorkQueue({ handler: async () => {}, ...options })).toThrow(TypeError);
    expect(() => new WorkQueue({ handler: async () => {}, ...options })).toThrow(message);
  });

  it('runs a key once however often it was added while waiting', async () => {
    const { queue, h } = makeQueue({ concurrency: 1 });
    queue.add('blocker');
    await settle();
    queue.add('a');
    queue.add('a');
    queue.add('a');
    expect(queue.depth).toBe(1);
    await h.succeed('blocker');
    expect(h.started).toEqual(['blocker', 'a']);
    await h.succeed('a');
    await queue.drain();
    expect(h.started).toEqual(['blocker', 'a']);
  });

  it('runs a key added during its own run once more, after the run', async () => {
    const { queue, h } = makeQueue();
    queue.add('a');
    await settle();
    queue.add('a');
    queue.add('a');
    await settle();
    expect(h.running('a')).toBe(1);
    expect(h.started).toEqual(['a']);
    await h.succeed('a');
    expect(h.started).toEqual(['a', 'a']);
    await h.succeed('a');
    await queue.drain();
    expect(h.started).toEqual(['a', 'a']);
    expect(h.selfOverlap).toBe(false);
  });

  it('bounds the runs at once', async () => {
    const { queue, h } = makeQueue({ concurrency: 3 });
    for (let i = 0; i < 10; i++) queue.add(`k${i}`);
    await settle();
    expect(queue.inFlight).toBe(3);
    for (let i = 0; i < 10; i++) await h.succeed(`k${i}`);
    await queue.drain();
    expect(h.maxConcurrent).toBe(3);
    expect(h.started).toHaveLength(10);
  });

  it('tells how long every worker has been busy: the sign of a wedged queue', async () => {
    const { queue, clock, h } = makeQueue({ concurrency: 2 });
    queue.add('a');
    await settle();
    await clock.advance(10_000);
    expect(queue.metrics().allWorkersBusySeconds).toBe(0); // one worker is free
    queue.add('b');
    await settle();
    await clock.advance(30_000);
    // Busy since b started: the youngest run decides when a worker will be free again.
    expect(queue.metrics().allWorkersBusySeconds).toBe(30);
    await h.succeed('a');
    expect(queue.metrics().allWorkersBusySeconds).toBe(0);
    await h.succeed('b');
  });

  it('retries a failure with exponential backoff and resets it on success', async () => {
    const retries: number[] = [];
    const { queue, clock, h } = makeQueue({ onRetry: (_key, _error, delay) => retries.push(delay) });
    queue.add('a');
    await settle();
    await h.fail('a');
    expect(clock.pending()).toEqual([500]);
    await clock.advance(499);
    expect(h.started).toHaveLength(1);
    await clock.advance(1);
    expect(h.started).toHaveLength(2);
    await h.fail('a');
    await clock.advance(1000);
    await h.fail('a');
    expect(queue.failures('a')).toBe(3);
    expect(retries).toEqual([500, 1000, 2000]);
    await clock.advance(2000);
    await h.succeed('a');
    expect(queue.failures('a')).toBe(0);
    queue.add('a');
    await settle();
    await h.fail('a');
    expect(retries.at(-1)).toBe(500);
    expect(queue.metrics().retriesTotal).toBe(4);
  });

  it('drops a pending retry once the key succeeds', async () => {
    const { queue, clock, h } = makeQueue();
    queue.add('a');
    await settle();
    await h.fail('a');
    queue.add('a'); // an event arrives during the backoff
    await settle();
    await h.succeed('a');
    expect(clock.pending()).toEqual([]);
    await clock.advance(10_000);
    expect(h.started).toHaveLength(2);
  });

  it('requeues after the delay a result asks for, without counting a failure', async () => {
    const { queue, clock, h } = makeQueue();
    queue.add('a');
    await settle();
    await h.succeed('a', { requeueAfterMs: 30_000 });
    expect(clock.pending()).toEqual([30_000]);
    await clock.advance(30_000);
    expect(h.started).toEqual(['a', 'a']);
    expect(queue.failures('a')).toBe(0);
  });

  it('reports a permanent error and does not retry it', async () => {
    const permanent: [string, string][] = [];
    const { queue, clock, h } = makeQueue({
      onPermanentError: (key, error) => permanent.push([key, error.message]),
    });
    queue.add('a');
    await settle();
    await h.fail('a', new PermanentError('invalid spec'));
    expect(permanent).toEqual([['a', 'invalid spec']]);
    expect(clock.pending()).toEqual([]);
    await clock.advance(600_000);
    expect(h.started).toEqual(['a']);
    expect(queue.metrics().permanentFailuresTotal).toBe(1);
  });

  it('keeps the earliest of several delays for one key', async () => {
    const { queue, clock, h } = makeQueue();
    queue.addAfter('a', 5000);
    queue.addAfter('a', 1000);
    queue.addAfter('a', 3000);
    expect(clock.pending()).toEqual([1000]);
    await clock.advance(1000);
    expect(h.started).toEqual(['a']);
    await h.succeed('a');
    await clock.advance(10_000);
    expect(h.started).toEqual(['a']);
  });

  it('treats a delay of zero as add', async () => {
    const { queue, h } = makeQueue();
    queue.addAfter('a', 0);
    await settle();
    expect(h.started).toEqual(['a']);
  });

  it('shutdown waits for runs in flight, drops the rest and ignores later adds', async () => {
    const { queue, clock, h } = makeQueue({ concurrency: 1 });
    queue.add('a');
    queue.add('b');
    queue.addAfter('c', 1000);
    await settle();
    let done = false;
    const shutdown = queue.shutdown().then(() => (done = true));
    await settle();
    expect(done).toBe(false);
    queue.add('d');
    await h.fail('a');
    await shutdown;
    expect(done).toBe(true);
    await clock.advance(600_000);
    expect(h.started).toEqual(['a']);
    expect(clock.pending()).toEqual([]);
  });

  it('gives handlers a signal aborted at shutdown', async () => {
    let signal: AbortSignal | undefined;
    const queue = new WorkQueue({
      handler: async (_key, context) => {
        signal = context.signal;
        await new Promise((resolve) => context.signal.addEventListener('abort', resolve));
      },
      clock: new ManualClock(),
    });
    queue.add('a');
    await settle();
    await queue.shutdown();
    expect(signal?.aborted).toBe(true);
  });

  it('counts what it does', async () => {
    const { queue, clock, h } = makeQueue();
    queue.add('a');
    queue.add('b');
    await settle();
    await clock.advance(2000);
    expect(queue.metrics()).toMatchObject({ inFlight: 2, depth: 0, longestRunningSeconds: 2 });
    await h.succeed('a');
    await h.fail('b');
    expect(queue.metrics()).toEqual({
      depth: 0,
      delayed: 1,
      inFlight: 0,
      addsTotal: 2,
      runsTotal: 2,
      successesTotal: 1,
      retriesTotal: 1,
      permanentFailuresTotal: 0,
      runDurationSecondsSum: 4,
      runDurationSecondsCount: 2,
      runDurationSecondsMax: 2,
      longestRunningSeconds: 0,
      allWorkersBusySeconds: 0,
    });
  });

  it('survives callbacks that throw', async () => {
    const { queue, clock, h } = makeQueue({
      onRetry: () => {
        throw new Error('bad logger');
      },
    });
    queue.add('a');
    await settle();
    await h.fail('a');
    await clock.advance(500);
    expect(h.started).toEqual(['a', 'a']);
  });
});

describe('WorkQueue property', () => {
  type Outcome = 'ok' | 'fail' | 'permanent' | 'requeue';
  type Op =
    | { t: 'add'; key: string }
    | { t: 'addAfter'; key: string; ms: number }
    | { t: 'end'; key: string; outcome: Outcome }
    | { t: 'tick'; ms: number };
  const key = fc.constantFrom('a', 'b', 'c', 'd');
  const op: fc.Arbitrary<Op> = fc.oneof(
    fc.record({ t: fc.constant('add' as const), key }),
    fc.record({ t: fc.constant('addAfter' as const), key, ms: fc.integer({ min: 0, max: 5000 }) }),
    fc.record({
      t: fc.constant('end' as const),
      key,
      outcome: fc.constantFrom('ok' as const, 'fail' as const, 'permanent' as const, 'requeue' as const),
    }),
    fc.record({ t: fc.constant('tick' as const), ms: fc.integer({ min: 0, max: 3000 }) }),
  );

  it('never runs a key alongside itself, and runs every key after its last add', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(op, { maxLength: 60 }),
        fc.integer({ min: 1, max: 3 }),
        async (ops, concurrency) => {
          const clock = new ManualClock();
          let seq = 0;
          const lastAdd = new Map<string, number>();
          const lastStart = new Map<string, number>();
          const open = new Map<string, Deferred>();
          let overlap = false;
          let autoSucceed = false;
          const queue = new WorkQueue({
            concurrency,
            clock,
            baseDelayMs: 100,
            maxDelayMs: 2000,
            handler: (k) => {
              if (open.has(k)) overlap = true;
              lastStart.set(k, ++seq);
              if (autoSucceed) return Promise.resolve();
              return new Promise<WorkResult | void>((resolve, reject) => open.set(k, { resolve, reject }));
            },
          });
          const end = (k: string, outcome: Outcome) => {
            const deferred = open.get(k);
            if (deferred === undefined) return;
            open.delete(k);
            if (outcome === 'ok') deferred.resolve();
            else if (outcome === 'requeue') deferred.resolve({ requeueAfterMs: 700 });
            else if (outcome === 'fail') deferred.reject(new Error('transient'));
            else deferred.reject(new PermanentError('bad'));
          };
          for (const o of ops) {
            if (o.t === 'add') {
              lastAdd.set(o.key, ++seq);
              queue.add(o.key);
            } else if (o.t === 'addAfter') {
              lastAdd.set(o.key, ++seq);
              queue.addAfter(o.key, o.ms);
            } else if (o.t === 'end') {
              end(o.key, o.outcome);
            } else {
              await clock.advance(o.ms);
            }
            await settle();
          }
          // Let everything finish: every run from now on succeeds at once.
          autoSucceed = true;
          for (
            let round = 0;
            round < 20 && (open.size > 0 || clock.pending().length > 0 || queue.inFlight > 0);
            round++
          ) {
            for (const k of [...open.keys()]) end(k, 'ok');
            await settle();
            await clock.advance(10_000);
          }
          await queue.drain();
          expect(overlap).toBe(false);
          expect(open.size).toBe(0);
          for (const [k, added] of lastAdd) {
            expect(lastStart.get(k) ?? 0, `key ${k}`).toBeGreaterThan(added);
          }
        },
      ),
      { numRuns: 150 },
    );
  });
});
