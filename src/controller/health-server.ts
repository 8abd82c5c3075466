/**
 * /healthz (the process answers), /readyz (the controller knows what it should serve and can
 * act on it: the source has synced and is being read, and the workers are not wedged) and /metrics (Prometheus text format, from src/controller/metrics/).
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';

/** The /metrics exposition: prom-client's registry, or anything that renders like it. */
export interface MetricsExposition {
  readonly contentType: string;
  render(): Promise<string>;
}

export interface HealthSources {
  /** Undefined when ready; otherwise why not (the /readyz body says it). */
  notReadyBecause(): string | undefined;
  metrics: MetricsExposition;
  /** Told when /metrics could not be rendered (the scraper sees a 500). */
  onMetricsError?: (error: unknown) => void;
}

export async function startHealthServer(host: string, port: number, sources: HealthSources): Promise<Server> {
  const server = createServer((request, response) => {
    const path = (request.url ?? '/').split('?')[0];
    if (path === '/healthz')
      return void response.writeHead(200, { 'content-type': 'text/plain' }).end('ok\n');
    if (path === '/readyz') {
      const why = sources.notReadyBecause();
      return void response
        .writeHead(why === undefined ? 200 : 503, { 'content-type': 'text/plain' })
        .end(why === undefined ? 'ok\n' : `not ready: ${why}\n`);
    }
    if (path === '/metrics') {
      sources.metrics.render().then(
        (body) => response.writeHead(200, { 'content-type': sources.metrics.contentType }).end(body),
        (error: unknown) => {
          sources.onMetricsError?.(error);
          response
            .writeHead(500, { 'content-type': 'text/plain' })
            .end(`metrics failed: ${error instanceof Error ? error.message : String(error)}\n`);
        },
      );
      return;
    }
    response.writeHead(404).end();
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  return server;
}

export function boundPort(server: Server): number {
  return (server.address() as AddressInfo).port;
}
