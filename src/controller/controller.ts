/**
 * The controller's lifecycle: start the servers (adopting running ones), start the
 * source, feed changed keys to the work queue, sweep orphans, resync. Stopping the
 * controller stops watching and working; the servers keep serving.
 */
import type { Logger } from 'pino';
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
}

export class Controller {
  readonly #options: ControllerOptions;
  readonly #queue: WorkQueue;
  readonly #reconciler: Reconciler;
  #sweepTimer: NodeJS.Timeout | undefined;
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
    services.nbdServer.onApplied((names) => {
      const byExport = new Map(services.ledger.all().map((r) => [r.exportName, r.key]));
      for (const name of names) {
        const key = byExport.get(name);
        if (key) this.#queue.add(key);
      }
      // Resources waiting on a restart that named none of theirs still want a look.
      for (const resource of store.list())
        this.#queue.add(`${resource.metadata.namespace}/${resource.metadata.name}`);
    });
    store.onChange((key) => this.#queue.add(key));
    await store.start();
    logger.info({ resources: store.list().length }, 'source synced');
    await this.#sweep();
    for (const resource of store.list())
      this.#queue.add(`${resource.metadata.namespace}/${resource.metadata.name}`);
    this.#sweepTimer = setInterval(() => void this.#sweep(), this.#options.sweepIntervalMs ?? 60_000);
    this.#started = true;
  }

  /** Stops watching and working. What the servers serve stays served. */
  async stop(): Promise<void> {
    clearInterval(this.#sweepTimer);
    await this.#options.store.stop();
    await this.#queue.shutdown();
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
