/**
 * The controller's own NBD handshake against a real server (qemu-nbd, --persistent):
 * the size it announces for a named export, and clear failures otherwise.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { probeExport } from '../../src/node/nbd-probe.js';
import { isServed } from '../support/nbd.js';
import { waitFor } from '../support/poll.js';
import { freePorts, requireBinary } from '../support/repo.js';

describe('probeExport (real qemu-nbd)', () => {
  let dir: string;
  let port: number;
  let closedPort: number;
  let server: ChildProcess;

  beforeAll(async () => {
    await requireBinary('qemu-nbd');
    dir = await mkdtemp(join(tmpdir(), 'nbdx-probe-'));
    [port, closedPort] = (await freePorts(2)) as [number, number];
    const image = join(dir, 'disk.qcow2');
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', image, '48M']);
    server = spawn(
      'qemu-nbd',
      [
        '--persistent',
        '--read-only',
        '-x',
        'disk',
        '-b',
        '127.0.0.1',
        '-p',
        String(port),
        '-f',
        'qcow2',
        image,
      ],
      {
        stdio: 'ignore',
      },
    );
    await waitFor('qemu-nbd to listen', async () =>
      (await isServed(`nbd://127.0.0.1:${port}/disk`)) ? true : undefined,
    );
  });

  afterAll(async () => {
    server?.kill('SIGTERM');
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('reports the virtual size and the read-only flag of a named export', async () => {
    expect(await probeExport({ host: '127.0.0.1', port, exportName: 'disk' })).toEqual({
      ok: true,
      size: 48 * 1024 * 1024,
      readOnly: true,
    });
  });

  it('says when the export is unknown', async () => {
    const result = await probeExport({ host: '127.0.0.1', port, exportName: 'nope' });
    expect(result.ok).toBe(false);
    if (!result.ok) expect(result.message).toMatch(/export "nope"/);
  });

  it('says when nothing listens', async () => {
    const result = await probeExport({ host: '127.0.0.1', port: closedPort, exportName: 'disk' });
    expect(result).toMatchObject({ ok: false, message: expect.stringContaining('ECONNREFUSED') as unknown });
  });

  it('leaves the server serving others (a clean disconnect)', async () => {
    for (let i = 0; i < 5; i++)
      expect((await probeExport({ host: '127.0.0.1', port, exportName: 'disk' })).ok).toBe(true);
    expect(await isServed(`nbd://127.0.0.1:${port}/disk`)).toBe(true);
  });
});
