/**
 * A small QMP client: QEMU's JSON monitor protocol over a UNIX socket. One JSON object per
 * line; the server greets, the client negotiates with `qmp_capabilities`, then sends
 * `execute` commands tagged with an `id` that the answer repeats, while asynchronous
 * `event`s arrive in between. Answers are matched by id, so commands may overlap.
 */
import { connect, type Socket } from 'node:net';

/** QEMU refused a command: `class` is QMP's error class (usually GenericError), `desc` its message. */
export class QmpError extends Error {
  override name = 'QmpError';
  readonly class: string;
  readonly desc: string;
  readonly command: string;
  constructor(command: string, errorClass: string, desc: string) {
    super(`${command}: ${desc}`);
    this.command = command;
    this.class = errorClass;
    this.desc = desc;
  }
}

/** No answer in time, or the connection ended before the answer. */
export class QmpConnectionError extends Error {
  override name = 'QmpConnectionError';
}

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

export interface QmpConnectOptions {
  /** Give up when the greeting and capabilities negotiation take longer. Default 10 s. */
  timeoutMs?: number;
}

export interface QmpExecuteOptions {
  /** Reject with QmpConnectionError after this long. Default 30 s. */
  timeoutMs?: number;
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (error: Error) => void;
  timer: NodeJS.Timeout;
}

export class QmpClient {
  #socket: Socket;
  #buffer = '';
  #nextId = 1;
  #pending = new Map<string, Pending>();
  #listeners = new Set<(event: QmpEvent) => void>();
  #closeListeners = new Set<() => void>();
  #greeting: ((line: Record<string, unknown>) => void) | undefined;
  #closed = false;

  private constructor(socket: Socket) {
    this.#socket = socket;
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.#receive(chunk));
    socket.on('error', () => undefined); // 'close' follows and reports
    socket.on('close', () => this.#onClose());
  }

  /** Connects, reads the greeting and enters command mode. */
  static async connect(socketPath: string, options: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = options.timeoutMs ?? 10_000;
    const socket = connect({ path: socketPath });
    const client = new QmpClient(socket);
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        (async () => {
          await new Promise<void>((resolve, reject) => {
            client.#greeting = (line) =>
              line['QMP'] ? resolve() : reject(new QmpConnectionError('no QMP greeting'));
            socket.once('error', reject);
            client.onClose(() => reject(new QmpConnectionError(`QMP connection to ${socketPath} closed`)));
          });
          await client.execute('qmp_capabilities', undefined, { timeoutMs });
        })(),
        new Promise((_, reject) => {
          timer = setTimeout(
            () =>
              reject(
                new QmpConnectionError(
                  `no QMP greeting on ${socketPath} within ${timeoutMs} ms (is another client connected? a QMP socket serves one at a time)`,
                ),
              ),
            timeoutMs,
          );
        }),
      ]);
    } catch (error) {
      client.close();
      throw error;
    } finally {
      clearTimeout(timer);
    }
    return client;
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Runs a command; resolves with its `return` value, rejects with QmpError or QmpConnectionError. */
  execute<T = unknown>(
    command: string,
    args?: Record<string, unknown>,
    options: QmpExecuteOptions = {},
  ): Promise<T> {
    if (this.#closed) return Promise.reject(new QmpConnectionError(`${command}: QMP connection is closed`));
    const id = `nbdx-${this.#nextId++}`;
    const timeoutMs = options.timeoutMs ?? 30_000;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new QmpConnectionError(`${command}: no answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#pending.set(id, { command, resolve: resolve as (value: unknown) => void, reject, timer });
      this.#socket.write(
        `${JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id })}\n`,
      );
    });
  }

  /** Calls the listener for every event until the returned function is called. */
  onEvent(listener: (event: QmpEvent) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /** Calls the listener once when the connection ends (the daemon quit or died). */
  onClose(listener: () => void): () => void {
    if (this.#closed) listener();
    else this.#closeListeners.add(listener);
    return () => this.#closeListeners.delete(listener);
  }

  /**
   * Resolves with the first event that matches. Subscribe before sending the command that
   * causes it: events are not kept.
   */
  waitForEvent(
    match: (event: QmpEvent) => boolean,
    timeoutMs: number,
  ): { promise: Promise<QmpEvent>; cancel: () => void } {
    let cancel = () => {};
    const promise = new Promise<QmpEvent>((resolve, reject) => {
      const timer = setTimeout(() => {
        cancel();
        reject(new QmpConnectionError(`no matching QMP event within ${timeoutMs} ms`));
      }, timeoutMs);
      const unsubscribe = this.onEvent((event) => {
        if (!match(event)) return;
        cancel();
        resolve(event);
      });
      const unClose = this.onClose(() => {
        cancel();
        reject(new QmpConnectionError('QMP connection closed while waiting for an event'));
      });
      cancel = () => {
        clearTimeout(timer);
        unsubscribe();
        unClose();
      };
    });
    return { promise, cancel: () => cancel() };
  }

  close(): void {
    this.#socket.destroy();
  }

  #receive(chunk: string): void {
    this.#buffer += chunk;
    for (;;) {
      const end = this.#buffer.indexOf('\n');
      if (end < 0) return;
      const line = this.#buffer.slice(0, end).trim();
      this.#buffer = this.#buffer.slice(end + 1);
      if (line) this.#dispatch(line);
    }
  }

  #dispatch(line: string): void {
    let message: Record<string, unknown>;
    try {
      message = JSON.parse(line) as Record<string, unknown>;
    } catch {
      return; // not QMP; ignore
    }
    if (this.#greeting) {
      const greeting = this.#greeting;
      this.#greeting = undefined;
      greeting(message);
      return;
    }
    if (typeof message['event'] === 'string') {
      const event: QmpEvent = {
        event: message['event'],
        data: (message['data'] as Record<string, unknown> | undefined) ?? {},
        ...(message['timestamp']
          ? { timestamp: message['timestamp'] as QmpEvent['timestamp'] & object }
          : {}),
      };
      for (const listener of [...this.#listeners]) listener(event);
      return;
    }
    const id = typeof message['id'] === 'string' ? message['id'] : undefined;
    const pending = id === undefined ? undefined : this.#pending.get(id);
    if (!pending || id === undefined) return;
    this.#pending.delete(id);
    clearTimeout(pending.timer);
    const error = message['error'] as { class?: string; desc?: string } | undefined;
    if (error) pending.reject(new QmpError(pending.command, error.class ?? 'GenericError', error.desc ?? ''));
    else pending.resolve(message['return']);
  }

  #onClose(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const [id, pending] of this.#pending) {
      clearTimeout(pending.timer);
      pending.reject(new QmpConnectionError(`${pending.command}: QMP connection closed`));
      this.#pending.delete(id);
    }
    for (const listener of [...this.#closeListeners]) listener();
    this.#closeListeners.clear();
  }
}
