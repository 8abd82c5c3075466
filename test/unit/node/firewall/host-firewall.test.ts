/**
 * HostFirewall at its boundary, with a fake CommandRunner that keeps a small model of the
 * filter table (chains, and the rules of INPUT and OUTPUT): which commands run in which order,
 * what an apply leaves behind, how failures read. The real iptables is exercised in
 * test/integration/host-firewall.test.ts.
 */
import { readFile } from 'node:fs/promises';
import { Writable } from 'node:stream';
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import { chainPrefixFor } from '../../../../src/node/firewall/client-rules.js';
import { FirewallCommandError, HostFirewall } from '../../../../src/node/firewall/host-firewall.js';
import type { CommandResult, CommandRunner } from '../../../../src/node/process/run-command.js';

const STATE_DIR = '/var/lib/nbdx-unit';
const P = chainPrefixFor(STATE_DIR);

/** One family's filter table: chains and their rules, as `-S` shows them (without iptables' rewording). */
class FakeTable {
  readonly chains = new Set<string>();
  readonly hooks: Record<'INPUT' | 'OUTPUT', string[]> = { INPUT: ['-j KUBE-FIREWALL'], OUTPUT: [] };
  readonly rules = new Map<string, string[]>();

  listing(): string {
    return [
      '-P INPUT ACCEPT',
      '-P OUTPUT ACCEPT',
      ...[...this.chains].map((chain) => `-N ${chain}`),
      ...this.hooks.INPUT.map((rule) => `-A INPUT ${rule}`),
      ...this.hooks.OUTPUT.map((rule) => `-A OUTPUT ${rule}`),
      ...[...this.chains].flatMap((chain) =>
        (this.rules.get(chain) ?? []).map((rule) => `-A ${chain} ${rule}`),
      ),
    ].join('\n');
  }

  restore(batch: string): void {
    for (const line of batch.split('\n')) {
      const [verb, name = '', ...rest] = line.split(' ');
      if (line.startsWith(':')) {
        const chain = line.slice(1).split(' ')[0] ?? '';
        this.chains.add(chain);
        this.rules.set(chain, []);
      } else if (verb === '-X') this.delete(name);
      else if (name === 'INPUT' || name === 'OUTPUT') {
        if (verb === '-D') this.hooks[name].splice(this.hooks[name].indexOf(rest.join(' ')), 1);
        if (verb === '-I') this.hooks[name].unshift(rest.slice(1).join(' '));
      } else if (verb === '-A') this.rules.get(name)?.push(rest.join(' '));
    }
  }

  delete(chain: string): void {
    this.chains.delete(chain);
    this.rules.delete(chain);
  }
}

interface Call {
  command: string;
  args: readonly string[];
  /** The batch file's content, for the restore tools. */
  batch?: string;
}

const ok = (stdout = ''): CommandResult => ({ exitCode: 0, stdout, stderr: '' });

function fakeIptables(overrides: { answer?: (call: Call) => CommandResult | undefined } = {}) {
  const tables = { iptables: new FakeTable(), ip6tables: new FakeTable() };
  const calls: Call[] = [];
  const run: CommandRunner = async (command, args) => {
    const call: Call = { command, args };
    const table = command.startsWith('ip6') ? tables.ip6tables : tables.iptables;
    if (command.endsWith('-restore')) call.batch = await readFile(args.at(-1) ?? '', 'utf8');
    calls.push(call);
    const answer = overrides.answer?.(call);
    if (answer !== undefined) return answer;
    if (command.endsWith('-restore')) {
      if (!args.includes('--test')) table.restore(call.batch ?? '');
      return ok();
    }
    if (args.includes('-S')) return ok(table.listing());
    const deleted = args.indexOf('-X');
    if (deleted >= 0) table.delete(args[deleted + 1] ?? '');
    return ok();
  };
  return { run, calls, tables };
}

function capturedLogger() {
  const records: Array<Record<string, unknown>> = [];
  const stream = new Writable({
    write(chunk: Buffer, _encoding, done) {
      records.push(JSON.parse(chunk.toString()) as Record<string, unknown>);
      done();
    },
  });
  return { logger: pino({ level: 'info' }, stream), records };
}

function firewall(run: CommandRunner, logger = pino({ level: 'silent' })) {
  return new HostFirewall({ stateDir: STATE_DIR, exemptGid: 4242, logger, runner: run });
}

const commandLine = (call: Call) => [call.command, ...call.args].join(' ');

describe('HostFirewall', () => {
  it('names its chains from the state directory', () => {
    expect(firewall(fakeIptables().run).chainPrefix).toBe(P);
  });

  it('first apply: lists, commits the chains, puts the jumps on top, checks; in both families', async () => {
    const { run, calls, tables } = fakeIptables();
    await firewall(run).apply([{ port: 10901, allowedClients: ['10.254.3.0/30'], maxConnections: 1 }]);

    const shape = calls.map(
      (call) => `${call.command} ${call.args.filter((arg) => !arg.startsWith('/')).join(' ')}`,
    );
    expect(shape).toEqual([
      'iptables -w 15 -S',
      'iptables-restore -w 15 --noflush',
      'iptables-restore -w 15 --noflush',
      'iptables -w 15 -S',
      'ip6tables -w 15 -S',
      'ip6tables-restore -w 15 --noflush',
      'ip6tables-restore -w 15 --noflush',
      'ip6tables -w 15 -S',
    ]);
    // The batch file is the last argument, after the lock wait's value (a bare -w would swallow it).
    expect(calls[1]?.args.at(-1)).toMatch(/\/nbdx-firewall-[^/]+\/batch\.rules$/);
    expect(calls[1]?.batch).toContain(`-A ${P}-P10901 -s 10.254.3.0/30 -g ${P}-L10901\n`);
    expect(calls[5]?.batch).not.toContain('10.254.3.0/30');
    expect(calls[2]?.batch).toBe(`*filter\n-I INPUT 1 -j ${P}-IN\n-I OUTPUT 1 -j ${P}-OUT\nCOMMIT\n`);
    for (const table of [tables.iptables, tables.ip6tables]) {
      expect([...table.chains]).toEqual([`${P}-IN`, `${P}-OUT`, `${P}-P10901`, `${P}-L10901`]);
      expect(table.hooks.INPUT).toEqual([`-j ${P}-IN`, '-j KUBE-FIREWALL']);
      expect(table.hooks.OUTPUT).toEqual([`-j ${P}-OUT`]);
    }
  });

  it('apply again with the same rules commits the chains only; a smaller set deletes the chains it left', async () => {
    const { run, calls, tables } = fakeIptables();
    const hostFirewall = firewall(run);
    await hostFirewall.apply([
      { port: 10901, allowedClients: [], maxConnections: 1 },
      { port: 10902, allowedClients: [] },
    ]);
    calls.length = 0;
    await hostFirewall.apply([
      { port: 10902, allowedClients: [] },
      { port: 10901, allowedClients: [], maxConnections: 1 },
    ]);
    expect(calls.filter((call) => call.command.endsWith('-restore'))).toHaveLength(2);
    expect(calls.some((call) => call.args.includes('-X'))).toBe(false);

    calls.length = 0;
    await hostFirewall.apply([{ port: 10902, allowedClients: [] }]);
    const deletions = calls.filter((call) => call.args.includes('-X')).map(commandLine);
    expect(deletions).toEqual([
      `iptables -w 15 -X ${P}-P10901`,
      `iptables -w 15 -X ${P}-L10901`,
      `ip6tables -w 15 -X ${P}-P10901`,
      `ip6tables -w 15 -X ${P}-L10901`,
    ]);
    // Declared (emptied) in the batch before they were deleted.
    expect(calls[1]?.batch).toContain(`:${P}-L10901 - [0:0]\n`);
    expect([...tables.iptables.chains]).toEqual([`${P}-IN`, `${P}-OUT`, `${P}-P10902`]);
  });

  it('leaves a limit chain that is in force alone, so that its count of open connections survives', async () => {
    const { run, calls, tables } = fakeIptables();
    const hostFirewall = firewall(run);
    const limited = { port: 10901, allowedClients: ['10.254.3.0/30'], maxConnections: 1 };
    await hostFirewall.apply([limited]);
    const limitRule = tables.iptables.rules.get(`${P}-L10901`);
    expect(limitRule).toHaveLength(1);

    calls.length = 0;
    await hostFirewall.apply([limited, { port: 10902, allowedClients: [], maxConnections: 2 }]);
    const batch = calls[1]?.batch ?? '';
    expect(batch).not.toContain(`${P}-L10901 `);
    expect(batch).toContain(`-A ${P}-P10901 -s 10.254.3.0/30 -g ${P}-L10901\n`);
    expect(batch).toContain(`:${P}-L10902 - [0:0]\n`);
    expect(tables.iptables.rules.get(`${P}-L10901`)).toBe(limitRule);

    // Another limit is another rule: written anew.
    calls.length = 0;
    await hostFirewall.apply([{ ...limited, maxConnections: 3 }]);
    expect(calls[1]?.batch).toContain(`:${P}-L10901 - [0:0]\n`);
    expect(tables.iptables.rules.get(`${P}-L10901`)?.[0]).toContain('--connlimit-above 3 ');
  });

  it('apply([]) and remove() take everything of ours out, and do nothing when nothing is there', async () => {
    const { run, calls, tables } = fakeIptables();
    const hostFirewall = firewall(run);
    await hostFirewall.apply([{ port: 10901, allowedClients: [] }]);
    tables.iptables.hooks.OUTPUT.push(`-j ${P}-OUT`); // a second copy
    calls.length = 0;
    await hostFirewall.apply([]);
    expect(calls[1]?.batch).toContain(`-D OUTPUT -j ${P}-OUT\n-D OUTPUT -j ${P}-OUT\n-X ${P}-IN\n`);
    for (const table of [tables.iptables, tables.ip6tables]) {
      expect([...table.chains]).toEqual([]);
      expect(table.hooks).toEqual({ INPUT: ['-j KUBE-FIREWALL'], OUTPUT: [] });
    }
    calls.length = 0;
    await hostFirewall.remove();
    expect(calls.map((call) => call.command)).toEqual(['iptables', 'ip6tables']);
  });

  it('refuses invalid rules before running anything', async () => {
    const { run, calls } = fakeIptables();
    await expect(firewall(run).apply([{ port: 0, allowedClients: [] }])).rejects.toThrow(TypeError);
    await expect(firewall(run).apply([{ port: 1, allowedClients: ['10.0.0.1; reboot'] }])).rejects.toThrow(
      /not an IPv4 or IPv6 address/,
    );
    expect(calls).toEqual([]);
    expect(() => new HostFirewall({ stateDir: STATE_DIR, exemptGid: 0, logger: pino() })).toThrow(TypeError);
  });

  it('runs one apply or removal at a time, in the order asked for', async () => {
    const { run: fast, calls } = fakeIptables();
    const slow: CommandRunner = async (command, args, options) => {
      await new Promise((resolve) => setTimeout(resolve, 2));
      return fast(command, args, options);
    };
    const hostFirewall = firewall(slow);
    await Promise.all([
      hostFirewall.apply([{ port: 10901, allowedClients: [] }]),
      hostFirewall.remove(),
      hostFirewall.apply([{ port: 10902, allowedClients: [] }]),
    ]);
    const batches = calls
      .filter((call) => call.command === 'iptables-restore')
      .map((call) => call.batch ?? '');
    expect(batches.map((batch) => (/-X /.test(batch) ? 'remove' : /P1090\d/.exec(batch)?.[0]))).toEqual([
      'P10901',
      undefined, // the jumps
      'remove',
      'P10902',
      undefined,
    ]);
  });

  it('logs each apply with its family and ports', async () => {
    const { logger, records } = capturedLogger();
    await firewall(fakeIptables().run, logger).apply([
      { port: 10903, allowedClients: [] },
      { port: 10901, allowedClients: [] },
    ]);
    const applied = records.filter((record) => record.msg === 'host firewall client rules applied');
    expect(applied.map(({ family, ports, level }) => ({ family, ports, level }))).toEqual([
      { family: 'ipv4', ports: [10901, 10903], level: 30 },
      { family: 'ipv6', ports: [10901, 10903], level: 30 },
    ]);
  });

  it('a failed batch: the error names the command, its stderr and the line it failed on', async () => {
    const { run } = fakeIptables({
      answer: (call) =>
        call.command === 'ip6tables-restore'
          ? {
              exitCode: 2,
              stdout: '',
              stderr: 'ip6tables-restore: line 6 failed: No chain/target/match by that name.',
            }
          : undefined,
    });
    const error = await firewall(run)
      .apply([{ port: 10901, allowedClients: [], maxConnections: 2 }])
      .catch((caught: unknown) => caught);
    expect(error).toBeInstanceOf(FirewallCommandError);
    expect((error as FirewallCommandError).command).toBe('ip6tables-restore');
    expect((error as Error).message).toMatch(
      /^ip6tables-restore -w 15 --noflush \/\S+batch\.rules: ip6tables-restore: line 6 failed: No chain\/target\/match by that name\. \(line 6 of the batch: -A NBDX-[0-9a-f]{8}-IN -i lo -j RETURN\)$/,
    );
  });

  it('a batch the kernel refuses (nf_tables words it differently, on two lines): one line, naming the line of the batch', async () => {
    const stderr =
      'iptables-restore v1.8.9 (nf_tables): \nline 5: RULE_APPEND failed (Invalid argument): rule in chain X\n';
    const { run } = fakeIptables({
      answer: (call) =>
        call.command === 'iptables-restore' ? { exitCode: 4, stdout: '', stderr } : undefined,
    });
    await expect(firewall(run).apply([{ port: 10901, allowedClients: [] }])).rejects.toThrow(
      /: iptables-restore v1\.8\.9 \(nf_tables\): line 5: RULE_APPEND failed \(Invalid argument\): rule in chain X \(line 5 of the batch: -A NBDX-[0-9a-f]{8}-IN -i lo -j RETURN\)$/,
    );
  });

  it('a restore that reports success and changes nothing is an error, not a silent pass', async () => {
    const { run } = fakeIptables({
      answer: (call) => (call.command === 'iptables-restore' ? ok() : undefined),
    });
    await expect(firewall(run).apply([{ port: 10901, allowedClients: [] }])).rejects.toThrow(
      /^iptables-restore reported success, but iptables -S shows chains \[\] where \[NBDX-[0-9a-f]{8}-IN, .*P10901\] were expected/,
    );
  });

  it('a missing program and a deadline are said so', async () => {
    const missing = Object.assign(new Error('spawn iptables ENOENT'), { code: 'ENOENT' });
    const { run } = fakeIptables({
      answer: () => ({ exitCode: undefined, stdout: '', stderr: '', spawnError: missing }),
    });
    await expect(firewall(run).remove()).rejects.toThrow(
      'iptables is not installed or not on PATH (Debian: iptables)',
    );
    const { run: hung } = fakeIptables({
      answer: () => ({
        exitCode: undefined,
        stdout: '',
        stderr: '',
        timedOut: { afterMs: 30_000, lastSignal: 'SIGTERM' },
      }),
    });
    await expect(firewall(hung).remove()).rejects.toThrow(
      'iptables -w 15 -S: timed out after 30000 ms (killed with SIGTERM)',
    );
  });
});

describe('HostFirewall.check', () => {
  it('is undefined when all four tools answer; the restore tools only parse (--test)', async () => {
    const { run, calls } = fakeIptables();
    expect(await HostFirewall.check(run)).toBeUndefined();
    expect(calls.map(commandLine).map((line) => line.replace(/\/\S+$/, '<file>'))).toEqual([
      'iptables -w 15 -S OUTPUT',
      'iptables-restore -w 15 --noflush --test <file>',
      'ip6tables -w 15 -S OUTPUT',
      'ip6tables-restore -w 15 --noflush --test <file>',
    ]);
  });

  it('says why not: not root, or a tool missing', async () => {
    const notRoot = fakeIptables({
      answer: (call) =>
        call.command === 'iptables'
          ? {
              exitCode: 4,
              stdout: '',
              stderr:
                'iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)\n',
            }
          : undefined,
    });
    expect(await HostFirewall.check(notRoot.run)).toBe(
      'iptables -w 15 -S OUTPUT: iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)',
    );
    const noRestore6 = fakeIptables({
      answer: (call) =>
        call.command === 'ip6tables-restore'
          ? {
              exitCode: undefined,
              stdout: '',
              stderr: '',
              spawnError: Object.assign(new Error(), { code: 'ENOENT' }),
            }
          : undefined,
    });
    expect(await HostFirewall.check(noRestore6.run)).toMatch(
      /^ip6tables-restore is not installed or not on PATH \(Debian: iptables\)$/,
    );
  });
});
