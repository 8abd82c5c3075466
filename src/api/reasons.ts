/**
 * Condition types and reasons: the vocabulary of status and events. Operators match on
 * these strings (`kubectl wait --for=condition=Ready`, alerts), so they are API.
 */

export const ConditionType = {
  /** Top level: the export is served as specified. */
  Ready: 'Ready',
  /** The file or device exists, is valid, matches the spec and no foreign writer holds it. */
  ImageReady: 'ImageReady',
  /** The server serves it, verified by an NBD handshake that reports the expected size. */
  Exported: 'Exported',
} as const;
export type ConditionType = (typeof ConditionType)[keyof typeof ConditionType];

export const Reason = {
  // Ready / Exported = True
  Served: 'Served',
  // the spec or the node's rules
  InvalidSpec: 'InvalidSpec',
  PathNotAllowed: 'PathNotAllowed',
  DeviceNotAllowed: 'DeviceNotAllowed',
  Unsupported: 'Unsupported',
  ExportNameConflict: 'ExportNameConflict',
  // the image
  ImageValid: 'ImageValid',
  ImageCreated: 'ImageCreated',
  ImageNotFound: 'ImageNotFound',
  ImageCreateFailed: 'ImageCreateFailed',
  ImageFormatMismatch: 'ImageFormatMismatch',
  ImageInvalid: 'ImageInvalid',
  ImageInUse: 'ImageInUse',
  BackingFileNotFound: 'BackingFileNotFound',
  /**
   * The image's header asks for something that would reach outside it: an external data file,
   * a backing name that is not a plain path, a hard-linked or non-regular file, a loop or an
   * over-long backing chain (src/plan/image-header.ts).
   */
  ImageUnsafe: 'ImageUnsafe',
  // serving
  ConfigPending: 'ConfigPending',
  RestartPending: 'RestartPending',
  ServerUnavailable: 'ServerUnavailable',
  ExportFailed: 'ExportFailed',
  ProbeFailed: 'ProbeFailed',
  Probing: 'Probing',
  WaitingForImage: 'WaitingForImage',
  // an executor failed for a reason not named above (a state write, the API server)
  ReconcileFailed: 'ReconcileFailed',
  // lifecycle
  Deleting: 'Deleting',
  Reconciling: 'Reconciling',
} as const;
export type Reason = (typeof Reason)[keyof typeof Reason];

/** Event reasons: what a person should notice. */
export const EventReason = {
  ImageCreated: 'ImageCreated',
  Served: 'Served',
  Conflict: 'Conflict',
  RestartPlanned: 'RestartPlanned',
  InvalidSpec: 'InvalidSpec',
  ImageInUse: 'ImageInUse',
  ExportRemoved: 'ExportRemoved',
  ImageDeleted: 'ImageDeleted',
  ImageRetained: 'ImageRetained',
  /** An action on the node failed; the message has the cause. */
  Failed: 'Failed',
} as const;
