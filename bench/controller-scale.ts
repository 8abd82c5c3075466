/**
 * How the controller scales on one plain host: N NbdExports (half QCOW2 on
 * qemu-storage-daemon, half raw on nbd-server) appear at once in the source directory;
 * prints the time until all are Ready, the nbd-server hand-over restarts that took, the
 * time to converge again after a controller restart, and the controller's memory.
 * Prints figures; asserts nothing about speed.
 *
 *   bench/run.sh controller-scale [N=100]
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { nbdExport, PlainHostNode } from '../test/integration/harness/plain-host-controller.js';

const count = Number(process.argv[2] ?? 100);
const node = await PlainHostNode.create();

async function allReady(): Promise<number> {
  const started = performance.now();
  for (let i = 0; i < count; i++) await node.waitForReady(`x-${i}`, 'True', undefined, 600_000);
  return performance.now() - started;
}

async function metric(name: string): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${node.healthPort}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  return Number(line?.split(' ')[1] ?? NaN);
}

async function rssMiB(pid: number | undefined): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  return Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? NaN) / 1024;
}

try {
  await node.start();
  const documents = Array.from({ length: count }, (_, i) =>
    nbdExport(`x-${i}`, {
      source: {
        file:
          i % 2 === 0
            ? { path: join(node.images, `x-${i}.qcow2`), format: 'qcow2', create: { size: '64Mi' } }
            : { path: join(node.images, `x-${i}.raw`), format: 'raw', create: { size: '16Mi' } },
      },
      deletionPolicy: 'Delete',
    }),
  );
  const t0 = performance.now();
  await node.writeExports('scale.yaml', documents);
  await allReady();
  const firstMs = performance.now() - t0;
  const restarts = await metric('nbdx_nbd_server_restarts_total');
  const reconciles = await metric('nbdx_reconciles_total');
  const rssAfterCreate = await rssMiB(node.pid);

  await node.stop('SIGTERM');
  const t1 = performance.now();
  await node.start();
  // Every export must be checked again (probe) before the controller calls it Ready: wait for
  // the reconciles of all keys to have run.
  while ((await metric('nbdx_reconciles_total')) < count) await new Promise((r) => setTimeout(r, 100));
  await allReady();
  const restartMs = performance.now() - t1;
  const rssAfterRestart = await rssMiB(node.pid);

  console.log(`exports                                  ${count} (${count / 2} qcow2, ${count / 2} raw)`);
  console.log(`all Ready after they appeared            ${(firstMs / 1000).toFixed(2)} s`);
  console.log(`  per export                             ${(firstMs / count).toFixed(1)} ms`);
  console.log(`  nbd-server starts and hand-overs       ${restarts}`);
  console.log(`  reconciles                             ${reconciles}`);
  console.log(`controller restart to all Ready again    ${(restartMs / 1000).toFixed(2)} s`);
  console.log(
    `controller RSS with ${count} exports         ${rssAfterCreate.toFixed(1)} MiB (after restart ${rssAfterRestart.toFixed(1)} MiB)`,
  );
} finally {
  await node.destroy();
}
