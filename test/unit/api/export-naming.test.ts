import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  buildBackupExportName,
  isBackupExport,
  parseBackupExportName,
} from '../../../src/api/backup-export-name.js';
import { defaultExportName, exportNameProblem } from '../../../src/api/export-name.js';

const dnsLabel = fc.stringMatching(/^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/);
const dnsSubdomain = fc
  .array(dnsLabel, { minLength: 1, maxLength: 4 })
  .map((parts) => parts.join('.'))
  .filter((s) => s.length <= 253);
const vmId = fc.stringMatching(/^[A-Za-z0-9][A-Za-z0-9._-]{0,40}$/);
const time = fc.date({
  min: new Date('2000-01-01T00:00:00Z'),
  max: new Date('2999-12-31T23:59:59Z'),
  noInvalidDate: true,
});
const backupInfo = fc.record({
  vmId,
  diskIndex: fc.integer({ min: 0, max: 9999 }),
  backupType: fc.constantFrom('full' as const, 'incr' as const),
  time,
});

describe('defaultExportName', () => {
  it('is a valid export name for every namespace and name', () => {
    fc.assert(
      fc.property(
        dnsLabel,
        dnsSubdomain,
        (ns, name) => exportNameProblem(defaultExportName(ns, name)) === undefined,
      ),
    );
  });

  it('never maps two different resources to one name', () => {
    fc.assert(
      fc.property(dnsLabel, dnsSubdomain, dnsLabel, dnsSubdomain, (ns1, n1, ns2, n2) => {
        fc.pre(ns1 !== ns2 || n1 !== n2);
        return defaultExportName(ns1, n1) !== defaultExportName(ns2, n2);
      }),
      { numRuns: 2000 },
    );
  });
});

describe('backup export names', () => {
  it('builds the documented form', () => {
    expect(
      buildBackupExportName({
        vmId: 'vm-1234',
        diskIndex: 0,
        backupType: 'incr',
        time: new Date('2026-11-24T10:30:00.123Z'),
      }),
    ).toBe('backup-vm-1234-disk0-incr-20261124T103000123Z');
  });

  it('parses back to what built it', () => {
    fc.assert(
      fc.property(backupInfo, (info) => {
        const parsed = parseBackupExportName(buildBackupExportName(info));
        expect(parsed).toEqual(info);
      }),
    );
  });

  it('gives different names to different backups', () => {
    fc.assert(
      fc.property(backupInfo, backupInfo, (a, b) => {
        fc.pre(
          a.vmId !== b.vmId ||
            a.diskIndex !== b.diskIndex ||
            a.backupType !== b.backupType ||
            a.time.getTime() !== b.time.getTime(),
        );
        return buildBackupExportName(a) !== buildBackupExportName(b);
      }),
      { numRuns: 2000 },
    );
  });

  it('produces names that are valid export names', () => {
    fc.assert(
      fc.property(backupInfo, (info) => exportNameProblem(buildBackupExportName(info)) === undefined),
    );
  });

  it('tells backup exports from others', () => {
    expect(isBackupExport('backup-vm-1-disk2-full-20261124T103000123Z')).toBe(true);
    for (const other of [
      'migration-vm-1-disk0',
      'backups.vm-1234-disk0',
      'backup-vm-1-disk2-diff-20261124T103000123Z',
      'backup-vm-1-disk2-full-20261324T103000123Z', // month 13
      'backup-vm-1-disk2-full-20260230T103000123Z', // February 30th
      'backup--disk2-full-20261124T103000123Z',
      'backup-vm-1-disk02-full-20261124T103000123Z',
    ])
      expect(isBackupExport(other), other).toBe(false);
  });

  it('rejects inputs that cannot make a safe name', () => {
    const time = new Date('2026-11-24T10:30:00Z');
    expect(() => buildBackupExportName({ vmId: 'vm 1', diskIndex: 0, backupType: 'full', time })).toThrow(
      TypeError,
    );
    expect(() => buildBackupExportName({ vmId: 'vm-1', diskIndex: -1, backupType: 'full', time })).toThrow(
      /diskIndex/,
    );
    expect(() =>
      buildBackupExportName({ vmId: 'vm-1', diskIndex: 0, backupType: 'full', time: new Date('x') }),
    ).toThrow(/time/);
  });
});
