/**
 * The NbdExport resource (group nbd.dev, version v1alpha1), as TypeScript types.
 * The CRD in crds/ is the schema's source of truth; test/unit/api/crd-agreement.test.ts
 * keeps these types, the validation in validate-spec.ts and the CRD in step.
 */

export const API_GROUP = 'nbd.dev';
export const API_VERSION = 'v1alpha1';
export const API_GROUP_VERSION = `${API_GROUP}/${API_VERSION}`;
export const KIND = 'NbdExport';
export const PLURAL = 'nbdexports';
/** Guards node-side cleanup: removed only after the node no longer serves the export. */
export const FINALIZER = 'nbd.dev/node-cleanup';

export type ImageFormat = 'qcow2' | 'raw';
export const IMAGE_FORMATS: readonly ImageFormat[] = ['qcow2', 'raw'];

export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';
export const PREALLOCATIONS: readonly Preallocation[] = ['off', 'metadata', 'falloc', 'full'];

export type DeletionPolicy = 'Retain' | 'Delete';
export const DELETION_POLICIES: readonly DeletionPolicy[] = ['Retain', 'Delete'];

/** Which program serves an export. */
export type ServerKind = 'nbd-server' | 'qemu-storage-daemon';

export interface ImageCreateSpec {
  /** Kubernetes quantity (e.g. 10Gi). Taken from the backing file when omitted. */
  size?: string;
  /** Absolute path of the backing image, for incrementals. */
  backingFile?: string;
  /** Format of the backing image; probed from the file when omitted. */
  backingFormat?: ImageFormat;
  preallocation?: Preallocation;
}

export interface FileSource {
  path: string;
  format: ImageFormat;
  /** Create the image when missing. An existing file is never overwritten. */
  create?: ImageCreateSpec;
}

export interface BlockDeviceSource {
  path: string;
}

export interface ExportSource {
  file?: FileSource;
  blockDevice?: BlockDeviceSource;
}

export interface NbdExportSpec {
  nodeName: string;
  exportName?: string;
  source: ExportSource;
  readOnly?: boolean;
  /**
   * Connections served at once (default 1), the controller's own not counted. One client using
   * several connections (NBD multi-conn) needs as many. Enforced by nbd-server's admission hook,
   * or by the node's firewall on the port of an export's own qemu-storage-daemon; absent on an
   * export of the shared qemu-storage-daemon, no limit (status.access).
   */
  maxConnections?: number;
  /** CIDR allow-list; empty or absent allows every client that reaches the port. */
  allowedClients?: string[];
  deletionPolicy?: DeletionPolicy;
}

export type ConditionStatus = 'True' | 'False' | 'Unknown';

/** The metav1.Condition shape. */
export interface Condition {
  type: string;
  status: ConditionStatus;
  reason: string;
  message: string;
  observedGeneration?: number;
  lastTransitionTime: string;
}

/** Asks for a verification of the seal: any new value starts one (a restore's id, a date). */
export const VERIFY_SEAL_ANNOTATION = 'nbd.dev/verify-seal';

/**
 * A checksum of the guest-visible data of a read-only export, read through its server as a
 * client reads it, computed once the export is read-only and Ready.
 */
export interface IntegritySeal {
  state: 'Computing' | 'Sealed' | 'Failed';
  /** The resource generation it describes; a spec change seals again. */
  generation: number;
  algorithm: 'sha256';
  /** Hex digest of every byte the export serves, when Sealed. */
  digest?: string;
  bytes?: number;
  /** While Computing. */
  progressPercent?: number;
  sealedAt?: string;
  /** Why it Failed. */
  message?: string;
}

/** The last verification asked for with the verify-seal annotation. */
export interface SealVerification {
  /** The annotation's value it answers. */
  token: string;
  state: 'Verifying' | 'Match' | 'Mismatch' | 'Failed';
  progressPercent?: number;
  digest?: string;
  verifiedAt?: string;
  message?: string;
}

/** Who may connect to an export, as the node enforces it (status.access). */
export interface ClientAccess {
  /** CIDRs whose clients are served; empty: any address. */
  allowedClients: string[];
  /** Clients served at once; absent: the server cannot limit them per export. */
  maxConnections?: number;
  /** Clients must present a certificate signed by the node's CA (run --tls-dir). */
  clientCertificate: boolean;
  /** What enforces these rules on the node. */
  enforcedBy: string;
}

export interface NbdExportStatus {
  observedGeneration?: number;
  exportName?: string;
  uri?: string;
  server?: ServerKind;
  format?: ImageFormat;
  virtualSize?: number;
  actualSize?: number;
  backingChain?: string[];
  access?: ClientAccess;
  seal?: IntegritySeal;
  verification?: SealVerification;
  conditions?: Condition[];
}

export interface ObjectMeta {
  name: string;
  namespace: string;
  uid?: string;
  generation?: number;
  resourceVersion?: string;
  creationTimestamp?: string;
  deletionTimestamp?: string;
  finalizers?: string[];
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
}

export interface NbdExport {
  apiVersion: typeof API_GROUP_VERSION;
  kind: typeof KIND;
  metadata: ObjectMeta;
  spec: NbdExportSpec;
  status?: NbdExportStatus;
}

/** `namespace/name`: the work queue's and the logs' key for a resource. */
export type ResourceKey = string;

export function keyOf(meta: Pick<ObjectMeta, 'namespace' | 'name'>): ResourceKey {
  return `${meta.namespace}/${meta.name}`;
}

/** A Kubernetes-style event about one resource, for a person to notice. */
export interface ExportEvent {
  type: 'Normal' | 'Warning';
  /** UpperCamelCase, from the named constants in src/api/reasons.ts. */
  reason: string;
  message: string;
}
