/**
 * Puts the client rules of client-rules.ts into the kernel firewall with iptables and
 * ip6tables, and takes them out again. Every batch goes through iptables-restore, which
 * commits it at once: a client never meets half a rule set.
 *
 * iptables-restore reads the batch from a file here (run-command.ts gives a program no
 * stdin), and gets its lock wait as `-w <seconds>`: a bare `-w` takes the next argument as
 * its value, so `-w <file>` swallows the file, reads an empty stdin, changes nothing and
 * exits 0 (iptables 1.8.9). Each change is also checked in a fresh listing afterwards.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { SerialLock } from '../../shared/serial-lock.js';
import { CommandError, failureMessage } from '../process/command-error.js';
import { runCommand, type CommandResult, type CommandRunner } from '../process/run-command.js';
import {
  chainNamesFor,
  chainPrefixFor,
  chainsIn,
  exemptGidProblem,
  inputChain,
  jumpsIn,
  limitChainsInForce,
  outputChain,
  renderClientRules,
  renderJumpRepair,
  renderRemoval,
  type IpFamily,
  type PortClientRule,
} from './client-rules.js';

export interface HostFirewallOptions {
  /** The controller's state directory: it names our chains (chainPrefixFor); nothing is written there. */
  stateDir: string;
  /** The supplementary group that lets a root process of this host past the rules: the controller's own probe. */
  exemptGid: number;
  logger: Logger;
  /** Runs iptables and its companions. Default: runCommand. */
  runner?: CommandRunner;
  /** Deadline of each command. Default DEFAULT_FIREWALL_TIMEOUT_MS. */
  timeoutMs?: number;
}

export const DEFAULT_FIREWALL_TIMEOUT_MS = 30_000;

interface FamilyTools {
  family: IpFamily;
  /** Lists and changes single rules and chains. */
  tables: string;
  /** Commits a batch at once. */
  restore: string;
}

const FAMILIES: readonly FamilyTools[] = [
  { family: 'ipv4', tables: 'iptables', restore: 'iptables-restore' },
  { family: 'ipv6', tables: 'ip6tables', restore: 'ip6tables-restore' },
];

/** An iptables command failed; the message names the command, what it printed and the failed line of a batch. */
export class FirewallCommandError extends CommandError {
  override name = 'FirewallCommandError';

  constructor(
    command: string,
    args: readonly string[],
    result: CommandResult,
    options: { batch?: string } = {},
  ) {
    super(command, args, result.exitCode, result.stderr, {
      cause: result.spawnError,
      message: `${failureMessage(command, args, result, 'iptables')}${failedLineOf(result.stderr, options.batch)}`,
    });
  }
}

/** iptables-restore names the failed line of its batch; the batch itself is gone once it fails. */
function failedLineOf(stderr: string, batch: string | undefined): string {
  // "line 6 failed: ..." or "line 6: RULE_APPEND failed (...)", depending on where it failed.
  const number = /line (\d+)(?: failed|:)/.exec(stderr)?.[1];
  const line = number === undefined ? undefined : batch?.split('\n')[Number(number) - 1];
  return line === undefined ? '' : ` (line ${number} of the batch: ${line})`;
}

export class HostFirewall {
  /** Every chain of this controller starts with it and a "-". */
  readonly chainPrefix: string;
  readonly #exemptGid: number;
  readonly #logger: Logger;
  readonly #run: CommandRunner;
  readonly #timeoutMs: number;
  /** Applies and removals never interleave: each reads the tables, then changes them. */
  readonly #lock = new SerialLock();

  constructor(options: HostFirewallOptions) {
    const { exemptGid, timeoutMs = DEFAULT_FIREWALL_TIMEOUT_MS } = options;
    const gidProblem = exemptGidProblem(exemptGid);
    if (gidProblem !== undefined) throw new TypeError(gidProblem);
    if (!(timeoutMs >= 1000))
      throw new TypeError(`timeoutMs must be at least 1000, got ${String(timeoutMs)}`);
    this.chainPrefix = chainPrefixFor(options.stateDir);
    this.#exemptGid = exemptGid;
    this.#logger = options.logger.child({ component: 'host-firewall' });
    this.#run = options.runner ?? runCommand;
    this.#timeoutMs = timeoutMs;
  }

  /**
   * Makes the kernel enforce exactly `rules`, in both families: the ports named get their
   * rules, any other port of ours loses its own. Idempotent; an empty list removes everything.
   * Invalid rules are refused with a TypeError before anything changes.
   */
  async apply(rules: readonly PortClientRule[]): Promise<void> {
    const used = chainNamesFor(rules, this.chainPrefix);
    return this.#lock.run(async () => {
      if (rules.length === 0) return this.#remove();
      for (const tools of FAMILIES) await this.#apply(tools, rules, used);
    });
  }

  /** Deletes our jumps (every copy) and chains, in both families. Idempotent. */
  remove(): Promise<void> {
    return this.#lock.run(() => this.#remove());
  }

  /**
   * Undefined when iptables, ip6tables and their restore tools can be used here; otherwise a
   * line saying why not (not installed, not root), for an operator.
   */
  static async check(runner: CommandRunner = runCommand): Promise<string | undefined> {
    const run = async (command: string, args: readonly string[]) => {
      const result = await runner(command, args, { timeoutMs: DEFAULT_FIREWALL_TIMEOUT_MS });
      return result.exitCode === 0 ? undefined : new FirewallCommandError(command, args, result).message;
    };
    const lockWait = lockWaitSecondsFor(DEFAULT_FIREWALL_TIMEOUT_MS);
    for (const { tables, restore } of FAMILIES) {
      const listed = await run(tables, ['-w', lockWait, '-S', 'OUTPUT']);
      if (listed !== undefined) return listed;
      // --test parses the batch and commits nothing, but still needs the rights a commit does.
      const restored = await withBatchFile('*filter\nCOMMIT\n', (file) =>
        run(restore, ['-w', lockWait, '--noflush', '--test', file]),
      );
      if (restored !== undefined) return restored;
    }
    return undefined;
  }

  async #apply(tools: FamilyTools, rules: readonly PortClientRule[], used: readonly string[]): Promise<void> {
    const { family } = tools;
    const before = await this.#list(tools);
    const stale = chainsIn(before, this.chainPrefix).filter((chain) => !used.includes(chain));
    const batch = renderClientRules(family, rules, {
      chainPrefix: this.chainPrefix,
      exemptGid: this.#exemptGid,
      staleChains: stale,
      keptChains: limitChainsInForce(before, rules, this.chainPrefix),
    });
    await this.#restore(tools, batch);
    // The chains exist now, so the jumps to them can be put in place.
    const repair = renderJumpRepair(before, this.chainPrefix);
    if (repair !== undefined) await this.#restore(tools, repair);
    // Nothing references the stale chains any more: the batch emptied them and all of ours.
    for (const chain of stale) await this.#tables(tools, ['-X', chain]);

    const after = await this.#list(tools);
    const present = chainsIn(after, this.chainPrefix);
    const expected = (chain: string) => used.includes(chain);
    if (present.length !== used.length || !present.every(expected) || !this.#hasOneJumpEach(after))
      throw new Error(
        `${tools.restore} reported success, but ${tools.tables} -S shows chains [${present.join(', ')}] ` +
          `where [${used.join(', ')}] were expected, each of INPUT and OUTPUT jumping to ours once`,
      );
    this.#logger.info(
      { family, ports: rules.map((rule) => rule.port).sort((a, b) => a - b), removedChains: stale },
      'host firewall client rules applied',
    );
  }

  async #remove(): Promise<void> {
    for (const tools of FAMILIES) {
      const before = await this.#list(tools);
      const removal = renderRemoval(before, this.chainPrefix);
      if (removal === undefined) continue;
      await this.#restore(tools, removal);
      const after = await this.#list(tools);
      const left = chainsIn(after, this.chainPrefix);
      if (left.length > 0 || this.#jumpCount(after) > 0)
        throw new Error(
          `${tools.restore} reported success, but ${tools.tables} -S still shows ` +
            `chains [${left.join(', ')}] or jumps of ours`,
        );
      this.#logger.info(
        { family: tools.family, removedChains: chainsIn(before, this.chainPrefix) },
        'host firewall client rules removed',
      );
    }
  }

  #hasOneJumpEach(listing: string): boolean {
    return (
      jumpsIn(listing, 'INPUT', inputChain(this.chainPrefix)).copies === 1 &&
      jumpsIn(listing, 'OUTPUT', outputChain(this.chainPrefix)).copies === 1
    );
  }

  #jumpCount(listing: string): number {
    return (
      jumpsIn(listing, 'INPUT', inputChain(this.chainPrefix)).copies +
      jumpsIn(listing, 'OUTPUT', outputChain(this.chainPrefix)).copies
    );
  }

  /** The whole filter table as `-S` prints it: chain declarations and rules. */
  #list(tools: FamilyTools): Promise<string> {
    return this.#tables(tools, ['-S']);
  }

  async #tables(tools: FamilyTools, args: readonly string[]): Promise<string> {
    const fullArgs = ['-w', lockWaitSecondsFor(this.#timeoutMs), ...args];
    const result = await this.#run(tools.tables, fullArgs, { timeoutMs: this.#timeoutMs });
    if (result.exitCode !== 0) throw new FirewallCommandError(tools.tables, fullArgs, result);
    return result.stdout;
  }

  async #restore(tools: FamilyTools, batch: string): Promise<void> {
    await withBatchFile(batch, async (file) => {
      const args = ['-w', lockWaitSecondsFor(this.#timeoutMs), '--noflush', file];
      const result = await this.#run(tools.restore, args, { timeoutMs: this.#timeoutMs });
      if (result.exitCode !== 0) throw new FirewallCommandError(tools.restore, args, result, { batch });
    });
  }
}

/**
 * How long iptables may wait for the xtables lock (another program changing the tables): half
 * the command's deadline, so that a wait that gives up is reported as such, not as a timeout.
 */
function lockWaitSecondsFor(timeoutMs: number): string {
  return String(Math.max(1, Math.floor(timeoutMs / 2000)));
}

/** Writes `batch` to a file of a private temporary directory for `use`, and removes it after. */
async function withBatchFile<T>(batch: string, use: (file: string) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), 'nbdx-firewall-'));
  try {
    const file = join(dir, 'batch.rules');
    await writeFile(file, batch, { mode: 0o600 });
    return await use(file);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
