import { describe, expect, it } from 'vitest';
import { fingerprintOf, type ExportConfig } from '../../../../src/api/export-config.js';
import {
  HEADER_PREFIX,
  isOurs,
  parseConfHeader,
  renderBaseConfig,
  renderExportConf,
  type ExportAdmission,
} from '../../../../src/node/nbd-server/render-export-config.js';
import { rawExportConfig } from '../../../support/export-config.js';

const ADMISSION: ExportAdmission = {
  hook: {
    flock: '/usr/bin/flock',
    node: '/opt/node/bin/node',
    script: '/opt/nbdx/dist/node/nbd-server/admission-hook.js',
  },
  rulesPath: '/var/lib/nbdx/nbd-server/auth/0123abcd.rules',
  lockPath: '/var/lib/nbdx/nbd-server/auth/0123abcd.lock',
};
const PRERUN =
  'prerun = /usr/bin/flock -w 10 /var/lib/nbdx/nbd-server/auth/0123abcd.lock /opt/node/bin/node ' +
  '/opt/nbdx/dist/node/nbd-server/admission-hook.js /var/lib/nbdx/nbd-server/auth/0123abcd.rules %s';

function config(overrides: Partial<ExportConfig> = {}): ExportConfig {
  return rawExportConfig('vm-1234-disk0', '/srv/images/vm-1234/disk0.raw', overrides);
}

/** The lines after our header. */
function body(conf: string): string[] {
  return conf.trimEnd().split('\n').slice(1);
}

describe('renderExportConf', () => {
  it.each([
    {
      name: 'read-write',
      input: config(),
      lines: [
        '[vm-1234-disk0]',
        'exportname = /srv/images/vm-1234/disk0.raw',
        'virtstyle = none',
        'readonly = false',
        'flush = true',
        'fua = true',
        PRERUN,
      ],
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
        PRERUN,
      ],
    },
  ])('$name: every connection passes the admission hook', ({ input, lines }) => {
    expect(body(renderExportConf(input, ADMISSION))).toEqual(lines);
  });

  it('never renders maxconnections (a lifetime count in 3.24), an authfile or postrun', () => {
    const conf = renderExportConf(
      config({ readOnly: true, maxConnections: 4, allowedClients: ['10.0.0.0/8'] }),
      ADMISSION,
    );
    expect(conf).not.toMatch(/maxconnections|authfile|postrun/);
  });

  it('carries the fingerprint, name, path and rules in its header, and reads them back', () => {
    const input = config({ allowedClients: ['10.0.0.0/8'] });
    const conf = renderExportConf(input, ADMISSION);
    expect(conf.startsWith(HEADER_PREFIX)).toBe(true);
    expect(isOurs(conf)).toBe(true);
    expect(parseConfHeader(conf)).toEqual({
      exportName: input.exportName,
      fingerprint: fingerprintOf(input),
      path: input.path,
      rules: ADMISSION.rulesPath,
    });
  });

  it('refuses a config for another server with a TypeError', () => {
    expect(() => renderExportConf(config({ server: 'qemu-storage-daemon' }), ADMISSION)).toThrow(TypeError);
  });

  it('refuses a format nbd-server would not decode', () => {
    expect(() => renderExportConf(config({ format: 'qcow2' }), ADMISSION)).toThrow(TypeError);
  });

  it.each([
    ['a newline and a new section', 'x]\n[evil'],
    ['a closing bracket', 'a]b'],
    ['an opening bracket', 'a[b'],
    ['a double slash', '//srv/disk.raw'],
    ['a trailing slash', '/srv/'],
    ['the root', '/'],
    ['a tab', '/srv/a\tb.raw'],
    ['a space (the hook gets it through a shell)', '/srv/a b.raw'],
    ['a semicolon', '/srv/a;reboot'],
    ['a dollar sign', '/srv/$(id).raw'],
  ])('refuses a path with %s', (_, path) => {
    expect(() => renderExportConf(config({ path }), ADMISSION)).toThrow(TypeError);
  });

  it('accepts % in a path: virtstyle = none opens it literally, and printf fills %s with it, not in it', () => {
    expect(renderExportConf(config({ path: '/srv/100%s.raw' }), ADMISSION)).toContain(
      'exportname = /srv/100%s.raw',
    );
  });

  it.each([
    ['the rules file', { ...ADMISSION, rulesPath: '/var/lib/100%n/x.rules' }],
    ['the lock file', { ...ADMISSION, lockPath: '/var/lib/%s/x.lock' }],
    ['the Node runtime', { ...ADMISSION, hook: { ...ADMISSION.hook, node: '/opt/%x/node' } }],
    ['the script', { ...ADMISSION, hook: { ...ADMISSION.hook, script: '/opt/a b/hook.js' } }],
    ['flock', { ...ADMISSION, hook: { ...ADMISSION.hook, flock: 'flock' } }],
  ])('refuses %s when printf or the shell would read it as more than a path', (_, admission) => {
    expect(() => renderExportConf(config(), admission)).toThrow(TypeError);
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
    expect(() => renderExportConf(config({ allowedClients: [cidr] }), ADMISSION)).toThrow(TypeError);
  });
});

describe('renderBaseConfig', () => {
  const base = { port: 10809, listenAddress: '0.0.0.0', includeDir: '/var/lib/nbdx/nbd-server/conf.d' };

  it('renders [generic] with port, address and includedir', () => {
    expect(body(renderBaseConfig(base))).toEqual([
      '[generic]',
      'port = 10809',
      'listenaddr = 0.0.0.0',
      'includedir = /var/lib/nbdx/nbd-server/conf.d',
      'allowlist = false',
    ]);
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
