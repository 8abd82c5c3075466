/**
 * A Clock that moves only when a test says so: timers fire, in order of their due time,
 * as `advance()` passes them. Tests of time-dependent logic use it instead of sleeping.
 */
import type { Clock, TimerHandle } from '../../src/shared/clock.js';

interface Timer {
  id: number;
  due: number;
  callback: () => void;
}

export class ManualClock implements Clock {
  #now: number;
  #epochMs: number;
  #nextId = 1;
  #timers: Timer[] = [];

  /** @param start wall-clock time at monotonic 0. */
  constructor(start = new Date('2026-01-01T00:00:00Z')) {
    this.#now = 0;
    this.#epochMs = start.getTime();
  }

  now(): number {
    return this.#now;
  }

  date(): Date {
    return new Date(this.#epochMs + this.#now);
  }

  setTimeout(callback: () => void, ms: number): TimerHandle {
    const timer = { id: this.#nextId++, due: this.#now + Math.max(0, ms), callback };
    this.#timers.push(timer);
    return timer.id;
  }

  clearTimeout(handle: TimerHandle): void {
    this.#timers = this.#timers.filter((t) => t.id !== handle);
  }

  /** Delays of the timers not yet fired, relative to now, shortest first. */
  pending(): number[] {
    return this.#timers.map((t) => t.due - this.#now).sort((a, b) => a - b);
  }

  /**
   * Moves time forward by `ms`, firing every timer that falls due on the way (timers that
   * those callbacks set are fired too when due), and lets promise callbacks run after each.
   */
  async advance(ms: number): Promise<void> {
    const target = this.#now + ms;
    for (;;) {
      const next = this.#timers
        .filter((t) => t.due <= target)
        .sort((a, b) => a.due - b.due || a.id - b.id)[0];
      if (!next) break;
      this.#timers = this.#timers.filter((t) => t !== next);
      this.#now = Math.max(this.#now, next.due);
      next.callback();
      await flushPromises();
    }
    this.#now = target;
    await flushPromises();
  }
}

/** Lets queued promise callbacks (and the ones they queue) run. */
export async function flushPromises(rounds = 10): Promise<void> {
  for (let i = 0; i < rounds; i++) await new Promise<void>((resolve) => setImmediate(resolve));
}
