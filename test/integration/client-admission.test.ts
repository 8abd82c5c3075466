/**
 * Who gets in, with the real controller (its own process, as in production), nbd-server and
 * NBD clients: allowedClients and maxConnections are enforced by nbd-server's admission hook
 * at every connection (QCOW2 exports with rules: test/integration/qemu-client-rules.test.ts), and the controller's own probe passes without being in the list or
 * counted. The clients here run in the test's process tree, so they are outsiders to the
 * controller, as any client on the node is.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { HeldTransfer, isServed, sha256File, writeRandomFile } from '../support/nbd.js';
import type { PlainHostNode } from './harness/plain-host-controller.js';
import { nbdExport } from './harness/plain-host-controller.js';
import { useStartedNode } from './harness/started-node.js';

const MiB = 1024 * 1024;

describe('client admission', () => {
  let node: PlainHostNode;
  useStartedNode((started) => (node = started));

  const admissionLog = () => readFile(join(node.stateDir, 'nbd-server', 'auth', 'admission.log'), 'utf8');
  const raw = (name: string, size: string) => ({
    file: { path: join(node.images, `${name}.raw`), format: 'raw', create: { size } },
  });

  it('allowedClients keeps out a client the list does not name, while the probe gets in unlisted', async () => {
    await node.writeExports('fenced.yaml', [
      nbdExport('fenced', { source: raw('fenced', '1Mi'), allowedClients: ['192.0.2.0/24'] }),
      nbdExport('open', { source: raw('open', '1Mi'), allowedClients: ['192.0.2.0/24', '127.0.0.0/8'] }),
    ]);
    // Ready means the controller's own NBD handshake succeeded: 127.0.0.1 is not in the list.
    const fenced = await node.waitForReady('fenced');
    expect(fenced.status?.access).toMatchObject({ allowedClients: ['192.0.2.0/24'], maxConnections: 1 });
    expect(fenced.status?.access?.enforcedBy).toContain("nbd-server's admission hook");
    expect(await isServed(node.uri(fenced))).toBe(false);
    expect(await admissionLog()).toMatch(/"client refused".*client 127\.0\.0\.1 is not in allowedClients/);

    const open = await node.waitForReady('open');
    expect(await isServed(node.uri(open))).toBe(true);

    // Narrowed: the next client is judged by the new list.
    await node.writeExports('fenced.yaml', [
      nbdExport('fenced', { source: raw('fenced', '1Mi'), allowedClients: ['192.0.2.0/24'] }),
      nbdExport('open', { source: raw('open', '1Mi'), allowedClients: ['192.0.2.0/24'] }),
    ]);
    await expect.poll(() => isServed(node.uri(open)), { timeout: 60_000, interval: 500 }).toBe(false);
  });

  it('maxConnections refuses a client beyond the limit, serves the next once one left, and never counts the probe', async () => {
    await node.writeExports('single.yaml', [nbdExport('single', { source: raw('single', '64Mi') })]);
    const uri = node.uri(await node.waitForReady('single'));
    const payload = join(node.root, 'single-payload.bin');
    await writeRandomFile(payload, 64 * MiB);
    const transfer = new HeldTransfer(payload, uri, 32 * MiB);
    try {
      await transfer.firstHalfWritten();
      await expect
        .poll(() => admissionLog(), { timeout: 30_000 })
        .toMatch(/"client admitted".*"counted":true/);
      expect(await isServed(uri)).toBe(false);
      expect(await admissionLog()).toMatch(/already connected; maxConnections is 1/);

      // A restarted controller probes every export before calling it Ready: with the one
      // slot taken, its probe still gets in (not counted), and the held client is not cut.
      const before = (await admissionLog()).length;
      await node.stop('SIGKILL');
      await node.start();
      const probedAfterRestart = new RegExp(
        `"client admitted","export":"it\\.single","client":"controller","counted":false`,
      );
      await expect
        .poll(async () => (await admissionLog()).slice(before), { timeout: 60_000, interval: 250 })
        .toMatch(probedAfterRestart);
      const ready = await node.waitForReady('single');
      expect(ready.status?.conditions?.find((c) => c.type === 'Ready')?.reason).toBe('Served');
      expect(await isServed(uri)).toBe(false);
    } finally {
      const result = await transfer.finish();
      expect(result.exitCode, result.stderr).toBe(0);
    }
    expect(await sha256File(join(node.images, 'single.raw'))).toBe(await sha256File(payload));
    expect(await isServed(uri)).toBe(true);
    expect(await isServed(uri)).toBe(true); // clients at once, not over the server's life
  });

  it('a QCOW2 export without client rules says that nothing per export limits its clients', async () => {
    await node.writeExports('q.yaml', [
      nbdExport('q', {
        source: { file: { path: join(node.images, 'q.qcow2'), format: 'qcow2', create: { size: '1Mi' } } },
      }),
    ]);
    const q = await node.waitForReady('q');
    expect(q.status?.access).toMatchObject({ allowedClients: [], clientCertificate: false });
    expect(q.status?.access?.maxConnections).toBeUndefined();
    expect(q.status?.access?.enforcedBy).toMatch(/^nothing per export: qemu-storage-daemon's shared port/);
  });
});
