/**
 * The behaviours of nbd-server (3.24, Debian bookworm) that the backend's design rests
 * on, run against the installed binary. When nbd-server is upgraded and one of these
 * fails, re-read docs/nbd-server.md: the design may be able to change.
 */
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdir, mkdtemp, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { processState } from '../../src/node/process/proc-scan.js';
import { exportSize, isServed } from '../support/nbd.js';
import { waitFor } from '../support/poll.js';
import { freePorts, requireBinary } from '../support/repo.js';

describe('nbd-server facts', () => {
  let root = '';
  let port = 0;
  const pids: number[] = [];

  beforeAll(async () => {
    await requireBinary('nbd-server');
    await requireBinary('nbdinfo');
  });

  afterEach(async () => {
    for (const pid of pids.splice(0))
      try {
        process.kill(pid, 'SIGTERM'); // the parent takes its children with it
      } catch {
        // already gone
      }
    if (root) await rm(root, { recursive: true, force: true });
    root = '';
    port = 0;
  });

  /** Writes a config with these export sections and starts a daemonized nbd-server; returns its pid. */
  async function serve(
    sections: Record<string, Record<string, string>>,
    extraArgs: string[] = [],
  ): Promise<number> {
    root = root || (await mkdtemp(join(tmpdir(), 'nbdx-facts-')));
    port = port || ((await freePorts(1)) as [number])[0];
    await mkdir(join(root, 'conf.d'), { recursive: true });
    await writeFile(
      join(root, 'config'),
      `[generic]\nport = ${port}\nlistenaddr = 127.0.0.1\nincludedir = ${join(root, 'conf.d')}\n`,
    );
    for (const [name, keys] of Object.entries(sections))
      await writeFile(
        join(root, 'conf.d', `${name}.conf`),
        `[${name}]\n${Object.entries(keys)
          .map(([k, v]) => `${k} = ${v}`)
          .join('\n')}\n`,
      );
    const pidFile = join(root, 'pid');
    await rm(pidFile, { force: true });
    await execa('nbd-server', ['-C', join(root, 'config'), '-p', pidFile, ...extraArgs]);
    const pid = await waitFor(
      'the pid file',
      async () => Number((await readFile(pidFile, 'utf8')).trim()) || undefined,
    );
    pids.push(pid);
    await waitFor('nbd-server to listen', async () =>
      (await isServed(uri(Object.keys(sections)[0] ?? ''))) ? true : undefined,
    );
    return pid;
  }

  async function file(name: string, bytes: number): Promise<string> {
    root = root || (await mkdtemp(join(tmpdir(), 'nbdx-facts-')));
    const path = join(root, name);
    await writeFile(path, '');
    await truncate(path, bytes);
    return path;
  }

  const uri = (name: string) => `nbd://127.0.0.1:${port}/${name}`;

  it("counts maxconnections over the parent's lifetime: one finished client locks out the next", async () => {
    const path = await file('a.raw', 1 << 20);
    await serve({ limited: { exportname: path, maxconnections: '1' }, other: { exportname: path } });
    // serve() probed "limited" once already: that was its one connection.
    expect(await isServed(uri('limited'))).toBe(false);
    await sleep(500);
    expect(await isServed(uri('limited'))).toBe(false);
    expect(await isServed(uri('other'))).toBe(true);
  });

  it('replaces %s in a path with the client address unless virtstyle = none', async () => {
    const literal = await file('p%s.raw', 1 << 20);
    await file('p127.0.0.1.raw', 2 << 20);
    await serve({ none: { exportname: literal, virtstyle: 'none' }, implicit: { exportname: literal } });
    expect(await exportSize(uri('none'))).toBe(1 << 20);
    expect(await exportSize(uri('implicit'))).toBe(2 << 20);
  });

  it('dies after a few SIGHUPs that each add an export (fixed in 3.25)', async () => {
    const path = await file('a.raw', 1 << 20);
    const pid = await serve({ first: { exportname: path } });
    let reloads = 0;
    while (processState(pid) === 'running' && reloads < 30) {
      reloads++;
      await writeFile(
        join(root, 'conf.d', `added-${reloads}.conf`),
        `[added-${reloads}]\nexportname = ${path}\n`,
      );
      process.kill(pid, 'SIGHUP');
      await sleep(300);
    }
    console.log(`nbd-server parent died after ${reloads} SIGHUP reloads with additions`);
    expect(processState(pid)).not.toBe('running');
  });

  it('with -d, does not fork per client: it serves one client and then exits', async () => {
    const path = await file('a.raw', 1 << 20);
    root = root || (await mkdtemp(join(tmpdir(), 'nbdx-facts-')));
    port = ((await freePorts(1)) as [number])[0];
    await mkdir(join(root, 'conf.d'), { recursive: true });
    await writeFile(join(root, 'conf.d', 'a.conf'), `[a]\nexportname = ${path}\n`);
    await writeFile(
      join(root, 'config'),
      `[generic]\nport = ${port}\nlistenaddr = 127.0.0.1\nincludedir = ${join(root, 'conf.d')}\n`,
    );
    const foreground = spawn('nbd-server', ['-C', join(root, 'config'), '-d'], { stdio: 'ignore' });
    pids.push(foreground.pid as number);
    const exited = once(foreground, 'exit');
    // The first client is served (the probe retries until nbd-server listens)...
    await waitFor('nbd-server -d to serve', async () => ((await isServed(uri('a'))) ? true : undefined));
    // ...and then the server is gone: the next client is refused.
    await exited;
    expect(await isServed(uri('a'))).toBe(false);
  });
});
