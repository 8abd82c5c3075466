import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { KubeConfig } from '@kubernetes/client-node';
import type { NbdExport } from '../../../src/api/types.js';

/**
 * Just enough of a kube-apiserver on loopback, over plain HTTP, for the NbdExport collection:
 * paginated LIST with a spec.nodeName field selector, WATCH with history, bookmarks and 410,
 * GET, merge PATCH of an object (resourceVersion precondition) and of /status, and event
 * creation. Knobs let a test break it in the ways a real server breaks.
 */

export interface RecordedRequest {
  method: string;
  path: string;
  query: URLSearchParams;
  contentType: string | undefined;
  body: unknown;
}

interface ActiveWatch {
  res: http.ServerResponse;
  nodeName: string | undefined;
  /** Receives nothing at all: a hung stream. */
  silent: boolean;
}

type EventType = 'ADDED' | 'MODIFIED' | 'DELETED';

const PREFIX = '/apis/nbd.dev/v1alpha1';

export function makeExport(namespace: string, name: string, nodeName = 'node-a'): NbdExport {
  return {
    apiVersion: 'nbd.dev/v1alpha1',
    kind: 'NbdExport',
    metadata: { namespace, name, uid: `uid-${namespace}-${name}`, generation: 1 },
    spec: { nodeName, source: { file: { path: `/srv/${name}.qcow2`, format: 'qcow2' } } },
  };
}

export class FakeApiServer {
  readonly objects = new Map<string, NbdExport>();
  readonly requests: RecordedRequest[] = [];
  readonly events: unknown[] = [];
  readonly watches = new Set<ActiveWatch>();
  #rv = 100;
  #history: { rv: number; type: EventType; object: NbdExport }[] = [];
  /** Watches from a resourceVersion below this get 410. */
  compactedBelow = 0;
  /** How 410 is told: an ERROR watch event (what kube-apiserver does) or the HTTP status. */
  goneAs: 'event' | 'http' = 'event';
  /** While set, list and watch requests get 503. */
  unavailable = false;
  /** The next this-many watches hang: headers, then nothing ever. */
  hangWatches = 0;
  /** The next this-many object patches meet a concurrent writer and get 409. */
  conflictPatches = 0;
  /** Events POSTs answer this status when set. */
  eventStatus: number | undefined;
  readonly #server = http.createServer((req, res) => {
    this.#handle(req, res).catch((error: unknown) => {
      res.writeHead(500).end(JSON.stringify({ kind: 'Status', code: 500, message: String(error) }));
    });
  });
  #url = '';

  async start(): Promise<this> {
    await new Promise<void>((resolve) => this.#server.listen(0, '127.0.0.1', resolve));
    this.#url = `http://127.0.0.1:${(this.#server.address() as AddressInfo).port}`;
    return this;
  }

  async close(): Promise<void> {
    this.closeWatches();
    this.#server.closeAllConnections();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }

  get url(): string {
    return this.#url;
  }

  get resourceVersion(): string {
    return String(this.#rv);
  }

  kubeConfig(): KubeConfig {
    const kc = new KubeConfig();
    kc.loadFromOptions({
      clusters: [{ name: 'fake', server: this.#url, skipTLSVerify: true }], // client-node demands it for http:
      users: [{ name: 'fake' }],
      contexts: [{ name: 'fake', cluster: 'fake', user: 'fake' }],
      currentContext: 'fake',
    });
    return kc;
  }

  requestsOf(method: string, match: (r: RecordedRequest) => boolean = () => true): RecordedRequest[] {
    return this.requests.filter((r) => r.method === method && match(r));
  }

  lists(): RecordedRequest[] {
    return this.requestsOf(
      'GET',
      (r) => r.path === `${PREFIX}/nbdexports` && r.query.get('watch') !== 'true',
    );
  }

  watchRequests(): RecordedRequest[] {
    return this.requestsOf('GET', (r) => r.query.get('watch') === 'true');
  }

  /** Creates or replaces an object, as a client would. */
  put(object: NbdExport): NbdExport {
    const key = `${object.metadata.namespace}/${object.metadata.name}`;
    const type: EventType = this.objects.has(key) ? 'MODIFIED' : 'ADDED';
    const stored = structuredClone(object);
    stored.metadata.resourceVersion = String(++this.#rv);
    this.objects.set(key, stored);
    this.#publish(type, stored);
    return stored;
  }

  remove(key: string): void {
    const object = this.objects.get(key);
    if (object === undefined) throw new Error(`no ${key}`);
    this.objects.delete(key);
    const deleted = structuredClone(object);
    deleted.metadata.resourceVersion = String(++this.#rv);
    this.#publish('DELETED', deleted);
  }

  /** Forgets history: watches from before now get 410. */
  compact(): void {
    this.compactedBelow = this.#rv; // a watch from the current resourceVersion still works
    this.#history = [];
  }

  /** Moves the resourceVersion on, as a change elsewhere in the cluster would. */
  bumpResourceVersion(): string {
    return String(++this.#rv);
  }

  bookmark(): void {
    this.#sendAll({
      type: 'BOOKMARK',
      object: {
        apiVersion: 'nbd.dev/v1alpha1',
        kind: 'NbdExport',
        metadata: { resourceVersion: String(this.#rv) },
      },
    });
  }

  /** Sends an ERROR event with code 410 to every watch and ends them, as after compaction. */
  expireWatches(): void {
    this.compact();
    this.#sendAll({ type: 'ERROR', object: goneStatus() });
    this.closeWatches();
  }

  closeWatches(): void {
    for (const watch of this.watches) watch.res.end();
    this.watches.clear();
  }

  #sendAll(event: unknown): void {
    for (const watch of this.watches) if (!watch.silent) watch.res.write(`${JSON.stringify(event)}\n`);
  }

  #publish(type: EventType, object: NbdExport): void {
    this.#history.push({ rv: Number(object.metadata.resourceVersion), type, object });
    for (const watch of this.watches) {
      if (watch.silent || (watch.nodeName !== undefined && object.spec.nodeName !== watch.nodeName)) continue;
      watch.res.write(`${JSON.stringify({ type, object })}\n`);
    }
  }

  async #handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://fake');
    let text = '';
    for await (const chunk of req) text += String(chunk);
    const body: unknown = text === '' ? undefined : JSON.parse(text);
    const method = req.method ?? 'GET';
    this.requests.push({
      method,
      path: url.pathname,
      query: url.searchParams,
      contentType: req.headers['content-type'],
      body,
    });
    const send = (status: number, payload: unknown) => {
      res.writeHead(status, { 'Content-Type': 'application/json' }).end(JSON.stringify(payload));
    };

    if (url.pathname === `${PREFIX}/nbdexports` && method === 'GET') {
      if (this.unavailable) return send(503, status(503, 'ServiceUnavailable', 'down for a test'));
      const selector = url.searchParams.get('fieldSelector') ?? '';
      const nodeName = /^spec\.nodeName=(.+)$/.exec(selector)?.[1];
      if (url.searchParams.get('watch') === 'true') return this.#watch(url, nodeName, res);
      const all = [...this.objects.values()]
        .filter((o) => nodeName === undefined || o.spec.nodeName === nodeName)
        .sort((a, b) => (a.metadata.name < b.metadata.name ? -1 : 1));
      const limit = Number(url.searchParams.get('limit') ?? all.length);
      const offset = Number(url.searchParams.get('continue') || 0);
      const items = all.slice(offset, offset + limit);
      const more = offset + limit < all.length;
      return send(200, {
        apiVersion: 'nbd.dev/v1alpha1',
        kind: 'NbdExportList',
        metadata: { resourceVersion: String(this.#rv), ...(more && { continue: String(offset + limit) }) },
        items,
      });
    }

    const objectMatch =
      /^\/apis\/nbd\.dev\/v1alpha1\/namespaces\/([^/]+)\/nbdexports\/([^/]+)(\/status)?$/.exec(url.pathname);
    if (objectMatch !== null) {
      const key = `${decodeURIComponent(objectMatch[1] ?? '')}/${decodeURIComponent(objectMatch[2] ?? '')}`;
      const current = this.objects.get(key);
      if (current === undefined) return send(404, status(404, 'NotFound', `nbdexports "${key}" not found`));
      if (method === 'GET') return send(200, current);
      if (method !== 'PATCH') return send(405, status(405, 'MethodNotAllowed', method));
      if (req.headers['content-type'] !== 'application/merge-patch+json') {
        return send(415, status(415, 'UnsupportedMediaType', String(req.headers['content-type'])));
      }
      const patch = body as { metadata?: { resourceVersion?: string }; status?: unknown };
      if (objectMatch[3] === '/status') {
        const next = structuredClone(current);
        next.status = mergePatch(current.status ?? {}, patch.status) as NonNullable<NbdExport['status']>;
        return send(200, this.put(next));
      }
      if (this.conflictPatches > 0) {
        this.conflictPatches--;
        this.put({ ...current, metadata: { ...current.metadata, labels: { touched: 'yes' } } });
        return send(409, status(409, 'Conflict', 'the object has been modified'));
      }
      const wanted = patch.metadata?.resourceVersion;
      if (wanted !== undefined && wanted !== current.metadata.resourceVersion) {
        return send(409, status(409, 'Conflict', 'the object has been modified'));
      }
      const { resourceVersion: _ignored, ...metadataPatch } = patch.metadata ?? {};
      const next = mergePatch(current, { ...patch, metadata: metadataPatch }) as NbdExport;
      return send(200, this.put(next));
    }

    if (/^\/apis\/events\.k8s\.io\/v1\/namespaces\/[^/]+\/events$/.test(url.pathname) && method === 'POST') {
      if (this.eventStatus !== undefined)
        return send(this.eventStatus, status(this.eventStatus, 'Forbidden', 'no'));
      this.events.push(body);
      return send(201, body);
    }
    return send(404, status(404, 'NotFound', `no route ${method} ${url.pathname}`));
  }

  #watch(url: URL, nodeName: string | undefined, res: http.ServerResponse): void {
    const from = Number(url.searchParams.get('resourceVersion') || 0);
    if (from < this.compactedBelow) {
      if (this.goneAs === 'http') {
        res.writeHead(410, { 'Content-Type': 'application/json' }).end(JSON.stringify(goneStatus()));
        return;
      }
      res.writeHead(200, { 'Content-Type': 'application/json' });
      res.end(`${JSON.stringify({ type: 'ERROR', object: goneStatus() })}\n`);
      return;
    }
    res.writeHead(200, { 'Content-Type': 'application/json', 'Transfer-Encoding': 'chunked' });
    res.flushHeaders();
    const silent = this.hangWatches > 0;
    if (silent) this.hangWatches--;
    const watch: ActiveWatch = { res, nodeName, silent };
    this.watches.add(watch);
    res.on('close', () => this.watches.delete(watch));
    if (silent) return;
    for (const entry of this.#history) {
      if (entry.rv <= from || (nodeName !== undefined && entry.object.spec.nodeName !== nodeName)) continue;
      res.write(`${JSON.stringify({ type: entry.type, object: entry.object })}\n`);
    }
  }
}

function status(code: number, reason: string, message: string) {
  return { kind: 'Status', apiVersion: 'v1', status: 'Failure', code, reason, message };
}

function goneStatus() {
  return status(410, 'Expired', 'too old resource version');
}

/** RFC 7386 JSON merge patch. */
function mergePatch(target: unknown, patch: unknown): unknown {
  if (typeof patch !== 'object' || patch === null || Array.isArray(patch)) return patch;
  const result: Record<string, unknown> =
    typeof target === 'object' && target !== null && !Array.isArray(target)
      ? { ...(target as Record<string, unknown>) }
      : {};
  for (const [k, v] of Object.entries(patch)) {
    if (v === null) delete result[k];
    else result[k] = mergePatch(result[k], v);
  }
  return result;
}
