/** QMP ids of exports, and the exports.json round trip. */
import fc from 'fast-check';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  CorruptExportStateError,
  exportIdsOf,
  ID_PREFIX,
  readExportState,
  writeExportState,
  type ExportRecord,
} from '../../../../src/node/qemu-storage-daemon/export-state.js';

describe('exportIdsOf', () => {
  it('gives short, prefixed, valid QEMU ids, the same for the same input', () => {
    fc.assert(
      fc.property(
        fc.string({ minLength: 1, maxLength: 2000 }),
        fc.stringMatching(/^[0-9a-f]{16}$/),
        (name, fp) => {
          const ids = exportIdsOf(name, fp);
          for (const id of [ids.id, ids.nodeNames.file, ids.nodeNames.format]) {
            expect(id.length).toBeLessThanOrEqual(31);
            expect(id).toMatch(/^[A-Za-z][A-Za-z0-9_.-]*$/);
            expect(id.startsWith(ID_PREFIX)).toBe(true);
          }
          expect(exportIdsOf(name, fp)).toEqual(ids);
        },
      ),
    );
  });

  it('differs when the name or the fingerprint differs', () => {
    const a = exportIdsOf('disk', '0123456789abcdef');
    expect(exportIdsOf('disk', 'fedcba9876543210').id).not.toBe(a.id);
    expect(exportIdsOf('disk2', '0123456789abcdef').id).not.toBe(a.id);
    expect(new Set([a.id, a.nodeNames.file, a.nodeNames.format]).size).toBe(3);
  });
});

describe('export state file', () => {
  it('round-trips, reads a missing file as empty, and rejects a foreign file', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'nbdx-state-'));
    try {
      const path = join(dir, 'exports.json');
      expect(await readExportState(path)).toEqual(new Map());
      const record: ExportRecord = {
        ...exportIdsOf('disk', '0123456789abcdef'),
        fingerprint: '0123456789abcdef',
        state: 'served',
        config: {
          exportName: 'disk',
          server: 'qemu-storage-daemon',
          path: '/images/disk.qcow2',
          format: 'qcow2',
          blockDevice: false,
          readOnly: false,
          maxConnections: 1,
          allowedClients: [],
        },
      };
      await writeExportState(path, new Map([['disk', record]]));
      expect(await readExportState(path)).toEqual(new Map([['disk', record]]));
      expect(await readdir(dir)).toEqual(['exports.json']);

      await writeFile(path, '{"something":"else"}');
      await expect(readExportState(path)).rejects.toThrow(CorruptExportStateError);
      await expect(readExportState(path)).rejects.toThrow(/version 1/);
      await writeFile(path, '{"version": 1, "expo');
      await expect(readExportState(path)).rejects.toThrow(CorruptExportStateError);
      await writeFile(path, 'null');
      await expect(readExportState(path)).rejects.toThrow(CorruptExportStateError);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
