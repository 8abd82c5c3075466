/**
 * Runs asynchronous sections one at a time, in the order they were asked for. A section
 * that fails passes its error to its own caller and does not stop the ones queued after
 * it. Each server supervisor keeps one, so that configuration writes, restarts and
 * control-socket commands never interleave.
 */
export class SerialLock {
  #tail: Promise<unknown> = Promise.resolve();

  /** Runs `section` after every section asked for before it has settled; resolves with its result. */
  run<T>(section: () => Promise<T>): Promise<T> {
    const result = this.#tail.then(section, section);
    this.#tail = result.catch(() => undefined);
    return result;
  }
}
