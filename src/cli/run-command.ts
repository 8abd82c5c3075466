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
import { createNodeServices } from '../controller/create-node-services.js';
import { ControllerMetrics } from '../controller/metrics/controller-metrics.js';
import type { KubeExportStoreMetrics } from '../kube/kube-export-store.js';
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
  const { store, kubeFigures } = await createStore(options, logger);
  const services = await createNodeServices({
    stateDir: options.stateDir,
    listenAddress: options.listenAddress,
    nbdPort: options.nbdPort,
    qemuPort: options.qemuPort,
    dedicatedPorts: options.dedicatedPorts,
    ...(options.clientFirewall === 'iptables'
      ? { clientFirewall: { controllerGroup: options.controllerGroup } }
      : {}),
    ...(options.tlsDir === undefined ? {} : { tlsDir: options.tlsDir }),
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
    maxBackingDepth: options.maxBackingDepth,
    allowRawOverForeignHeader: options.allowRawOverForeignHeader,
    tls: options.tlsDir !== undefined,
    clientFirewall: services.clientFirewall,
  };
  // The metrics read the controller only at scrape time, once the health server listens.
  const metrics: ControllerMetrics = new ControllerMetrics(
    {
      ready: () => controller.ready,
      workQueue: () => controller.metrics(),
      servers: () => services.serverFigures(),
      exports: () => services.exportFigures(),
      qemuStorageDaemonIo: () => services.qemuStorageDaemonIo(),
      kubeStore: kubeFigures,
      directorySource: store instanceof DirectoryExportStore ? () => store.metrics() : undefined,
    },
    { onSourceError: (source, error) => logger.warn({ source, err: error }, 'a metrics source failed') },
  );
  const controller: Controller = new Controller({
    store,
    services,
    policy,
    logger,
    concurrency: options.concurrency,
    metrics,
  });
  const health = await startHealthServer(options.healthAddress, options.healthPort, {
    notReadyBecause: () => controller.notReadyBecause(),
    metrics,
    onMetricsError: (error) => logger.warn({ err: error }, '/metrics failed'),
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

/** The source, and in Kubernetes mode the figures of its watch and API writes for /metrics. */
async function createStore(
  options: RunOptions,
  logger: Logger,
): Promise<{ store: ExportStore; kubeFigures?: () => KubeExportStoreMetrics }> {
  if (options.source.kind === 'dir')
    return {
      store: new DirectoryExportStore({
        sourceDir: options.source.path,
        statusDir: options.statusDir,
        nodeName: options.nodeName,
        logger,
      }),
    };
  // Loaded only in Kubernetes mode: the client library costs a plain host tens of MiB.
  const { KubeClient, loadKubeConfig } = await import('../kube/kube-client.js');
  const { KubeExportStore } = await import('../kube/kube-export-store.js');
  const kubeConfig = loadKubeConfig({ kubeconfigPath: options.kubeconfig });
  const store = new KubeExportStore({
    transport: new KubeClient(kubeConfig),
    nodeName: options.nodeName,
    logger,
  });
  return { store, kubeFigures: () => store.metrics() };
}

export function defaultStatusDir(stateDir: string): string {
  return join(stateDir, 'status');
}
