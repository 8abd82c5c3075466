import http from 'node:http';
import https from 'node:https';
import { delimiter } from 'node:path';
import { KubeConfig } from '@kubernetes/client-node';

/**
 * A small HTTP client for the Kubernetes API. client-node supplies only the configuration
 * (server, TLS, credentials); requests are ours, so that we choose content types (merge
 * patches) and read watch streams line by line with our own timeouts.
 */

export const CONTENT_TYPE_JSON = 'application/json';
export const CONTENT_TYPE_MERGE_PATCH = 'application/merge-patch+json';
export const CONTENT_TYPE_JSON_PATCH = 'application/json-patch+json';

/** A failed API call, with what a caller needs to decide about retrying. */
export class KubeApiError extends Error {
  override readonly name = 'KubeApiError';
  /** HTTP status, or the `code` of a watch ERROR event; undefined for network errors. */
  readonly statusCode: number | undefined;
  /** The Status `reason` (NotFound, Conflict, Expired, ...), or NetworkError, Timeout, Aborted. */
  readonly reason: string;
  /** True when the same call may succeed later: 429, 5xx, 409 (after a fresh read), network errors. */
  readonly retryable: boolean;
  readonly method: string;
  readonly path: string;
  /** From a Retry-After header, when the server sent one. */
  readonly retryAfterSeconds: number | undefined;

  constructor(init: {
    message: string;
    method: string;
    path: string;
    statusCode?: number | undefined;
    reason: string;
    retryAfterSeconds?: number | undefined;
    cause?: unknown;
  }) {
    super(
      `${init.method} ${init.path}: ${init.statusCode ?? init.reason}: ${init.message}`,
      init.cause === undefined ? undefined : { cause: init.cause },
    );
    this.statusCode = init.statusCode;
    this.reason = init.reason;
    this.method = init.method;
    this.path = init.path;
    this.retryAfterSeconds = init.retryAfterSeconds;
    const code = init.statusCode;
    this.retryable =
      code === undefined ? init.reason !== 'Aborted' : code === 409 || code === 429 || code >= 500;
  }

  get notFound(): boolean {
    return this.statusCode === 404;
  }

  get conflict(): boolean {
    return this.statusCode === 409;
  }

  /** The resourceVersion asked for is no longer available: list again. */
  get gone(): boolean {
    return this.statusCode === 410;
  }
}

export function isKubeApiError(error: unknown): error is KubeApiError {
  return error instanceof KubeApiError;
}

export type QueryValue = string | number | boolean | undefined;

export interface KubeRequest {
  method: 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE';
  /** Absolute API path, e.g. `/apis/nbd.dev/v1alpha1/nbdexports`. */
  path: string;
  query?: Record<string, QueryValue>;
  /** Serialised as JSON. */
  body?: unknown;
  /** Content type of the body. Default application/json. */
  contentType?: string;
  signal?: AbortSignal;
  /** Whole-request timeout for `request`; no effect on streams. Default: the client's. */
  timeoutMs?: number;
}

/** The lines of a streaming response (a watch); ends when the server ends the response. */
export interface LineStream extends AsyncIterable<string> {
  /** Ends the stream; the iteration then finishes or throws an Aborted error. */
  close(): void;
}

/** What the watch loop and the store need from a client; tests may supply their own. */
export interface KubeTransport {
  request<T>(request: KubeRequest): Promise<T>;
  stream(request: KubeRequest): Promise<LineStream>;
}

export interface KubeClientOptions {
  /** Default timeout of a non-streaming request. Default 30 s. */
  requestTimeoutMs?: number;
  userAgent?: string;
}

export interface LoadKubeConfigOptions {
  /** From `--kubeconfig`; wins over everything. */
  kubeconfigPath?: string | undefined;
  /** Where KUBECONFIG is read from. Default process.env. */
  env?: NodeJS.ProcessEnv;
}

/** Explicit path, else KUBECONFIG (a path list, merged as kubectl does), else in-cluster. */
export function loadKubeConfig(options: LoadKubeConfigOptions = {}): KubeConfig {
  const env = options.env ?? process.env;
  const kc = new KubeConfig();
  if (options.kubeconfigPath !== undefined && options.kubeconfigPath !== '') {
    kc.loadFromFile(options.kubeconfigPath);
    return kc;
  }
  const paths = (env.KUBECONFIG ?? '').split(delimiter).filter((p) => p !== '');
  if (paths.length > 0) {
    const [first, ...rest] = paths as [string, ...string[]];
    kc.loadFromFile(first);
    for (const path of rest) {
      const more = new KubeConfig();
      more.loadFromFile(path);
      kc.mergeConfig(more, true);
    }
    return kc;
  }
  if (env.KUBERNETES_SERVICE_HOST === undefined || env.KUBERNETES_SERVICE_PORT === undefined) {
    throw new Error(
      'no Kubernetes configuration: pass --kubeconfig, set KUBECONFIG, or run in a pod (KUBERNETES_SERVICE_HOST unset)',
    );
  }
  kc.loadFromCluster();
  return kc;
}

interface StatusBody {
  kind?: string;
  reason?: string;
  message?: string;
  code?: number;
}

/** Turns an API Status object (an error body, or a watch ERROR event's object) into an error. */
export function errorFromStatus(
  status: unknown,
  method: string,
  path: string,
  fallbackCode?: number,
  retryAfterSeconds?: number,
): KubeApiError {
  const body = (typeof status === 'object' && status !== null ? status : {}) as StatusBody;
  const statusCode = typeof body.code === 'number' ? body.code : fallbackCode;
  return new KubeApiError({
    method,
    path,
    statusCode,
    reason: typeof body.reason === 'string' && body.reason !== '' ? body.reason : httpReason(statusCode),
    message:
      typeof body.message === 'string' ? body.message : (http.STATUS_CODES[statusCode ?? 0] ?? 'error'),
    retryAfterSeconds,
  });
}

function httpReason(code: number | undefined): string {
  switch (code) {
    case 404:
      return 'NotFound';
    case 409:
      return 'Conflict';
    case 410:
      return 'Expired';
    case 429:
      return 'TooManyRequests';
    default:
      return code !== undefined && code >= 500 ? 'InternalError' : 'Unknown';
  }
}

export class KubeClient implements KubeTransport {
  readonly #kc: KubeConfig;
  readonly #server: URL;
  readonly #timeoutMs: number;
  readonly #userAgent: string;

  constructor(kc: KubeConfig, options: KubeClientOptions = {}) {
    const cluster = kc.getCurrentCluster();
    if (cluster === null) throw new TypeError('kubeconfig has no current cluster');
    this.#server = new URL(cluster.server);
    if (this.#server.protocol !== 'https:' && this.#server.protocol !== 'http:') {
      throw new TypeError(`unsupported server URL ${cluster.server}`);
    }
    this.#kc = kc;
    this.#timeoutMs = options.requestTimeoutMs ?? 30_000;
    this.#userAgent = options.userAgent ?? 'nbd-export-controller';
  }

  /** The API server's URL, for logs. */
  get server(): string {
    return this.#server.href;
  }

  /** Sends a request and parses a JSON answer; a non-2xx answer throws a KubeApiError. */
  async request<T>(request: KubeRequest): Promise<T> {
    const timeout = AbortSignal.timeout(request.timeoutMs ?? this.#timeoutMs);
    const signal = request.signal === undefined ? timeout : AbortSignal.any([request.signal, timeout]);
    const response = await this.#send(request, signal);
    const text = await readAll(response, request, signal);
    const statusCode = response.statusCode ?? 0;
    const parsed = parseJson(text);
    if (statusCode < 200 || statusCode >= 300) {
      throw errorFromStatus(parsed, request.method, request.path, statusCode, retryAfter(response));
    }
    return parsed as T;
  }

  /** Opens a streaming request (a watch); a non-2xx answer throws a KubeApiError. */
  async stream(request: KubeRequest): Promise<LineStream> {
    const controller = new AbortController();
    const signal =
      request.signal === undefined ? controller.signal : AbortSignal.any([request.signal, controller.signal]);
    const response = await this.#send(request, signal);
    const statusCode = response.statusCode ?? 0;
    if (statusCode < 200 || statusCode >= 300) {
      const text = await readAll(response, request, signal);
      throw errorFromStatus(parseJson(text), request.method, request.path, statusCode, retryAfter(response));
    }
    return {
      close: () => controller.abort(),
      [Symbol.asyncIterator]: () => readLines(response, request, signal),
    };
  }

  async #send(request: KubeRequest, signal: AbortSignal): Promise<http.IncomingMessage> {
    const url = new URL(this.#server.href);
    url.pathname = url.pathname.replace(/\/$/, '') + request.path;
    for (const [name, value] of Object.entries(request.query ?? {})) {
      if (value !== undefined) url.searchParams.set(name, String(value));
    }
    const body = request.body === undefined ? undefined : JSON.stringify(request.body);
    const options: https.RequestOptions = {
      method: request.method,
      headers: {
        Accept: CONTENT_TYPE_JSON,
        'User-Agent': this.#userAgent,
        ...(body !== undefined && {
          'Content-Type': request.contentType ?? CONTENT_TYPE_JSON,
          'Content-Length': Buffer.byteLength(body),
        }),
      },
    };
    try {
      // TLS material and credentials, read again on each request so that rotated tokens apply.
      await this.#kc.applyToHTTPSOptions(options);
    } catch (error) {
      throw networkError(request, error, 'Unauthorized');
    }
    const plain = url.protocol === 'http:';
    // Plain HTTP (tests, local proxies; client-node demands insecure-skip-tls-verify for it):
    // the https agent client-node made cannot carry it.
    if (plain) delete options.agent;
    return new Promise((resolve, reject) => {
      const onError = (error: unknown) =>
        reject(networkError(request, error, signal.aborted ? abortReason(signal) : undefined));
      let req: http.ClientRequest;
      try {
        req = (plain ? http : https).request(url, { ...options, signal }, resolve);
      } catch (error) {
        onError(error);
        return;
      }
      req.on('error', onError);
      req.end(body);
    });
  }
}

function retryAfter(response: http.IncomingMessage): number | undefined {
  const header = response.headers['retry-after'];
  const seconds = header === undefined ? NaN : Number(header);
  return Number.isFinite(seconds) ? seconds : undefined;
}

function parseJson(text: string): unknown {
  if (text === '') return undefined;
  try {
    return JSON.parse(text) as unknown;
  } catch {
    return { message: text.slice(0, 500) };
  }
}

function abortReason(signal: AbortSignal): string {
  const reason: unknown = signal.reason;
  return reason instanceof DOMException && reason.name === 'TimeoutError' ? 'Timeout' : 'Aborted';
}

function networkError(request: KubeRequest, error: unknown, reason?: string): KubeApiError {
  if (error instanceof KubeApiError) return error;
  const code = (error as { code?: unknown } | null)?.code;
  return new KubeApiError({
    method: request.method,
    path: request.path,
    reason: reason ?? 'NetworkError',
    message: `${error instanceof Error ? error.message : String(error)}${typeof code === 'string' ? ` (${code})` : ''}`,
    cause: error,
  });
}

async function readAll(
  response: http.IncomingMessage,
  request: KubeRequest,
  signal: AbortSignal,
): Promise<string> {
  response.setEncoding('utf8');
  let text = '';
  try {
    for await (const chunk of response) text += chunk as string;
  } catch (error) {
    throw networkError(request, error, signal.aborted ? abortReason(signal) : undefined);
  }
  return text;
}

async function* readLines(
  response: http.IncomingMessage,
  request: KubeRequest,
  signal: AbortSignal,
): AsyncGenerator<string> {
  response.setEncoding('utf8');
  let buffered = '';
  try {
    for await (const chunk of response) {
      buffered += chunk as string;
      let newline: number;
      while ((newline = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, newline).trim();
        buffered = buffered.slice(newline + 1);
        if (line !== '') yield line;
      }
    }
  } catch (error) {
    throw networkError(request, error, signal.aborted ? abortReason(signal) : undefined);
  } finally {
    response.destroy();
  }
  if (buffered.trim() !== '') yield buffered.trim();
}
