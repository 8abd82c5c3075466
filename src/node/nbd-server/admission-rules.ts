/**
 * What nbd-server's admission hook enforces for one export. The controller writes the rules
 * next to the export's conf file; the hook reads them at every connection, so a client is
 * judged by the rules of the moment (see admission-hook.ts).
 */
import { cidrProblem } from '../../api/cidr.js';
import { HEADER_PREFIX } from './render-export-config.js';

export interface AdmissionRules {
  exportName: string;
  /** The name nbd-server opens, again at every connection. */
  path: string;
  /**
   * `<st_dev>:<st_ino>` of the file the controller checked. A connection is refused when the
   * name leads elsewhere (a file swapped in after the check), until the controller looks again.
   */
  fileId?: string;
  /** CIDRs a client's address must be in; empty: every address. */
  allowedClients: string[];
  /** Clients served at once; the controller's own probe and readers are not counted. */
  maxConnections: number;
}

const RULES_LINE = `${HEADER_PREFIX}admission rules; generated, do not edit`;
const FILE_ID = /^[0-9]+:[0-9]+$/;

export function renderAdmissionRules(rules: AdmissionRules): string {
  return `${RULES_LINE}\n${JSON.stringify(rules)}\n`;
}

/** The rules in a file's text; undefined for anything else (the hook then refuses: it fails closed). */
export function parseAdmissionRules(text: string): AdmissionRules | undefined {
  const [first, json] = text.split('\n');
  if (first !== RULES_LINE || json === undefined) return undefined;
  let value: unknown;
  try {
    value = JSON.parse(json);
  } catch {
    return undefined;
  }
  if (typeof value !== 'object' || value === null) return undefined;
  const { exportName, path, fileId, allowedClients, maxConnections } = value as Record<string, unknown>;
  if (typeof exportName !== 'string' || typeof path !== 'string' || !path.startsWith('/')) return undefined;
  if (fileId !== undefined && (typeof fileId !== 'string' || !FILE_ID.test(fileId))) return undefined;
  if (!Array.isArray(allowedClients)) return undefined;
  const cidrs: string[] = [];
  for (const cidr of allowedClients as unknown[]) {
    if (typeof cidr !== 'string' || cidrProblem(cidr) !== undefined) return undefined;
    cidrs.push(cidr);
  }
  if (typeof maxConnections !== 'number' || !Number.isInteger(maxConnections) || maxConnections < 1)
    return undefined;
  return {
    exportName,
    path,
    ...(fileId === undefined ? {} : { fileId }),
    allowedClients: cidrs,
    maxConnections,
  };
}
