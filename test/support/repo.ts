/**
 * Where things are, and the checks every integration and end-to-end test needs first: the repository root,
 * required programs on PATH, free loopback ports.
 */
import { readFileSync } from 'node:fs';
import { access, constants } from 'node:fs/promises';
import { createServer, type AddressInfo } from 'node:net';
import { delimiter, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO_ROOT = fileURLToPath(new URL('../..', import.meta.url));

export const CLUSTER_SCRIPT = join(REPO_ROOT, 'hack', 'cluster.sh');

/**
 * The absolute path of a program on PATH. A missing one fails the test with what to install:
 * nothing here is skipped.
 */
export async function requireBinary(name: string, installHint = 'run hack/setup.sh'): Promise<string> {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    if (dir === '') continue;
    const candidate = join(dir, name);
    try {
      await access(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not in this directory
    }
  }
  throw new Error(`the tests need "${name}" on PATH, and it is missing (${installHint})`);
}

/**
 * `count` distinct TCP ports that are free on 127.0.0.1 right now. All are held open until
 * every one is picked, so one call never returns the same port twice.
 */
export async function freePorts(count: number): Promise<number[]> {
  const servers = await Promise.all(
    Array.from(
      { length: count },
      () =>
        new Promise<ReturnType<typeof createServer>>((resolve, reject) => {
          const server = createServer();
          server.once('error', reject);
          server.listen(0, '127.0.0.1', () => resolve(server));
        }),
    ),
  );
  const ports = servers.map((server) => (server.address() as AddressInfo).port);
  await Promise.all(servers.map((server) => new Promise((resolve) => server.close(resolve))));
  return ports;
}

/**
 * `count` consecutive ports that nothing listens on now (for a controller's --dedicated-ports):
 * a random base, tried until every port of the run binds on every address.
 */
export async function freePortRange(count: number): Promise<{ first: number; last: number }> {
  const binds = (port: number) =>
    new Promise<ReturnType<typeof createServer> | undefined>((resolve) => {
      const server = createServer();
      server.once('error', () => resolve(undefined));
      server.listen(port, '0.0.0.0', () => resolve(server));
    });
  for (let attempt = 0; attempt < 50; attempt++) {
    const first = 20_000 + Math.floor(Math.random() * 30_000);
    const servers = [];
    for (let port = first; port < first + count; port++) {
      const server = await binds(port);
      if (!server) break;
      servers.push(server);
    }
    await Promise.all(servers.map((server) => new Promise((resolve) => server.close(resolve))));
    if (servers.length === count) return { first, last: first + count - 1 };
  }
  throw new Error(`no ${count} consecutive free ports found in 50 attempts`);
}

/** The process exists and is not a zombie (a zombie still answers kill(pid, 0)). */
export function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    return !/^State:\s+Z/m.test(readFileSync(`/proc/${pid}/status`, 'utf8'));
  } catch {
    return false; // gone meanwhile
  }
}
