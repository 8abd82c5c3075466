/**
 * TCP sockets as /proc/net/tcp and /proc/net/tcp6 show them (the reading process's network
 * namespace): who is connected to whom, in which state, through which socket inode. The
 * one place that decodes those tables.
 */
import { readFile } from 'node:fs/promises';

export interface TcpEndpoint {
  /** Dotted IPv4 or full IPv6 text; an IPv4-mapped IPv6 address is given as IPv4. */
  address: string;
  port: number;
}

export interface TcpSocketRow {
  local: TcpEndpoint;
  remote: TcpEndpoint;
  /** The kernel's state code: '01' ESTABLISHED, '0A' LISTEN, ... */
  state: string;
  inode: string;
}

export const TCP_ESTABLISHED = '01';
export const TCP_LISTEN = '0A';

/** The rows of one table's text (columns: sl, local_address, rem_address, st, ..., inode). */
export function parseTcpTable(text: string): TcpSocketRow[] {
  const rows: TcpSocketRow[] = [];
  for (const line of text.split('\n').slice(1)) {
    const fields = line.trim().split(/\s+/);
    if (fields.length < 10) continue;
    const local = endpointOf(fields[1] ?? '');
    const remote = endpointOf(fields[2] ?? '');
    if (!local || !remote) continue;
    rows.push({ local, remote, state: fields[3] ?? '', inode: fields[9] ?? '' });
  }
  return rows;
}

/** Every TCP socket of this network namespace, IPv4 and IPv6. */
export async function readTcpSockets(): Promise<TcpSocketRow[]> {
  const tables = await Promise.all(
    ['/proc/net/tcp', '/proc/net/tcp6'].map((path) => readFile(path, 'utf8').catch(() => '')),
  );
  return tables.flatMap(parseTcpTable);
}

/** "0100007F:2A41" → 127.0.0.1:10817. Addresses are 32-bit words in host (little-endian) order. */
function endpointOf(text: string): TcpEndpoint | undefined {
  const [hex = '', portHex = ''] = text.split(':');
  const port = Number.parseInt(portHex, 16);
  if (!/^[0-9A-Fa-f]{4}$/.test(portHex) || !Number.isInteger(port)) return undefined;
  if (hex.length === 8) return { address: ipv4Of(wordBytes(hex)), port };
  if (hex.length !== 32) return undefined;
  const bytes = [0, 8, 16, 24].flatMap((at) => wordBytes(hex.slice(at, at + 8)));
  const mapped = bytes.slice(0, 10).every((b) => b === 0) && bytes[10] === 0xff && bytes[11] === 0xff;
  if (mapped) return { address: ipv4Of(bytes.slice(12)), port };
  const groups: string[] = [];
  for (let i = 0; i < 16; i += 2) groups.push((((bytes[i] ?? 0) << 8) | (bytes[i + 1] ?? 0)).toString(16));
  return { address: groups.join(':'), port };
}

/** One little-endian 32-bit word of hex, as the four bytes in network order. */
function wordBytes(hex: string): number[] {
  const word = Number.parseInt(hex, 16);
  return [word & 0xff, (word >>> 8) & 0xff, (word >>> 16) & 0xff, (word >>> 24) & 0xff];
}

function ipv4Of(bytes: number[]): string {
  return bytes.join('.');
}
