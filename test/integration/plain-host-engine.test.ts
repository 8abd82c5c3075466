/**
 * The engine end to end on one plain host: the built controller process, real qemu-img,
 * nbd-server, qemu-storage-daemon and NBD clients (nbdcopy, nbdinfo) on loopback.
 */
import { mkdir, readdir, readFile, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { exportSize, isServed, nbdcopy, sha256File, writeRandomFile, HeldTransfer } from '../support/nbd.js';
import { waitFor } from '../support/poll.js';
import { holdsQemuWriteLock, probeImageLock } from '../../src/node/qemu-img.js';
import { processState } from '../../src/node/process/proc-scan.js';
import { nbdExport, PlainHostNode } from './harness/plain-host-controller.js';
import { useStartedNode } from './harness/started-node.js';

const MiB = 1024 * 1024;

async function qemuImg(...args: string[]) {
  return execa('qemu-img', args);
}

/** Every file below `dir`, recursively (relative paths). */
async function listFiles(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { recursive: true, withFileTypes: true }).catch(() => []);
  return entries
    .filter((e) => e.isFile())
    .map((e) => join(e.parentPath, e.name).slice(dir.length + 1))
    .sort();
}

describe('plain-host engine', () => {
  let node: PlainHostNode;
  useStartedNode((started) => (node = started));

  it('serves a QCOW2 full backup with its virtual size, and an incremental that reads through to it', async () => {
    // The platform's full backup: 32 MiB of data in a QCOW2 file.
    const disk = join(node.root, 'full-disk.bin');
    await writeRandomFile(disk, 32 * MiB);
    await mkdir(join(node.images, 'vm-1'));
    const fullPath = join(node.images, 'vm-1', 'full.qcow2');
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', disk, fullPath);

    await node.writeExports('vm-1.yaml', [
      nbdExport('vm-1-full', { source: { file: { path: fullPath, format: 'qcow2' } }, readOnly: true }),
      nbdExport('vm-1-incr', {
        source: {
          file: {
            path: join(node.images, 'vm-1', 'incr.qcow2'),
            format: 'qcow2',
            create: { backingFile: fullPath },
          },
        },
        deletionPolicy: 'Delete',
      }),
    ]);
    const full = await node.waitForReady('vm-1-full');
    const incr = await node.waitForReady('vm-1-incr');

    expect(full.status).toMatchObject({
      server: 'qemu-storage-daemon',
      format: 'qcow2',
      virtualSize: 32 * MiB,
    });
    expect(await exportSize(node.uri(full))).toBe(32 * MiB);
    const fileSize = (await import('node:fs/promises').then((fs) => fs.stat(fullPath))).size;
    expect(fileSize).not.toBe(32 * MiB);
    expect(incr.status?.backingChain).toEqual([fullPath]);

    // Nothing written yet: the incremental reads its backing file's data.
    const readBack = join(node.root, 'incr-before.bin');
    await nbdcopy(node.uri(incr), readBack);
    expect(await sha256File(readBack)).toBe(await sha256File(disk));

    // Write through NBD: it reads back, and it is inside the QCOW2 (qemu-img reads the file itself).
    const payload = join(node.root, 'payload.bin');
    await writeRandomFile(payload, 32 * MiB);
    await execa('nbdcopy', ['--flush', '--connections=1', payload, node.uri(incr)]);
    const viaNbd = join(node.root, 'incr-after.bin');
    await nbdcopy(node.uri(incr), viaNbd);
    expect(await sha256File(viaNbd)).toBe(await sha256File(payload));
    await qemuImg(
      'compare',
      '-U',
      '-f',
      'qcow2',
      '-F',
      'raw',
      join(node.images, 'vm-1', 'incr.qcow2'),
      payload,
    );
    const info = JSON.parse(
      (await qemuImg('info', '-U', '--output=json', join(node.images, 'vm-1', 'incr.qcow2'))).stdout,
    ) as {
      format: string;
    };
    expect(info.format).toBe('qcow2');
    // The full backup did not change.
    await qemuImg('compare', '-U', '-f', 'qcow2', '-F', 'raw', fullPath, disk);
  });

  it('serves a raw file through nbd-server; adding another export does not disturb a transfer', async () => {
    await node.writeExports('raw-a.yaml', [
      nbdExport('raw-a', {
        source: { file: { path: join(node.images, 'a.raw'), format: 'raw', create: { size: '256Mi' } } },
        deletionPolicy: 'Delete',
      }),
    ]);
    const a = await node.waitForReady('raw-a');
    expect(a.status).toMatchObject({ server: 'nbd-server', virtualSize: 256 * MiB });
    const nbdPid = (
      await readFile(join(node.stateDir, 'nbd-server', 'nbd-server.pid'), 'utf8').catch(() => '')
    ).trim();

    // A client writes 256 MiB in two halves and holds its connection in between.
    const payload = join(node.root, 'raw-payload.bin');
    await writeRandomFile(payload, 256 * MiB);
    const transfer = new HeldTransfer(payload, node.uri(a), 128 * MiB);
    await transfer.firstHalfWritten();

    await node.writeExports('raw-b.yaml', [
      nbdExport('raw-b', {
        source: { file: { path: join(node.images, 'b.raw'), format: 'raw', create: { size: '16Mi' } } },
        deletionPolicy: 'Delete',
      }),
    ]);
    const b = await node.waitForReady('raw-b');
    expect(await exportSize(node.uri(b))).toBe(16 * MiB);
    const nbdPidAfter = (
      await readFile(join(node.stateDir, 'nbd-server', 'nbd-server.pid'), 'utf8').catch(() => '')
    ).trim();
    // The new export came with a hand-over restart of nbd-server's parent process...
    if (nbdPid !== '' && nbdPidAfter !== '') expect(nbdPidAfter).not.toBe(nbdPid);

    // ...and the held transfer finishes intact.
    const result = await transfer.finish();
    expect(result).toMatchObject({ exitCode: 0 });
    const back = join(node.root, 'raw-back.bin');
    await nbdcopy(node.uri(a), back);
    expect(await sha256File(back)).toBe(await sha256File(payload));
  });

  it('a removed export is no longer served to new clients, and Delete removes the file it created', async () => {
    const b = await node.waitForReady('raw-b');
    const uri = node.uri(b);
    await node.removeExports('raw-b.yaml');
    await node.waitForGone('raw-b');
    await waitFor('raw-b to be refused', async () => ((await isServed(uri)) ? undefined : true));
    expect(await listFiles(node.images)).not.toContain('b.raw');
    // The other export on the same server still serves.
    expect(await isServed(node.uri(await node.waitForReady('raw-a')))).toBe(true);
  });

  it('refuses bad input with a clear reason and changes nothing on the node', async () => {
    const outside = join(node.root, 'outside');
    await mkdir(outside);
    await symlink(outside, join(node.images, 'escape'));
    await symlink(join(node.images, 'a.raw'), join(node.images, 'alias.raw'));
    const confDir = join(node.stateDir, 'nbd-server', 'conf.d');
    const confBefore = await listFiles(confDir);
    const imagesBefore = await listFiles(node.images);

    await node.writeExports('bad.yaml', [
      nbdExport('escape', {
        source: {
          file: { path: join(node.images, 'escape', 'x.raw'), format: 'raw', create: { size: '1Mi' } },
        },
      }),
      nbdExport('inject-name', {
        exportName: 'x]\n[generic',
        source: { file: { path: join(node.images, 'i.raw'), format: 'raw', create: { size: '1Mi' } } },
      }),
      nbdExport('inject-path', {
        source: {
          file: {
            path: `${node.images}/j.raw\nprerun = touch /tmp/pwned`,
            format: 'raw',
            create: { size: '1Mi' },
          },
        },
      }),
      nbdExport('taken-name', {
        exportName: 'it.raw-a',
        source: { file: { path: join(node.images, 't.raw'), format: 'raw', create: { size: '1Mi' } } },
      }),
      nbdExport('second-writer', { source: { file: { path: join(node.images, 'a.raw'), format: 'raw' } } }),
      nbdExport('alias-writer', {
        source: { file: { path: join(node.images, 'alias.raw'), format: 'raw' } },
      }),
    ]);

    const escape = await node.waitForReady('escape', 'False', 'PathNotAllowed');
    expect(escape.status?.conditions?.[0]?.message).toContain(outside);
    expect(
      (await node.waitForReady('inject-name', 'False', 'InvalidSpec')).status?.conditions?.[0]?.message,
    ).toContain('spec.exportName');
    expect(
      (await node.waitForReady('inject-path', 'False', 'InvalidSpec')).status?.conditions?.[0]?.message,
    ).toContain('spec.source.file.path');
    await node.waitForReady('taken-name', 'False', 'ExportNameConflict');
    await node.waitForReady('second-writer', 'False', 'ImageInUse');
    // The same file through a symlink is the same file.
    await node.waitForReady('alias-writer', 'False', 'ImageInUse');

    expect(await listFiles(outside)).toEqual([]);
    expect(await listFiles(confDir)).toEqual(confBefore);
    expect(await listFiles(node.images)).toEqual(imagesBefore);
    await node.removeExports('bad.yaml');
    for (const name of [
      'escape',
      'inject-name',
      'inject-path',
      'taken-name',
      'second-writer',
      'alias-writer',
    ])
      await node.waitForGone(name);
  });

  it('a foreign QEMU writer holding the image gives ImageInUse, and the export follows once it lets go', async () => {
    const path = join(node.images, 'locked.qcow2');
    await qemuImg('create', '-f', 'qcow2', path, '8M');
    // --fork: qemu-nbd returns only once it has opened the image and holds its locks. Polling
    // with `qemu-img info` instead raced the writer's start: qemu-img's momentary shared lock
    // made a starting qemu-nbd fail to get "write" and exit (the test's own flake, twice).
    const pidFile = join(node.root, 'foreign.pid');
    await execa('qemu-nbd', [
      '--fork',
      '--persistent',
      `--pid-file=${pidFile}`,
      '-f',
      'qcow2',
      '-k',
      join(node.root, 'foreign.sock'),
      path,
    ]);
    const foreignPid = Number((await readFile(pidFile, 'utf8')).trim());
    try {
      expect(await holdsQemuWriteLock(path)).toBe(true);
      await node.writeExports('locked.yaml', [
        nbdExport('locked', { source: { file: { path, format: 'qcow2' } } }),
      ]);
      const locked = await node.waitForReady('locked', 'False', 'ImageInUse');
      expect(locked.status?.conditions?.[0]?.message).toMatch(/lock/);
    } finally {
      process.kill(foreignPid, 'SIGTERM');
      await waitFor('the foreign writer to exit', () =>
        processState(foreignPid) !== 'running' ? true : undefined,
      );
    }
    await node.waitForReady('locked', 'True', undefined, 120_000);
    await node.removeExports('locked.yaml');
    await node.waitForGone('locked');
  });

  it('a controller restart neither restarts the servers nor disturbs a client', async () => {
    const a = await node.waitForReady('raw-a');
    const pidsBefore = await serverPids(node);
    const payload = join(node.root, 'restart-payload.bin');
    await writeRandomFile(payload, 64 * MiB);
    const transfer = new HeldTransfer(payload, node.uri(a), 32 * MiB);
    await transfer.firstHalfWritten();

    await node.stop('SIGTERM');
    await node.start();
    await node.waitForReady('raw-a');
    await node.waitForReady('vm-1-incr');
    expect(await serverPids(node)).toEqual(pidsBefore);
    expect(await transfer.finish()).toMatchObject({ exitCode: 0 });
  });

  it('a qemu-storage-daemon that dies is started again and serves its exports again, data intact', async () => {
    const incr = await node.waitForReady('vm-1-incr');
    const before = join(node.root, 'incr-before-crash.bin');
    await nbdcopy(node.uri(incr), before);
    const [, qemuPid] = await serverPids(node);
    process.kill(Number(qemuPid), 'SIGKILL');
    await waitFor('a new qemu-storage-daemon', async () => {
      const [, pid] = await serverPids(node).catch(() => ['', '']);
      return pid !== undefined && pid !== '' && pid !== qemuPid ? pid : undefined;
    });
    await waitFor('vm-1-incr to be served again', async () =>
      (await isServed(node.uri(incr))) ? true : undefined,
    );
    await node.waitForReady('vm-1-incr');
    const after = join(node.root, 'incr-after-crash.bin');
    await nbdcopy(node.uri(incr), after);
    expect(await sha256File(after)).toBe(await sha256File(before));
  });

  it('killed at any point, the controller converges again with nothing half-done left behind', async () => {
    const names = ['crash-1', 'crash-2', 'crash-3'];
    await node.writeExports('crash.yaml', [
      nbdExport('crash-1', {
        source: {
          file: {
            path: join(node.images, 'crash', '1.qcow2'),
            format: 'qcow2',
            create: { size: '256Mi', preallocation: 'full' },
          },
        },
        deletionPolicy: 'Delete',
      }),
      nbdExport('crash-2', {
        source: {
          file: {
            path: join(node.images, 'crash', '2.raw'),
            format: 'raw',
            create: { size: '256Mi', preallocation: 'full' },
          },
        },
        deletionPolicy: 'Delete',
      }),
      nbdExport('crash-3', {
        readOnly: true,
        source: {
          file: { path: join(node.images, 'crash', '3.raw'), format: 'raw', create: { size: '8Mi' } },
        },
        deletionPolicy: 'Delete',
      }),
    ]);
    // Kill it again and again, a little later each time, while it works.
    for (const delayMs of [0, 50, 100, 200, 300, 500, 800, 1200]) {
      await node.stop('SIGKILL');
      await node.start();
      await new Promise((resolve) => setTimeout(resolve, delayMs));
    }
    for (const name of names) await node.waitForReady(name);

    const leftovers = [...(await listFiles(node.images)), ...(await listFiles(node.stateDir))].filter((f) =>
      /(^|\/)\.[^/]*(tmp|nbdx-tmp)/.test(f),
    );
    expect(leftovers).toEqual([]);
    for (const file of ['1.qcow2', '2.raw', '3.raw'])
      await qemuImg(
        'check',
        '-U',
        '-f',
        file.endsWith('qcow2') ? 'qcow2' : 'raw',
        join(node.images, 'crash', file),
      ).catch((error: unknown) => {
        // qemu-img check on raw reports "format does not support checks" (exit 63): that is fine.
        if (!String((error as { stderr?: string }).stderr).includes('does not support checks')) throw error;
      });
    const conf = (await listFiles(join(node.stateDir, 'nbd-server', 'conf.d'))).filter((f) =>
      f.endsWith('.conf'),
    );
    // One conf file per export nbd-server should serve: raw-a, crash-2, crash-3.
    expect(conf.length).toBe(3);

    await node.removeExports('crash.yaml');
    for (const name of names) await node.waitForGone(name);
    expect(await listFiles(join(node.images, 'crash'))).toEqual([]);
  });
});

async function serverPids(node: PlainHostNode): Promise<string[]> {
  const pids: string[] = [];
  for (const file of ['nbd-server/nbd-server.pid', 'qemu-storage-daemon/qemu-storage-daemon.pid'])
    pids.push((await readFile(join(node.stateDir, file), 'utf8')).trim());
  return pids;
}

describe('plain-host engine with --raw-server=qemu-storage-daemon', () => {
  let node: PlainHostNode;

  beforeAll(async () => {
    node = await PlainHostNode.create();
    await node.start(['--raw-server=qemu-storage-daemon']);
  });

  afterAll(async () => {
    await node?.destroy();
  });

  it("serves raw files with qemu-storage-daemon, holding QEMU's write lock on them", async () => {
    const path = join(node.images, 'raw.img');
    await node.writeExports('raw.yaml', [
      nbdExport('raw', { source: { file: { path, format: 'raw', create: { size: '32Mi' } } } }),
    ]);
    const raw = await node.waitForReady('raw');
    expect(raw.status).toMatchObject({ server: 'qemu-storage-daemon', format: 'raw', virtualSize: 32 * MiB });
    expect(node.uri(raw)).toBe(`nbd://127.0.0.1:${node.qemuPort}/it.raw`);

    const payload = join(node.root, 'payload.bin');
    await writeRandomFile(payload, 32 * MiB);
    await execa('nbdcopy', ['--flush', '--connections=1', payload, node.uri(raw)]);
    expect(await sha256File(path)).toBe(await sha256File(payload));

    // The daemon holds QEMU's write-permission lock on the file, which the lock probe (ours, and
    // any QEMU-aware tool that looks) sees. QEMU itself lets a second raw writer in: it shares "write".
    expect(await probeImageLock(path)).toMatchObject({ locked: true });
    expect(await listFiles(join(node.stateDir, 'nbd-server', 'conf.d'))).toEqual([]);
  });
});
