/**
 * /healthz (the process answers), /readyz (the source has synced: the controller knows
 * what it should serve) and /metrics (Prometheus text format).
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';

export interface HealthSources {
  ready(): boolean;
  /** Gauges and counters: name → value, with help text. */
  metrics(): { name: string; help: string; type: 'gauge' | 'counter'; value: number }[];
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
      const lines = sources
        .metrics()
        .flatMap((m) => [`# HELP ${m.name} ${m.help}`, `# TYPE ${m.name} ${m.type}`, `${m.name} ${m.value}`]);
      return void response
        .writeHead(200, { 'content-type': 'text/plain; version=0.0.4' })
        .end(`${lines.join('\n')}\n`);
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
