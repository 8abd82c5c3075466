import { describe, expect, it } from 'vitest';
import {
  collectExportFigures,
  type ExportFigureSources,
} from '../../../../src/controller/metrics/export-figures.js';
import type { LedgerEntry as OwnershipRecord } from '../../../../src/plan/observed-state.js';

function sources(records: OwnershipRecord[]) {
  const asked = { nbdServer: 0, nbdServerStale: 0, qemu: 0 };
  const figureSources: ExportFigureSources = {
    ledgerRecords: () => records,
    nbdServerConnections: () => {
      asked.nbdServer++;
      return Promise.resolve(new Map([['ns.raw', [101, 102]]]));
    },
    nbdServerStaleConnections: () => {
      asked.nbdServerStale++;
      return Promise.resolve(new Map([['ns.raw', 1]]));
    },
    qemuHighestWrittenOffsets: () => {
      asked.qemu++;
      return Promise.resolve(new Map([['ns.qcow2', 65536]]));
    },
  };
  return { figureSources, asked };
}

describe('collectExportFigures', () => {
  it('names each served export by its resource and joins what its server tells', async () => {
    const { figureSources } = sources([
      { uid: 'u1', key: 'ns/raw', exportName: 'ns.raw', server: 'nbd-server' },
      { uid: 'u2', key: 'ns/idle', exportName: 'ns.idle', server: 'nbd-server' },
      { uid: 'u3', key: 'ns/qcow2', exportName: 'ns.qcow2', server: 'qemu-storage-daemon' },
      { uid: 'u4', key: 'ns/adding', exportName: 'ns.adding', server: 'qemu-storage-daemon' },
      { uid: 'u5', key: 'ns/no-export', createdImage: { path: '/srv/x.qcow2' } },
    ]);
    expect(await collectExportFigures(figureSources)).toEqual([
      {
        namespace: 'ns',
        name: 'raw',
        export: 'ns.raw',
        server: 'nbd-server',
        connectedClients: 2,
        staleClients: 1,
      },
      {
        namespace: 'ns',
        name: 'idle',
        export: 'ns.idle',
        server: 'nbd-server',
        connectedClients: 0,
        staleClients: 0,
      },
      {
        namespace: 'ns',
        name: 'qcow2',
        export: 'ns.qcow2',
        server: 'qemu-storage-daemon',
        highestWrittenOffsetBytes: 65536,
      },
      // Not (yet) served by the daemon: listed, but with no figure rather than a made-up 0.
      { namespace: 'ns', name: 'adding', export: 'ns.adding', server: 'qemu-storage-daemon' },
    ]);
  });

  it('asks a server only when it serves something of ours', async () => {
    const { figureSources, asked } = sources([
      { uid: 'u1', key: 'ns/raw', exportName: 'ns.raw', server: 'nbd-server' },
    ]);
    await collectExportFigures(figureSources);
    expect(asked).toEqual({ nbdServer: 1, nbdServerStale: 1, qemu: 0 });
    const none = sources([]);
    expect(await collectExportFigures(none.figureSources)).toEqual([]);
    expect(none.asked).toEqual({ nbdServer: 0, nbdServerStale: 0, qemu: 0 });
  });
});
