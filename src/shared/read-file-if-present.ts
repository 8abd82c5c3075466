/**
 * Reading a state file that may not exist yet: missing is an answer (undefined), any
 * other failure (permissions, I/O) is an error the caller must see.
 */
import { readFile } from 'node:fs/promises';

/** The file's text, or undefined when there is no file at `path`. */
export async function readFileIfPresent(path: string): Promise<string | undefined> {
  try {
    return await readFile(path, 'utf8');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw error;
  }
}
