/**
 * `get`: a table like `kubectl get nbdexports`, read from a directory source's status files.
 */
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { loadAll } from 'js-yaml';
import type { NbdExport } from '../api/types.js';

export async function renderExportTable(statusDir: string, now: Date, wide = false): Promise<string> {
  const objects: NbdExport[] = [];
  for (const name of (await readdir(statusDir)).filter((n) => n.endsWith('.yaml')).sort()) {
    const [object] = loadAll(await readFile(join(statusDir, name), 'utf8'));
    if (object && typeof object === 'object') objects.push(object as NbdExport);
  }
  const header = ['NAMESPACE', 'NAME', 'NODE', 'EXPORT', 'FORMAT', 'SIZE', 'READY', 'AGE'];
  if (wide) header.push('REASON', 'URI');
  const rows = objects.map((o) => {
    const ready = o.status?.conditions?.find((c) => c.type === 'Ready');
    const row = [
      o.metadata.namespace,
      o.metadata.name,
      o.spec.nodeName ?? '',
      o.status?.exportName ?? '',
      o.status?.format ?? '',
      o.status?.virtualSize === undefined ? '' : String(o.status.virtualSize),
      ready?.status ?? 'Unknown',
      age(o.metadata.creationTimestamp, now),
    ];
    if (wide) row.push(ready?.reason ?? '', o.status?.uri ?? '');
    return row;
  });
  if (rows.length === 0) return 'No resources found.\n';
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const format = (row: string[]) =>
    row
      .map((cell, i) => cell.padEnd(widths[i] ?? 0))
      .join('   ')
      .trimEnd();
  return `${[header, ...rows].map(format).join('\n')}\n`;
}

/** kubectl's short ages: 45s, 12m, 5h, 3d. */
export function age(creationTimestamp: string | undefined, now: Date): string {
  if (!creationTimestamp) return '<unknown>';
  const seconds = Math.max(0, Math.floor((now.getTime() - Date.parse(creationTimestamp)) / 1000));
  if (seconds < 120) return `${seconds}s`;
  if (seconds < 7200) return `${Math.floor(seconds / 60)}m`;
  if (seconds < 172800) return `${Math.floor(seconds / 3600)}h`;
  return `${Math.floor(seconds / 86400)}d`;
}
