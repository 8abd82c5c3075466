import type { NbdExport } from './types.js';

/**
 * NBD export names this controller accepts. Deliberately narrower than NBD allows: the
 * name is written into nbd-server's config and QEMU's command stream, and appears in
 * URIs, so it is limited to characters that need no quoting anywhere.
 * The length fits every default name (namespace 63 + "." + name 253).
 */
export const EXPORT_NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._:-]*$/;
export const EXPORT_NAME_MAX_LENGTH = 320;
/** nbd-server treats this section name specially. */
const RESERVED_EXPORT_NAMES = new Set(['generic']);

export function exportNameProblem(name: string): string | undefined {
  if (name.length === 0) return 'must not be empty';
  if (name.length > EXPORT_NAME_MAX_LENGTH) return `must be at most ${EXPORT_NAME_MAX_LENGTH} characters`;
  if (!EXPORT_NAME_PATTERN.test(name))
    return 'may contain only letters, digits, ".", "_", ":" and "-", and must start with a letter or digit';
  if (RESERVED_EXPORT_NAMES.has(name.toLowerCase())) return `"${name}" is reserved by nbd-server`;
  return undefined;
}

/**
 * The export name used when the spec names none: `<namespace>.<name>`.
 * Never collides between two resources: a namespace is a DNS label and holds no ".",
 * so the first "." always splits the two parts back unambiguously.
 */
export function defaultExportName(namespace: string, name: string): string {
  return `${namespace}.${name}`;
}

export function effectiveExportName(resource: Pick<NbdExport, 'metadata' | 'spec'>): string {
  return resource.spec.exportName ?? defaultExportName(resource.metadata.namespace, resource.metadata.name);
}
