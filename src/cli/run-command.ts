/**
 * `run`: wires the engine for one node and runs it until SIGTERM/SIGINT. A second
 * signal exits at once. Stopping leaves the servers serving: a restarted controller
 * adopts them.
 */
import { join } from 'node:path';
import { pino, type Logger } from 'pino';
import type { ExportStore } from '../controller/export-store.js';
import { Controller } from '../controller/controller.js';
import { startHealthServer, boundPort } from '../controller/health-server.js';
import { createNodeServices, type StartedNodeServices } from '../controller/create-node-services.js';
import type { NodePolicy } from '../plan/node-policy.js';
import { DirectoryExportStore } from '../source/directory-export-store.js';
import type { RunOptions } from './run-options.js';

export async function runController(options: RunOptions): Promise<void> {
  const logger = pino({ level: options.logLevel, base: { node: options.nodeName } });
  logger.info(
    { source: options.source, stateDir: options.stateDir, allowedRoots: options.allowedRoots },
    'starting',
  );

  // The source first: a bad kubeconfig must fail before any server is started.
  const store = await createStore(options, logger);
  const services = await createNodeServices({
    stateDir: options.stateDir,
    listenAddress: options.listenAddress,
    nbdPort: options.nbdPort,
    qemuPort: options.qemuPort,
    logger,
  });
  const policy: NodePolicy = {
    nodeName: options.nodeName,
    allowedRoots: options.allowedRoots,
    allowedDevices: options.allowedDevices,
    advertiseHost: options.advertiseAddress,
    probeHost: options.probeAddress,
    nbdServerPort: options.nbdPort,
    qemuPort: options.qemuPort,
    rawServer: options.rawServer,
  };
  const controller = new Controller({ store, services, policy, logger, concurrency: options.concurrency });
  const health = await startHealthServer(options.healthAddress, options.healthPort, {
    ready: () => controller.ready,
    metrics: () => metricsOf(controller, services),
  });
  logger.info({ port: boundPort(health) }, 'health server listening');

  let stopping = false;
  const stop = (signal: string) => {
    if (stopping) {
      logger.warn({ signal }, 'second signal: exiting now');
      process.exit(1);
    }
    stopping = true;
    logger.info({ signal }, 'stopping; the servers keep serving');
    // A step wedged beyond every deadline (say, a file system that hangs) must not hold the
    // process past its grace period: the servers keep serving either way.
    setTimeout(() => {
      logger.warn({ timeoutMs: options.shutdownTimeoutMs }, 'stop took too long: exiting now');
      process.exit(1);
    }, options.shutdownTimeoutMs).unref();
    void (async () => {
      await controller.stop();
      await services.detach();
      health.close();
      logger.info('stopped');
      process.exit(0);
    })();
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));

  await controller.start();
  logger.info('running');
}

async function createStore(options: RunOptions, logger: Logger): Promise<ExportStore> {
  if (options.source.kind === 'dir')
    return new DirectoryExportStore({
      sourceDir: options.source.path,
      statusDir: options.statusDir,
      nodeName: options.nodeName,
      logger,
    });
  // Loaded only in Kubernetes mode: the client library costs a plain host tens of MiB.
  const { KubeClient, loadKubeConfig } = await import('../kube/kube-client.js');
  const { KubeExportStore } = await import('../kube/kube-export-store.js');
  const kubeConfig = loadKubeConfig({ kubeconfigPath: options.kubeconfig });
  return new KubeExportStore({ transport: new KubeClient(kubeConfig), nodeName: options.nodeName, logger });
}

function metricsOf(controller: Controller, services: StartedNodeServices) {
  const queue = controller.metrics();
  const servers = services.serverMetrics();
  return [
    {
      name: 'nbdx_ready',
      help: 'Whether the source has synced',
      type: 'gauge' as const,
      value: controller.ready ? 1 : 0,
    },
    {
      name: 'nbdx_workqueue_depth',
      help: 'Keys waiting to reconcile',
      type: 'gauge' as const,
      value: queue.depth,
    },
    {
      name: 'nbdx_workqueue_in_flight',
      help: 'Reconciles running',
      type: 'gauge' as const,
      value: queue.inFlight,
    },
    {
      name: 'nbdx_reconciles_total',
      help: 'Reconciles run',
      type: 'counter' as const,
      value: queue.runsTotal,
    },
    {
      name: 'nbdx_reconcile_retries_total',
      help: 'Failed reconciles retried',
      type: 'counter' as const,
      value: queue.retriesTotal,
    },
    {
      name: 'nbdx_reconcile_seconds_sum',
      help: 'Total reconcile time',
      type: 'counter' as const,
      value: queue.runDurationSecondsSum,
    },
    ...servers,
  ];
}

export function defaultStatusDir(stateDir: string): string {
  return join(stateDir, 'status');
}
