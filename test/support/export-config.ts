/** ExportConfig fixtures: what the planner hands a server, for the backends' tests. */
import type { ExportConfig } from '../../src/api/export-config.js';

/** A read-write raw file for nbd-server, one client, no allow-list; override what a test is about. */
export function rawExportConfig(
  exportName: string,
  path: string,
  overrides: Partial<ExportConfig> = {},
): ExportConfig {
  return {
    exportName,
    server: 'nbd-server',
    path,
    format: 'raw',
    blockDevice: false,
    readOnly: false,
    maxConnections: 1,
    allowedClients: [],
    ...overrides,
  };
}
