/**
 * The controller's lifecycle: start the servers (adopting running ones), start the
 * source, feed changed keys to the work queue, sweep orphans, resync. Stopping the
 * controller stops watching and working; the servers keep serving.
 */
import type { Logger } from 'pino';
import { keyOf } from '../api/types.js';
import type { ExportStore } from './export-store.js';
import type { NodeServices } from './node-services.js';
import { sweepOrphans } from './orphan-sweep.js';
import { Reconciler } from './reconciler.js';
import { WorkQueue, type WorkQueueMetrics } from './work-queue.js';
import type { NodePolicy } from '../plan/node-policy.js';

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
}

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
    this.#reconciler = new Reconciler({
      store: options.store,
      services: options.services,
      policy: options.policy,
      logger,
    });
    this.#queue = new WorkQueue({
      handler: (key) => this.#reconciler.reconcile(key),
      concurrency: options.concurrency ?? 4,
      onRetry: (key, error, delayMs, failures) =>
        logger.warn(
          { key, error: error instanceof Error ? error.message : String(error), delayMs, failures },
          'reconcile failed; retrying',
        ),
    });
  }

  get ready(): boolean {
    return this.#started && this.#options.store.synced;
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
  #checkQemu(): void {
    const running = this.#options.services.qemu.status().running;
    if (this.#qemuWasRunning && !running) {
      this.#options.logger.warn('qemu-storage-daemon is gone; reconciling every export');
      this.#enqueueAll();
    }
    this.#qemuWasRunning = running;
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
