import { describe, expect, it } from 'vitest';
import { parseTcpTable, TCP_ESTABLISHED, TCP_LISTEN } from '../../../../src/node/process/proc-net-tcp.js';

const HEADER =
  '  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode';

describe('parseTcpTable', () => {
  it('decodes IPv4 rows: addresses in host byte order, ports, state and inode', () => {
    const rows = parseTcpTable(
      [
        HEADER,
        '   0: 0100007F:2A39 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77272 1 0000000000000000 100 0 0 10 0',
        '   1: 0100007F:2A39 0200A8C0:C350 01 00000000:00000000 00:00000000 00000000     0        0 77300 1 0000000000000000 20 4 30 10 -1',
        '   2: garbage',
      ].join('\n'),
    );
    expect(rows).toEqual([
      {
        local: { address: '127.0.0.1', port: 10809 },
        remote: { address: '0.0.0.0', port: 0 },
        state: TCP_LISTEN,
        inode: '77272',
      },
      {
        local: { address: '127.0.0.1', port: 10809 },
        remote: { address: '192.168.0.2', port: 50000 },
        state: TCP_ESTABLISHED,
        inode: '77300',
      },
    ]);
  });

  it('decodes IPv6 rows, and gives an IPv4-mapped address as IPv4', () => {
    const rows = parseTcpTable(
      [
        HEADER,
        // ::1 port 10809, from fd00::7 port 40000
        '   0: 00000000000000000000000001000000:2A39 000000FD000000000000000007000000:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1',
        // ::ffff:10.1.2.3 port 443
        '   1: 0000000000000000FFFF00000302010A:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 100 0 0 10 0',
      ].join('\n'),
    );
    expect(rows.map((row) => [row.local, row.remote])).toEqual([
      [
        { address: '0:0:0:0:0:0:0:1', port: 10809 },
        { address: 'fd00:0:0:0:0:0:0:7', port: 40000 },
      ],
      [
        { address: '10.1.2.3', port: 443 },
        { address: '0:0:0:0:0:0:0:0', port: 0 },
      ],
    ]);
  });
});
