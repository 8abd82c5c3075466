/**
 * Throughput through exports the controller serves, end to end on one plain host: a raw
 * file on nbd-server and a QCOW2 image on qemu-storage-daemon, written and read with
 * nbdcopy over loopback. Prints GiB/s next to the original plan's bars (block devices
 * 3.2 GiB/s, QCOW2 > 1 GiB/s); asserts nothing. No block device exists on these machines,
 * so the raw file stands in for one.
 *
 *   bench/run.sh export-throughput [SIZE_MIB=2048]
 */
import { join } from 'node:path';
import { execa } from 'execa';
import { nbdExport, PlainHostNode } from '../test/integration/harness/plain-host-controller.js';
import { writeRandomFile } from '../test/support/nbd.js';

const sizeMiB = Number(process.argv[2] ?? 2048);
const bytes = sizeMiB * 1024 * 1024;
const node = await PlainHostNode.create();

async function timed(what: string, args: string[]): Promise<number> {
  const started = performance.now();
  await execa('nbdcopy', args);
  const seconds = (performance.now() - started) / 1000;
  return bytes / 1024 ** 3 / seconds;
}

try {
  await node.start();
  await node.writeExports('bench.yaml', [
    nbdExport('raw', {
      source: {
        file: { path: join(node.images, 'raw.img'), format: 'raw', create: { size: `${sizeMiB}Mi` } },
      },
    }),
    nbdExport('qcow2', {
      source: {
        file: { path: join(node.images, 'disk.qcow2'), format: 'qcow2', create: { size: `${sizeMiB}Mi` } },
      },
    }),
  ]);
  const raw = node.uri(await node.waitForReady('raw'));
  const qcow2 = node.uri(await node.waitForReady('qcow2'));
  const source = join(node.root, 'source.bin');
  await writeRandomFile(source, bytes);

  const rows: [string, number, string][] = [];
  for (const [name, uri, bar] of [
    ['nbd-server raw', raw, '3.2 GiB/s (block devices)'],
    ['qemu-storage-daemon qcow2', qcow2, '> 1 GiB/s (QCOW2)'],
  ] as const) {
    rows.push([`${name}: first write`, await timed('write', ['--flush', source, uri]), bar]);
    rows.push([`${name}: rewrite`, await timed('rewrite', ['--flush', source, uri]), bar]);
    rows.push([`${name}: read`, await timed('read', [uri, 'null:']), bar]);
  }
  const memory = await timed('memory', [source, 'null:']);
  console.log(`${sizeMiB} MiB through each export, nbdcopy over loopback, 2-core machine`);
  for (const [what, gibs, bar] of rows)
    console.log(`${what.padEnd(44)} ${gibs.toFixed(2)} GiB/s   (plan: ${bar})`);
  console.log(`${'nbdcopy file → null (no NBD), for scale'.padEnd(44)} ${memory.toFixed(2)} GiB/s`);
} finally {
  await node.destroy();
}
