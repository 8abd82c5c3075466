/**
 * The supervisor's start-up waits are bounded: an "nbd-server" that never daemonizes (here
 * a tiny script that answers -V and then sleeps) is killed when startTimeoutMs runs out,
 * and the failure says so, instead of holding the supervisor's lock for ever.
 */
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { NbdServerSupervisor } from '../../../../src/node/nbd-server/nbd-server-supervisor.js';
import { findProcesses, isRunning } from '../../../../src/node/process/proc-scan.js';
import { rawExportConfig } from '../../../support/export-config.js';
import { waitFor } from '../../../support/poll.js';
import { freePorts } from '../../../support/repo.js';

let root: string;
let supervisor: NbdServerSupervisor | undefined;

beforeEach(async () => {
  root = await mkdtemp(join(tmpdir(), 'launch-deadline-'));
});
afterEach(async () => {
  await supervisor?.detach();
  supervisor = undefined;
  await rm(root, { recursive: true, force: true });
});

describe('NbdServerSupervisor start-up deadline', () => {
  it('kills an nbd-server that never daemonizes and reports it in status()', async () => {
    const pidFile = join(root, 'fake.pid');
    const binary = join(root, 'nbd-server');
    await writeFile(
      binary,
      [
        '#!/bin/sh',
        'if [ "$1" = -V ]; then echo "This is nbd-server version 3.24"; exit 0; fi',
        // A helper in its process group, as a real server might fork before daemonizing.
        `sleep 60 & echo $! > ${pidFile}`,
        'wait',
      ].join('\n'),
    );
    await chmod(binary, 0o755);
    const [port] = await freePorts(1);
    supervisor = new NbdServerSupervisor({
      stateDir: join(root, 'state'),
      listenAddress: '127.0.0.1',
      port: port ?? 0,
      logger: pino({ level: 'silent' }),
      binary,
      startTimeoutMs: 300,
      watchdogIntervalMs: 60_000,
    });
    // A configured export makes start() launch the server.
    await writeFile(join(root, 'disk.img'), Buffer.alloc(4096));
    await mkdir(join(root, 'state', 'nbd-server', 'conf.d'), { recursive: true });
    await supervisor.writeExport(rawExportConfig('disk', join(root, 'disk.img')));

    const started = performance.now();
    await supervisor.start();
    expect(performance.now() - started).toBeLessThan(55_000); // never the fake's 60 s

    const status = supervisor.status();
    expect(status.running).toBe(false);
    expect(status.version).toBe('3.24');
    expect(status.lastError).toMatch(/^nbd-server did not daemonize within 300 ms; killed it/);

    // On a slow machine the kill may come before the script got as far as its helper.
    const helper = await readFile(pidFile, 'utf8').then(Number, () => undefined);
    const gone = () =>
      findProcesses((argv) => argv.includes(binary)).length === 0 &&
      (helper === undefined || !isRunning(helper));
    await waitFor('the fake nbd-server and its helper to be gone', () => (gone() ? true : undefined), {
      timeoutMs: 30_000,
      intervalMs: 20,
    });
  });
});
