/**
 * Node-wide conflicts, decided deterministically: among resources claiming one export
 * name, or one file with at least one writer, the oldest (creation time, then UID) wins
 * and every other gets a conflict naming the winner.
 */
import type { ConflictObservation } from './observed-state.js';

export interface Claim {
  key: string;
  uid: string;
  creationTimestamp: string;
  exportName: string;
  /** Real path of the image or device, when it could be resolved. */
  realPath?: string;
  writable: boolean;
}

export function decideConflicts(claims: readonly Claim[]): Map<string, ConflictObservation> {
  const ordered = [...claims].sort(olderFirst);
  const conflicts = new Map<string, ConflictObservation>();
  const nameHolders = new Map<string, Claim>();
  const pathHolders = new Map<string, Claim[]>();

  for (const claim of ordered) {
    const nameHolder = nameHolders.get(claim.exportName);
    if (nameHolder) {
      conflicts.set(claim.key, {
        reason: 'ExportNameConflict',
        message: `export name "${claim.exportName}" is already used on this node by ${nameHolder.key}, which is older`,
      });
      continue;
    }
    if (claim.realPath !== undefined) {
      const holders = pathHolders.get(claim.realPath) ?? [];
      const clash = holders.find((h) => h.writable || claim.writable);
      if (clash) {
        conflicts.set(claim.key, {
          reason: 'ImageInUse',
          message: `${claim.realPath} is already exported by ${clash.key}${clash.writable ? ' read-write' : ''}, which is older; one file takes one writer and no readers beside it`,
        });
        continue;
      }
      pathHolders.set(claim.realPath, [...holders, claim]);
    }
    nameHolders.set(claim.exportName, claim);
  }
  return conflicts;
}

function olderFirst(a: Claim, b: Claim): number {
  const byTime = Date.parse(a.creationTimestamp) - Date.parse(b.creationTimestamp);
  if (byTime !== 0 && !Number.isNaN(byTime)) return byTime;
  return a.uid < b.uid ? -1 : a.uid > b.uid ? 1 : 0;
}
