/**
 * /healthz (the process answers), /readyz (the source has synced: the controller knows
 * what it should serve) and /metrics (Prometheus text format, from src/controller/metrics/).
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';

/** The /metrics exposition: prom-client's registry, or anything that renders like it. */
export interface MetricsExposition {
  readonly contentType: string;
  render(): Promise<string>;
}

export interface HealthSources {
  ready(): boolean;
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
      const ready = sources.ready();
      return void response
        .writeHead(ready ? 200 : 503, { 'content-type': 'text/plain' })
        .end(ready ? 'ok\n' : 'not synced\n');
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
