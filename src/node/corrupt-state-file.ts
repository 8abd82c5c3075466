/**
 * A state file the controller cannot parse is evidence, not rubbish: it is moved aside as
 * `<name>.corrupt-<time>` (never deleted) and the caller rebuilds the state from what the
 * servers really serve. Every move is logged and counted for /metrics.
 */
import { rename } from 'node:fs/promises';
import type { Logger } from 'pino';

let movedAside = 0;

/** How many corrupt state files this process has moved aside. */
export function corruptStateFilesMovedAside(): number {
  return movedAside;
}

/** `2026-11-30T10:17:16.123Z` → `20261130T101716123Z`: sortable, and no `:` in a file name. */
function compactTime(at: Date): string {
  return at.toISOString().replace(/[-:.]/g, '');
}

/**
 * Renames the corrupt file at `path` to `<path>.corrupt-<time>` and logs why. Returns the new
 * path, or undefined when the file could not be moved (it is then left where it is, and the
 * caller still ignores its content).
 */
export async function moveCorruptStateFileAside(
  path: string,
  reason: unknown,
  logger: Logger,
  at: Date = new Date(),
): Promise<string | undefined> {
  const aside = `${path}.corrupt-${compactTime(at)}`;
  const why = reason instanceof Error ? reason.message : String(reason);
  try {
    await rename(path, aside);
  } catch (error) {
    logger.error(
      { path, reason: why, err: error },
      'a corrupt state file could not be moved aside; ignoring its content',
    );
    movedAside++;
    return undefined;
  }
  movedAside++;
  logger.warn({ path, movedTo: aside, reason: why }, 'moved a corrupt state file aside; rebuilding it');
  return aside;
}
