/**
 * The controller's lifecycle: start the servers (adopting running ones), start the
 * source, feed changed keys to the work queue, sweep orphans, resync. Stopping the
 * controller stops watching and working; the servers keep serving.
 */
import type { Logger } from 'pino';
import { keyOf } from '../api/types.js';
import type { ExportStore } from './export-store.js';
import type { ReconcileRecorder } from './metrics/controller-metrics.js';
import type { NodeServices } from './node-services.js';
import { sweepOrphans } from './orphan-sweep.js';
import { Reconciler } from './reconciler.js';
import { isPermanentError, WorkQueue, type WorkQueueMetrics } from './work-queue.js';
import type { NodePolicy } from '../plan/node-policy.js';
import { systemClock, type Clock } from '../shared/clock.js';

export interface ControllerOptions {
  store: ExportStore;
  services: NodeServices;
  policy: NodePolicy;
  logger: Logger;
  /** Reconciles at once, at most. Default 4. */
  concurrency?: number;
  /** How often orphans are swept. Default 60 s. */
  sweepIntervalMs?: number;
  /** How often qemu-storage-daemon's liveness is checked. Default 2 s. */
  serverCheckIntervalMs?: number;
  /** Told how long each reconcile and each probe took, and how it ended (for /metrics). */
  metrics?: ReconcileRecorder | undefined;
  /** Times reconciles and probes. Default the real clock. */
  clock?: Clock;
}

/** A directory source is read every second; a minute without a reading means it stopped. */
const SOURCE_STALE_SECONDS = 60;
/**
 * Every step has a deadline of its own (external programs, QMP, the probe); a queue with no
 * free worker for this long is wedged all the same, and a restart is the way out.
 */
const WORKERS_STUCK_SECONDS = 300;

export class Controller {
  readonly #options: ControllerOptions;
  readonly #queue: WorkQueue;
  readonly #reconciler: Reconciler;
  #sweepTimer: NodeJS.Timeout | undefined;
  #serverTimer: NodeJS.Timeout | undefined;
  #started = false;

  constructor(options: ControllerOptions) {
    this.#options = options;
    const logger = options.logger;
    const recorder = options.metrics;
    const clock = options.clock ?? systemClock;
    this.#reconciler = new Reconciler({
      store: options.store,
      services: recorder ? timedProbes(options.services, options.policy, recorder, clock) : options.services,
      policy: options.policy,
      logger,
    });
    this.#queue = new WorkQueue({
      handler: recorder
        ? (key) => timed(() => this.#reconciler.reconcile(key), recorder, clock)
        : (key) => this.#reconciler.reconcile(key),
      concurrency: options.concurrency ?? 4,
      onRetry: (key, error, delayMs, failures) =>
        logger.warn(
          { key, error: error instanceof Error ? error.message : String(error), delayMs, failures },
          'reconcile failed; retrying',
        ),
    });
  }

  get ready(): boolean {
    return this.notReadyBecause() === undefined;
  }

  /**
   * Why the controller cannot do its job now, or undefined when it can: the source has not
   * synced, has stopped being read, or every worker has been busy too long (a wedged step).
   */
  notReadyBecause(): string | undefined {
    const { store } = this.#options;
    if (!this.#started || !store.synced) return 'the source has not synced yet';
    const stale = store.secondsSinceRead?.() ?? 0;
    if (stale > SOURCE_STALE_SECONDS) return `the source was last read ${Math.round(stale)} s ago`;
    const busy = this.#queue.metrics().allWorkersBusySeconds;
    if (busy > WORKERS_STUCK_SECONDS) return `every worker has been busy for ${Math.round(busy)} s`;
    return undefined;
  }

  metrics(): WorkQueueMetrics {
    return this.#queue.metrics();
  }

  async start(): Promise<void> {
    const { store, services, logger } = this.#options;
    // A hand-over restart changes what several resources see; the queue dedupes, so every
    // resource is simply looked at again (those waiting on the restart become Ready).
    services.nbdServer.onApplied(() => this.#enqueueAll());
    services.checksums.onChange((key) => this.#queue.add(key));
    store.onChange((key) => this.#queue.add(key));
    await store.start();
    logger.info({ resources: store.list().length }, 'source synced');
    await this.#sweep();
    this.#enqueueAll();
    this.#sweepTimer = setInterval(() => void this.#sweep(), this.#options.sweepIntervalMs ?? 60_000);
    this.#serverTimer = setInterval(() => this.#checkQemu(), this.#options.serverCheckIntervalMs ?? 2_000);
    this.#started = true;
  }

  /** Stops watching and working. What the servers serve stays served. */
  async stop(): Promise<void> {
    clearInterval(this.#sweepTimer);
    clearInterval(this.#serverTimer);
    await this.#options.store.stop();
    await this.#queue.shutdown();
  }

  /**
   * qemu-storage-daemon that died loses every export; nothing else would notice before the
   * next resync. (nbd-server's supervisor has its own watchdog and reports through onApplied.)
   * Every resource is looked at again: the first look restarts the daemon, and the planner
   * adds back what it should serve.
   */
  #qemuWasRunning = true;
  #qemuStarts: number | undefined;
  #checkQemu(): void {
    const { running, starts } = this.#options.services.qemu.status();
    // Any call that talks to the daemon restarts a dead one at once, so between two checks it
    // may have died and come back empty: a new start counts as much as a death seen.
    const restarted = this.#qemuStarts !== undefined && starts !== this.#qemuStarts;
    if ((this.#qemuWasRunning && !running) || restarted) {
      this.#options.logger.warn(
        restarted
          ? 'qemu-storage-daemon was started again; reconciling every export'
          : 'qemu-storage-daemon is gone; reconciling every export',
      );
      this.#enqueueAll();
    }
    this.#qemuWasRunning = running;
    this.#qemuStarts = starts;
  }

  #enqueueAll(): void {
    for (const resource of this.#options.store.list()) this.#queue.add(keyOf(resource.metadata));
  }

  async #sweep(): Promise<void> {
    try {
      await sweepOrphans(this.#options.store, this.#options.services, this.#options.logger);
    } catch (error) {
      this.#options.logger.warn(
        { error: error instanceof Error ? error.message : String(error) },
        'orphan sweep failed',
      );
    }
  }
}

/** Runs one reconcile and tells the recorder how long it took and how it ended. */
async function timed<T extends { requeueAfterMs?: number }>(
  reconcile: () => Promise<T>,
  recorder: ReconcileRecorder,
  clock: Clock,
): Promise<T> {
  const started = clock.now();
  const seconds = () => (clock.now() - started) / 1000;
  let result: T;
  try {
    result = await reconcile();
  } catch (error) {
    recorder.observeReconcile(isPermanentError(error) ? 'permanent_error' : 'error', seconds(), error);
    throw error;
  }
  recorder.observeReconcile(result.requeueAfterMs === undefined ? 'success' : 'requeue', seconds());
  return result;
}

/** The node services with every probe timed; the port probed says which server answered. */
function timedProbes(
  services: NodeServices,
  policy: NodePolicy,
  recorder: ReconcileRecorder,
  clock: Clock,
): NodeServices {
  // Spelled out, not spread: an implementation may be a class whose methods a spread would drop.
  return {
    nbdServer: services.nbdServer,
    qemu: services.qemu,
    images: services.images,
    ledger: services.ledger,
    checksums: services.checksums,
    resolvePath: (path) => services.resolvePath(path),
    async probe(target) {
      // Every port but nbd-server's is a qemu-storage-daemon's (the shared one or an export's own).
      const server = target.port === policy.nbdServerPort ? 'nbd-server' : 'qemu-storage-daemon';
      const started = clock.now();
      try {
        const result = await services.probe(target);
        recorder.observeProbe(server, result.ok, (clock.now() - started) / 1000);
        return result;
      } catch (error) {
        recorder.observeProbe(server, false, (clock.now() - started) / 1000);
        throw error;
      }
    },
  };
}
