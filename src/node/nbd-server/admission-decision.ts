/**
 * Whether nbd-server may serve one connecting client: the admission hook's decision, pure.
 * The file comes first and binds everyone, the controller included: a name that leads to
 * another file than the one checked is served to no one. Then the client: the controller's
 * own probe and readers are neither filtered nor counted (they run as root beside the
 * files and read them anyway; a probe refused at the limit would say nothing about the
 * export), every other client must be in the allow-list and under the limit.
 */
import { isAddressAllowed } from '../../api/cidr.js';
import type { AdmissionRules } from './admission-rules.js';

export type ConnectingClient =
  { kind: 'controller' } | { kind: 'remote'; address: string } | { kind: 'unidentified'; problem: string };

/** What `lstat` says the export's path is now. */
export type FileAtPath =
  | { kind: 'missing' }
  | { kind: 'symlink' }
  | { kind: 'file' | 'block-device' | 'other'; fileId: string; nlink: number };

export type AdmissionDecision = { admit: true; counted: boolean } | { admit: false; reason: string };

export function decideAdmission(
  rules: AdmissionRules,
  client: ConnectingClient,
  file: FileAtPath,
  /** Clients of this export being served now (not counting this one). */
  servedNow: number,
): AdmissionDecision {
  const fileProblem = problemWith(rules, file);
  if (fileProblem !== undefined) return { admit: false, reason: fileProblem };
  switch (client.kind) {
    case 'controller':
      return { admit: true, counted: false };
    case 'unidentified':
      return { admit: false, reason: `cannot tell who the client is: ${client.problem}` };
    case 'remote':
      if (!isAddressAllowed(client.address, rules.allowedClients))
        return {
          admit: false,
          reason: `client ${client.address} is not in allowedClients (${rules.allowedClients.join(', ')})`,
        };
      if (servedNow >= rules.maxConnections)
        return {
          admit: false,
          reason: `${servedNow} client(s) already connected; maxConnections is ${rules.maxConnections}`,
        };
      return { admit: true, counted: true };
  }
}

function problemWith(rules: AdmissionRules, file: FileAtPath): string | undefined {
  switch (file.kind) {
    case 'missing':
      return `${rules.path} is gone`;
    case 'symlink':
      return `${rules.path} is now a symlink; the controller checked a file there`;
    case 'other':
      return `${rules.path} is neither a regular file nor a block device`;
    case 'file':
    case 'block-device':
      if (rules.fileId !== undefined && file.fileId !== rules.fileId)
        return `${rules.path} names another file (${file.fileId}) than the one the controller checked (${rules.fileId}); it is served again once checked`;
      if (file.kind === 'file' && file.nlink > 1)
        return `${rules.path} has ${file.nlink} hard links: a name outside the allowed roots may share it`;
      return undefined;
  }
}
