/**
 * Validation of an NbdExport spec, with a field path in every error. It says the same as
 * the CRD's schema and CEL rules (test/unit/api/crd-agreement.test.ts checks a shared
 * corpus against both), so a directory-sourced resource, which no API server checked,
 * gets the same answers as one applied with kubectl.
 * Node-specific rules (allowed roots, device patterns) are checked by the planner.
 */
import { cidrProblem } from './cidr.js';
import { exportNameProblem } from './export-name.js';
import { parseQuantity } from './quantity.js';
import { DELETION_POLICIES, IMAGE_FORMATS, PREALLOCATIONS } from './types.js';
import type { NbdExportSpec } from './types.js';

export interface FieldError {
  /** e.g. `spec.source.file.create.size` */
  path: string;
  message: string;
}

/** Absolute, normalised paths of safe characters: they are written into config files. */
export const PATH_PATTERN = /^\/[A-Za-z0-9._@%+,:/-]*$/;
export const PATH_MAX_LENGTH = 4096;
export const NODE_NAME_PATTERN = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;
export const MAX_CONNECTIONS_LIMIT = 128;

export type SpecValidation = { ok: true; spec: NbdExportSpec } | { ok: false; errors: FieldError[] };

type Json = Record<string, unknown>;

/** Validates an untyped spec (from parsed YAML or an API object). */
export function validateSpec(input: unknown): SpecValidation {
  const errors: FieldError[] = [];
  const error = (path: string, message: string) => void errors.push({ path, message });

  const spec = objectAt({ spec: input }, 'spec', error, true);
  if (!spec) return { ok: false, errors };
  allowOnly(
    spec,
    'spec',
    ['nodeName', 'exportName', 'source', 'readOnly', 'maxConnections', 'allowedClients', 'deletionPolicy'],
    error,
  );

  const nodeName = stringAt(spec, 'nodeName', 'spec.nodeName', error, true);
  if (nodeName !== undefined && (!NODE_NAME_PATTERN.test(nodeName) || nodeName.length > 253))
    error('spec.nodeName', `"${nodeName}" is not a valid node name (lower-case DNS subdomain)`);

  const exportName = stringAt(spec, 'exportName', 'spec.exportName', error, false);
  if (exportName !== undefined) {
    const problem = exportNameProblem(exportName);
    if (problem) error('spec.exportName', problem);
  }

  booleanAt(spec, 'readOnly', 'spec.readOnly', error);
  const maxConnections = integerAt(spec, 'maxConnections', 'spec.maxConnections', error);
  if (maxConnections !== undefined) {
    // Read-write exports may take more than one connection too: one client's several
    // connections (NBD multi-conn, nbdcopy's default) are how the data path reaches its speed.
    if (maxConnections < 1 || maxConnections > MAX_CONNECTIONS_LIMIT)
      error('spec.maxConnections', `must be between 1 and ${MAX_CONNECTIONS_LIMIT}`);
  }

  const allowedClients = spec['allowedClients'];
  if (allowedClients !== undefined) {
    if (!Array.isArray(allowedClients)) error('spec.allowedClients', 'must be a list of CIDRs');
    else
      allowedClients.forEach((entry: unknown, i) => {
        const path = `spec.allowedClients[${i}]`;
        const problem = typeof entry === 'string' ? cidrProblem(entry) : 'must be a string';
        if (problem) error(path, problem);
      });
  }

  const deletionPolicy = enumAt(spec, 'deletionPolicy', 'spec.deletionPolicy', DELETION_POLICIES, error);

  const source = objectAt(spec, 'source', error, true, 'spec.source');
  if (source) {
    allowOnly(source, 'spec.source', ['file', 'blockDevice'], error);
    const hasFile = source['file'] !== undefined;
    const hasDevice = source['blockDevice'] !== undefined;
    if (hasFile === hasDevice) error('spec.source', 'exactly one of file or blockDevice must be set');
    if (hasFile) validateFileSource(source['file'], error);
    if (hasDevice) {
      const device = objectAt(source, 'blockDevice', error, true, 'spec.source.blockDevice');
      if (device) {
        allowOnly(device, 'spec.source.blockDevice', ['path'], error);
        pathAt(device, 'path', 'spec.source.blockDevice.path', error, true);
      }
      if (deletionPolicy === 'Delete')
        error(
          'spec.deletionPolicy',
          'Delete applies only to files the controller created; a block device is never deleted',
        );
    }
  }

  return errors.length === 0 ? { ok: true, spec: spec as unknown as NbdExportSpec } : { ok: false, errors };
}

function validateFileSource(value: unknown, error: (path: string, message: string) => void): void {
  const base = 'spec.source.file';
  const file = objectAt({ file: value }, 'file', error, true, base);
  if (!file) return;
  allowOnly(file, base, ['path', 'format', 'create'], error);
  pathAt(file, 'path', `${base}.path`, error, true);
  const format = enumAt(file, 'format', `${base}.format`, IMAGE_FORMATS, error, true);
  const create =
    file['create'] === undefined ? undefined : objectAt(file, 'create', error, true, `${base}.create`);
  if (!create) return;
  const cbase = `${base}.create`;
  allowOnly(create, cbase, ['size', 'backingFile', 'backingFormat', 'preallocation'], error);
  const size = create['size'];
  if (size !== undefined) {
    if (typeof size !== 'string' && typeof size !== 'number')
      error(`${cbase}.size`, 'must be a quantity such as 10Gi');
    else {
      const parsed = parseQuantity(size);
      if (!parsed.ok) error(`${cbase}.size`, parsed.message);
    }
  }
  const backingFile = pathAt(create, 'backingFile', `${cbase}.backingFile`, error, false);
  enumAt(create, 'backingFormat', `${cbase}.backingFormat`, IMAGE_FORMATS, error);
  enumAt(create, 'preallocation', `${cbase}.preallocation`, PREALLOCATIONS, error);
  if (backingFile !== undefined && format === 'raw')
    error(`${cbase}.backingFile`, 'a raw image cannot have a backing file; use format: qcow2');
  if (create['backingFormat'] !== undefined && backingFile === undefined)
    error(`${cbase}.backingFormat`, 'backingFormat needs backingFile');
  if (size === undefined && backingFile === undefined)
    error(`${cbase}.size`, 'size is required unless backingFile is set (the size is then taken from it)');
  if (backingFile !== undefined && backingFile === file['path'])
    error(`${cbase}.backingFile`, 'an image cannot be its own backing file');
}

function objectAt(
  parent: unknown,
  key: string,
  error: (path: string, message: string) => void,
  required: boolean,
  path = key,
): Json | undefined {
  const value = isObject(parent) ? parent[key] : undefined;
  if (value === undefined || value === null) {
    if (required) error(path, 'is required');
    return undefined;
  }
  if (!isObject(value)) {
    error(path, 'must be an object');
    return undefined;
  }
  return value;
}

function stringAt(
  obj: Json,
  key: string,
  path: string,
  error: (p: string, m: string) => void,
  required: boolean,
) {
  const value = obj[key];
  if (value === undefined) {
    if (required) error(path, 'is required');
    return undefined;
  }
  if (typeof value !== 'string') {
    error(path, 'must be a string');
    return undefined;
  }
  if (required && value.length === 0) {
    error(path, 'must not be empty');
    return undefined;
  }
  return value;
}

function pathAt(
  obj: Json,
  key: string,
  path: string,
  error: (p: string, m: string) => void,
  required: boolean,
) {
  const value = stringAt(obj, key, path, error, required);
  if (value === undefined) return undefined;
  if (value.length > PATH_MAX_LENGTH) error(path, `must be at most ${PATH_MAX_LENGTH} characters`);
  else if (!PATH_PATTERN.test(value))
    error(path, `"${value}" must be an absolute path of letters, digits and . _ @ % + , : / - only`);
  else if (
    value.split('/').some((part) => part === '.' || part === '..') ||
    value.includes('//') ||
    (value.length > 1 && value.endsWith('/'))
  )
    error(path, `"${value}" must be normalised: no ".", ".." or empty components`);
  else return value;
  return undefined;
}

function booleanAt(obj: Json, key: string, path: string, error: (p: string, m: string) => void) {
  const value = obj[key];
  if (value === undefined) return undefined;
  if (typeof value !== 'boolean') {
    error(path, 'must be true or false');
    return undefined;
  }
  return value;
}

function integerAt(obj: Json, key: string, path: string, error: (p: string, m: string) => void) {
  const value = obj[key];
  if (value === undefined) return undefined;
  if (typeof value !== 'number' || !Number.isInteger(value)) {
    error(path, 'must be a whole number');
    return undefined;
  }
  return value;
}

function enumAt<T extends string>(
  obj: Json,
  key: string,
  path: string,
  allowed: readonly T[],
  error: (p: string, m: string) => void,
  required = false,
): T | undefined {
  const value = obj[key];
  if (value === undefined) {
    if (required) error(path, `is required (one of ${allowed.join(', ')})`);
    return undefined;
  }
  if (typeof value !== 'string' || !(allowed as readonly string[]).includes(value)) {
    error(path, `must be one of ${allowed.join(', ')}`);
    return undefined;
  }
  return value as T;
}

function allowOnly(obj: Json, path: string, keys: readonly string[], error: (p: string, m: string) => void) {
  for (const key of Object.keys(obj))
    if (!keys.includes(key)) error(`${path}.${key}`, 'is not a known field');
}

function isObject(value: unknown): value is Json {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}
