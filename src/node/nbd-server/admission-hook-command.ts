/**
 * Where the admission hook's programs are on this machine: flock(1) from PATH, the Node
 * runtime running the controller, and the hook's script built next to this module. Run
 * from the TypeScript sources (the tests), the script is the built one in dist/: nbd-server
 * runs it as a program, outside any TypeScript loader.
 */
import { accessSync, constants, existsSync } from 'node:fs';
import { delimiter, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { AdmissionHookCommand } from './render-export-config.js';

export function defaultAdmissionHook(): AdmissionHookCommand {
  const here = fileURLToPath(import.meta.url);
  const script = here.endsWith('.ts')
    ? join(here.replace(/\/src\/node\/nbd-server\/[^/]+$/, '/dist/node/nbd-server'), 'admission-hook.js')
    : join(here, '..', 'admission-hook.js');
  if (!existsSync(script))
    throw new Error(`nbd-server's admission hook is missing at ${script}; build the project (npm run build)`);
  return { flock: programInPath('flock'), node: process.execPath, script };
}

function programInPath(name: string): string {
  for (const dir of (process.env['PATH'] ?? '').split(delimiter)) {
    if (!dir.startsWith('/')) continue;
    const candidate = join(dir, name);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  throw new Error(`${name} not found in PATH (util-linux); nbd-server's admission hook needs it`);
}
