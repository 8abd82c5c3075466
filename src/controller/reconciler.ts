/**
 * Glue only: observe → plan → execute, until the plan has nothing left to do, then
 * write status. Every decision is the planner's; every effect is an executor's.
 * Level-triggered: a run starts from what is, not from the event that caused it.
 */
import type { Logger } from 'pino';
import { setConditions, findCondition } from '../api/conditions.js';
import { effectiveExportName } from '../api/export-name.js';
import { EventReason, Reason } from '../api/reasons.js';
import { keyOf, type NbdExport, type NbdExportStatus, type ResourceKey } from '../api/types.js';
import { validateSpec } from '../api/validate-spec.js';
import type { Action } from '../plan/actions.js';
import { decideConflicts, type Claim } from '../plan/conflicts.js';
import type { NodePolicy } from '../plan/node-policy.js';
import type { LockObservation, ProbeObservation } from '../plan/observed-state.js';
import { planExport, RETRY_SOON_MS, type ExportPlan } from '../plan/plan-export.js';
import type { ExportStore } from './export-store.js';
import type { NodeServices } from './node-services.js';
import { observeExport } from './observe-export.js';
import type { WorkResult } from './work-queue.js';

export interface ReconcilerOptions {
  store: ExportStore;
  services: NodeServices;
  policy: NodePolicy;
  logger: Logger;
  /** Injected so that tests control time. Default: the real clock. */
  now?: () => Date;
  /** A successful probe is trusted this long before the next resync probes again. Default 60 s. */
  probeTtlMs?: number;
}

/** Steps one run may take before it yields (a plan needing more is requeued at once). */
const MAX_STEPS = 12;

export class Reconciler {
  readonly #store: ExportStore;
  readonly #services: NodeServices;
  readonly #policy: NodePolicy;
  readonly #logger: Logger;
  readonly #now: () => Date;
  readonly #probeTtlMs: number;
  readonly #probes = new Map<ResourceKey, ProbeObservation & { at: number }>();

  constructor(options: ReconcilerOptions) {
    this.#store = options.store;
    this.#services = options.services;
    this.#policy = options.policy;
    this.#logger = options.logger;
    this.#now = options.now ?? (() => new Date());
    this.#probeTtlMs = options.probeTtlMs ?? 60_000;
  }

  async reconcile(key: ResourceKey): Promise<WorkResult> {
    const log = this.#logger.child({ key });
    let resource = this.#store.get(key);
    if (!resource) {
      this.#probes.delete(key);
      return {};
    }
    const wasReady = findCondition(resource.status?.conditions, 'Ready')?.status === 'True';
    let lockOverride: LockObservation | undefined;
    let busyMessage: string | undefined;
    let plan: ExportPlan | undefined;
    /** The generation the last plan was made from: status must not claim a newer one. */
    let plannedGeneration: number | undefined;
    let stepsLeft = false;

    // Node-wide claims, read once a run: other resources' changes queue a run of their own.
    const claims = await this.#claims();
    for (let step = 0; step < MAX_STEPS; step++) {
      resource = this.#store.get(key);
      if (!resource) return {};
      const observed = await observeExport(resource, {
        services: this.#services,
        policy: this.#policy,
        conflict: decideConflicts(claims).get(key),
        probe: this.#freshProbe(key),
      });
      if (lockOverride) observed.lock = lockOverride;
      const created = observed.ledger?.createdImage;
      if (created) {
        const usedBy = claims.filter((c) => c.key !== key && c.realPath === created.path).map((c) => c.key);
        if (usedBy.length > 0) observed.createdImageUsedBy = usedBy;
      }
      plan = planExport({ resource, observed, policy: this.#policy });
      plannedGeneration = resource.metadata.generation;
      if (busyMessage !== undefined) break;
      if (plan.actions.length === 0) break;
      stepsLeft = step === MAX_STEPS - 1;
      log.debug({ actions: plan.actions.map((a) => a.kind) }, 'executing plan');

      const outcome = await this.#execute(resource, plan.actions, log);
      if (outcome.kind === 'gone') return {};
      if (outcome.kind === 'lock') lockOverride = { locked: true, message: outcome.message };
      if (outcome.kind === 'busy') busyMessage = outcome.message;
      if (outcome.kind === 'waiting') break;
    }
    if (!plan) return {};
    if (busyMessage !== undefined) plan = busyPlan(plan, busyMessage);

    const current = this.#store.get(key);
    if (!current) return {};
    await this.#writeStatus(current, plannedGeneration, plan, wasReady, log);
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
        const validation = validateSpec(other.spec);
        if (!validation.ok) return undefined;
        const source = validation.spec.source;
        const specPath = source.file?.path ?? source.blockDevice?.path ?? '';
        const resolved = await this.#services.resolvePath(specPath);
        return {
          key: keyOf(other.metadata),
          uid: other.metadata.uid ?? '',
          creationTimestamp: other.metadata.creationTimestamp ?? '',
          exportName: effectiveExportName(other),
          realPath: resolved.kind === 'resolved' ? resolved.realPath : specPath,
          writable: !(validation.spec.readOnly ?? false),
        };
      }),
    );
    return claims.filter((c) => c !== undefined);
  }

  #freshProbe(key: ResourceKey): ProbeObservation | undefined {
    const probe = this.#probes.get(key);
    if (!probe) return undefined;
    const ttl = probe.ok ? this.#probeTtlMs : 2_000;
    return Date.now() - probe.at < ttl ? probe : undefined;
  }

  async #execute(
    resource: NbdExport,
    actions: Action[],
    log: Logger,
  ): Promise<{ kind: 'progress' | 'waiting' | 'gone' } | { kind: 'lock' | 'busy'; message: string }> {
    const key = keyOf(resource.metadata);
    const uid = resource.metadata.uid ?? '';
    const { ledger, nbdServer, qemu, images } = this.#services;
    let onlyWaiting = true;
    for (const action of actions) {
      if (action.kind !== 'applyNbdServer') onlyWaiting = false;
      switch (action.kind) {
        case 'addFinalizer':
          await this.#store.addFinalizer(key);
          break;
        case 'removeFinalizer':
          await this.#store.removeFinalizer(key);
          this.#probes.delete(key);
          log.info('cleanup finished; finalizer removed');
          return { kind: 'gone' };
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
          const started = Date.now();
          log.info({ path: action.path, format: action.format }, 'creating image');
          // Preallocating a large image takes minutes: say that it is still going.
          const progress = setInterval(
            () =>
              log.info(
                { path: action.path, seconds: Math.round((Date.now() - started) / 1000) },
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
          log.info({ path: action.path, ms: Date.now() - started }, 'image created');
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
          try {
            await qemu.addExport(action.config);
            log.info({ export: action.config.exportName }, 'qemu-storage-daemon export added');
          } catch (error) {
            if (errorName(error) === 'ImageLockedError')
              return { kind: 'lock', message: errorMessage(error) };
            throw error;
          }
          break;
        case 'removeQemuExport':
          try {
            await qemu.removeExport(action.exportName, { force: action.force });
            log.info(
              { export: action.exportName, force: action.force },
              'qemu-storage-daemon export removed',
            );
          } catch (error) {
            if (errorName(error) === 'ExportBusyError') return { kind: 'busy', message: errorMessage(error) };
            throw error;
          }
          break;
        case 'probe': {
          const port = action.server === 'nbd-server' ? this.#policy.nbdServerPort : this.#policy.qemuPort;
          const result = await this.#services.probe({
            host: this.#policy.probeHost,
            port,
            exportName: action.exportName,
          });
          this.#probes.set(key, {
            fingerprint: action.fingerprint,
            at: Date.now(),
            ok: result.ok,
            message: result.ok ? 'ok' : result.message,
            ...(result.ok ? { size: result.size } : {}),
          });
          if (!result.ok) log.warn({ export: action.exportName, error: result.message }, 'probe failed');
          break;
        }
      }
    }
    return { kind: onlyWaiting ? 'waiting' : 'progress' };
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
    plan: ExportPlan,
    wasReady: boolean,
    log: Logger,
  ): Promise<void> {
    const key = keyOf(resource.metadata);
    const previous = resource.status ?? {};
    const status: NbdExportStatus = {
      ...(generation === undefined ? {} : { observedGeneration: generation }),
      ...plan.fields,
      conditions: setConditions(previous.conditions, plan.conditions, generation, this.#now()),
    };
    await this.#store.updateStatus(key, status);

    const ready = plan.conditions.find((c) => c.type === 'Ready');
    if (!ready) return;
    if (ready.status === 'True' && !wasReady) {
      log.info({ uri: plan.fields.uri }, 'export ready');
      await this.#event(key, 'Normal', EventReason.Served, `serving ${plan.fields.uri ?? ''}`);
    } else if (ready.status === 'False') {
      const reason = warningEventFor(ready.reason);
      if (reason) await this.#event(key, 'Warning', reason, ready.message);
      if (ready.reason === Reason.RestartPending)
        await this.#event(key, 'Normal', EventReason.RestartPlanned, ready.message);
    }
  }

  async #event(key: ResourceKey, type: 'Normal' | 'Warning', reason: string, message: string): Promise<void> {
    try {
      await this.#store.recordEvent(key, { type, reason, message });
    } catch (error) {
      this.#logger.warn({ key, error: errorMessage(error) }, 'could not record event');
    }
  }
}

function warningEventFor(reason: string): string | undefined {
  switch (reason) {
    case Reason.ExportNameConflict:
    case Reason.ImageInUse:
      return reason === Reason.ImageInUse ? EventReason.ImageInUse : EventReason.Conflict;
    case Reason.InvalidSpec:
    case Reason.PathNotAllowed:
    case Reason.DeviceNotAllowed:
    case Reason.Unsupported:
    case Reason.ImageFormatMismatch:
      return EventReason.InvalidSpec;
    default:
      return undefined;
  }
}

/** A gentle change of a qemu export waits for its clients to leave. */
function busyPlan(plan: ExportPlan, message: string): ExportPlan {
  const waitingFor = `${message}; the change is applied once the connected client disconnects`;
  return {
    ...plan,
    actions: [],
    requeueAfterMs: RETRY_SOON_MS,
    conditions: plan.conditions.map((c) =>
      c.type === 'ImageReady'
        ? c
        : { ...c, status: 'False', reason: Reason.RestartPending, message: waitingFor },
    ),
  };
}

function errorName(error: unknown): string | undefined {
  return error instanceof Error ? error.name : undefined;
}

function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
