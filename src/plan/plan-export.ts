/**
 * The planner: desired spec + what the node shows → the next actions and the status.
 * Pure: no I/O, no clock (the caller stamps times). The reconciler runs
 * observe → plan → execute until a plan has no actions, so each call only needs to
 * name the next step, and running it on a converged node yields nothing to do.
 */
import { findCondition, type ConditionDraft } from '../api/conditions.js';
import { differsOnlyInAccess, fingerprintOf, type ExportConfig } from '../api/export-config.js';
import { parseQuantity } from '../api/quantity.js';
import { ConditionType, EventReason, Reason } from '../api/reasons.js';
import {
  FINALIZER,
  type ClientAccess,
  type ExportEvent,
  type ImageFormat,
  type NbdExport,
  type NbdExportSpec,
  type NbdExportStatus,
  type ServerKind,
} from '../api/types.js';
import type { Action, ActionKind } from './actions.js';
import type { DesiredExport, InvalidExport } from './desired-export.js';
import { planSeal } from './plan-seal.js';
import { exportUri, isInsideAnyRoot, isPathAllowed, type NodePolicy } from './node-policy.js';
import type { ExecutionFailure, ImageInfo, ObservedExport, ProbeObservation } from './observed-state.js';

/** The status fields the planner decides; the reconciler adds observedGeneration and conditions. */
export type StatusFields = Omit<NbdExportStatus, 'observedGeneration' | 'conditions'>;

export interface ExportPlan {
  actions: Action[];
  /** Ready, ImageReady and Exported, always all three. */
  conditions: ConditionDraft[];
  fields: StatusFields;
  /** Look again after this long even if nothing changes (waiting on something outside). */
  requeueAfterMs?: number;
  /**
   * An action failed: after status is written the run counts as failed, so the queue retries
   * it with backoff, or, when `permanent`, not until the resource changes.
   */
  failed?: { permanent: boolean; message: string };
}

export interface PlanInput {
  resource: NbdExport;
  /** The resource's spec, parsed once for this step (desiredExportOf). */
  desired: DesiredExport | InvalidExport;
  observed: ObservedExport;
  policy: NodePolicy;
}

/** How long to wait before looking again at something outside our control. */
export const RETRY_SOON_MS = 5_000;
/** Files and locks change without any event reaching the controller: look again now and then. */
export const RECHECK_FILESYSTEM_MS = 15_000;
/** A successful NBD handshake is trusted this long; a later look at the resource probes again. */
export const PROBE_TRUSTED_MS = 60_000;
/** A failed handshake is tried again after this long. */
export const PROBE_RETRY_MS = 2_000;

/** The plan, and the events that go with the status it sets. */
export function planExport(input: PlanInput): ExportPlan & { events: ExportEvent[] } {
  const plan = planSeal(
    retireWhenRefused(holdWhileClientConnected(planNextStep(input), input.observed), input),
    input,
  );
  return { ...plan, events: eventsFor(input.resource, plan) };
}

function planNextStep({ resource, desired, observed, policy }: PlanInput): ExportPlan {
  const hasFinalizer = resource.metadata.finalizers?.includes(FINALIZER) ?? false;
  if (resource.metadata.deletionTimestamp !== undefined)
    return planDeletion(resource, observed, hasFinalizer);

  if (!desired.ok) return notReady(Reason.InvalidSpec, `${desired.message}.`, 'Unknown');
  // Before the node changes at all, so that cleanup is guaranteed to run.
  if (!hasFinalizer)
    return waiting([{ kind: 'addFinalizer' }], Reason.Reconciling, 'adding the cleanup finalizer');

  const { spec, exportName, format, server, isDevice, specPath } = desired;
  // An export's own daemon has the port it was given: known once it serves.
  const dedicatedPort = desired.dedicatedDaemon ? observed.desired?.port : undefined;
  const uri =
    desired.dedicatedDaemon && dedicatedPort === undefined
      ? undefined
      : uriFor(policy, server, exportName, dedicatedPort);
  const fields: StatusFields = {
    exportName,
    server,
    format,
    ...(uri === undefined ? {} : { uri }),
    access: accessFor(desired, policy),
  };
  if (observed.executionFailure) return { ...failedPlan(observed.executionFailure), fields };

  if (observed.conflict) {
    // A loser stops serving what it served, then gives up its claim; it looks again soon,
    // since the winner's deletion reaches only the winner's own key.
    const retire = retireOwned(observed, false);
    const release: Action[] =
      retire.length === 0 && observed.ledger?.exportName !== undefined ? [{ kind: 'releaseExport' }] : [];
    return {
      ...notReady(observed.conflict.reason, observed.conflict.message, 'False', [...retire, ...release]),
      fields,
      requeueAfterMs: RETRY_SOON_MS,
    };
  }

  // Where the image is, and whether the node allows it.
  const path = observed.path;
  if (!path) return { ...waiting([], Reason.Reconciling, 'resolving the path'), fields };
  if (path.kind === 'error') return { ...notReady(Reason.PathNotAllowed, path.message), fields };
  if (isDevice) {
    // udev's /dev/disk/by-id links still work: they resolve to /dev/sd*, /dev/nvme*, ...
    if (!isPathAllowed(path.realPath, true, policy))
      return {
        ...notReady(
          Reason.DeviceNotAllowed,
          `${specPath} (${path.realPath}) matches none of this node's allowed device patterns (${policy.allowedDevices.join(', ') || 'none configured'})`,
        ),
        fields,
      };
    // Devices come and go without an event reaching the controller: look again now and then.
    if (!path.exists)
      return {
        ...notReady(Reason.ImageNotFound, `block device ${specPath} does not exist`),
        fields,
        requeueAfterMs: RECHECK_FILESYSTEM_MS,
      };
    if (!path.isBlockDevice)
      return {
        ...notReady(Reason.ImageInvalid, `${specPath} (${path.realPath}) is not a block device`),
        fields,
      };
  } else if (!isPathAllowed(path.realPath, false, policy)) {
    return {
      ...notReady(
        Reason.PathNotAllowed,
        `${specPath} resolves to ${path.realPath}, outside this node's allowed roots (${policy.allowedRoots.join(', ')})`,
      ),
      fields,
    };
  } else if (path.exists && !path.isFile) {
    return { ...notReady(Reason.ImageInvalid, `${specPath} exists but is not a regular file`), fields };
  }

  // Moved to another file: the image created for the old path is no longer this resource's to delete.
  const created = observed.ledger?.createdImage;
  if (created && created.path !== path.realPath)
    return {
      ...waiting([{ kind: 'forgetCreatedImage' }], Reason.Reconciling, 'the image path changed'),
      fields,
    };

  if (desired.dedicatedDaemon && policy.clientFirewall !== true)
    return {
      ...notReady(
        Reason.Unsupported,
        `allowedClients and maxConnections on a qemu-storage-daemon export (QCOW2, or the node serves every format with it) are enforced by the node's firewall on a port of the export's own, and this node has none (${policy.clientFirewall ?? 'run --client-firewall none'}). Remove them, or run the controller with the firewall (as root, with iptables).`,
      ),
      fields,
    };

  // The image: create it, or check the one that is there.
  const image = observed.image;
  if (!image) return { ...waiting([], Reason.Reconciling, 'inspecting the image'), fields };
  if (image.kind === 'missing')
    return { ...planCreation(spec, path.realPath, path.parentExists, observed, policy), fields };
  if (image.kind === 'unreadable')
    return {
      ...notReady(Reason.ImageInvalid, `${specPath} cannot be read as an image: ${image.message}`),
      fields,
    };
  // Looked at again now and then: a device gets its medium back, a stray hard link goes.
  if (image.kind === 'refused')
    return { ...notReady(image.reason, image.message), fields, requeueAfterMs: RECHECK_FILESYSTEM_MS };

  const info = image.info;
  const imageFields: StatusFields = {
    ...fields,
    virtualSize: info.virtualSize,
    actualSize: info.actualSize,
    ...(info.backingChain.length > 0 ? { backingChain: info.backingChain } : {}),
  };

  const backingWriter = writerOfBacking(info.backingChain, observed);
  if (backingWriter) return { ...backingWriter, fields: imageFields };
  if (observed.lock?.locked)
    return {
      ...notReady(
        Reason.ImageInUse,
        `another process holds a write lock on ${specPath}: ${observed.lock.message}. Stop that process or export a different file; the controller does not break locks.`,
      ),
      fields: imageFields,
      requeueAfterMs: RECHECK_FILESYSTEM_MS,
    };

  const createdHere = observed.ledger?.createdImage?.path === path.realPath;
  const imageReady: ConditionDraft = {
    type: ConditionType.ImageReady,
    status: 'True',
    reason: createdHere ? Reason.ImageCreated : Reason.ImageValid,
    message: `${format} image, ${info.virtualSize} bytes${info.backingChain.length ? `, backed by ${info.backingChain.join(' → ')}` : ''}`,
  };

  const config: ExportConfig = {
    exportName,
    server,
    path: path.realPath,
    format,
    blockDevice: isDevice,
    readOnly: spec.readOnly ?? false,
    maxConnections: spec.maxConnections ?? 1,
    allowedClients: spec.allowedClients ?? [],
    ...(format === 'qcow2' && info.backingChain.length > 0 ? { backing: backingOf(info) } : {}),
    ...(server === 'nbd-server' && info.fileId !== undefined ? { fileId: info.fileId } : {}),
    ...(desired.dedicatedDaemon ? { dedicatedDaemon: true as const } : {}),
  };
  const clientSize = servedSize(server, format, info.virtualSize);
  const serving = planServing(config, observed, clientSize);
  return {
    ...serving,
    conditions: [readyFrom(serving.exported), imageReady, serving.exported],
    fields: { ...imageFields, virtualSize: clientSize },
  };
}

function planDeletion(resource: NbdExport, observed: ObservedExport, hasFinalizer: boolean): ExportPlan {
  const deleting = (message: string, actions: Action[] = []) => waiting(actions, Reason.Deleting, message);
  if (!hasFinalizer) return deleting('deleted; nothing of it is left on this node');
  if (observed.executionFailure) return failedPlan(observed.executionFailure);

  const retire = retireOwned(observed, true);
  if (retire.length > 0)
    return deleting('no longer serving the export; waiting for the server to drop it', retire);

  const actions: Action[] = [];
  const created = observed.ledger?.createdImage;
  const policy = resource.spec.deletionPolicy ?? 'Retain';
  // Only a file proven ours (its inode recorded after creation) that no other resource uses.
  if (
    created?.inode !== undefined &&
    policy === 'Delete' &&
    observed.image?.kind === 'present' &&
    (observed.createdImageUsedBy ?? []).length === 0
  )
    actions.push({ kind: 'deleteImage', path: created.path, inode: created.inode });
  if (observed.ledger) actions.push({ kind: 'forgetOwnership' });
  actions.push({ kind: 'removeFinalizer' });
  return deleting('cleaning up', actions);
}

/** Stop serving whatever the ledger says this resource serves. */
function retireOwned(observed: ObservedExport, force: boolean): Action[] {
  const owned = observed.owned;
  if (!owned) return [];
  if (owned.server === 'qemu-storage-daemon')
    return owned.served !== undefined
      ? [{ kind: 'removeQemuExport', exportName: owned.exportName, force }]
      : [];
  if (owned.configured !== undefined)
    return [{ kind: 'removeNbdServerExport', exportName: owned.exportName }, { kind: 'applyNbdServer' }];
  if (owned.served !== undefined) return [{ kind: 'applyNbdServer' }];
  if (force && (owned.connections ?? 0) > 0)
    return [{ kind: 'disconnectNbdServerClients', exportName: owned.exportName }];
  return [];
}

function planCreation(
  spec: NbdExportSpec,
  realPath: string,
  parentExists: boolean,
  observed: ObservedExport,
  policy: NodePolicy,
): ExportPlan {
  const file = spec.source.file;
  if (!file)
    return notReady(
      Reason.ImageNotFound,
      `block device ${spec.source.blockDevice?.path ?? ''} does not exist`,
    );
  const create = file.create;
  if (!create)
    return {
      ...notReady(
        Reason.WaitingForImage,
        `${file.path} does not exist; waiting for it to appear (or set spec.source.file.create to have the controller create it)`,
      ),
      requeueAfterMs: RECHECK_FILESYSTEM_MS,
    };

  let backingFile: string | undefined;
  if (create.backingFile !== undefined) {
    const backing = observed.backingPath;
    if (!backing || !observed.backingImage)
      return waiting([], Reason.Reconciling, 'inspecting the backing file');
    if (backing.kind === 'error') return notReady(Reason.PathNotAllowed, backing.message);
    if (!isInsideAnyRoot(backing.realPath, policy.allowedRoots))
      return notReady(
        Reason.PathNotAllowed,
        `backing file ${create.backingFile} resolves to ${backing.realPath}, outside this node's allowed roots`,
      );
    if (observed.backingImage.kind === 'refused')
      return notReady(observed.backingImage.reason, observed.backingImage.message);
    if (observed.backingImage.kind !== 'present')
      return {
        ...notReady(
          Reason.BackingFileNotFound,
          `backing file ${create.backingFile} ${observed.backingImage.kind === 'missing' ? 'does not exist' : `cannot be read: ${observed.backingImage.message}`}`,
        ),
        requeueAfterMs: RETRY_SOON_MS,
      };
    backingFile = backing.realPath;
    const backingWriter = writerOfBacking([backing.realPath], observed);
    if (backingWriter) return backingWriter;
  }
  const size = create.size === undefined ? undefined : parseQuantity(create.size);
  if (size && !size.ok) return notReady(Reason.InvalidSpec, `spec.source.file.create.size: ${size.message}`);

  // With a backing file, size and backing format come from our own reading of it, so that
  // qemu-img never has to open the backing file itself (createImage runs it with -u).
  const backingInfo = observed.backingImage?.kind === 'present' ? observed.backingImage.info : undefined;
  const backingFormat = create.backingFormat ?? (backingInfo ? asFormat(backingInfo.format) : undefined);
  const sizeBytes = size?.ok ? size.bytes : backingInfo?.virtualSize;
  const actions: Action[] = [];
  if (!parentExists) actions.push({ kind: 'makeParentDirectories', path: realPath });
  // Recorded first: if the controller dies mid-creation, the next run knows the file is its own.
  actions.push({ kind: 'recordOwnership', createdImage: { path: realPath } });
  actions.push({
    kind: 'createImage',
    path: realPath,
    format: file.format,
    ...(sizeBytes === undefined ? {} : { sizeBytes }),
    ...(backingFile === undefined ? {} : { backingFile }),
    ...(backingFormat === undefined ? {} : { backingFormat }),
    ...(create.preallocation === undefined ? {} : { preallocation: create.preallocation }),
  });
  return waiting(actions, Reason.Reconciling, `creating ${file.format} image ${file.path}`);
}

function planServing(
  config: ExportConfig,
  observed: ObservedExport,
  expectedSize: number,
): { actions: Action[]; exported: ConditionDraft; requeueAfterMs?: number } {
  const exported = (status: 'True' | 'False', reason: string, message: string): ConditionDraft => ({
    type: ConditionType.Exported,
    status,
    reason,
    message,
  });
  const fingerprint = fingerprintOf(config);

  // A renamed export, or one moving to the other server: retire the old one first.
  const owned = observed.owned;
  if (owned && (owned.exportName !== config.exportName || owned.server !== config.server)) {
    const retire = retireOwned(observed, false);
    if (retire.length > 0)
      return {
        actions: retire,
        exported: exported(
          'False',
          Reason.ConfigPending,
          `retiring ${owned.exportName} on ${owned.server} first`,
        ),
      };
  }
  const ledger = observed.ledger;
  const record: Action[] =
    ledger?.exportName === config.exportName && ledger.server === config.server
      ? []
      : [{ kind: 'claimExport', exportName: config.exportName, server: config.server }];

  const desired = observed.desired;
  if (!desired)
    return { actions: record, exported: exported('False', Reason.Reconciling, 'looking at the server') };

  if (config.server === 'nbd-server') {
    if (desired.configured !== fingerprint)
      return {
        actions: [...record, { kind: 'writeNbdServerExport', config }, { kind: 'applyNbdServer' }],
        exported: exported('False', Reason.ConfigPending, 'writing the nbd-server configuration'),
      };
    if (desired.served !== fingerprint && desired.failure !== undefined)
      return {
        actions: [...record, { kind: 'applyNbdServer' }],
        exported: exported(
          'False',
          Reason.ServerUnavailable,
          `nbd-server does not start: ${desired.failure}`,
        ),
        requeueAfterMs: RETRY_SOON_MS,
      };
    if (desired.served !== fingerprint)
      return {
        actions: [...record, { kind: 'applyNbdServer' }],
        exported: exported(
          'False',
          Reason.RestartPending,
          desired.served === undefined
            ? 'a hand-over restart of nbd-server is planned to add this export; connected clients are not cut'
            : 'nbd-server serves an older configuration of this export; a hand-over restart is planned, and clients connected to the old one keep it until they disconnect',
        ),
        requeueAfterMs: RETRY_SOON_MS,
      };
  } else {
    // An export's own daemon is started by adding the export; only the shared one is awaited.
    if (!desired.running && config.dedicatedDaemon !== true)
      return {
        actions: record,
        exported: exported(
          'False',
          Reason.ServerUnavailable,
          'qemu-storage-daemon is not running; it is being restarted',
        ),
        requeueAfterMs: RETRY_SOON_MS,
      };
    if (
      desired.served !== fingerprint &&
      config.dedicatedDaemon === true &&
      desired.servedConfig?.dedicatedDaemon === true &&
      differsOnlyInAccess(desired.servedConfig, config)
    )
      return {
        actions: [...record, { kind: 'updateQemuExportAccess', config }],
        exported: exported(
          'False',
          Reason.ConfigPending,
          "applying the new client rules to the export's own port; connected clients keep their connections",
        ),
      };
    if (desired.served !== fingerprint) {
      const actions: Action[] = [...record];
      if (desired.served !== undefined)
        actions.push({ kind: 'removeQemuExport', exportName: config.exportName, force: false });
      actions.push({ kind: 'addQemuExport', config });
      return {
        actions,
        exported: exported('False', Reason.ConfigPending, 'adding the export to qemu-storage-daemon'),
      };
    }
  }
  if (record.length > 0)
    return { actions: record, exported: exported('False', Reason.Reconciling, 'recording ownership') };

  // A hand-over applies a change to new connections only: say so while older ones remain.
  const stale = config.server === 'nbd-server' ? (desired.staleConnections ?? 0) : 0;
  if (stale > 0)
    return {
      actions: [],
      exported: exported(
        'False',
        Reason.RestartPending,
        `${stale} client(s) connected before the last change keep the previous configuration until they disconnect; new connections get the new one. Delete and re-create the resource to cut them.`,
      ),
      requeueAfterMs: RETRY_SOON_MS,
    };

  const probe = observed.probe;
  // A size that no longer matches is asked again (the image grew, a device came back) before
  // it is reported as a failure.
  const sizeChanged = probe?.ok === true && probe.size !== expectedSize && probe.ageMs >= PROBE_RETRY_MS;
  if (!probe || probe.fingerprint !== fingerprint || !isFresh(probe) || sizeChanged)
    return {
      actions: [
        {
          kind: 'probe',
          server: config.server,
          exportName: config.exportName,
          fingerprint,
          expectedSize,
          ...(desired.port === undefined ? {} : { port: desired.port }),
        },
      ],
      exported: exported('False', Reason.Probing, 'checking the export with an NBD handshake'),
    };
  if (!probe.ok)
    return {
      actions: [],
      exported: exported('False', Reason.ProbeFailed, `NBD handshake failed: ${probe.message}`),
      requeueAfterMs: RETRY_SOON_MS,
    };
  if (probe.size !== expectedSize)
    return {
      actions: [],
      exported: exported(
        'False',
        Reason.ProbeFailed,
        `the server reports ${probe.size ?? 'no'} bytes but the image has ${expectedSize}`,
      ),
      requeueAfterMs: RETRY_SOON_MS,
    };
  // Looked at again when the handshake expires: files change without any event (a path
  // swapped for a symlink, a file replaced), and what must not be served is then retired.
  return {
    actions: [],
    exported: exported(
      'True',
      Reason.Served,
      `served by ${config.server}; an NBD handshake saw ${expectedSize} bytes`,
    ),
    requeueAfterMs: config.blockDevice ? RECHECK_FILESYSTEM_MS : PROBE_TRUSTED_MS,
  };
}

/**
 * Reasons that mean "this must not be served": the spec, the node's rules or the image
 * itself forbid it. Whatever the resource served before is retired at once, and its clients
 * cut: a confinement breach is the one case where cutting clients is right.
 */
const REFUSALS: ReadonlySet<string> = new Set([
  Reason.InvalidSpec,
  Reason.ImageUnsafe,
  Reason.PathNotAllowed,
  Reason.DeviceNotAllowed,
  Reason.Unsupported,
  Reason.ImageFormatMismatch,
  Reason.ImageInvalid,
]);

function retireWhenRefused(plan: ExportPlan, { resource, observed }: PlanInput): ExportPlan {
  if (resource.metadata.deletionTimestamp !== undefined) return plan;
  const ready = plan.conditions.find((c) => c.type === ConditionType.Ready);
  if (!ready || !REFUSALS.has(ready.reason) || plan.actions.length > 0) return plan;
  const actions = retireAndCut(observed);
  const note =
    actions.length > 0 || observed.owned
      ? ' The export it served is taken down and its clients are disconnected.'
      : ' Nothing on the node was changed.';
  // Nothing is served there: no address that a client might try.
  const { uri: _, ...fields } = plan.fields;
  return {
    ...plan,
    actions,
    fields,
    conditions: plan.conditions.map((c) => ({ ...c, message: `${c.message}${note}` })),
  };
}

/** Stops serving what the ledger says this resource serves, cutting its clients, then drops the claim. */
function retireAndCut(observed: ObservedExport): Action[] {
  const owned = observed.owned;
  if (!owned) return [];
  const { exportName } = owned;
  if (owned.server === 'qemu-storage-daemon')
    return owned.served !== undefined
      ? [{ kind: 'removeQemuExport', exportName, force: true }]
      : [{ kind: 'releaseExport' }];
  if (owned.configured !== undefined)
    return [{ kind: 'removeNbdServerExport', exportName }, { kind: 'applyNbdServer' }];
  if (owned.served !== undefined) return [{ kind: 'applyNbdServer' }];
  // No longer configured nor served by the current parent: children forked before still serve.
  return [{ kind: 'disconnectNbdServerClients', exportName }, { kind: 'releaseExport' }];
}

/**
 * The size a client is told. qemu-storage-daemon serves a raw file in whole 512-byte sectors
 * (a 1,000,000-byte file is announced as 1,000,448 bytes, the tail reading as zeros);
 * nbd-server announces the file's own size. Without this, such a file failed its probe forever.
 */
function servedSize(server: ServerKind, format: ImageFormat, virtualSize: number): number {
  if (server === 'qemu-storage-daemon' && format === 'raw') return Math.ceil(virtualSize / 512) * 512;
  return virtualSize;
}

/** The checked chain, handed to the server whole so that it opens nothing a header names. */
function backingOf(info: ImageInfo): NonNullable<ExportConfig['backing']> {
  return info.backingChain.map((path, i) => ({
    path,
    format: info.backingFormats?.[i] === 'raw' ? 'raw' : 'qcow2',
  }));
}

/** Whether a probe result may stand, or the export must be probed again. */
function isFresh(probe: ProbeObservation): boolean {
  return probe.ageMs < (probe.ok ? PROBE_TRUSTED_MS : PROBE_RETRY_MS);
}

/**
 * Another resource of this node exports a file of this image's backing chain read-write:
 * QEMU would refuse to open the chain (our own server holds the write lock), and serving
 * an incremental on a backing file that still changes would serve inconsistent data.
 */
function writerOfBacking(chain: readonly string[], observed: ObservedExport): ExportPlan | undefined {
  for (const path of chain) {
    const writer = observed.writersElsewhere?.find((w) => w.realPath === path);
    if (writer)
      return {
        ...notReady(
          Reason.ImageInUse,
          `backing file ${path} is exported read-write by ${writer.key} on this node. Seal it first: set readOnly: true on ${writer.key} once its writer has finished; this export follows by itself.`,
        ),
        requeueAfterMs: RECHECK_FILESYSTEM_MS,
      };
  }
  return undefined;
}

/** An action of the last step threw: say which, with the cause's words. */
function failedPlan(failure: ExecutionFailure): ExportPlan {
  const reason = failureReason(failure.action);
  const retry = failure.permanent ? 'not retried until the resource changes' : 'retrying with backoff';
  return {
    ...notReady(reason, `${failure.action} failed: ${failure.message} (${retry})`),
    failed: { permanent: failure.permanent, message: failure.message },
  };
}

function failureReason(action: ActionKind): string {
  switch (action) {
    case 'makeParentDirectories':
    case 'recordOwnership':
    case 'createImage':
      return Reason.ImageCreateFailed;
    case 'writeNbdServerExport':
    case 'removeNbdServerExport':
    case 'applyNbdServer':
    case 'disconnectNbdServerClients':
    case 'addQemuExport':
    case 'removeQemuExport':
      return Reason.ExportFailed;
    case 'probe':
      return Reason.ProbeFailed;
    default:
      return Reason.ReconcileFailed;
  }
}

/**
 * A gentle removal of a qemu-storage-daemon export was refused because a client is
 * connected: hold every such change until the client leaves, and say so.
 */
function holdWhileClientConnected(plan: ExportPlan, observed: ObservedExport): ExportPlan {
  const blocked = observed.removalBlocked;
  if (blocked === undefined) return plan;
  if (!plan.actions.some((a) => a.kind === 'removeQemuExport' && !a.force)) return plan;
  const message = `${blocked}; the change is applied once the connected client disconnects`;
  return {
    ...plan,
    actions: [],
    requeueAfterMs: RETRY_SOON_MS,
    conditions: plan.conditions.map((c) =>
      c.type === ConditionType.ImageReady
        ? c
        : { ...c, status: 'False', reason: Reason.RestartPending, message },
    ),
  };
}

/** Events go with a change of Ready: served at last, or refused for a reason a person must see. */
function eventsFor(resource: NbdExport, plan: ExportPlan): ExportEvent[] {
  const ready = plan.conditions.find((c) => c.type === ConditionType.Ready);
  if (!ready || plan.actions.length > 0) return [];
  const before = findCondition(resource.status?.conditions, ConditionType.Ready);
  if (ready.status === 'True')
    return before?.status === 'True'
      ? []
      : [{ type: 'Normal', reason: EventReason.Served, message: `serving ${plan.fields.uri ?? ''}` }];
  if (ready.status !== 'False') return [];
  const warning = warningEventFor(ready.reason);
  const events: ExportEvent[] = [];
  if (warning) events.push({ type: 'Warning', reason: warning, message: ready.message });
  if (ready.reason === Reason.RestartPending)
    events.push({ type: 'Normal', reason: EventReason.RestartPlanned, message: ready.message });
  return events;
}

function warningEventFor(reason: string): string | undefined {
  switch (reason) {
    case Reason.ExportNameConflict:
      return EventReason.Conflict;
    case Reason.ImageInUse:
      return EventReason.ImageInUse;
    case Reason.InvalidSpec:
    case Reason.PathNotAllowed:
    case Reason.DeviceNotAllowed:
    case Reason.Unsupported:
    case Reason.ImageFormatMismatch:
      return EventReason.InvalidSpec;
    case Reason.ImageCreateFailed:
    case Reason.ExportFailed:
    case Reason.ReconcileFailed:
      return EventReason.Failed;
    default:
      return undefined;
  }
}

/** The client rules in force for an export (status.access): what its server, or the firewall, enforces. */
function accessFor(desired: DesiredExport, policy: NodePolicy): ClientAccess {
  const clientCertificate = policy.tls === true;
  const rules = {
    allowedClients: desired.spec.allowedClients ?? [],
    maxConnections: desired.spec.maxConnections ?? 1,
    clientCertificate,
  };
  if (desired.server === 'nbd-server')
    return {
      ...rules,
      enforcedBy:
        "nbd-server's admission hook, at every connection (the controller's own probe is let in by its process, not its address)",
    };
  if (desired.dedicatedDaemon && policy.clientFirewall !== true)
    return {
      ...rules,
      enforcedBy:
        'nothing: the export is not served, since this node has no firewall to enforce its rules (see Ready)',
    };
  if (desired.dedicatedDaemon)
    return {
      ...rules,
      enforcedBy:
        "the node's firewall, on the port of the export's own qemu-storage-daemon (the controller's own probe is let in by a group id only its processes carry, not by its address)",
    };
  return {
    allowedClients: [],
    clientCertificate,
    enforcedBy: clientCertificate
      ? "qemu-storage-daemon's shared port: any client with a certificate from the node's CA, any number (name allowedClients or maxConnections to give the export a port of its own under those rules)"
      : "nothing per export: qemu-storage-daemon's shared port serves any client that reaches it (name allowedClients or maxConnections to give the export a port of its own under those rules)",
  };
}

function uriFor(policy: NodePolicy, server: ServerKind, exportName: string, dedicatedPort?: number): string {
  // nbds:// tells libnbd (and QEMU) to insist on TLS: with --tls-dir a plain client is refused anyway.
  return exportUri(
    policy,
    policy.advertiseHost,
    server,
    exportName,
    policy.tls === true ? 'nbds' : 'nbd',
    dedicatedPort,
  );
}

function readyFrom(exported: ConditionDraft): ConditionDraft {
  return { ...exported, type: ConditionType.Ready };
}

function asFormat(format: string): ImageFormat | undefined {
  return format === 'qcow2' || format === 'raw' ? format : undefined;
}

/** Not ready for a reason the user (or someone outside) must fix: no retry until something changes. */
function notReady(
  reason: string,
  message: string,
  imageStatus: 'False' | 'Unknown' = 'False',
  actions: Action[] = [],
): ExportPlan {
  return {
    actions,
    conditions: [
      { type: ConditionType.Ready, status: 'False', reason, message },
      { type: ConditionType.ImageReady, status: imageStatus, reason, message },
      { type: ConditionType.Exported, status: 'False', reason, message },
    ],
    fields: {},
  };
}

/** On the way somewhere: the actions are the next step. */
function waiting(actions: Action[], reason: string, message: string): ExportPlan {
  return {
    actions,
    conditions: [
      { type: ConditionType.Ready, status: 'False', reason, message },
      { type: ConditionType.ImageReady, status: 'Unknown', reason, message },
      { type: ConditionType.Exported, status: 'Unknown', reason, message },
    ],
    fields: {},
  };
}
