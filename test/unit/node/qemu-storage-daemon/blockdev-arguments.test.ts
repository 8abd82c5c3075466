/** The blockdev-add arguments of an export's nodes: what decides how QEMU opens the image. */
import { describe, expect, it } from 'vitest';
import type { ExportConfig } from '../../../../src/api/export-config.js';
import {
  formatNodeArguments,
  protocolNodeArguments,
} from '../../../../src/node/qemu-storage-daemon/blockdev-arguments.js';

function config(overrides: Partial<ExportConfig>): ExportConfig {
  return {
    exportName: 'e',
    server: 'qemu-storage-daemon',
    path: '/var/lib/nbd-exports/e.qcow2',
    format: 'qcow2',
    blockDevice: false,
    readOnly: false,
    maxConnections: 1,
    allowedClients: [],
    ...overrides,
  };
}

describe('protocolNodeArguments', () => {
  it('opens a block device with O_DIRECT, locked, through host_device', () => {
    expect(
      protocolNodeArguments(config({ path: '/dev/zram1', format: 'raw', blockDevice: true }), 'n-f'),
    ).toEqual({
      driver: 'host_device',
      'node-name': 'n-f',
      filename: '/dev/zram1',
      locking: 'on',
      'read-only': false,
      cache: { direct: true },
    });
  });

  it('keeps the page cache for an image file', () => {
    const args = protocolNodeArguments(config({ readOnly: true }), 'n-f');
    expect(args).toEqual({
      driver: 'file',
      'node-name': 'n-f',
      filename: '/var/lib/nbd-exports/e.qcow2',
      locking: 'on',
      'read-only': true,
    });
  });
});

describe('formatNodeArguments', () => {
  it('puts the format driver on the protocol node, read-only as the export', () => {
    expect(formatNodeArguments(config({ readOnly: true }), 'n-d', 'n-f')).toEqual({
      driver: 'qcow2',
      'node-name': 'n-d',
      file: 'n-f',
      'read-only': true,
      // No backing node given: none, whatever the image's header names.
      backing: null,
    });
  });

  it('names the backing node the controller chose; a raw node has no backing key at all', () => {
    expect(formatNodeArguments(config({}), 'n-d', 'n-f', 'n-b0d')).toMatchObject({ backing: 'n-b0d' });
    expect(formatNodeArguments({ format: 'raw', readOnly: true }, 'r-d', 'r-f')).not.toHaveProperty(
      'backing',
    );
  });
});
