import { describe, expect, it } from 'vitest';
import { SerialLock } from '../../../src/shared/serial-lock.js';

describe('SerialLock', () => {
  it('runs sections one at a time in call order, and a failure does not stop the next', async () => {
    const lock = new SerialLock();
    const events: string[] = [];
    let releaseFirst = () => {};
    const first = lock.run(async () => {
      events.push('first starts');
      await new Promise<void>((resolve) => (releaseFirst = resolve));
      events.push('first ends');
      throw new Error('first failed');
    });
    const second = lock.run(() => {
      events.push('second runs');
      return Promise.resolve(2);
    });
    await Promise.resolve();
    await Promise.resolve();
    expect(events).toEqual(['first starts']);
    releaseFirst();
    await expect(first).rejects.toThrow('first failed');
    await expect(second).resolves.toBe(2);
    expect(events).toEqual(['first starts', 'first ends', 'second runs']);
  });
});
