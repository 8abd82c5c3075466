import { describe, expect, it } from 'vitest';
import { fingerprintOf, type ExportConfig } from '../../../../src/api/export-config.js';
import {
  HEADER_PREFIX,
  isOurs,
  parseConfHeader,
  renderBaseConfig,
  renderExportFiles,
} from '../../../../src/node/nbd-server/render-export-config.js';
import { rawExportConfig } from '../../../support/export-config.js';

const AUTH = '/var/lib/nbdx/nbd-server/auth/x.allow';

function config(overrides: Partial<ExportConfig> = {}): ExportConfig {
  return rawExportConfig('vm-1234-disk0', '/srv/images/vm-1234/disk0.raw', overrides);
}

/** The lines after our header. */
function body(conf: string): string[] {
  return conf.trimEnd().split('\n').slice(1);
}

describe('renderExportFiles', () => {
  it.each([
    {
      name: 'read-write, open to all',
      input: config(),
      lines: [
        '[vm-1234-disk0]',
        'exportname = /srv/images/vm-1234/disk0.raw',
        'virtstyle = none',
        'readonly = false',
        'flush = true',
        'fua = true',
      ],
      authfile: undefined,
    },
    {
      name: 'read-only block device',
      input: config({ exportName: 'ns.dev', path: '/dev/dm-3', blockDevice: true, readOnly: true }),
      lines: [
        '[ns.dev]',
        'exportname = /dev/dm-3',
        'virtstyle = none',
        'readonly = true',
        'flush = true',
        'fua = true',
      ],
      authfile: undefined,
    },
    {
      name: 'restricted to networks',
      input: config({ allowedClients: ['10.20.0.0/16', '192.0.2.7', 'fd00::/8'] }),
      lines: [
        '[vm-1234-disk0]',
        'exportname = /srv/images/vm-1234/disk0.raw',
        'virtstyle = none',
        'readonly = false',
        'flush = true',
        'fua = true',
        `authfile = ${AUTH}`,
      ],
      authfile: ['10.20.0.0/16', '192.0.2.7', 'fd00::/8'],
    },
  ])('$name', ({ input, lines, authfile }) => {
    const files = renderExportFiles(input, AUTH);
    expect(body(files.conf)).toEqual(lines);
    expect(files.authfile?.trimEnd().split('\n').slice(1)).toEqual(authfile);
    if (files.authfile !== undefined) expect(isOurs(files.authfile)).toBe(true);
  });

  it('never renders maxconnections, prerun or postrun', () => {
    const { conf } = renderExportFiles(config({ readOnly: true, maxConnections: 4 }), AUTH);
    expect(conf).not.toMatch(/maxconnections|prerun|postrun/);
  });

  it('carries the fingerprint, name and path in its header, and reads them back', () => {
    const input = config({ allowedClients: ['10.0.0.0/8'] });
    const { conf } = renderExportFiles(input, AUTH);
    expect(conf.startsWith(HEADER_PREFIX)).toBe(true);
    expect(parseConfHeader(conf)).toEqual({
      exportName: input.exportName,
      fingerprint: fingerprintOf(input),
      path: input.path,
      authfile: AUTH,
    });
  });

  it('refuses a config for another server with a TypeError', () => {
    expect(() => renderExportFiles(config({ server: 'qemu-storage-daemon' }), AUTH)).toThrow(TypeError);
  });

  it('refuses a format nbd-server would not decode', () => {
    expect(() => renderExportFiles(config({ format: 'qcow2' }), AUTH)).toThrow(TypeError);
  });

  it.each([
    ['a newline and a new section', 'x]\n[evil'],
    ['a closing bracket', 'a]b'],
    ['an opening bracket', 'a[b'],
    ['a newline with prerun', 'x\nprerun = touch /tmp/pwned'],
    ['a carriage return', 'x\rprerun=id'],
    ['an equals sign', 'a=b'],
    ['a hash', 'a#b'],
    ['a semicolon', 'a;b'],
    ['a control character', 'a\u0000b'],
    ['a space', 'a b'],
    ['a backslash escape', 'a\\nb'],
    ['the generic section', 'generic'],
    ['the generic section, any case', 'GeNeRiC'],
    ['nothing', ''],
    ['a leading dot', '.hidden'],
    ['a name too long to list', 'a'.repeat(321)],
    ['non-ASCII', 'diskö'],
  ])('refuses an export name with %s', (_, exportName) => {
    expect(() => renderExportFiles(config({ exportName }), AUTH)).toThrow(TypeError);
  });

  it.each([
    ['a relative path', 'srv/disk.raw'],
    ['a newline and a key', '/srv/disk.raw\nprerun = id'],
    ['a bracket', '/srv/[x]/disk.raw'],
    ['an equals sign', '/srv/a=b.raw'],
    ['a hash', '/srv/a#b.raw'],
    ['a semicolon', '/srv/a;b.raw'],
    ['a space', '/srv/a b.raw'],
    ['a backslash', '/srv/a\\nb.raw'],
    ['a dot-dot segment', '/srv/../etc/shadow'],
    ['a dot segment', '/srv/./disk.raw'],
    ['a double slash', '//srv/disk.raw'],
    ['a trailing slash', '/srv/'],
    ['the root', '/'],
    ['a tab', '/srv/a\tb.raw'],
  ])('refuses a path with %s', (_, path) => {
    expect(() => renderExportFiles(config({ path }), AUTH)).toThrow(TypeError);
  });

  it('accepts % in a path: virtstyle = none makes nbd-server open it literally', () => {
    expect(renderExportFiles(config({ path: '/srv/100%s.raw' }), AUTH).conf).toContain(
      'exportname = /srv/100%s.raw',
    );
  });

  it.each([
    ['a newline', '10.0.0.0/8\n0.0.0.0/0'],
    ['a comment', '10.0.0.0/8 # all'],
    ['a hostname', 'backup.example'],
    ['two slashes', '10.0.0.0/8/8'],
    ['a prefix too long', '10.0.0.0/33'],
    ['an IPv6 prefix too long', 'fd00::/129'],
    ['a zone', 'fe80::1%eth0'],
    ['a leading zero prefix', '10.0.0.0/08'],
    ['nothing', ''],
  ])('refuses an allowedClients entry with %s', (_, cidr) => {
    expect(() => renderExportFiles(config({ allowedClients: [cidr] }), AUTH)).toThrow(TypeError);
  });

  it('refuses an unsafe authfile path', () => {
    expect(() => renderExportFiles(config({ allowedClients: ['10.0.0.0/8'] }), '/x/a b.allow')).toThrow(
      TypeError,
    );
  });
});

describe('renderBaseConfig', () => {
  const base = { port: 10809, listenAddress: '0.0.0.0', includeDir: '/var/lib/nbdx/nbd-server/conf.d' };

  it('renders [generic] with port, address and includedir, and no account by default', () => {
    expect(body(renderBaseConfig(base))).toEqual([
      '[generic]',
      'port = 10809',
      'listenaddr = 0.0.0.0',
      'includedir = /var/lib/nbdx/nbd-server/conf.d',
      'allowlist = false',
    ]);
  });

  it('renders user and group when asked', () => {
    expect(body(renderBaseConfig({ ...base, user: 'nbd', group: 'disk' }))).toEqual(
      expect.arrayContaining(['user = nbd', 'group = disk']),
    );
  });

  it('with a TLS directory, requires TLS and names the certificates in the layout QEMU uses', () => {
    const lines = body(renderBaseConfig({ ...base, tlsDir: '/etc/nbdx/tls' }));
    expect(lines).toEqual(
      expect.arrayContaining([
        'certfile = /etc/nbdx/tls/server-cert.pem',
        'keyfile = /etc/nbdx/tls/server-key.pem',
        'cacertfile = /etc/nbdx/tls/ca-cert.pem',
        'force_tls = true',
      ]),
    );
    expect(body(renderBaseConfig(base)).some((line) => /tls|cert|key/.test(line))).toBe(false);
  });

  it.each([
    ['port 0', { port: 0 }],
    ['a port too large', { port: 65536 }],
    ['a fractional port', { port: 10809.5 }],
    ['a hostname', { listenAddress: 'localhost' }],
    ['two addresses', { listenAddress: '127.0.0.1,0.0.0.0' }],
    ['a newline in the address', { listenAddress: '127.0.0.1\nprerun=id' }],
    ['a relative includedir', { includeDir: 'conf.d' }],
    ['a newline in includedir', { includeDir: '/x\n[y]' }],
    ['a user with a newline', { user: 'nbd\nprerun=id' }],
    ['a group with a space', { group: 'di sk' }],
    ['a relative TLS directory', { tlsDir: 'tls' }],
    ['a newline in the TLS directory', { tlsDir: '/etc/tls\nprerun=id' }],
  ])('refuses %s', (_, overrides) => {
    expect(() => renderBaseConfig({ ...base, ...overrides })).toThrow(TypeError);
  });
});

describe('parseConfHeader', () => {
  it.each([
    ['a file without our header', '[x]\nexportname = /srv/x\n'],
    ['our prefix with broken JSON', `${HEADER_PREFIX}{nope\n[x]\n`],
    ['our prefix with the wrong shape', `${HEADER_PREFIX}{"exportName":1}\n`],
    [
      'our header on a later line',
      `# hello\n${HEADER_PREFIX}{"exportName":"x","fingerprint":"f","path":"/x"}\n`,
    ],
    ['an empty file', ''],
  ])('ignores %s', (_, text) => {
    expect(parseConfHeader(text)).toBeUndefined();
  });
});
