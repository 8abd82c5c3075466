#!/usr/bin/env node
/**
 * Entry point: dispatches the subcommands. Wiring only.
 *   run            converge this node to its NbdExports (Kubernetes or a directory)
 *   get            print the exports of a directory source, like `kubectl get nbdexports`
 *   stop-servers   stop the NBD servers of a state directory and cut their clients
 */
import { parseArgs } from 'node:util';
import { renderExportTable } from './cli/get-command.js';
import { runController } from './cli/run-command.js';
import { parseRunOptions, RUN_USAGE, UsageError } from './cli/run-options.js';
import { stopServers } from './controller/create-node-services.js';

const USAGE = `usage: nbd-export-controller <run|get|stop-servers> [flags]

${RUN_USAGE}

  nbd-export-controller get --status-dir DIR [-o wide]
  nbd-export-controller stop-servers --state-dir DIR`;

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  switch (command) {
    case 'run':
      if (rest.includes('--help') || rest.includes('-h')) {
        process.stdout.write(`${RUN_USAGE}\n`);
        return 0;
      }
      await runController(parseRunOptions(rest));
      return -1; // keeps running until a signal
    case 'get': {
      const { values } = parseArgs({
        args: rest,
        options: { 'status-dir': { type: 'string' }, output: { type: 'string', short: 'o' } },
      });
      if (!values['status-dir']) throw new UsageError('get needs --status-dir');
      process.stdout.write(
        await renderExportTable(values['status-dir'], new Date(), values.output === 'wide'),
      );
      return 0;
    }
    case 'stop-servers': {
      const { values } = parseArgs({ args: rest, options: { 'state-dir': { type: 'string' } } });
      if (!values['state-dir']) throw new UsageError('stop-servers needs --state-dir');
      await stopServers(values['state-dir']);
      return 0;
    }
    case undefined:
    case 'help':
    case '--help':
    case '-h':
      process.stdout.write(`${USAGE}\n`);
      return 0;
    default:
      throw new UsageError(`unknown command "${command}"`);
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    if (code >= 0) process.exit(code);
  },
  (error: unknown) => {
    if (error instanceof UsageError || (error instanceof TypeError && 'code' in error)) {
      process.stderr.write(`nbd-export-controller: ${error.message}\n\n${USAGE}\n`);
      process.exit(2);
    }
    process.stderr.write(
      `nbd-export-controller: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`,
    );
    process.exit(1);
  },
);
