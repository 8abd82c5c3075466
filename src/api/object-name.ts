/**
 * Kubernetes' rules for an NbdExport's own name and namespace, for the sources that are not
 * the API server (which enforces them itself). Both exclude `_`, `/` and `~`, which is what
 * lets file names built from them stay unambiguous.
 */

/** A DNS subdomain: lower-case alphanumerics, `-` and `.`, at most 253 characters. */
export const MAX_OBJECT_NAME_LENGTH = 253;
/** A DNS label: lower-case alphanumerics and `-`, at most 63 characters. */
export const MAX_NAMESPACE_LENGTH = 63;

const OBJECT_NAME_PATTERN = /^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/;
const NAMESPACE_PATTERN = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;

export function isValidObjectName(name: unknown): name is string {
  return typeof name === 'string' && name.length <= MAX_OBJECT_NAME_LENGTH && OBJECT_NAME_PATTERN.test(name);
}

export function isValidNamespace(namespace: unknown): namespace is string {
  return (
    typeof namespace === 'string' &&
    namespace.length <= MAX_NAMESPACE_LENGTH &&
    NAMESPACE_PATTERN.test(namespace)
  );
}
