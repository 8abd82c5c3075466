import { BlockList, isIPv4, isIPv6 } from 'node:net';

/**
 * Accepts an IPv4 or IPv6 network in CIDR notation ("10.20.0.0/16", "fd00::/8") or a
 * single address. Strict on purpose: the value is written into nbd-server's authfile.
 */
export function cidrProblem(value: string): string | undefined {
  const [address = '', prefix, extra] = value.split('/');
  if (extra !== undefined) return `"${value}" has more than one "/"`;
  const family = isIPv4(address) ? 4 : isIPv6(address) && !address.includes('%') ? 6 : 0;
  if (family === 0) return `"${value}" is not an IPv4 or IPv6 address or network`;
  if (prefix === undefined) return undefined;
  const max = family === 4 ? 32 : 128;
  if (!/^(0|[1-9][0-9]{0,2})$/.test(prefix) || Number(prefix) > max)
    return `"${value}" has a prefix length outside 0..${max}`;
  return undefined;
}

/**
 * Whether a client's address is in one of the CIDRs (each valid by cidrProblem). An empty
 * list lets every address in. An IPv4-mapped IPv6 address should be given as IPv4.
 */
export function isAddressAllowed(address: string, cidrs: readonly string[]): boolean {
  if (cidrs.length === 0) return true;
  const family = isIPv4(address) ? 'ipv4' : isIPv6(address) ? 'ipv6' : undefined;
  if (family === undefined) return false;
  const list = new BlockList();
  for (const cidr of cidrs) {
    const [network = '', prefix] = cidr.split('/');
    const networkFamily = isIPv4(network) ? 'ipv4' : 'ipv6';
    if (prefix === undefined) list.addAddress(network, networkFamily);
    else list.addSubnet(network, Number(prefix), networkFamily);
  }
  return list.check(address, family);
}
