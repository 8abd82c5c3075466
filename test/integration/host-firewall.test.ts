/**
 * HostFirewall with the real iptables and ip6tables, and real TCP: a server on an ephemeral
 * port of every address of this host, a remote client in a network namespace of its own
 * (joined by a veth pair on a /30 of 10.254.0.0/16 and a /126 of a ULA no host address is in),
 * and local clients that are root with or without the exempt group among their supplementary
 * groups (setpriv --groups), as the controller's probe and any other root process are.
 *
 * The server writes one byte at accept and echoes what it reads, so a client tells "served"
 * (the byte came) from "refused" (ECONNREFUSED before any byte: the firewall's tcp-reset)
 * from anything else. Only chains of this file's own prefix are touched; the namespace, the
 * chains and the servers go in afterAll whatever happened.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { execa } from 'execa';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { chainsIn, type PortClientRule } from '../../src/node/firewall/client-rules.js';
import { HostFirewall } from '../../src/node/firewall/host-firewall.js';
import { stopChild } from '../support/child-process.js';
import { waitFor } from '../support/poll.js';
import { requireBinary } from '../support/repo.js';
import { NetworkNamespace } from '../support/network-namespace.js';

/** A group no process of this host has: only the clients started with it carry it. */
const EXEMPT_GID = 61_000 + (process.pid % 4_000);
const OUTCOME_TIMEOUT_MS = 15_000;

/**
 * A TCP client, as a program of its own. Prints "served" when the server's first byte
 * arrives, "refused" on ECONNREFUSED before it, anything else otherwise; with "hold" it
 * then stays connected, sends what it reads on stdin and prints "echo <line>" for each reply.
 */
const CLIENT_SCRIPT = `
const net = require('node:net');
const [host, port, mode] = process.argv.slice(1);
const say = (line) => process.stdout.write(line + '\\n');
let served = false;
const timer = setTimeout(() => { say('no answer'); process.exit(3); }, ${OUTCOME_TIMEOUT_MS});
const socket = net.connect({ host, port: Number(port) });
socket.once('data', (chunk) => {
  served = true;
  clearTimeout(timer);
  say('served');
  if (mode !== 'hold') return socket.end();
  socket.on('data', (data) => say('echo ' + data.toString().trim()));
  process.stdin.on('data', (data) => socket.write(data));
  process.stdin.on('end', () => socket.end());
});
socket.on('error', (error) => {
  clearTimeout(timer);
  say(served ? 'error after the byte: ' + error.code : error.code === 'ECONNREFUSED' ? 'refused' : 'error ' + error.code);
  process.exit(0);
});
socket.on('close', () => {
  clearTimeout(timer);
  if (!served) say('closed before a byte');
  process.exit(0);
});
`;

/**
 * Where a client runs: in the namespace (a remote host), or here with these supplementary
 * groups, as root unless another uid is given.
 */
type Origin = { namespace: string } | { groups: readonly number[]; uid?: number };

class Client {
  readonly lines: string[] = [];
  readonly #child: ChildProcess;
  readonly #exited: Promise<void>;

  constructor(origin: Origin, host: string, port: number, mode: 'once' | 'hold') {
    const node = [process.execPath, '-e', CLIENT_SCRIPT, host, String(port), mode];
    const argv =
      'namespace' in origin
        ? ['ip', 'netns', 'exec', origin.namespace, ...node]
        : [
            'setpriv',
            ...(origin.uid === undefined ? [] : [`--reuid=${origin.uid}`, `--regid=${origin.uid}`]),
            `--groups=${origin.groups.join(',')}`,
            ...node,
          ];
    this.#child = spawn(argv[0] ?? '', argv.slice(1), { stdio: ['pipe', 'pipe', 'inherit'] });
    this.#exited = new Promise((resolve) => this.#child.once('exit', () => resolve()));
    // A client that has exited closed its stdin: ending it then is no error of the test.
    this.#child.stdin?.on('error', () => undefined);
    if (this.#child.stdout !== null)
      createInterface({ input: this.#child.stdout }).on('line', (line) => this.lines.push(line));
  }

  /** The first thing the client printed: served, refused, or what else happened. */
  outcome(): Promise<string> {
    return waitFor('a client to connect or be refused', () => this.lines[0], {
      timeoutMs: OUTCOME_TIMEOUT_MS + 10_000,
      intervalMs: 20,
    });
  }

  /** Sends a line over the held connection and waits for the server's echo: the connection still works. */
  async roundTrip(text: string): Promise<string> {
    this.#child.stdin?.write(`${text}\n`);
    return waitFor(
      `the echo of "${text}"`,
      () => this.lines.find((line) => line === `echo ${text}` || line.startsWith('error')),
      {
        timeoutMs: 10_000,
        intervalMs: 20,
      },
    );
  }

  /** Closes the connection (end of stdin) and waits for the client to exit; bounded. */
  async close(): Promise<void> {
    this.#child.stdin?.end();
    const exited = await Promise.race([
      this.#exited.then(() => true),
      new Promise<boolean>((resolve) => setTimeout(() => resolve(false), 5_000).unref()),
    ]);
    if (!exited) await stopChild(this.#child);
  }
}

/** Listens on every address of this host (both families); one byte at accept, then echoes. */
async function startServer(sockets: Set<Socket>): Promise<{ server: Server; port: number }> {
  const server = createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => socket.destroy());
    socket.write('+');
    socket.on('data', (data) => socket.write(data));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host: '::', port: 0, ipv6Only: false }, resolve);
  });
  return { server, port: (server.address() as AddressInfo).port };
}

/** The whole filter table of both families, for what is of our prefix. */
async function listings(): Promise<{ ipv4: string; ipv6: string }> {
  const [ipv4, ipv6] = await Promise.all([
    execa('iptables', ['-w', '5', '-S']),
    execa('ip6tables', ['-w', '5', '-S']),
  ]);
  return { ipv4: ipv4.stdout, ipv6: ipv6.stdout };
}

/** Every line of a listing that names a chain of ours. */
function linesOf(listing: string, prefix: string): string[] {
  return listing.split('\n').filter((line) => line.includes(`${prefix}-`));
}

/**
 * The rules of a hook before our jump are only other controllers' jumps (they insert theirs at
 * the top too); ours is there once.
 */
function expectOneJumpOnTop(listing: string, hook: 'INPUT' | 'OUTPUT', target: string): void {
  const rules = listing.split('\n').filter((line) => line.startsWith(`-A ${hook} `));
  expect(rules.filter((rule) => rule === `-A ${hook} -j ${target}`)).toHaveLength(1);
  const above = rules.slice(
    0,
    rules.findIndex((rule) => rule === `-A ${hook} -j ${target}`),
  );
  for (const rule of above) expect(rule).toMatch(new RegExp(`^-A ${hook} -j NBDX-[0-9a-f]{8}-(IN|OUT)$`));
}

/**
 * Takes our chains out with plain iptables commands, should remove() itself have failed: only
 * names of our prefix are touched.
 */
async function scrub(prefix: string): Promise<void> {
  for (const tables of ['iptables', 'ip6tables']) {
    for (const [hook, suffix] of [
      ['INPUT', 'IN'],
      ['OUTPUT', 'OUT'],
    ] as const) {
      for (let copy = 0; copy < 10; copy++) {
        const deleted = await execa(tables, ['-w', '5', '-D', hook, '-j', `${prefix}-${suffix}`], {
          reject: false,
        });
        if (deleted.exitCode !== 0) break;
      }
    }
    const chains = chainsIn((await execa(tables, ['-w', '5', '-S'])).stdout, prefix);
    for (const chain of chains) await execa(tables, ['-w', '5', '-F', chain], { reject: false });
    for (const chain of chains) await execa(tables, ['-w', '5', '-X', chain], { reject: false });
  }
}

describe('HostFirewall (real iptables, real TCP)', () => {
  let stateDir: string;
  let remote: NetworkNamespace;
  let firewall: HostFirewall;
  let port: number;
  /** A port of this host with no rule of ours. */
  let otherPort: number;
  const servers: Server[] = [];
  const sockets = new Set<Socket>();
  const clients: Client[] = [];

  const client = (origin: Origin, host: string, mode: 'once' | 'hold' = 'once', to = port) => {
    const started = new Client(origin, host, to, mode);
    clients.push(started);
    return started;
  };
  /** One connection attempt, closed at once: "served" or "refused". */
  const attempt = (origin: Origin, host: string, to = port) => client(origin, host, 'once', to).outcome();
  const remoteOrigin = (): Origin => ({ namespace: remote.name });
  const rootOnly: Origin = { groups: [0] };
  const exempt: Origin = { groups: [0, EXEMPT_GID] };

  beforeAll(async () => {
    for (const binary of ['iptables', 'ip6tables', 'iptables-restore', 'ip6tables-restore', 'setpriv', 'ip'])
      await requireBinary(binary);
    expect(process.getuid?.()).toBe(0);
    expect(await HostFirewall.check()).toBeUndefined();
    stateDir = await mkdtemp(join(tmpdir(), 'nbdx-host-firewall-'));
    firewall = new HostFirewall({ stateDir, exemptGid: EXEMPT_GID, logger: pino({ level: 'silent' }) });
    remote = await NetworkNamespace.create();
    for (const started of [await startServer(sockets), await startServer(sockets)])
      servers.push(started.server);
    [port, otherPort] = servers.map((server) => (server.address() as AddressInfo).port) as [number, number];
    // Ephemeral ports (32768-60999 here): never the ones the suite running beside this one uses.
    for (const used of [port, otherPort])
      expect(used === 8080 || (used >= 10800 && used <= 10999)).toBe(false);
    // Without rules, every client gets in: the setup itself is not what refuses anyone.
    expect(await attempt(remoteOrigin(), remote.hostAddress)).toBe('served');
    expect(await attempt(remoteOrigin(), remote.hostAddress6)).toBe('served');
    expect(await attempt(rootOnly, '127.0.0.1')).toBe('served');
  });

  afterAll(async () => {
    await Promise.allSettled(clients.map((started) => started.close()));
    try {
      await firewall?.remove().catch(async (error: unknown) => {
        await scrub(firewall.chainPrefix);
        throw error;
      });
    } finally {
      for (const socket of sockets) socket.destroy();
      await Promise.all(servers.map((server) => new Promise((resolve) => server.close(resolve))));
      await remote?.destroy();
      if (stateDir !== undefined) await rm(stateDir, { recursive: true, force: true });
    }
  });

  it('allowedClients: the listed network is served; local root is refused on any address unless it carries the exempt group', async () => {
    const host = remote;
    await firewall.apply([{ port, allowedClients: [host.subnet, host.subnet6] }]);

    expect(await attempt(remoteOrigin(), host.hostAddress)).toBe('served');
    expect(await attempt(remoteOrigin(), host.hostAddress6)).toBe('served');
    expect(await attempt(rootOnly, '127.0.0.1')).toBe('refused');
    expect(await attempt(rootOnly, '::1')).toBe('refused');
    expect(await attempt(exempt, '127.0.0.1')).toBe('served');
    expect(await attempt(exempt, '::1')).toBe('served');
    // A local connection to the host's veth address comes from that address, which the /30 lists.
    expect(await attempt(rootOnly, host.hostAddress)).toBe('served');
    // Another group does not open the door, nor does the exempt group of a process that is not root.
    expect(await attempt({ groups: [0, EXEMPT_GID + 1] }, '127.0.0.1')).toBe('refused');
    expect(await attempt({ groups: [EXEMPT_GID], uid: 65534 }, '127.0.0.1')).toBe('refused');
    // A port without rules is nobody's business.
    expect(await attempt(rootOnly, '127.0.0.1', otherPort)).toBe('served');
    expect(await attempt(remoteOrigin(), host.hostAddress, otherPort)).toBe('served');

    // Only the remote client's own IPv4 address listed: a local connection to any address of
    // this host (here the veth's) is refused unless exempt, and IPv6 clients are refused.
    await firewall.apply([{ port, allowedClients: [host.clientAddress] }]);
    expect(await attempt(remoteOrigin(), host.hostAddress)).toBe('served');
    expect(await attempt(rootOnly, host.hostAddress)).toBe('refused');
    expect(await attempt(exempt, host.hostAddress)).toBe('served');
    expect(await attempt(remoteOrigin(), host.hostAddress6)).toBe('refused');
    expect(await attempt(rootOnly, '::1')).toBe('refused');
    expect(await attempt(exempt, '::1')).toBe('served');
  });

  it('maxConnections 1: one at a time from any origin, the exempt client never counted, the next served once one left', async () => {
    const host = remote;
    await firewall.apply([{ port, allowedClients: [], maxConnections: 1 }]);

    const held = client(remoteOrigin(), host.hostAddress, 'hold');
    expect(await held.outcome()).toBe('served');
    expect(await attempt(remoteOrigin(), host.hostAddress)).toBe('refused');
    // The local path ends in the same count.
    expect(await attempt(rootOnly, '127.0.0.1')).toBe('refused');
    // The count survives applying the rule set again, and applying it with another port.
    await firewall.apply([{ port, allowedClients: [], maxConnections: 1 }]);
    expect(await attempt(remoteOrigin(), host.hostAddress)).toBe('refused');
    await firewall.apply([
      { port, allowedClients: [], maxConnections: 1 },
      { port: otherPort, allowedClients: [], maxConnections: 5 },
    ]);
    expect(await attempt(remoteOrigin(), host.hostAddress)).toBe('refused');
    // iptables and ip6tables count apart: the IPv6 path has its own 1.
    expect(await attempt(remoteOrigin(), host.hostAddress6)).toBe('served');

    const probe = client(exempt, '127.0.0.1', 'hold');
    expect(await probe.outcome()).toBe('served');
    await held.close();
    // The slot is free again once the held connection has closed (the kernel sees its FIN);
    // the exempt connection, still open, does not take it.
    await waitFor(
      'a remote client to be served once the held one left',
      async () => ((await attempt(remoteOrigin(), host.hostAddress)) === 'served' ? true : undefined),
      { timeoutMs: 30_000, intervalMs: 200 },
    );
    expect(await probe.roundTrip('still here')).toBe('echo still here');

    // A local client without the group takes the slot as a remote one would.
    const local = client(rootOnly, '127.0.0.1', 'hold');
    expect(await local.outcome()).toBe('served');
    expect(await attempt(remoteOrigin(), host.hostAddress)).toBe('refused');
    await local.close();
    await probe.close();
  });

  it('a narrowed rule set refuses the next connection, and a connection already open stays', async () => {
    const host = remote;
    await firewall.apply([{ port, allowedClients: [host.subnet] }]);
    const held = client(remoteOrigin(), host.hostAddress, 'hold');
    expect(await held.outcome()).toBe('served');

    await firewall.apply([{ port, allowedClients: ['203.0.113.7'] }]);
    expect(await attempt(remoteOrigin(), host.hostAddress)).toBe('refused');
    expect(await held.roundTrip('after narrowing')).toBe('echo after narrowing');

    // A limit added while a connection is open does not count it (the kernel counts the
    // connections its rule has seen): the first new one still gets the slot.
    await firewall.apply([{ port, allowedClients: [host.subnet], maxConnections: 1 }]);
    const second = client(remoteOrigin(), host.hostAddress, 'hold');
    expect(await second.outcome()).toBe('served');
    expect(await attempt(remoteOrigin(), host.hostAddress)).toBe('refused');
    expect(await held.roundTrip('still open')).toBe('echo still open');
    await second.close();
    await held.close();
  });

  it('apply is idempotent, deletes chains it no longer needs, and apply([]) / remove() leave nothing of ours', async () => {
    const host = remote;
    const prefix = firewall.chainPrefix;
    const rules: PortClientRule[] = [
      { port, allowedClients: [host.subnet], maxConnections: 2 },
      { port: otherPort, allowedClients: [] },
    ];
    await firewall.apply(rules);
    const first = await listings();
    await firewall.apply(rules);
    const again = await listings();
    for (const family of ['ipv4', 'ipv6'] as const) {
      expect(linesOf(again[family], prefix)).toEqual(linesOf(first[family], prefix));
      expectOneJumpOnTop(again[family], 'INPUT', `${prefix}-IN`);
      expectOneJumpOnTop(again[family], 'OUTPUT', `${prefix}-OUT`);
      expect(chainsIn(again[family], prefix).sort()).toEqual(
        [
          `${prefix}-IN`,
          `${prefix}-L${port}`,
          `${prefix}-OUT`,
          `${prefix}-P${otherPort}`,
          `${prefix}-P${port}`,
        ].sort(),
      );
    }

    await firewall.apply([{ port, allowedClients: [host.subnet] }]);
    const narrowed = await listings();
    for (const family of ['ipv4', 'ipv6'] as const)
      expect(chainsIn(narrowed[family], prefix).sort()).toEqual([
        `${prefix}-IN`,
        `${prefix}-OUT`,
        `${prefix}-P${port}`,
      ]);

    await firewall.apply([]);
    const afterEmpty = await listings();
    expect(linesOf(afterEmpty.ipv4, prefix)).toEqual([]);
    expect(linesOf(afterEmpty.ipv6, prefix)).toEqual([]);
    expect(await attempt(rootOnly, '127.0.0.1')).toBe('served');

    await firewall.remove(); // nothing there: no error
    await firewall.apply(rules);
    expect(await attempt(rootOnly, '127.0.0.1')).toBe('refused');
    expect(await attempt(remoteOrigin(), host.hostAddress)).toBe('served');

    await firewall.remove();
    await firewall.remove();
    const removed = await listings();
    expect(linesOf(removed.ipv4, prefix)).toEqual([]);
    expect(linesOf(removed.ipv6, prefix)).toEqual([]);
    expect(await attempt(rootOnly, '127.0.0.1')).toBe('served');
    expect(await attempt(remoteOrigin(), host.hostAddress6)).toBe('served');
  });
});
