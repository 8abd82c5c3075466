/**
 * Coalesces requests for one expensive node-wide action (the hand-over restart): a
 * burst of requests runs it once. The run starts after `debounceMs` without a new
 * request, but never later than `maxDelayMs` after the first request of the burst.
 * Requests while it runs schedule exactly one more run afterwards.
 */
export interface ApplySchedulerOptions {
  /** Quiet time after the last request before running. */
  debounceMs: number;
  /** Longest wait after the first request of a burst. */
  maxDelayMs: number;
  /** The action. Its errors are its own business: they are swallowed here. */
  run: () => Promise<void>;
}

export class ApplyScheduler {
  readonly #options: ApplySchedulerOptions;
  #timer: NodeJS.Timeout | undefined;
  #firstRequestAt = 0;
  #running: Promise<void> | undefined;
  #again = false;
  #stopped = false;

  constructor(options: ApplySchedulerOptions) {
    if (!(options.debounceMs >= 0)) throw new TypeError(`debounceMs must be >= 0, got ${options.debounceMs}`);
    if (!(options.maxDelayMs >= options.debounceMs))
      throw new TypeError(`maxDelayMs (${options.maxDelayMs}) must be >= debounceMs (${options.debounceMs})`);
    this.#options = options;
  }

  /** Whether a run is scheduled or under way. */
  get busy(): boolean {
    return this.#timer !== undefined || this.#running !== undefined;
  }

  request(): void {
    if (this.#stopped) return;
    if (this.#running) {
      this.#again = true;
      return;
    }
    const now = Date.now();
    if (this.#timer === undefined) this.#firstRequestAt = now;
    else clearTimeout(this.#timer);
    const due = Math.min(now + this.#options.debounceMs, this.#firstRequestAt + this.#options.maxDelayMs);
    this.#timer = setTimeout(() => this.#fire(), Math.max(0, due - now));
  }

  /** Resolves when nothing is scheduled or running. */
  async settled(): Promise<void> {
    while (this.busy) {
      if (this.#running) await this.#running;
      else await new Promise((resolve) => setTimeout(resolve, 10));
    }
  }

  /** Cancels what is scheduled; a run under way finishes, and nothing follows it. */
  async stop(): Promise<void> {
    this.#stopped = true;
    this.#again = false;
    if (this.#timer !== undefined) clearTimeout(this.#timer);
    this.#timer = undefined;
    await this.#running;
  }

  #fire(): void {
    this.#timer = undefined;
    this.#running = this.#options
      .run()
      .catch(() => undefined)
      .finally(() => {
        this.#running = undefined;
        if (this.#again) {
          this.#again = false;
          this.request();
        }
      });
  }
}
