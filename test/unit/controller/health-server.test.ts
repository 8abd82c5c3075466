import type { Server } from 'node:http';
import { afterEach, describe, expect, it } from 'vitest';
import { boundPort, startHealthServer, type HealthSources } from '../../../src/controller/health-server.js';

let server: Server | undefined;

afterEach(async () => {
  await new Promise((resolve) => server?.close(resolve) ?? resolve(undefined));
  server = undefined;
});

async function start(sources: HealthSources): Promise<string> {
  server = await startHealthServer('127.0.0.1', 0, sources);
  return `http://127.0.0.1:${boundPort(server)}`;
}

describe('health server', () => {
  it('answers /healthz, /readyz by readiness, /metrics with the exposition and its content type', async () => {
    let why: string | undefined = 'the source has not synced yet';
    const url = await start({
      notReadyBecause: () => why,
      metrics: {
        contentType: 'text/plain; version=0.0.4; charset=utf-8',
        render: () => Promise.resolve('up 1\n'),
      },
    });
    expect((await fetch(`${url}/healthz`)).status).toBe(200);
    const notReady = await fetch(`${url}/readyz`);
    expect(notReady.status).toBe(503);
    expect(await notReady.text()).toBe('not ready: the source has not synced yet\n');
    why = undefined;
    expect((await fetch(`${url}/readyz`)).status).toBe(200);
    const metrics = await fetch(`${url}/metrics`);
    expect(metrics.status).toBe(200);
    expect(metrics.headers.get('content-type')).toBe('text/plain; version=0.0.4; charset=utf-8');
    expect(await metrics.text()).toBe('up 1\n');
    expect((await fetch(`${url}/other`)).status).toBe(404);
  });

  it('answers 500 and tells why when the metrics cannot be rendered', async () => {
    const errors: unknown[] = [];
    const url = await start({
      notReadyBecause: () => undefined,
      metrics: { contentType: 'text/plain', render: () => Promise.reject(new Error('QMP timed out')) },
      onMetricsError: (error) => errors.push(error),
    });
    const response = await fetch(`${url}/metrics`);
    expect(response.status).toBe(500);
    expect(await response.text()).toMatch(/QMP timed out/);
    expect(errors).toHaveLength(1);
  });
});
