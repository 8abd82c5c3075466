import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { KubeConfig } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  KubeApiError,
  KubeClient,
  errorFromStatus,
  loadKubeConfig,
  CONTENT_TYPE_MERGE_PATCH,
} from '../../../src/kube/kube-client.js';

type Route = (req: http.IncomingMessage, body: string, res: http.ServerResponse) => void;

let server: http.Server;
let base: string;
const routes = new Map<string, Route>();

function clientFor(url: string, requestTimeoutMs?: number): KubeClient {
  const kc = new KubeConfig();
  kc.loadFromOptions({
    clusters: [{ name: 'c', server: url, skipTLSVerify: true }], // client-node demands it for http:
    users: [{ name: 'u', token: 'secret-token' }],
    contexts: [{ name: 'x', cluster: 'c', user: 'u' }],
    currentContext: 'x',
  });
  return new KubeClient(kc, requestTimeoutMs === undefined ? {} : { requestTimeoutMs });
}

beforeAll(async () => {
  server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (chunk: Buffer) => (body += chunk.toString()));
    req.on('end', () => {
      const route = routes.get(new URL(req.url ?? '/', 'http://x').pathname);
      if (route === undefined) res.writeHead(404).end();
      else route(req, body, res);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});

afterAll(async () => {
  server.closeAllConnections();
  await new Promise((resolve) => server.close(resolve));
});

describe('KubeClient.request', () => {
  it('sends JSON with the content type asked for, credentials and query, and parses the answer', async () => {
    let seen: { url?: string | undefined; headers?: http.IncomingHttpHeaders; body?: string } = {};
    routes.set('/apis/x/v1/things/a', (req, body, res) => {
      seen = { url: req.url, headers: req.headers, body };
      res.writeHead(200, { 'Content-Type': 'application/json' }).end('{"ok":true}');
    });
    const answer = await clientFor(base).request<{ ok: boolean }>({
      method: 'PATCH',
      path: '/apis/x/v1/things/a',
      query: { fieldSelector: 'spec.nodeName=n 1', limit: 5, skipped: undefined },
      body: { status: { a: 1 } },
      contentType: CONTENT_TYPE_MERGE_PATCH,
    });
    expect(answer).toEqual({ ok: true });
    expect(seen.url).toBe('/apis/x/v1/things/a?fieldSelector=spec.nodeName%3Dn+1&limit=5');
    expect(seen.headers?.['content-type']).toBe('application/merge-patch+json');
    expect(seen.headers?.authorization).toBe('Bearer secret-token');
    expect(seen.body).toBe('{"status":{"a":1}}');
  });

  it('keeps a path prefix of the server URL', async () => {
    routes.set('/prefix/api/v1/x', (_req, _body, res) => res.writeHead(200).end('{"p":1}'));
    await expect(clientFor(`${base}/prefix/`).request({ method: 'GET', path: '/api/v1/x' })).resolves.toEqual(
      { p: 1 },
    );
  });

  it.each([
    { code: 400, reason: 'BadRequest', retryable: false },
    { code: 403, reason: 'Forbidden', retryable: false },
    { code: 404, reason: 'NotFound', retryable: false },
    { code: 409, reason: 'Conflict', retryable: true },
    { code: 410, reason: 'Expired', retryable: false },
    { code: 422, reason: 'Invalid', retryable: false },
    { code: 429, reason: 'TooManyRequests', retryable: true },
    { code: 500, reason: 'InternalError', retryable: true },
    { code: 503, reason: 'ServiceUnavailable', retryable: true },
  ])('maps HTTP $code to a KubeApiError (retryable: $retryable)', async ({ code, reason, retryable }) => {
    routes.set('/fail', (_req, _body, res) =>
      res
        .writeHead(code, { 'Content-Type': 'application/json', 'Retry-After': '7' })
        .end(JSON.stringify({ kind: 'Status', code, reason, message: `said ${code}` })),
    );
    const error = await clientFor(base)
      .request({ method: 'GET', path: '/fail' })
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(KubeApiError);
    expect(error).toMatchObject({ statusCode: code, reason, retryable, retryAfterSeconds: 7 });
    expect((error as Error).message).toContain(`said ${code}`);
    expect((error as KubeApiError).conflict).toBe(code === 409);
    expect((error as KubeApiError).gone).toBe(code === 410);
  });

  it('names a reason from the status code when the body is not a Status', async () => {
    routes.set('/plain', (_req, _body, res) => res.writeHead(502).end('bad gateway'));
    const error = (await clientFor(base)
      .request({ method: 'GET', path: '/plain' })
      .catch((e: unknown) => e)) as KubeApiError;
    expect(error).toMatchObject({ statusCode: 502, reason: 'InternalError', retryable: true });
    expect(error.message).toContain('bad gateway');
  });

  it('turns a refused connection into a retryable network error', async () => {
    const closed = http.createServer();
    await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
    const port = (closed.address() as AddressInfo).port;
    await new Promise((resolve) => closed.close(resolve));
    const error = await clientFor(`http://127.0.0.1:${port}`)
      .request({ method: 'GET', path: '/x' })
      .catch((e: unknown) => e);
    expect(error).toMatchObject({ statusCode: undefined, reason: 'NetworkError', retryable: true });
    expect((error as Error).message).toContain('ECONNREFUSED');
  });

  it('times out a request that never answers', async () => {
    routes.set('/slow', () => {
      // never answers
    });
    const error = await clientFor(base, 200)
      .request({ method: 'GET', path: '/slow' })
      .catch((e: unknown) => e);
    expect(error).toMatchObject({ reason: 'Timeout', retryable: true });
  });

  it('reports a caller abort as not retryable', async () => {
    routes.set('/slow', () => {});
    const controller = new AbortController();
    const pending = clientFor(base).request({ method: 'GET', path: '/slow', signal: controller.signal });
    controller.abort();
    await expect(pending).rejects.toMatchObject({ reason: 'Aborted', retryable: false });
  });
});

describe('KubeClient.stream', () => {
  it('yields whole lines however the chunks fall, including split multi-byte characters', async () => {
    const payload = Buffer.from('{"a":"ü"}\n\n{"b":2}\n{"c":3}');
    routes.set('/stream', (_req, _body, res) => {
      res.writeHead(200);
      const cut = payload.indexOf(0xbc); // the second byte of ü
      res.write(payload.subarray(0, cut));
      setTimeout(() => {
        res.write(payload.subarray(cut, cut + 9));
        res.end(payload.subarray(cut + 9));
      }, 10);
    });
    const lines: string[] = [];
    for await (const line of await clientFor(base).stream({ method: 'GET', path: '/stream' }))
      lines.push(line);
    expect(lines).toEqual(['{"a":"ü"}', '{"b":2}', '{"c":3}']);
  });

  it('throws a KubeApiError for an error answer before streaming', async () => {
    routes.set('/gone', (_req, _body, res) =>
      res
        .writeHead(410)
        .end(JSON.stringify({ kind: 'Status', code: 410, reason: 'Expired', message: 'too old' })),
    );
    await expect(clientFor(base).stream({ method: 'GET', path: '/gone' })).rejects.toMatchObject({
      statusCode: 410,
      reason: 'Expired',
    });
  });

  it('ends the iteration when closed', async () => {
    routes.set('/forever', (_req, _body, res) => {
      res.writeHead(200);
      res.write('{"first":1}\n');
    });
    const stream = await clientFor(base).stream({ method: 'GET', path: '/forever' });
    const lines: string[] = [];
    const done = (async () => {
      for await (const line of stream) {
        lines.push(line);
        stream.close();
      }
    })();
    await expect(done).rejects.toMatchObject({ reason: 'Aborted' });
    expect(lines).toEqual(['{"first":1}']);
  });
});

describe('errorFromStatus', () => {
  it('reads a watch ERROR event object', () => {
    const error = errorFromStatus(
      { kind: 'Status', code: 410, reason: 'Expired', message: 'too old' },
      'GET',
      '/x',
    );
    expect(error).toMatchObject({ statusCode: 410, reason: 'Expired', gone: true, retryable: false });
  });
});

describe('loadKubeConfig', () => {
  const dir = mkdtempSync(join(tmpdir(), 'kubeconfig-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const write = (name: string, server: string) => {
    const path = join(dir, name);
    writeFileSync(
      path,
      JSON.stringify({
        apiVersion: 'v1',
        kind: 'Config',
        clusters: [{ name, cluster: { server } }],
        users: [{ name, user: { token: 't' } }],
        contexts: [{ name, context: { cluster: name, user: name } }],
        'current-context': name,
      }),
    );
    return path;
  };
  const explicit = write('explicit', 'https://explicit:6443');
  const fromEnv = write('env', 'https://env:6443');

  it.each([
    {
      name: 'an explicit path wins',
      path: explicit,
      env: { KUBECONFIG: fromEnv },
      server: 'https://explicit:6443',
    },
    { name: 'KUBECONFIG next', path: undefined, env: { KUBECONFIG: fromEnv }, server: 'https://env:6443' },
    {
      name: 'the first file of a KUBECONFIG list sets the context',
      path: undefined,
      env: { KUBECONFIG: `${fromEnv}:${explicit}` },
      server: 'https://env:6443',
    },
  ])('$name', ({ path, env, server }) => {
    expect(loadKubeConfig({ kubeconfigPath: path, env }).getCurrentCluster()?.server).toBe(server);
  });

  it('says what is missing outside a cluster', () => {
    expect(() => loadKubeConfig({ env: {} })).toThrow(/--kubeconfig.*KUBECONFIG/);
  });
});
