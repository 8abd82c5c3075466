import type { Logger } from 'pino';
import { setConditions } from '../api/conditions.js';
import { EventReason } from '../api/reasons.js';
import {
  keyOf,
  type ExportEvent,
  type NbdExport,
  type NbdExportStatus,
  type ResourceKey,
  type ServerKind,
} from '../api/types.js';
import type { Action } from '../plan/actions.js';
import { decideConflicts, type Claim } from '../plan/conflicts.js';
import { desiredExportOf } from '../plan/desired-export.js';
import { exportUri, isPathAllowed, type NodePolicy } from '../plan/node-policy.js';
import type { ObservedExport, ProbeObservation } from '../plan/observed-state.js';
import { planExport, type ExportPlan } from '../plan/plan-export.js';
import { ExportBusyError, ImageLockedError } from '../node/qemu-storage-daemon/errors.js';
import { systemClock, type Clock } from '../shared/clock.js';
import { errorMessage, isPermanentFailure } from './failure.js';
import type { ExportStore } from './export-store.js';
import type { NodeServices } from './node-services.js';
import { observeExport } from './observe-export.js';
import { PermanentError, type WorkResult } from './work-queue.js';

export interface ReconcilerOptions {
  store: ExportStore;
  services: NodeServices;
  policy: NodePolicy;
  logger: Logger;
  /** Injected so that tests control time. Default: the real clock. */
  clock?: Clock;
}

/** Steps one run may take before it yields (a plan needing more is requeued at once). */
const MAX_STEPS = 12;

/** What the executors learned in this run, handed to the next step's plan as observations. */
type Learned = Pick<ObservedExport, 'lock' | 'removalBlocked' | 'executionFailure'>;

type StepOutcome = { kind: 'progress' | 'waiting' | 'gone' } | { kind: 'learned'; learned: Learned };

export class Reconciler {
  readonly #store: ExportStore;
  readonly #services: NodeServices;
  readonly #policy: NodePolicy;
  readonly #logger: Logger;
  readonly #clock: Clock;
  /** The last NBD handshake per resource, with the time it was made. */
  readonly #probes = new Map<ResourceKey, Omit<ProbeObservation, 'ageMs'> & { at: number }>();

  constructor(options: ReconcilerOptions) {
    this.#store = options.store;
    this.#services = options.services;
    this.#policy = options.policy;
    this.#logger = options.logger;
    this.#clock = options.clock ?? systemClock;
  }

  async reconcile(key: ResourceKey): Promise<WorkResult> {
    const log = this.#logger.child({ key });
    if (!this.#store.get(key)) {
      this.#probes.delete(key);
      return {};
    }
    let learned: Learned = {};
    let plan: ReturnType<typeof planExport> | undefined;
    /** The generation the last plan was made from: status must not claim a newer one. */
    let plannedGeneration: number | undefined;
    let stepsLeft = false;

    // Node-wide claims, read once a run: other resources' changes queue a run of their own.
    const claims = await this.#claims();
    const conflicts = decideConflicts(claims);
    for (let step = 0; step < MAX_STEPS; step++) {
      const resource = this.#store.get(key);
      if (!resource) return {};
      const desired = desiredExportOf(resource, this.#policy);
      const seen = await observeExport(resource, desired, {
        services: this.#services,
        policy: this.#policy,
        conflict: conflicts.get(key),
        probe: this.#probeOf(key),
      });
      const observed: ObservedExport = {
        ...seen,
        ...learned,
        ...claimsAround(key, claims, seen.ledger?.createdImage?.path),
      };
      plan = planExport({ resource, desired, observed, policy: this.#policy });
      plannedGeneration = resource.metadata.generation;
      if (plan.actions.length === 0) break;
      stepsLeft = step === MAX_STEPS - 1;
      log.debug({ actions: plan.actions.map((a) => a.kind) }, 'executing plan');

      const outcome = await this.#execute(resource, plan.actions, log);
      if (outcome.kind === 'gone') return {};
      if (outcome.kind === 'learned') learned = { ...learned, ...outcome.learned };
      if (outcome.kind === 'waiting') break;
    }
    if (!plan) return {};

    const current = this.#store.get(key);
    if (!current) return {};
    await this.#writeStatus(current, plannedGeneration, plan);
    for (const event of plan.events) await this.#event(key, event.type, event.reason, event.message);
    // Status says what failed; the queue decides when to try again (or, if permanent, not to).
    if (plan.failed)
      throw plan.failed.permanent ? new PermanentError(plan.failed.message) : new Error(plan.failed.message);
    // A plan that needed more steps than one run takes continues at once.
    if (stepsLeft) return { requeueAfterMs: 1 };
    return plan.requeueAfterMs === undefined ? {} : { requeueAfterMs: plan.requeueAfterMs };
  }

  /**
   * What every resource of the node claims (export name, resolved path, writer or not), for
   * the node-wide decisions: conflicts, and whether a created image is still in use.
   * Paths are resolved, so two spellings of one file (a symlink) are one file.
   */
  async #claims(): Promise<Claim[]> {
    const claims = await Promise.all(
      this.#store.list().map(async (other): Promise<Claim | undefined> => {
        const desired = desiredExportOf(other, this.#policy);
        if (!desired.ok) return undefined;
        const resolved = await this.#services.resolvePath(desired.specPath);
        // A resource the node's rules refuse serves nothing: it claims nothing either.
        if (resolved.kind === 'error') return undefined;
        if (!isPathAllowed(resolved.realPath, desired.isDevice, this.#policy)) return undefined;
        return {
          key: keyOf(other.metadata),
          uid: other.metadata.uid ?? '',
          creationTimestamp: other.metadata.creationTimestamp ?? '',
          exportName: desired.exportName,
          realPath: resolved.realPath,
          writable: !desired.readOnly,
        };
      }),
    );
    return claims.filter((c) => c !== undefined);
  }

  /** Where this node's own clients (the checksum reader) reach an export. */
  #localUri(server: ServerKind, exportName: string, dedicatedPort: number | undefined): string {
    return exportUri(this.#policy, this.#policy.probeHost, server, exportName, 'nbd', dedicatedPort);
  }

  #probeOf(key: ResourceKey): ProbeObservation | undefined {
    const probe = this.#probes.get(key);
    if (!probe) return undefined;
    const { at, ...result } = probe;
    return { ...result, ageMs: this.#clock.now() - at };
  }

  /**
   * Runs the plan's actions in order. An action that throws ends the step: what it means
   * (a foreign lock, a connected client, a failure with its cause) goes back to the planner
   * as an observation, and the planner decides the status.
   */
  async #execute(resource: NbdExport, actions: Action[], log: Logger): Promise<StepOutcome> {
    let onlyWaiting = true;
    for (const action of actions) {
      if (action.kind !== 'applyNbdServer') onlyWaiting = false;
      try {
        if ((await this.#act(resource, action, log)) === 'gone') return { kind: 'gone' };
      } catch (error) {
        return { kind: 'learned', learned: learnedFrom(action, error, log) };
      }
    }
    return { kind: onlyWaiting ? 'waiting' : 'progress' };
  }

  async #act(resource: NbdExport, action: Action, log: Logger): Promise<'gone' | undefined> {
    const key = keyOf(resource.metadata);
    const uid = resource.metadata.uid ?? '';
    const { ledger, nbdServer, qemu, images } = this.#services;
    {
      switch (action.kind) {
        case 'addFinalizer':
          await this.#store.addFinalizer(key);
          break;
        case 'removeFinalizer':
          await this.#store.removeFinalizer(key);
          this.#probes.delete(key);
          this.#services.checksums.forget(key);
          log.info('cleanup finished; finalizer removed');
          return 'gone';
        case 'recordOwnership':
          await ledger.record(uid, key, { createdImage: action.createdImage });
          break;
        case 'claimExport':
          await ledger.claimExport(uid, key, action.server, action.exportName);
          break;
        case 'releaseExport':
          await ledger.releaseExport(uid);
          break;
        case 'forgetCreatedImage':
          log.info('the image path changed; the image created for the old path is kept');
          await ledger.forgetCreatedImage(uid);
          break;
        case 'forgetOwnership':
          await ledger.forget(uid);
          break;
        case 'makeParentDirectories':
          await images.makeParentDirectories(action.path);
          break;
        case 'createImage': {
          const { kind: _, ...request } = action;
          const started = this.#clock.now();
          log.info({ path: action.path, format: action.format }, 'creating image');
          // Preallocating a large image takes minutes: say that it is still going.
          const progress = setInterval(
            () =>
              log.info(
                { path: action.path, seconds: Math.round((this.#clock.now() - started) / 1000) },
                'still creating image',
              ),
            10_000,
          );
          try {
            // The inode is recorded before the image appears at its path: a controller killed
            // right after publishing still knows the file as its own (else Delete never removes it).
            await images
              .create(request, (inode) =>
                ledger.record(uid, key, { createdImage: { path: action.path, inode } }).then(() => undefined),
              )
              .finally(() => clearInterval(progress));
          } catch (error) {
            // Nothing of ours is at the path (an existing file is never overwritten): forget the intent.
            await ledger.forgetCreatedImage(uid);
            throw error;
          }
          log.info({ path: action.path, ms: Math.round(this.#clock.now() - started) }, 'image created');
          await this.#event(
            key,
            'Normal',
            EventReason.ImageCreated,
            `created ${action.format} image ${action.path}`,
          );
          break;
        }
        case 'deleteImage':
          await this.#deleteImage(key, action.path, action.inode, log);
          break;
        case 'writeNbdServerExport':
          if (await nbdServer.writeExport(action.config))
            log.info({ export: action.config.exportName }, 'nbd-server export configured');
          break;
        case 'removeNbdServerExport':
          await nbdServer.removeExport(action.exportName);
          log.info({ export: action.exportName }, 'nbd-server export removed from configuration');
          break;
        case 'applyNbdServer':
          nbdServer.requestApply();
          break;
        case 'disconnectNbdServerClients': {
          const count = await nbdServer.disconnect(action.exportName);
          log.info({ export: action.exportName, count }, 'disconnected clients of a removed export');
          break;
        }
        case 'addQemuExport':
          await qemu.addExport(action.config);
          log.info({ export: action.config.exportName }, 'qemu-storage-daemon export added');
          break;
        case 'updateQemuExportAccess':
          await qemu.updateAccess(action.config);
          log.info(
            {
              export: action.config.exportName,
              allowedClients: action.config.allowedClients,
              maxConnections: action.config.maxConnections,
            },
            "client rules of the export's own port changed",
          );
          break;
        case 'removeQemuExport':
          await qemu.removeExport(action.exportName, { force: action.force });
          log.info({ export: action.exportName, force: action.force }, 'qemu-storage-daemon export removed');
          break;
        case 'startChecksum':
          this.#services.checksums.start(
            key,
            action.request,
            this.#localUri(action.server, action.exportName, action.port),
          );
          log.info({ checksum: action.request.kind }, 'checksum of the export started');
          break;
        case 'probe': {
          const port =
            action.port ??
            (action.server === 'nbd-server' ? this.#policy.nbdServerPort : this.#policy.qemuPort);
          const result = await this.#services.probe({
            host: this.#policy.probeHost,
            port,
            exportName: action.exportName,
          });
          this.#probes.set(key, {
            fingerprint: action.fingerprint,
            at: this.#clock.now(),
            ok: result.ok,
            message: result.ok ? 'ok' : result.message,
            ...(result.ok ? { size: result.size } : {}),
          });
          if (!result.ok) log.warn({ export: action.exportName, error: result.message }, 'probe failed');
          break;
        }
      }
    }
    return undefined;
  }

  /** Deletes an image only if it is still the very file this controller created. */
  async #deleteImage(key: ResourceKey, path: string, inode: number | undefined, log: Logger): Promise<void> {
    const outcome = await this.#services.images.remove(path, inode);
    if (outcome === 'replaced') {
      log.warn({ path }, 'not deleting: the file was replaced since the controller created it');
      await this.#event(
        key,
        'Warning',
        EventReason.ImageRetained,
        `${path} was replaced after creation; kept`,
      );
    } else if (outcome === 'deleted') {
      log.info({ path }, 'deleted created image (deletionPolicy: Delete)');
      await this.#event(key, 'Normal', EventReason.ImageDeleted, `deleted ${path}`);
    }
  }

  async #writeStatus(
    resource: NbdExport,
    generation: number | undefined,
    plan: ExportPlan & { events: ExportEvent[] },
  ): Promise<void> {
    const key = keyOf(resource.metadata);
    const previous = resource.status ?? {};
    const status: NbdExportStatus = {
      ...(generation === undefined ? {} : { observedGeneration: generation }),
      ...plan.fields,
      conditions: setConditions(previous.conditions, plan.conditions, generation, this.#clock.date()),
    };
    await this.#store.updateStatus(key, status);
    const ready = plan.conditions.find((c) => c.type === 'Ready');
    if (ready?.status === 'True' && plan.events.some((e) => e.reason === EventReason.Served))
      this.#logger.info({ key, uri: plan.fields.uri }, 'export ready');
  }

  async #event(key: ResourceKey, type: 'Normal' | 'Warning', reason: string, message: string): Promise<void> {
    try {
      await this.#store.recordEvent(key, { type, reason, message });
    } catch (error) {
      this.#logger.warn({ key, error: errorMessage(error) }, 'could not record event');
    }
  }
}

/** What a thrown action means for the next plan. */
function learnedFrom(action: Action, error: unknown, log: Logger): Learned {
  if (action.kind === 'addQemuExport' && error instanceof ImageLockedError)
    return { lock: { locked: true, message: error.message } };
  if (action.kind === 'removeQemuExport' && error instanceof ExportBusyError)
    return { removalBlocked: error.message };
  const permanent = isPermanentFailure(error);
  log.warn({ action: action.kind, error: errorMessage(error), permanent }, 'action failed');
  return { executionFailure: { action: action.kind, message: errorMessage(error), permanent } };
}

/**
 * What the rest of the node means for this resource: who else uses the image it created,
 * and which files others export read-write (none may back this resource's image).
 */
function claimsAround(
  key: ResourceKey,
  claims: readonly Claim[],
  createdPath: string | undefined,
): Pick<ObservedExport, 'createdImageUsedBy' | 'writersElsewhere'> {
  const others = claims.filter((c) => c.key !== key);
  const usedBy = createdPath === undefined ? [] : others.filter((c) => c.realPath === createdPath);
  const writers = others.filter((c) => c.writable && c.realPath !== undefined);
  return {
    ...(usedBy.length > 0 ? { createdImageUsedBy: usedBy.map((c) => c.key) } : {}),
    ...(writers.length > 0
      ? { writersElsewhere: writers.map((c) => ({ realPath: c.realPath ?? '', key: c.key })) }
      : {}),
  };
}
