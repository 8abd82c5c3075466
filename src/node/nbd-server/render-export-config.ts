/**
 * Renders nbd-server's configuration: the base config ([generic]) and one export section
 * per conf.d file. Only keys this project knows are rendered (nbd-server ignores unknown
 * keys silently). `prerun` runs our admission hook: nbd-server passes it through printf and
 * system() as root, so the command is built only from checked absolute paths with no `%`,
 * and the one `%s` becomes the export's path, itself of shell-safe characters only.
 *
 * Defence in depth: the planner validates specs, and every name and value is checked
 * again here against a strict pattern. Anything that could end a line, open a section,
 * start a comment, or be read as an escape (GKeyFile reads `\` escapes) throws.
 */
import { isIPv4, isIPv6 } from 'node:net';
import { fingerprintOf, type ExportConfig } from '../../api/export-config.js';

/** The first line of every file we write: marks it as ours and carries what we need back. */
export const HEADER_PREFIX = '# nbd-export-controller ';

/** Export (section) names: what the API accepts, and never nbd-server's special section. */
const SECTION_NAME = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,319}$/;
/**
 * Absolute paths of safe characters, no "." or ".." segments, no "//". `%` is allowed
 * because every section renders `virtstyle = none` (by default nbd-server replaces
 * `%s` in a path with the client's address). `=` is refused even though GKeyFile splits
 * only at the first one: no value needs it.
 */
const PATH = /^(\/[A-Za-z0-9._@%+,:-]+)+$/;
const PATH_SEGMENT_DOTS = /(^|\/)\.{1,2}(\/|$)/;
const PATH_MAX = 4096;
const CIDR_PREFIX = /^(0|[1-9][0-9]{0,2})$/;

export interface BaseConfig {
  port: number;
  /** One IPv4 or IPv6 address. */
  listenAddress: string;
  /** Absolute path of conf.d. */
  includeDir: string;
  /**
   * Directory with ca-cert.pem, server-cert.pem, server-key.pem: every export then requires
   * TLS (force_tls) and a client certificate signed by that CA. nbd-server 3.24 verifies the
   * client's certificate against cacertfile and refuses a missing or foreign one (tested in
   * test/integration/tls.test.ts). It reads the files when a parent starts, so a hand-over
   * restart picks up a changed certificate while connected clients stay with their child.
   */
  tlsDir?: string;
}

/** The admission hook's command (see admission-hook.ts): absolute paths. */
export interface AdmissionHookCommand {
  /** flock(1): one hook at a time per export, so that counting its clients cannot race. */
  flock: string;
  /** The Node runtime that runs the hook. */
  node: string;
  /** The hook's script. */
  script: string;
}

/** Where one export's admission lives: its rules, and the lock its hook runs under. */
export interface ExportAdmission {
  hook: AdmissionHookCommand;
  rulesPath: string;
  lockPath: string;
}

/** How long a connecting client waits for the export's lock before it is refused. */
const ADMISSION_LOCK_WAIT_SECONDS = 10;

/** What our header says about an export's conf file. */
export interface ConfHeader {
  exportName: string;
  fingerprint: string;
  path: string;
  /** The admission rules file this conf's hook reads. */
  rules?: string;
  /** An authfile (written by versions before the admission hook): removed once no conf names it. */
  authfile?: string;
}

export function renderBaseConfig(base: BaseConfig): string {
  if (!Number.isInteger(base.port) || base.port < 1 || base.port > 65535)
    throw new TypeError(`nbd-server port must be an integer in 1..65535, got ${String(base.port)}`);
  if (!(isIPv4(base.listenAddress) || (isIPv6(base.listenAddress) && !base.listenAddress.includes('%'))))
    throw new TypeError(
      `listen address must be one IPv4 or IPv6 address, got ${JSON.stringify(base.listenAddress)}`,
    );
  const lines = [
    `${HEADER_PREFIX}base config; generated, do not edit`,
    '[generic]',
    `port = ${base.port}`,
    `listenaddr = ${base.listenAddress}`,
    `includedir = ${checkedPath(base.includeDir, 'includedir')}`,
    'allowlist = false',
  ];
  if (base.tlsDir !== undefined) {
    const dir = checkedPath(base.tlsDir, 'TLS directory');
    lines.push(
      `certfile = ${dir}/server-cert.pem`,
      `keyfile = ${dir}/server-key.pem`,
      `cacertfile = ${dir}/ca-cert.pem`,
      'force_tls = true',
    );
  }
  return `${lines.join('\n')}\n`;
}

/**
 * The conf.d file of one export. Every connection to it passes the admission hook first
 * (`prerun`: nbd-server refuses the client when it exits non-zero), which enforces the
 * rules file: the client's address, the number of clients at once, and that the path still
 * names the file the controller checked.
 *
 * `maxconnections` is deliberately not rendered: nbd-server 3.24 counts it over the
 * export's lifetime in one parent (one finished connection with maxconnections = 1
 * refuses every later one until a restart); see docs/nbd-server.md.
 */
export function renderExportConf(config: ExportConfig, admission: ExportAdmission): string {
  if (config.server !== 'nbd-server')
    throw new TypeError(`nbd-server cannot serve export "${config.exportName}" for ${String(config.server)}`);
  checkedSectionName(config.exportName);
  const path = checkedPath(config.path, `path of export "${config.exportName}"`);
  if (config.format !== 'raw')
    throw new TypeError(
      `nbd-server serves raw data only; export "${config.exportName}" is ${JSON.stringify(config.format)}`,
    );
  for (const cidr of config.allowedClients) checkedCidr(cidr, config.exportName);
  const rules = checkedCommandPath(admission.rulesPath, 'admission rules file');
  const header: ConfHeader = {
    exportName: config.exportName,
    fingerprint: fingerprintOf(config),
    path,
    rules,
  };
  const { hook } = admission;
  const prerun = [
    checkedCommandPath(hook.flock, 'flock program'),
    '-w',
    String(ADMISSION_LOCK_WAIT_SECONDS),
    checkedCommandPath(admission.lockPath, 'admission lock file'),
    checkedCommandPath(hook.node, 'Node runtime'),
    checkedCommandPath(hook.script, 'admission hook'),
    rules,
    '%s',
  ].join(' ');
  const lines = [
    `${HEADER_PREFIX}${JSON.stringify(header)}`,
    `[${config.exportName}]`,
    `exportname = ${path}`,
    'virtstyle = none',
    `readonly = ${config.readOnly ? 'true' : 'false'}`,
    'flush = true',
    'fua = true',
    `prerun = ${prerun}`,
  ];
  return `${lines.join('\n')}\n`;
}

/** Reads our header back; undefined for a file we did not write. */
export function parseConfHeader(text: string): ConfHeader | undefined {
  const firstLine = text.slice(0, text.indexOf('\n') === -1 ? undefined : text.indexOf('\n'));
  if (!firstLine.startsWith(HEADER_PREFIX)) return undefined;
  let value: unknown;
  try {
    value = JSON.parse(firstLine.slice(HEADER_PREFIX.length));
  } catch {
    return undefined;
  }
  if (typeof value !== 'object' || value === null) return undefined;
  const { exportName, fingerprint, path, rules, authfile } = value as Record<string, unknown>;
  if (typeof exportName !== 'string' || typeof fingerprint !== 'string' || typeof path !== 'string')
    return undefined;
  if (rules !== undefined && typeof rules !== 'string') return undefined;
  if (authfile !== undefined && typeof authfile !== 'string') return undefined;
  return {
    exportName,
    fingerprint,
    path,
    ...(rules === undefined ? {} : { rules }),
    ...(authfile === undefined ? {} : { authfile }),
  };
}

/** Whether a file (its text) starts with our header: only such files are ever deleted. */
export function isOurs(text: string): boolean {
  return text.startsWith(HEADER_PREFIX);
}

function checkedSectionName(name: string): string {
  if (!SECTION_NAME.test(name) || name.toLowerCase() === 'generic')
    throw new TypeError(`unsafe nbd-server export name ${JSON.stringify(name)}`);
  return name;
}

export function checkedPath(path: string, what: string): string {
  if (path.length > PATH_MAX || !PATH.test(path) || PATH_SEGMENT_DOTS.test(path))
    throw new TypeError(`unsafe ${what} for an nbd-server config: ${JSON.stringify(path)}`);
  return path;
}

/** A path inside the hook's command: printf would read a `%` in it as a conversion. */
function checkedCommandPath(path: string, what: string): string {
  checkedPath(path, what);
  if (path.includes('%'))
    throw new TypeError(`unsafe ${what} for nbd-server's prerun: ${JSON.stringify(path)}`);
  return path;
}

/** One CIDR or address, as nbd-server's authfile reads it. */
function checkedCidr(cidr: string, exportName: string): string {
  const [address = '', prefix, extra] = cidr.split('/');
  const family = isIPv4(address) ? 4 : isIPv6(address) && !address.includes('%') ? 6 : 0;
  const prefixOk =
    prefix === undefined || (CIDR_PREFIX.test(prefix) && Number(prefix) <= (family === 4 ? 32 : 128));
  if (extra !== undefined || family === 0 || !prefixOk)
    throw new TypeError(`unsafe allowedClients entry ${JSON.stringify(cidr)} for export "${exportName}"`);
  return cidr;
}
