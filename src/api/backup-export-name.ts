/**
 * The backup platform's export names, which existing capture agents use to find their
 * exports: `backup-<vmId>-disk<N>-<full|incr>-<UTC time to the millisecond>`, e.g.
 * `backup-vm-1234-disk0-incr-20261124T103000123Z`. Everything else is a migration (or
 * other) export. The name is collision-free for one VM disk as long as two backups of it
 * do not start in the same millisecond, and it parses back to what built it.
 */
import { EXPORT_NAME_MAX_LENGTH, exportNameProblem } from './export-name.js';

export type BackupType = 'full' | 'incr';

export interface BackupExportInfo {
  vmId: string;
  diskIndex: number;
  backupType: BackupType;
  time: Date;
}

const PREFIX = 'backup-';
const VM_ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;
const VM_ID_MAX_LENGTH = 128;
const NAME_PATTERN = /^backup-(.+)-disk(0|[1-9][0-9]{0,3})-(full|incr)-(\d{8}T\d{9}Z)$/;

export function buildBackupExportName(info: BackupExportInfo): string {
  const { vmId, diskIndex, backupType, time } = info;
  if (!VM_ID_PATTERN.test(vmId) || vmId.length > VM_ID_MAX_LENGTH)
    throw new TypeError(
      `vmId ${JSON.stringify(vmId)} must match ${VM_ID_PATTERN.source} (at most ${VM_ID_MAX_LENGTH})`,
    );
  if (!Number.isInteger(diskIndex) || diskIndex < 0 || diskIndex > 9999)
    throw new TypeError(`diskIndex ${diskIndex} must be a whole number from 0 to 9999`);
  if (backupType !== 'full' && backupType !== 'incr')
    throw new TypeError(`backupType ${JSON.stringify(backupType)} must be "full" or "incr"`);
  if (Number.isNaN(time.getTime()) || time.getUTCFullYear() < 1000 || time.getUTCFullYear() > 9999)
    throw new TypeError(`time ${String(time)} must be a valid date with a four-digit year`);
  const name = `${PREFIX}${vmId}-disk${diskIndex}-${backupType}-${formatCompactTime(time)}`;
  const problem = exportNameProblem(name);
  if (problem) throw new TypeError(`backup export name "${name}" ${problem}`);
  return name;
}

/** Parses a backup export name; undefined for any other name. */
export function parseBackupExportName(name: string): BackupExportInfo | undefined {
  if (name.length > EXPORT_NAME_MAX_LENGTH) return undefined;
  const match = NAME_PATTERN.exec(name);
  if (!match) return undefined;
  const [, vmId = '', disk = '', type = '', stamp = ''] = match;
  if (!VM_ID_PATTERN.test(vmId) || vmId.length > VM_ID_MAX_LENGTH) return undefined;
  const time = parseCompactTime(stamp);
  if (!time) return undefined;
  return { vmId, diskIndex: Number(disk), backupType: type as BackupType, time };
}

export function isBackupExport(name: string): boolean {
  return parseBackupExportName(name) !== undefined;
}

/** `20261124T103000123Z`: sortable, and free of characters export names forbid. */
function formatCompactTime(time: Date): string {
  const iso = time.toISOString(); // 2026-11-24T10:30:00.123Z
  return `${iso.slice(0, 4)}${iso.slice(5, 7)}${iso.slice(8, 10)}T${iso.slice(11, 13)}${iso.slice(14, 16)}${iso.slice(17, 19)}${iso.slice(20, 23)}Z`;
}

function parseCompactTime(stamp: string): Date | undefined {
  const iso = `${stamp.slice(0, 4)}-${stamp.slice(4, 6)}-${stamp.slice(6, 8)}T${stamp.slice(9, 11)}:${stamp.slice(11, 13)}:${stamp.slice(13, 15)}.${stamp.slice(15, 18)}Z`;
  const time = new Date(iso);
  // Reject dates that JavaScript silently rolls over (e.g. February 30th).
  return !Number.isNaN(time.getTime()) && formatCompactTime(time) === stamp ? time : undefined;
}
