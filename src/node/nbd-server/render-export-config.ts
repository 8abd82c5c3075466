/**
 * Renders nbd-server's configuration: the base config ([generic]), one export section
 * per conf.d file, and authfiles. Only keys this project knows are rendered (nbd-server
 * ignores unknown keys silently), never `prerun`/`postrun` (printf and system() as root).
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
const ACCOUNT = /^[a-z_][a-z0-9_-]{0,31}$/;
const CIDR_PREFIX = /^(0|[1-9][0-9]{0,2})$/;

export interface BaseConfig {
  port: number;
  /** One IPv4 or IPv6 address. */
  listenAddress: string;
  /** Absolute path of conf.d. */
  includeDir: string;
  /** Run as this account (nbd-server switches after binding, before opening files). Omitted: stays root. */
  user?: string;
  group?: string;
  /**
   * Directory with ca-cert.pem, server-cert.pem, server-key.pem: every export then requires
   * TLS (force_tls) and a client certificate signed by that CA. nbd-server 3.24 verifies the
   * client's certificate against cacertfile and refuses a missing or foreign one (tested in
   * test/integration/tls.test.ts). It reads the files when a parent starts, so a hand-over
   * restart picks up a changed certificate while connected clients stay with their child.
   */
  tlsDir?: string;
}

export interface ExportFiles {
  /** The conf.d file content. */
  conf: string;
  /** The authfile content, when the export restricts clients. */
  authfile?: string;
}

/** What our header says about an export's conf file. */
export interface ConfHeader {
  exportName: string;
  fingerprint: string;
  path: string;
  /** The authfile this conf references, if any. */
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
  if (base.user !== undefined) lines.push(`user = ${checkedAccount(base.user, 'user')}`);
  if (base.group !== undefined) lines.push(`group = ${checkedAccount(base.group, 'group')}`);
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
 * The conf.d file of one export, and its authfile when `allowedClients` is non-empty.
 * `authfilePath` is where the authfile will be: it must be written before the conf
 * (nbd-server lets everyone in when an authfile is missing).
 *
 * `maxconnections` is deliberately not rendered: nbd-server 3.24 counts it over the
 * export's lifetime in one parent (one finished connection with maxconnections = 1
 * refuses every later one until a restart); see docs/nbd-server.md.
 */
export function renderExportFiles(config: ExportConfig, authfilePath: string): ExportFiles {
  if (config.server !== 'nbd-server')
    throw new TypeError(`nbd-server cannot serve export "${config.exportName}" for ${String(config.server)}`);
  checkedSectionName(config.exportName);
  const path = checkedPath(config.path, `path of export "${config.exportName}"`);
  if (config.format !== 'raw')
    throw new TypeError(
      `nbd-server serves raw data only; export "${config.exportName}" is ${JSON.stringify(config.format)}`,
    );
  const cidrs = config.allowedClients.map((cidr) => checkedCidr(cidr, config.exportName));
  const restricted = cidrs.length > 0;
  const header: ConfHeader = {
    exportName: config.exportName,
    fingerprint: fingerprintOf(config),
    path,
    ...(restricted ? { authfile: checkedPath(authfilePath, 'authfile') } : {}),
  };
  const lines = [
    `${HEADER_PREFIX}${JSON.stringify(header)}`,
    `[${config.exportName}]`,
    `exportname = ${path}`,
    'virtstyle = none',
    `readonly = ${config.readOnly ? 'true' : 'false'}`,
    'flush = true',
    'fua = true',
  ];
  if (restricted) lines.push(`authfile = ${header.authfile}`);
  const conf = `${lines.join('\n')}\n`;
  if (!restricted) return { conf };
  return { conf, authfile: `${HEADER_PREFIX}authfile of ${config.exportName}\n${cidrs.join('\n')}\n` };
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
  const { exportName, fingerprint, path, authfile } = value as Record<string, unknown>;
  if (typeof exportName !== 'string' || typeof fingerprint !== 'string' || typeof path !== 'string')
    return undefined;
  if (authfile !== undefined && typeof authfile !== 'string') return undefined;
  return { exportName, fingerprint, path, ...(authfile === undefined ? {} : { authfile }) };
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

function checkedAccount(name: string, what: string): string {
  if (!ACCOUNT.test(name)) throw new TypeError(`unsafe nbd-server ${what} ${JSON.stringify(name)}`);
  return name;
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
