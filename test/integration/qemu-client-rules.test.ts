/**
 * Who gets in to a QCOW2 export, with the real controller (its own process), qemu-storage-daemon,
 * iptables and NBD clients. An export that names allowedClients or maxConnections is served by
 * a qemu-storage-daemon of its own on a port of its own, where the node's firewall enforces its
 * rules. The remote client runs in a network namespace of its own (a host of its own, as far
 * as the node can tell); clients in the test's process tree are local outsiders. The
 * controller's probe passes without being listed or counted.
 */
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { chainPrefixFor } from '../../src/node/firewall/client-rules.js';
import { HeldTransfer, isServed, sha256File, writeRandomFile } from '../support/nbd.js';
import { NetworkNamespace } from '../support/network-namespace.js';
import { parseExposition, samplesOf, valueOf } from '../support/prometheus-text.js';
import { nbdExport, PlainHostNode } from './harness/plain-host-controller.js';

const MiB = 1024 * 1024;

describe('client rules on qemu-storage-daemon exports', () => {
  let node: PlainHostNode;
  let remote: NetworkNamespace;
  beforeAll(async () => {
    remote = await NetworkNamespace.create();
    node = await PlainHostNode.create();
    // The servers listen on this host's end of the pair: the remote host reaches them there.
    await node.start([`--listen-address=${remote.hostAddress}`]);
  });
  afterAll(async () => {
    await node?.destroy();
    await remote?.destroy();
  });

  const qcow2 = (name: string, size: string) => ({
    file: { path: join(node.images, `${name}.qcow2`), format: 'qcow2', create: { size } },
  });
  const fromRemote = () => remote.argv([]);
  /** Our chains and jumps, in both families. */
  const firewallRules = async () => {
    const prefix = chainPrefixFor(node.stateDir);
    const listings = await Promise.all(['iptables', 'ip6tables'].map((tool) => execa(tool, ['-w', '-S'])));
    return listings.flatMap((l) => l.stdout.split('\n')).filter((line) => line.includes(prefix));
  };
  const portOf = (uri: string) => Number(new URL(uri).port);
  const scrape = async () =>
    parseExposition(await (await fetch(`http://127.0.0.1:${node.healthPort}/metrics`)).text());

  it('allowedClients: the listed host is served on its own port, this host is refused, the probe gets in unlisted', async () => {
    await node.writeExports('shared.yaml', [nbdExport('shared', { source: qcow2('shared', '1Mi') })]);
    await node.writeExports('fenced.yaml', [
      nbdExport('fenced', { source: qcow2('fenced', '1Mi'), allowedClients: [`${remote.clientAddress}/32`] }),
    ]);
    // Ready means the controller's own NBD handshake succeeded, though this host is not listed.
    const fenced = await node.waitForReady('fenced');
    const uri = node.uri(fenced);
    expect(portOf(uri)).toBeGreaterThanOrEqual(node.dedicatedPorts.first);
    expect(portOf(uri)).toBeLessThanOrEqual(node.dedicatedPorts.last);
    expect(fenced.status?.access).toMatchObject({
      allowedClients: [`${remote.clientAddress}/32`],
      maxConnections: 1,
      clientCertificate: false,
    });
    expect(fenced.status?.access?.enforcedBy).toContain("the node's firewall");
    expect(await isServed(uri, fromRemote())).toBe(true);
    expect(await isServed(uri)).toBe(false);

    // Without rules, the export stays on the shared daemon, open to any client.
    const shared = await node.waitForReady('shared');
    expect(portOf(node.uri(shared))).toBe(node.qemuPort);
    expect(shared.status?.access?.enforcedBy).toMatch(/^nothing per export/);
    expect(await isServed(node.uri(shared))).toBe(true);
    expect(await firewallRules()).not.toEqual([]);
    expect(valueOf(await scrape(), 'nbdx_dedicated_qemu_daemons_up')).toBe(1);
    expect(valueOf(await scrape(), 'nbdx_client_firewall_enabled')).toBe(1);
  });

  it('new rules apply to the next client without cutting a connected one, on the same port', async () => {
    const spec = (allowedClients: string[]) => [
      nbdExport('fenced', { source: qcow2('fenced', '1Mi'), allowedClients }),
      nbdExport('moving', { source: qcow2('moving', '32Mi'), allowedClients }),
    ];
    await node.writeExports('fenced.yaml', spec([remote.subnet]));
    const uri = node.uri(await node.waitForReady('moving'));
    const payload = join(node.root, 'moving-payload.bin');
    await writeRandomFile(payload, 32 * MiB);
    const transfer = new HeldTransfer(payload, uri, 16 * MiB, fromRemote());
    try {
      await transfer.firstHalfWritten();
      await node.writeExports('fenced.yaml', spec(['203.0.113.0/24']));
      await expect
        .poll(async () => (await node.object('moving'))?.status?.access?.allowedClients, { timeout: 60_000 })
        .toEqual(['203.0.113.0/24']);
      const narrowed = await node.waitForReady('moving');
      expect(node.uri(narrowed)).toBe(uri);
      expect(await isServed(uri, fromRemote())).toBe(false);
    } finally {
      const result = await transfer.finish();
      expect(result.exitCode, result.stderr).toBe(0);
    }
    // Widened again: everything the held client wrote is there.
    await node.writeExports('fenced.yaml', spec([remote.subnet]));
    await expect.poll(() => isServed(uri, fromRemote()), { timeout: 60_000, interval: 500 }).toBe(true);
    const copy = join(node.root, 'moving-copy.bin');
    await remote.run(['nbdcopy', '--connections=1', uri, copy]);
    expect(await sha256File(copy)).toBe(await sha256File(payload));
  });

  it('maxConnections refuses a client beyond the limit, serves the next once one left, and never counts the probe', async () => {
    await node.writeExports('single.yaml', [
      nbdExport('single', { source: qcow2('single', '32Mi'), maxConnections: 1 }),
    ]);
    const single = await node.waitForReady('single');
    expect(single.status?.access).toMatchObject({ allowedClients: [], maxConnections: 1 });
    const uri = node.uri(single);
    const payload = join(node.root, 'single-payload.bin');
    await writeRandomFile(payload, 32 * MiB);
    const transfer = new HeldTransfer(payload, uri, 16 * MiB, fromRemote());
    try {
      await transfer.firstHalfWritten();
      await expect.poll(() => isServed(uri), { timeout: 30_000, interval: 250 }).toBe(false);
      expect(await isServed(uri, fromRemote())).toBe(false);

      // A restarted controller probes every export before calling it Ready: with the one
      // connection taken, its probe still gets in, and the held client is not cut.
      await node.stop('SIGKILL');
      await node.start([`--listen-address=${remote.hostAddress}`]);
      const probes = async (result: 'ok' | 'failed') =>
        samplesOf(await scrape(), 'nbdx_probe_duration_seconds_count', {
          server: 'qemu-storage-daemon',
          result,
        }).reduce((sum, sample) => sum + sample.value, 0);
      // shared, fenced, moving and single, each probed by the new process.
      await expect.poll(() => probes('ok'), { timeout: 60_000, interval: 250 }).toBeGreaterThanOrEqual(4);
      expect(await probes('failed')).toBe(0);
      const ready = await node.waitForReady('single');
      expect(node.uri(ready)).toBe(uri);
      expect(await isServed(uri)).toBe(false);
    } finally {
      const result = await transfer.finish();
      expect(result.exitCode, result.stderr).toBe(0);
    }
    // Connections at once, not over the server's life.
    await expect.poll(() => isServed(uri), { timeout: 30_000, interval: 250 }).toBe(true);
    expect(await isServed(uri, fromRemote())).toBe(true);
    expect(await isServed(uri)).toBe(true);
  });

  it("deleting the exports stops their daemons and lifts their ports' rules", async () => {
    const uris = await Promise.all(
      ['fenced', 'moving', 'single'].map(async (n) => node.uri(await node.waitForReady(n))),
    );
    await node.removeExports('fenced.yaml');
    await node.removeExports('single.yaml');
    for (const name of ['fenced', 'moving', 'single']) await node.waitForGone(name);
    await expect.poll(firewallRules, { timeout: 30_000 }).toEqual([]);
    expect(valueOf(await scrape(), 'nbdx_dedicated_qemu_daemons')).toBe(0);
    expect(await readdir(join(node.stateDir, 'qemu-storage-daemon-dedicated'))).toEqual([]);
    for (const uri of uris) expect(await isServed(uri, fromRemote())).toBe(false);
    // The shared daemon serves on.
    expect(await isServed(node.uri(await node.waitForReady('shared')))).toBe(true);
  });
});
