/**
 * The iptables-restore batches of the host firewall, as text: the layout, the families, the
 * exempt rule, stale chains, and the input refused before it reaches a tool running as root.
 * test/integration/host-firewall.test.ts feeds them to the real iptables.
 */
import { describe, expect, it } from 'vitest';
import {
  chainNamesFor,
  chainPrefixFor,
  chainsIn,
  exemptGidProblem,
  jumpsIn,
  limitChainsInForce,
  MAX_CHAIN_NAME_LENGTH,
  renderClientRules,
  renderJumpRepair,
  renderRemoval,
  type PortClientRule,
} from '../../../../src/node/firewall/client-rules.js';

const P = 'NBDX-0123abcd';
const options = { chainPrefix: P, exemptGid: 4242, staleChains: [] };
const lines = (text: string) => text.trimEnd().split('\n');

describe('chainPrefixFor', () => {
  it('is NBDX- and the first 8 hex digits of the SHA-256 of the path', () => {
    // printf %s /var/lib/nbd-export-controller | sha256sum
    expect(chainPrefixFor('/var/lib/nbd-export-controller')).toBe('NBDX-4b0a4e96');
    expect(chainPrefixFor('/tmp/a')).toMatch(/^NBDX-[0-9a-f]{8}$/);
    expect(chainPrefixFor('/tmp/a')).not.toBe(chainPrefixFor('/tmp/b'));
  });
});

describe('renderClientRules', () => {
  it('with no rules: only the two entry chains, and INPUT hands loopback to OUTPUT', () => {
    expect(lines(renderClientRules('ipv4', [], options))).toEqual([
      '*filter',
      `:${P}-IN - [0:0]`,
      `:${P}-OUT - [0:0]`,
      `-A ${P}-IN -i lo -j RETURN`,
      'COMMIT',
    ]);
  });

  it('one port with CIDRs and a limit: the whole layout', () => {
    const rules = [{ port: 10901, allowedClients: ['10.254.3.0/30', '198.51.100.7'], maxConnections: 2 }];
    expect(lines(renderClientRules('ipv4', rules, options))).toEqual([
      '*filter',
      `:${P}-IN - [0:0]`,
      `:${P}-OUT - [0:0]`,
      `:${P}-P10901 - [0:0]`,
      `:${P}-L10901 - [0:0]`,
      `-A ${P}-IN -i lo -j RETURN`,
      `-A ${P}-IN -p tcp --dport 10901 --syn -j ${P}-P10901`,
      `-A ${P}-OUT -o lo -p tcp --dport 10901 --syn -m owner --uid-owner 0 --gid-owner 4242 --suppl-groups -j RETURN`,
      `-A ${P}-OUT -o lo -p tcp --dport 10901 --syn -j ${P}-P10901`,
      `-A ${P}-P10901 -s 10.254.3.0/30 -g ${P}-L10901`,
      `-A ${P}-P10901 -s 198.51.100.7 -g ${P}-L10901`,
      `-A ${P}-P10901 -p tcp -j REJECT --reject-with tcp-reset`,
      `-A ${P}-L10901 -p tcp -m connlimit --connlimit-above 2 --connlimit-mask 0 -j REJECT --reject-with tcp-reset`,
      'COMMIT',
    ]);
  });

  it('without a limit an allowed client returns, and no limit chain exists', () => {
    const text = renderClientRules('ipv4', [{ port: 10902, allowedClients: ['10.254.3.0/30'] }], options);
    expect(text).toContain(`-A ${P}-P10902 -s 10.254.3.0/30 -j RETURN\n-A ${P}-P10902 -p tcp -j REJECT`);
    expect(text).not.toContain('-L10902');
    expect(text).not.toContain('connlimit');
  });

  it('an empty allowedClients lets any address on to the limit, and refuses nobody by address', () => {
    const limited = renderClientRules(
      'ipv4',
      [{ port: 10903, allowedClients: [], maxConnections: 1 }],
      options,
    );
    expect(lines(limited).filter((line) => line.startsWith(`-A ${P}-P10903 `))).toEqual([
      `-A ${P}-P10903 -g ${P}-L10903`,
    ]);
    const open = renderClientRules('ipv6', [{ port: 10903, allowedClients: [] }], options);
    expect(lines(open).filter((line) => line.startsWith(`-A ${P}-P10903 `))).toEqual([
      `-A ${P}-P10903 -j RETURN`,
    ]);
  });

  it('each family gets the CIDRs of its own; a port whose CIDRs are all of the other family refuses everyone', () => {
    const rules: PortClientRule[] = [
      { port: 10904, allowedClients: ['10.254.3.0/30', 'fd62:6478::/64', '::1'], maxConnections: 3 },
      { port: 10905, allowedClients: ['fd62:6478::5'] },
    ];
    const portLines = (text: string, port: number) =>
      lines(text).filter((line) => line.startsWith(`-A ${P}-P${port} `));

    const v4 = renderClientRules('ipv4', rules, options);
    expect(portLines(v4, 10904)).toEqual([
      `-A ${P}-P10904 -s 10.254.3.0/30 -g ${P}-L10904`,
      `-A ${P}-P10904 -p tcp -j REJECT --reject-with tcp-reset`,
    ]);
    expect(portLines(v4, 10905)).toEqual([`-A ${P}-P10905 -p tcp -j REJECT --reject-with tcp-reset`]);

    const v6 = renderClientRules('ipv6', rules, options);
    expect(portLines(v6, 10904)).toEqual([
      `-A ${P}-P10904 -s fd62:6478::/64 -g ${P}-L10904`,
      `-A ${P}-P10904 -s ::1 -g ${P}-L10904`,
      `-A ${P}-P10904 -p tcp -j REJECT --reject-with tcp-reset`,
    ]);
    expect(portLines(v6, 10905)).toEqual([
      `-A ${P}-P10905 -s fd62:6478::5 -j RETURN`,
      `-A ${P}-P10905 -p tcp -j REJECT --reject-with tcp-reset`,
    ]);
    // The chains, the exempt rule and the limit are the same in both families.
    const skeleton = (text: string) => lines(text).filter((line) => !/-P1090[45] /.test(line));
    expect(skeleton(v6)).toEqual(skeleton(v4));
    expect(v6).toContain(
      `-A ${P}-L10904 -p tcp -m connlimit --connlimit-above 3 --connlimit-mask 0 -j REJECT --reject-with tcp-reset`,
    );
  });

  it('exempts root processes carrying the exempt group on loopback only, before the port chain, per port', () => {
    const rules = [
      { port: 10907, allowedClients: ['10.254.3.0/30'] },
      { port: 10906, allowedClients: [] },
    ];
    const out = lines(renderClientRules('ipv4', rules, { ...options, exemptGid: 60123 })).filter((line) =>
      line.startsWith(`-A ${P}-OUT `),
    );
    // Ordered by port, whatever the order given.
    expect(out).toEqual([
      `-A ${P}-OUT -o lo -p tcp --dport 10906 --syn -m owner --uid-owner 0 --gid-owner 60123 --suppl-groups -j RETURN`,
      `-A ${P}-OUT -o lo -p tcp --dport 10906 --syn -j ${P}-P10906`,
      `-A ${P}-OUT -o lo -p tcp --dport 10907 --syn -m owner --uid-owner 0 --gid-owner 60123 --suppl-groups -j RETURN`,
      `-A ${P}-OUT -o lo -p tcp --dport 10907 --syn -j ${P}-P10907`,
    ]);
    const input = lines(renderClientRules('ipv4', rules, options)).filter((line) =>
      line.startsWith(`-A ${P}-IN `),
    );
    expect(input[0]).toBe(`-A ${P}-IN -i lo -j RETURN`);
    expect(input.join('\n')).not.toContain('owner');
  });

  it('declares stale chains, which empties them, and references them nowhere', () => {
    const stale = [`${P}-P10908`, `${P}-L10908`];
    const text = renderClientRules('ipv4', [{ port: 10909, allowedClients: [] }], {
      ...options,
      staleChains: stale,
    });
    expect(lines(text).filter((line) => line.startsWith(':'))).toEqual([
      `:${P}-IN - [0:0]`,
      `:${P}-OUT - [0:0]`,
      `:${P}-P10909 - [0:0]`,
      `:${P}-P10908 - [0:0]`,
      `:${P}-L10908 - [0:0]`,
    ]);
    expect(lines(text).filter((line) => line.includes('10908') && !line.startsWith(':'))).toEqual([]);
    // Deleting them is the executor's part: a batch that deletes nothing.
    expect(text).not.toMatch(/^-X /m);
  });

  it('every tcp-reset is in a rule that matches TCP itself (the kernel refuses it otherwise)', () => {
    const text = renderClientRules(
      'ipv6',
      [
        { port: 1, allowedClients: ['::1'], maxConnections: 1 },
        { port: 2, allowedClients: ['10.0.0.1'] },
      ],
      options,
    );
    const resets = lines(text).filter((line) => line.includes('tcp-reset'));
    expect(resets).toHaveLength(3);
    for (const line of resets) expect(line).toMatch(/^-A \S+ -p tcp /);
  });

  it('leaves kept limit chains alone: neither declared nor written, still jumped to', () => {
    const rules = [
      { port: 10910, allowedClients: [], maxConnections: 1 },
      { port: 10911, allowedClients: [], maxConnections: 4 },
    ];
    const text = renderClientRules('ipv4', rules, { ...options, keptChains: [`${P}-L10910`] });
    expect(text).not.toMatch(new RegExp(`^(:|-A )${P}-L10910 `, 'm'));
    expect(text).toContain(`-A ${P}-P10910 -g ${P}-L10910\n`);
    expect(text).toContain(`:${P}-L10911 - [0:0]\n`);
    expect(text).toContain(`-A ${P}-L10911 -p tcp -m connlimit --connlimit-above 4 `);
    expect(() => renderClientRules('ipv4', rules, { ...options, keptChains: [`${P}-P10910`] })).toThrow(
      /kept chain "NBDX-0123abcd-P10910" is not a limit chain/,
    );
  });

  it('keeps every chain name within the kernel limit, at the highest port', () => {
    const prefix = chainPrefixFor('/var/lib/nbd-export-controller');
    const names = chainNamesFor([{ port: 65535, allowedClients: [], maxConnections: 1 }], prefix);
    expect(names).toEqual([`${prefix}-IN`, `${prefix}-OUT`, `${prefix}-P65535`, `${prefix}-L65535`]);
    for (const name of names) expect(name.length).toBeLessThanOrEqual(MAX_CHAIN_NAME_LENGTH);
    // The longest prefix that still fits is accepted, one more character is not.
    const longest = 'N'.repeat(MAX_CHAIN_NAME_LENGTH - '-P65535'.length);
    expect(chainNamesFor([{ port: 65535, allowedClients: [] }], longest)[2]).toHaveLength(
      MAX_CHAIN_NAME_LENGTH,
    );
    expect(() => chainNamesFor([], `${longest}N`)).toThrow(TypeError);
  });

  const refused: Array<[string, unknown[], Partial<typeof options>, RegExp]> = [
    ['port 0', [{ port: 0, allowedClients: [] }], {}, /port must be an integer in 1\.\.65535, got 0/],
    ['port 65536', [{ port: 65536, allowedClients: [] }], {}, /got 65536/],
    ['a fractional port', [{ port: 10.5, allowedClients: [] }], {}, /got 10\.5/],
    ['a port as a string', [{ port: '10901', allowedClients: [] }], {}, /port must be an integer/],
    [
      'the same port twice',
      [
        { port: 1, allowedClients: [] },
        { port: 1, allowedClients: [] },
      ],
      {},
      /more than one/,
    ],
    ['maxConnections 0', [{ port: 1, allowedClients: [], maxConnections: 0 }], {}, /maxConnections .* >= 1/],
    ['maxConnections 1.5', [{ port: 1, allowedClients: [], maxConnections: 1.5 }], {}, /got 1\.5/],
    [
      'an option smuggled in a CIDR',
      [{ port: 1, allowedClients: ['10.0.0.1 -j ACCEPT'] }],
      {},
      /not an IPv4/,
    ],
    [
      'a line break in a CIDR',
      [{ port: 1, allowedClients: ['10.0.0.1\n-A INPUT -j ACCEPT'] }],
      {},
      /not an IPv4/,
    ],
    ['a prefix length out of range', [{ port: 1, allowedClients: ['10.0.0.0/33'] }], {}, /prefix length/],
    ['a host name', [{ port: 1, allowedClients: ['example.org'] }], {}, /not an IPv4/],
    ['a CIDR that is not a string', [{ port: 1, allowedClients: [7] }], {}, /7 is not a string/],
    ['allowedClients missing', [{ port: 1 }], {}, /allowedClients of port 1 must be an array/],
    ['exempt group 0', [], { exemptGid: 0 }, /exemptGid .* \(0 would exempt every root process\), got 0/],
    ['exempt group -1', [], { exemptGid: -1 }, /got -1/],
    ['a prefix with a space', [], { chainPrefix: 'NBDX x' }, /chain prefix "NBDX x"/],
    ['an empty prefix', [], { chainPrefix: '' }, /chain prefix ""/],
    ['a stale chain not ours', [], { staleChains: ['INPUT'] } as never, /stale chain "INPUT" is not/],
    ['a stale chain the rules use', [], { staleChains: [`${P}-IN`] } as never, /is used by the rule set/],
  ];
  it.each(refused)('refuses %s with a TypeError', (_name, rules, override, message) => {
    const render = () => renderClientRules('ipv4', rules as PortClientRule[], { ...options, ...override });
    expect(render).toThrow(TypeError);
    expect(render).toThrow(message);
  });

  it('accepts the largest group id and refuses the kernel "no group"', () => {
    expect(exemptGidProblem(4_294_967_294)).toBeUndefined();
    expect(exemptGidProblem(4_294_967_295)).toMatch(/exemptGid/);
    expect(exemptGidProblem(Number.NaN)).toMatch(/got NaN/);
  });
});

// As `iptables -S` prints it here (iptables 1.8.9, nf_tables), with a neighbour's chains.
const LISTING = [
  '-P INPUT ACCEPT',
  '-P FORWARD ACCEPT',
  '-P OUTPUT ACCEPT',
  '-N KUBE-FIREWALL',
  `-N ${P}-IN`,
  `-N ${P}-L10901`,
  `-N ${P}-OUT`,
  `-N ${P}-P10901`,
  '-N NBDX-0123abce-IN',
  `-N ${P}X-IN`,
  '-A INPUT -j NBDX-0123abce-IN',
  `-A INPUT -j ${P}-IN`,
  '-A INPUT -j KUBE-FIREWALL',
  `-A INPUT -s 10.0.0.1/32 -j ${P}-IN`,
  `-A OUTPUT -j ${P}-OUT`,
  '-A OUTPUT -j KUBE-FIREWALL',
  `-A OUTPUT -j ${P}-OUT`,
  `-A ${P}-IN -i lo -j RETURN`,
  `-A ${P}-IN -p tcp -m tcp --dport 10901 --tcp-flags FIN,SYN,RST,ACK SYN -j ${P}-P10901`,
].join('\n');

describe('chainsIn', () => {
  it('finds the chains of our prefix only, not a neighbour whose prefix shares the start', () => {
    expect(chainsIn(LISTING, P)).toEqual([`${P}-IN`, `${P}-L10901`, `${P}-OUT`, `${P}-P10901`]);
    expect(chainsIn(LISTING, 'NBDX-0123abce')).toEqual(['NBDX-0123abce-IN']);
    expect(chainsIn('-P INPUT ACCEPT\n-P OUTPUT ACCEPT\n', P)).toEqual([]);
    expect(chainsIn('', P)).toEqual([]);
  });
});

describe('limitChainsInForce', () => {
  // As iptables -S prints the rule: with the default --connlimit-saddr spelled out.
  const limit = (port: number, above: number) =>
    `-A ${P}-L${port} -p tcp -m connlimit --connlimit-above ${above} --connlimit-mask 0 --connlimit-saddr -j REJECT --reject-with tcp-reset`;
  const listing = [
    `-N ${P}-L1`,
    `-N ${P}-L2`,
    `-N ${P}-L3`,
    `-N ${P}-L4`,
    limit(1, 1),
    limit(2, 1),
    limit(3, 5),
    limit(3, 5),
    `-A ${P}-L4 -p tcp -m connlimit --connlimit-above 1 --connlimit-mask 24 --connlimit-saddr -j REJECT --reject-with tcp-reset`,
    limit(5, 1), // a rule with no chain declared: not trusted
  ].join('\n');

  it('names the limit chains whose one rule is what the rules need, and no other', () => {
    const rules = [1, 2, 3, 4, 5, 6].map((port) => ({ port, allowedClients: [], maxConnections: 1 }));
    rules[2] = { port: 3, allowedClients: [], maxConnections: 5 };
    expect(limitChainsInForce(listing, rules, P)).toEqual([`${P}-L1`, `${P}-L2`]);
    // Another limit, or none: not kept.
    expect(limitChainsInForce(listing, [{ port: 1, allowedClients: [], maxConnections: 2 }], P)).toEqual([]);
    expect(limitChainsInForce(listing, [{ port: 1, allowedClients: [] }], P)).toEqual([]);
  });

  it('recognises what renderClientRules wrote, as it wrote it', () => {
    const rules = [{ port: 7, allowedClients: [], maxConnections: 3 }];
    const text = renderClientRules('ipv6', rules, options);
    const asListed = text.replace(/^:(\S+) - \[0:0\]$/gm, '-N $1');
    expect(limitChainsInForce(asListed, rules, P)).toEqual([`${P}-L7`]);
  });
});

describe('jumpsIn', () => {
  it('counts exact copies of the jump and tells whether the hook starts with one', () => {
    expect(jumpsIn(LISTING, 'INPUT', `${P}-IN`)).toEqual({ copies: 1, first: false });
    expect(jumpsIn(LISTING, 'OUTPUT', `${P}-OUT`)).toEqual({ copies: 2, first: true });
    expect(jumpsIn(LISTING, 'INPUT', 'NBDX-0123abce-IN')).toEqual({ copies: 1, first: true });
    expect(jumpsIn('-P INPUT ACCEPT', 'INPUT', `${P}-IN`)).toEqual({ copies: 0, first: false });
  });
});

describe('renderJumpRepair', () => {
  it('moves a jump that is not first to the top, and leaves one copy of a duplicated jump', () => {
    expect(lines(renderJumpRepair(LISTING, P) ?? '')).toEqual([
      '*filter',
      `-D INPUT -j ${P}-IN`,
      `-I INPUT 1 -j ${P}-IN`,
      `-D OUTPUT -j ${P}-OUT`,
      `-D OUTPUT -j ${P}-OUT`,
      `-I OUTPUT 1 -j ${P}-OUT`,
      'COMMIT',
    ]);
  });

  it('inserts the missing jumps, and changes nothing when each hook starts with exactly one', () => {
    expect(lines(renderJumpRepair('-P INPUT ACCEPT\n-A INPUT -j KUBE-FIREWALL', P) ?? '')).toEqual([
      '*filter',
      `-I INPUT 1 -j ${P}-IN`,
      `-I OUTPUT 1 -j ${P}-OUT`,
      'COMMIT',
    ]);
    const good = [`-A INPUT -j ${P}-IN`, '-A INPUT -j KUBE-FIREWALL', `-A OUTPUT -j ${P}-OUT`].join('\n');
    expect(renderJumpRepair(good, P)).toBeUndefined();
  });
});

describe('renderRemoval', () => {
  it('empties our chains, deletes every copy of our jumps, then the chains; nothing of the neighbour', () => {
    expect(lines(renderRemoval(LISTING, P) ?? '')).toEqual([
      '*filter',
      `:${P}-IN - [0:0]`,
      `:${P}-L10901 - [0:0]`,
      `:${P}-OUT - [0:0]`,
      `:${P}-P10901 - [0:0]`,
      `-D INPUT -j ${P}-IN`,
      `-D OUTPUT -j ${P}-OUT`,
      `-D OUTPUT -j ${P}-OUT`,
      `-X ${P}-IN`,
      `-X ${P}-L10901`,
      `-X ${P}-OUT`,
      `-X ${P}-P10901`,
      'COMMIT',
    ]);
  });

  it('is undefined when nothing of ours is there', () => {
    expect(
      renderRemoval('-P INPUT ACCEPT\n-N NBDX-0123abce-IN\n-A INPUT -j NBDX-0123abce-IN', P),
    ).toBeUndefined();
  });
});
