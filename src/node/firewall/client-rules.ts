/**
 * Who may connect to a TCP port of this host, as kernel firewall rules: an export served by a
 * qemu-storage-daemon of its own listens on a port of its own, and QEMU's NBD server can
 * neither filter clients by address nor count them. Pure: this module writes
 * iptables-restore batches and reads `iptables -S` listings; host-firewall.ts runs them.
 *
 * The layout, the same in both families, every chain named from one prefix <p> per controller:
 *
 *   INPUT  -j <p>-IN   -i lo -j RETURN
 *                      per port: -p tcp --dport P --syn -j <p>-P<port>
 *   OUTPUT -j <p>-OUT  per port: -o lo -p tcp --dport P --syn -m owner --uid-owner 0
 *                                   --gid-owner G --suppl-groups -j RETURN
 *                               -o lo -p tcp --dport P --syn -j <p>-P<port>
 *   <p>-P<port>        per allowed CIDR of the family: -s CIDR -g <p>-L<port>  (-j RETURN: no limit)
 *                      -p tcp -j REJECT --reject-with tcp-reset  (not when any address may connect)
 *   <p>-L<port>        -p tcp -m connlimit --connlimit-above N --connlimit-mask 0
 *                         -j REJECT --reject-with tcp-reset
 *
 * A connection from this host to any of its own addresses passes OUTPUT, where the socket's
 * owner is known, and then INPUT on lo, where it is not: it is judged once, in OUTPUT, so that
 * the controller's own probe (a root process with group G among its supplementary groups)
 * gets in unlisted and uncounted. A client's address is its source address: a local client
 * connecting to one of this host's addresses comes from that address.
 *
 * connlimit counts the connections its own rule has seen. So the remote and the local path of
 * a port end in the port's one <p>-L<port> chain; a limit chain already in force is left as
 * it is when the rules are applied again (limitChainsInForce), since a rule written anew starts
 * from zero; and iptables and ip6tables count apart: a port that admits both families admits
 * maxConnections of each.
 *
 * Our chains never ACCEPT: they refuse or hand the packet back, so they can only narrow what
 * the rest of the host's firewall lets in, never widen it. Only the first packet (--syn) of a
 * connection is judged: a connection already open outlives a narrower rule set.
 */
import { createHash } from 'node:crypto';
import { isIPv4 } from 'node:net';
import { cidrProblem } from '../../api/cidr.js';

export type IpFamily = 'ipv4' | 'ipv6';

/** Who may connect to one port. */
export interface PortClientRule {
  port: number;
  /** CIDRs or single addresses, IPv4 and IPv6 mixed; empty: any address. */
  allowedClients: readonly string[];
  /**
   * Connections open at once on the port, from all clients of one family together (IPv4 and
   * IPv6 are counted apart); undefined: no limit.
   */
  maxConnections?: number;
}

export interface RenderOptions {
  /** From chainPrefixFor: every chain we create starts with it and a "-". */
  chainPrefix: string;
  /** The supplementary group that lets a root process of this host past the rules. */
  exemptGid: number;
  /** Our chains from an earlier apply that this rule set no longer uses (flushed here, deleted after). */
  staleChains: readonly string[];
  /**
   * Limit chains that hold exactly the rule this set needs already (limitChainsInForce): left
   * alone, so that the connections they count stay counted. Default none.
   */
  keptChains?: readonly string[];
}

/** The kernel's limit on a chain name (XT_EXTENSION_MAXNAMELEN - 1). */
export const MAX_CHAIN_NAME_LENGTH = 28;
/** The longest suffix we append to the prefix: "-P65535" / "-L65535". */
const LONGEST_SUFFIX_LENGTH = '-P65535'.length;
const CHAIN_PREFIX = new RegExp(
  `^[A-Za-z0-9][A-Za-z0-9_-]{0,${MAX_CHAIN_NAME_LENGTH - LONGEST_SUFFIX_LENGTH - 1}}$`,
);
const CHAIN_NAME = /^[A-Za-z0-9][A-Za-z0-9_-]*$/;
/** 2^32 - 1 is the kernel's "no group". */
const MAX_GID = 4_294_967_294;
/**
 * The kernel accepts a tcp-reset only in a rule that itself matches TCP (EINVAL otherwise),
 * though every path into our chains does: hence `-p tcp` again.
 */
const REFUSE = '-p tcp -j REJECT --reject-with tcp-reset';

/**
 * `NBDX-` and 8 hex digits of the SHA-256 of the state directory's path (as given: the
 * controller passes its absolute path), so that several controllers on one host (the tests
 * start several) never touch each other's chains.
 */
export function chainPrefixFor(stateDir: string): string {
  return `NBDX-${createHash('sha256').update(stateDir).digest('hex').slice(0, 8)}`;
}

/** The chain INPUT jumps to. */
export function inputChain(chainPrefix: string): string {
  return `${chainPrefix}-IN`;
}

/** The chain OUTPUT jumps to. */
export function outputChain(chainPrefix: string): string {
  return `${chainPrefix}-OUT`;
}

function portChain(chainPrefix: string, port: number): string {
  return `${chainPrefix}-P${port}`;
}

function limitChain(chainPrefix: string, port: number): string {
  return `${chainPrefix}-L${port}`;
}

/**
 * The chains a rule set uses, the same in both families (a port whose CIDRs are all of the
 * other family still has its chain: it refuses everyone). Throws a TypeError for invalid
 * rules, so a caller can refuse them before it changes anything.
 */
export function chainNamesFor(rules: readonly PortClientRule[], chainPrefix: string): string[] {
  checkChainPrefix(chainPrefix);
  const names = [inputChain(chainPrefix), outputChain(chainPrefix)];
  for (const rule of sortedRules(rules)) {
    names.push(portChain(chainPrefix, rule.port));
    if (rule.maxConnections !== undefined) names.push(limitChain(chainPrefix, rule.port));
  }
  return names;
}

/**
 * The iptables-restore input (filter table, for `--noflush`) that replaces all our chains of
 * one family with the ones `rules` need; declaring a chain creates it or empties it. Jumps
 * from INPUT and OUTPUT are not part of it (renderJumpRepair). Throws a TypeError for
 * anything that is not a valid rule: the text is fed to a tool running as root.
 */
export function renderClientRules(
  family: IpFamily,
  rules: readonly PortClientRule[],
  options: RenderOptions,
): string {
  const { chainPrefix, exemptGid, staleChains, keptChains = [] } = options;
  const used = chainNamesFor(rules, chainPrefix);
  const ordered = sortedRules(rules);
  const gidProblem = exemptGidProblem(exemptGid);
  if (gidProblem !== undefined) throw new TypeError(gidProblem);
  for (const stale of staleChains) {
    if (!isOurChainName(stale, chainPrefix))
      throw new TypeError(`stale chain "${stale}" is not a chain name starting with "${chainPrefix}-"`);
    if (used.includes(stale)) throw new TypeError(`stale chain "${stale}" is used by the rule set`);
  }
  const limitChains = ordered
    .filter((rule) => rule.maxConnections !== undefined)
    .map((rule) => limitChain(chainPrefix, rule.port));
  for (const kept of keptChains) {
    if (!limitChains.includes(kept))
      throw new TypeError(`kept chain "${kept}" is not a limit chain of the rule set`);
  }

  const IN = inputChain(chainPrefix);
  const OUT = outputChain(chainPrefix);
  const declared = [...used.filter((chain) => !keptChains.includes(chain)), ...new Set(staleChains)];
  const lines = ['*filter', ...declared.map((chain) => `:${chain} - [0:0]`)];
  // Local connections are judged in OUTPUT, where their owner is known.
  lines.push(`-A ${IN} -i lo -j RETURN`);
  for (const rule of ordered) {
    const syn = `-p tcp --dport ${rule.port} --syn`;
    const P = portChain(chainPrefix, rule.port);
    lines.push(`-A ${IN} ${syn} -j ${P}`);
    lines.push(
      `-A ${OUT} -o lo ${syn} -m owner --uid-owner 0 --gid-owner ${exemptGid} --suppl-groups -j RETURN`,
      `-A ${OUT} -o lo ${syn} -j ${P}`,
    );
  }
  for (const rule of ordered) {
    const P = portChain(chainPrefix, rule.port);
    // -g: a client within the limit returns from <p>-L to whatever jumped to <p>-P.
    const pass = rule.maxConnections === undefined ? '-j RETURN' : `-g ${limitChain(chainPrefix, rule.port)}`;
    if (rule.allowedClients.length === 0) {
      lines.push(`-A ${P} ${pass}`);
    } else {
      for (const cidr of new Set(rule.allowedClients)) {
        if (familyOf(cidr) === family) lines.push(`-A ${P} -s ${cidr} ${pass}`);
      }
      lines.push(`-A ${P} ${REFUSE}`);
    }
    const L = limitChain(chainPrefix, rule.port);
    if (rule.maxConnections !== undefined && !keptChains.includes(L))
      lines.push(`-A ${L} ${limitRule(rule.maxConnections)}`);
  }
  lines.push('COMMIT');
  return `${lines.join('\n')}\n`;
}

/**
 * Why a group cannot be the exempt group, or undefined. Group 0 would exempt every root
 * process (each has it), so the rules would bind only unprivileged clients.
 */
export function exemptGidProblem(gid: number): string | undefined {
  return Number.isInteger(gid) && gid >= 1 && gid <= MAX_GID
    ? undefined
    : `exemptGid must be an integer in 1..${MAX_GID} (0 would exempt every root process), got ${String(gid)}`;
}

/**
 * The limit chains of `rules` that an `iptables -S` listing shows with exactly the rule they
 * need. connlimit counts the connections its own rule has seen: a rule written again starts
 * from zero, and a port with its one slot taken would let the next client in after any apply.
 * These chains are kept as they are (RenderOptions.keptChains). A port whose maxConnections
 * changes gets a new rule, which does not count the connections open then.
 */
export function limitChainsInForce(
  listing: string,
  rules: readonly PortClientRule[],
  chainPrefix: string,
): string[] {
  checkChainPrefix(chainPrefix);
  const kept: string[] = [];
  for (const rule of sortedRules(rules)) {
    if (rule.maxConnections === undefined) continue;
    const chain = limitChain(chainPrefix, rule.port);
    const wanted = `-A ${chain} ${limitRule(rule.maxConnections)}`;
    const present = rulesOf(listing, chain).map((line) => line.replace(' --connlimit-saddr', ''));
    if (chainsIn(listing, chainPrefix).includes(chain) && present.length === 1 && present[0] === wanted)
      kept.push(chain);
  }
  return kept;
}

/** The chain names starting with `${prefix}-` declared (`-N NAME`) in `iptables -S` output. */
export function chainsIn(listing: string, prefix: string): string[] {
  const chains: string[] = [];
  for (const line of listing.split('\n')) {
    const match = /^-N (\S+)$/.exec(line.trim());
    if (match?.[1] !== undefined && match[1].startsWith(`${prefix}-`)) chains.push(match[1]);
  }
  return chains;
}

/**
 * An iptables-restore batch that leaves exactly one jump to our chain at the top of INPUT and
 * of OUTPUT (before any rule that might ACCEPT a client we would refuse), judged from an
 * `iptables -S` listing; undefined when they are there already. Copies are deleted by their
 * rule, not their number, and the new jump inserted in the same commit: there is no moment
 * without one, and a rule another program inserts meanwhile is not hit.
 */
export function renderJumpRepair(listing: string, chainPrefix: string): string | undefined {
  checkChainPrefix(chainPrefix);
  const lines: string[] = [];
  for (const [hook, target] of jumpTargets(chainPrefix)) {
    const { copies, first } = jumpsIn(listing, hook, target);
    if (copies === 1 && first) continue;
    for (let copy = 0; copy < copies; copy++) lines.push(`-D ${hook} -j ${target}`);
    lines.push(`-I ${hook} 1 -j ${target}`);
  }
  return lines.length === 0 ? undefined : ['*filter', ...lines, 'COMMIT', ''].join('\n');
}

/**
 * An iptables-restore batch that deletes our jumps (every copy) and all our chains, judged
 * from an `iptables -S` listing; undefined when nothing of ours is there. The chains are
 * emptied first, since a chain still referenced by one of ours cannot be deleted.
 */
export function renderRemoval(listing: string, chainPrefix: string): string | undefined {
  checkChainPrefix(chainPrefix);
  const chains = chainsIn(listing, chainPrefix);
  const lines = chains.map((chain) => `:${chain} - [0:0]`);
  for (const [hook, target] of jumpTargets(chainPrefix)) {
    const { copies } = jumpsIn(listing, hook, target);
    for (let copy = 0; copy < copies; copy++) lines.push(`-D ${hook} -j ${target}`);
  }
  if (lines.length === 0) return undefined;
  lines.push(...chains.map((chain) => `-X ${chain}`));
  return ['*filter', ...lines, 'COMMIT', ''].join('\n');
}

/** How many `-A <hook> -j <target>` rules the listing has, and whether the hook's first rule is one. */
export function jumpsIn(listing: string, hook: string, target: string): { copies: number; first: boolean } {
  const jump = `-A ${hook} -j ${target}`;
  const hookRules = rulesOf(listing, hook);
  return { copies: hookRules.filter((line) => line === jump).length, first: hookRules[0] === jump };
}

/** The `-A <chain> ...` lines of a listing, in order. */
function rulesOf(listing: string, chain: string): string[] {
  return listing
    .split('\n')
    .map((line) => line.trim())
    .filter((line) => line.startsWith(`-A ${chain} `));
}

/**
 * Refuses the connection beyond the limit; mask 0 (a prefix length, valid in both families)
 * counts every source together. Written as `iptables -S` prints it, but for the default
 * --connlimit-saddr, so that limitChainsInForce can recognise it.
 */
function limitRule(maxConnections: number): string {
  return `-p tcp -m connlimit --connlimit-above ${maxConnections} --connlimit-mask 0 -j REJECT --reject-with tcp-reset`;
}

function jumpTargets(chainPrefix: string): Array<[hook: 'INPUT' | 'OUTPUT', target: string]> {
  return [
    ['INPUT', inputChain(chainPrefix)],
    ['OUTPUT', outputChain(chainPrefix)],
  ];
}

function isOurChainName(name: string, chainPrefix: string): boolean {
  return name.startsWith(`${chainPrefix}-`) && name.length <= MAX_CHAIN_NAME_LENGTH && CHAIN_NAME.test(name);
}

function checkChainPrefix(chainPrefix: string): void {
  if (!CHAIN_PREFIX.test(chainPrefix))
    throw new TypeError(
      `chain prefix "${chainPrefix}" must be letters, digits, "_" or "-", at most ${MAX_CHAIN_NAME_LENGTH - LONGEST_SUFFIX_LENGTH} characters`,
    );
}

/** The rules checked and ordered by port, so that the same rule set always renders the same text. */
function sortedRules(rules: readonly PortClientRule[]): PortClientRule[] {
  const ports = new Set<number>();
  for (const rule of rules) {
    checkRule(rule);
    if (ports.has(rule.port)) throw new TypeError(`port ${rule.port} has more than one rule`);
    ports.add(rule.port);
  }
  return [...rules].sort((a, b) => a.port - b.port);
}

function checkRule(rule: PortClientRule): void {
  if (typeof rule !== 'object' || rule === null)
    throw new TypeError(`a rule must be an object, got ${String(rule)}`);
  const { port, allowedClients, maxConnections } = rule;
  if (!Number.isInteger(port) || port < 1 || port > 65_535)
    throw new TypeError(`port must be an integer in 1..65535, got ${String(port)}`);
  if (maxConnections !== undefined && (!Number.isInteger(maxConnections) || maxConnections < 1))
    throw new TypeError(
      `maxConnections of port ${port} must be an integer >= 1, got ${String(maxConnections)}`,
    );
  if (!Array.isArray(allowedClients))
    throw new TypeError(`allowedClients of port ${port} must be an array, got ${String(allowedClients)}`);
  for (const cidr of allowedClients as readonly unknown[]) {
    const problem = typeof cidr === 'string' ? cidrProblem(cidr) : `${String(cidr)} is not a string`;
    if (problem !== undefined) throw new TypeError(`allowedClients of port ${port}: ${problem}`);
  }
}

function familyOf(cidr: string): IpFamily {
  return isIPv4(cidr.split('/')[0] ?? '') ? 'ipv4' : 'ipv6';
}
