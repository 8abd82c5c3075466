import { describe, expect, it } from 'vitest';
import { isServerCommandLine, listeningInodes } from '../../../../src/node/nbd-server/server-processes.js';
import { processState } from '../../../../src/node/process/proc-scan.js';

describe('listeningInodes', () => {
  const table = [
    '  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode',
    '   0: 0100007F:2A39 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77272 1 0000000000000000 100 0 0 10 0',
    '   1: 0100007F:2A39 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 77300 1 0000000000000000 20 4 30 10 -1',
    '   2: 00000000:2A3A 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 88888 1 0000000000000000 100 0 0 10 0',
  ].join('\n');

  it('finds sockets listening on the port, not connected ones or other ports', () => {
    expect([...listeningInodes(table, 10809)]).toEqual(['77272']);
    expect([...listeningInodes(table, 10810)]).toEqual(['88888']);
    expect([...listeningInodes(table, 80)]).toEqual([]);
  });

  it('reads tcp6 addresses', () => {
    const tcp6 = [
      '  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode',
      '   0: 00000000000000000000000001000000:2A39 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0',
    ].join('\n');
    expect([...listeningInodes(tcp6, 10809)]).toEqual(['4242']);
  });
});

describe('isServerCommandLine', () => {
  const config = '/var/lib/nbdx/nbd-server/config';
  it.each([
    [['nbd-server', '-C', config, '-p', '/var/lib/nbdx/nbd-server/nbd-server.pid'], true],
    [['/usr/bin/nbd-server', '-C', config, '-p', '/x.pid'], true],
    [['nbd-server', '-C', '/other/config', '-p', '/x.pid'], false],
    [['nbd-server', config, '-C'], false],
    [['sh', '-c', `nbd-server -C ${config}`], false],
    [['not-nbd-server', '-C', config], false],
  ])('%j → %s', (argv, expected) => {
    expect(isServerCommandLine(argv, config)).toBe(expected);
  });
  it('is false for no command line', () => {
    expect(isServerCommandLine(undefined, config)).toBe(false);
  });
});

describe('processState', () => {
  it('sees this process running and a pid that does not exist as gone', () => {
    expect(processState(process.pid)).toBe('running');
    expect(processState(2 ** 22 + 1)).toBe('gone');
  });
});
