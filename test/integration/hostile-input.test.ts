/**
 * Hostile input through the controller's real interface: the built plain-host controller
 * process, images made by the real qemu-img, and real NBD clients (nbdinfo, nbdcopy) trying to
 * read or write through whatever it serves. One controller serves every case; each class of
 * cases is one source file, written at once, and removed again before the next class.
 *
 * Every case asserts its outcome (Ready=False with the expected reason and a message naming
 * the problem, or served), that nothing is served under its name when refused, and that the
 * controller still runs and serves the control exports. Every class then asserts the node is
 * unchanged: no file under the test's root added, removed or modified (the files outside the
 * roots included), no new conf.d file and no new qemu-storage-daemon export beyond those of
 * the cases that are meant to be served, and no TCP connection to the listeners that hostile
 * headers name.
 */
import { randomBytes } from 'node:crypto';
import { link, mkdir, readdir, readFile, rename, rm, symlink, writeFile } from 'node:fs/promises';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { join, relative } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Condition, NbdExport } from '../../src/api/types.js';
import { confFileNameOf } from '../../src/node/nbd-server/conf-file-name.js';
import { statusFileName } from '../../src/source/status-file-name.js';
import {
  createEncrypted,
  createImage,
  patchQcow2Field,
  QCOW2_FIELD,
  qcow2WithBacking,
  rebaseUnsafe,
  truncateTo,
  vmdkDescriptor,
} from '../support/hostile-images.js';
import {
  HeldTransfer,
  isServed,
  nbdcopy,
  establishedConnections,
  requireNbdClients,
  sha256File,
  writeRandomFile,
} from '../support/nbd.js';
import { snapshotNode, type NodeSnapshot } from '../support/node-snapshot.js';
import { waitFor } from '../support/poll.js';
import { isRunning, requireBinary } from '../support/repo.js';
import { nbdExport, PlainHostNode } from './harness/plain-host-controller.js';
import { load } from 'js-yaml';

const MiB = 1024 * 1024;
const NAMESPACE = 'it';

type Outcome =
  | { ready: 'True'; server: 'nbd-server' | 'qemu-storage-daemon' }
  | { ready: 'False'; reason: string; message: RegExp };

interface HostileCase {
  /** metadata.name; the export it would have is `it.<name>` unless the spec names another. */
  name: string;
  /** What the case tries, for the test's title. */
  what: string;
  /** Builds the case's files and returns its spec (nodeName added). */
  spec: () => Promise<Record<string, unknown>>;
  outcome: Outcome;
}

const refused = (reason: string, message: RegExp): Outcome => ({ ready: 'False', reason, message });
const served = (server: 'nbd-server' | 'qemu-storage-daemon'): Outcome => ({ ready: 'True', server });

let node: PlainHostNode;
let outside: string;
let controlRaw: string;
/** A read-only raw export that serves up to 8 clients at once. */
let controlShared: string;
let controlQcow2: string;
/** A loopback listener that counts connections: hostile backing names point at it. */
let trap: { server: Server; port: number; connections: number };
let caseCount = 0;

/** Registers a class: one source file with all its cases, one test per case, then the node check. */
function caseClass(title: string, file: string, build: () => HostileCase[]): void {
  const cases = build();
  caseCount += cases.length;
  describe(title, () => {
    let before: NodeSnapshot;

    beforeAll(async () => {
      const documents: object[] = [];
      for (const c of cases) documents.push(nbdExport(c.name, await c.spec()));
      before = await snapshot();
      await node.writeExports(file, documents);
    }, 240_000);

    it.each(cases.map((c) => [c.what, c] as const))('%s', async (_what, c) => {
      await expectOutcome(c);
    });

    it('leaves the node unchanged, and is cleaned up', async () => {
      const after = await snapshot();
      expect(after.files).toEqual(before.files);
      const servedCases = cases.filter((c) => c.outcome.ready === 'True');
      const expectedConf = servedCases
        .filter((c) => c.outcome.ready === 'True' && c.outcome.server === 'nbd-server')
        .map((c) => confFileNameOf(`${NAMESPACE}.${c.name}`));
      const expectedQemu = servedCases
        .filter((c) => c.outcome.ready === 'True' && c.outcome.server === 'qemu-storage-daemon')
        .map((c) => `${NAMESPACE}.${c.name}`);
      expect(after.confFiles).toEqual([...before.confFiles, ...expectedConf].sort());
      expect(after.qemuExports).toEqual([...before.qemuExports, ...expectedQemu].sort());
      expect(trap.connections).toBe(0);

      await node.removeExports(file);
      for (const c of cases) await waitForNoStatus(c.name);
      await waitFor('the served cases to be retired', async () => {
        const now = await snapshot();
        return now.confFiles.join() === before.confFiles.join() &&
          now.qemuExports.join() === before.qemuExports.join()
          ? true
          : undefined;
      });
    });
  });
}

async function snapshot(): Promise<NodeSnapshot> {
  return snapshotNode({
    root: node.root,
    exclude: [node.stateDir, node.statusDir, node.exportsDir],
    confDir: join(node.stateDir, 'nbd-server', 'conf.d'),
    qemuPort: node.qemuPort,
  });
}

async function readObject(name: string): Promise<NbdExport | undefined> {
  const text = await readFile(join(node.statusDir, statusFileName(NAMESPACE, name)), 'utf8').catch(
    () => undefined,
  );
  return text === undefined ? undefined : (load(text) as NbdExport);
}

async function waitForNoStatus(name: string): Promise<void> {
  await waitFor(`${name} to be cleaned up`, async () => ((await readObject(name)) ? undefined : true), {
    intervalMs: 250,
  });
}

/** Waits for the case's outcome for the current generation; a timeout shows what it showed last. */
async function waitForOutcome(
  c: HostileCase,
  timeoutMs = 120_000,
): Promise<{ object: NbdExport; ready: Condition }> {
  let last: Condition | undefined;
  try {
    return await waitFor(
      `${c.name} Ready=${c.outcome.ready}${c.outcome.ready === 'False' ? ` (${c.outcome.reason})` : ''}`,
      async () => {
        const object = await readObject(c.name);
        const ready = object?.status?.conditions?.find((condition) => condition.type === 'Ready');
        last = ready;
        if (!object || !ready || ready.observedGeneration !== object.metadata.generation) return undefined;
        if (ready.status !== c.outcome.ready) return undefined;
        if (c.outcome.ready === 'False' && ready.reason !== c.outcome.reason) return undefined;
        return { object, ready };
      },
      { timeoutMs, intervalMs: 250 },
    );
  } catch (error) {
    throw new Error(`${(error as Error).message}\nlast Ready: ${JSON.stringify(last)}`, { cause: error });
  }
}

function uriOf(port: number, exportName: string): string {
  return `nbd://127.0.0.1:${port}/${encodeURIComponent(exportName)}`;
}

async function expectOutcome(c: HostileCase): Promise<void> {
  const { object, ready } = await waitForOutcome(c);
  const exportName = `${NAMESPACE}.${c.name}`;
  if (c.outcome.ready === 'False') {
    expect(ready.message).toMatch(c.outcome.message);
    // Not served under its name by either server.
    expect(await isServed(uriOf(node.nbdPort, exportName))).toBe(false);
    expect(await isServed(uriOf(node.qemuPort, exportName))).toBe(false);
  } else {
    expect(object.status?.server).toBe(c.outcome.server);
    expect(await isServed(object.status?.uri ?? '')).toBe(true);
  }
  await expectControllerServing();
}

/**
 * The controller process runs, and both servers answer a new real client (on nbd-server, a
 * read-only export that takes several clients: the read-write control export may be held by
 * a transfer, and then a second client is refused, as its maxConnections says).
 */
async function expectControllerServing(): Promise<void> {
  expect(node.pid !== undefined && isRunning(node.pid)).toBe(true);
  expect(await isServed(controlShared)).toBe(true);
  expect(await isServed(controlQcow2)).toBe(true);
}

async function mkfifo(path: string): Promise<string> {
  await execa('mkfifo', [path]);
  return path;
}

async function mknod(path: string, type: 'b' | 'c', major: number, minor: number): Promise<string> {
  await execa('mknod', [path, type, String(major), String(minor)]);
  return path;
}

async function controllerLog(): Promise<string> {
  const logs = (await readdir(node.root)).filter((f) => /^controller-\d+\.log$/.test(f)).sort();
  return readFile(join(node.root, logs.at(-1) ?? 'controller-1.log'), 'utf8');
}

beforeAll(async () => {
  await requireNbdClients();
  for (const program of ['qemu-img', 'qemu-nbd', 'mkfifo', 'mknod']) await requireBinary(program);
  node = await PlainHostNode.create();
  outside = join(node.root, 'outside');
  await mkdir(outside);
  await writeFile(join(outside, 'secret.raw'), Buffer.alloc(MiB, 0x5a));
  await createImage('qcow2', join(outside, 'secret.qcow2'), '1M');
  for (const dir of ['h', 'n', 'e']) await mkdir(join(node.images, dir));

  trap = { server: createServer(), port: 0, connections: 0 };
  trap.server.on('connection', (socket: Socket) => {
    trap.connections++;
    socket.destroy();
  });
  await new Promise<void>((resolve) => trap.server.listen(0, '127.0.0.1', resolve));
  trap.port = (trap.server.address() as { port: number }).port;

  await node.start();
  await createImage('qcow2', join(node.images, 'control.qcow2'), '16M');
  await node.writeExports('control.yaml', [
    nbdExport('control-raw', {
      source: { file: { path: join(node.images, 'control.raw'), format: 'raw', create: { size: '64Mi' } } },
    }),
    nbdExport('control-qcow2', {
      source: { file: { path: join(node.images, 'control.qcow2'), format: 'qcow2' } },
    }),
    nbdExport('control-shared', {
      source: { file: { path: join(node.images, 'shared.raw'), format: 'raw', create: { size: '1Mi' } } },
      readOnly: true,
      maxConnections: 8,
    }),
  ]);
  controlRaw = node.uri(await node.waitForReady('control-raw'));
  controlShared = node.uri(await node.waitForReady('control-shared'));
  controlQcow2 = node.uri(await node.waitForReady('control-qcow2'));
}, 180_000);

afterAll(async () => {
  console.log(`hostile-input: ${caseCount} cases`);
  await new Promise((resolve) => trap?.server.close(resolve));
  await node?.destroy();
});

// ---------------------------------------------------------------------------------------------
// Hostile image headers
// ---------------------------------------------------------------------------------------------

caseClass('hostile image headers', 'headers.yaml', () => {
  const h = (file: string) => join(node.images, 'h', file);
  const qcow2 = (path: string) => ({ source: { file: { path, format: 'qcow2' } } });
  const raw = (path: string) => ({ source: { file: { path, format: 'raw' } } });
  const external = /external file/;
  const notAPath = /only plain file paths are followed/;
  const outsideRoots = /outside the allowed roots/;
  return [
    {
      name: 'data-file-inside',
      what: 'qcow2 with an external data file inside the roots',
      spec: async () =>
        qcow2(await createImage('qcow2', h('df-in.qcow2'), '4M', '-o', `data_file=${h('df-in.data')}`)),
      outcome: refused('ImageUnsafe', external),
    },
    {
      name: 'data-file-outside',
      what: 'qcow2 with an external data file outside the roots',
      spec: async () =>
        qcow2(
          await createImage('qcow2', h('df-out.qcow2'), '4M', '-o', `data_file=${join(outside, 'df.data')}`),
        ),
      outcome: refused('ImageUnsafe', external),
    },
    {
      name: 'data-file-raw-outside',
      what: 'qcow2 with data_file_raw naming a secret outside the roots',
      spec: async () => {
        const data = join(outside, 'df-raw.data');
        const path = await createImage(
          'qcow2',
          h('df-raw.qcow2'),
          '1M',
          '-o',
          `data_file=${data},data_file_raw=on`,
        );
        // The secret is written after qemu-img made the data file: the image's blocks are its bytes.
        await writeFile(data, Buffer.alloc(MiB, 0x5a));
        return qcow2(path);
      },
      outcome: refused('ImageUnsafe', external),
    },
    {
      name: 'backing-json',
      what: 'backing name json:{...} opening the secret outside the roots',
      spec: async () =>
        qcow2(
          await qcow2WithBacking(
            h('json.qcow2'),
            `json:{"driver":"raw","file":{"driver":"file","filename":"${join(outside, 'secret.raw')}"}}`,
            'raw',
          ),
        ),
      outcome: refused('ImageUnsafe', /json: pseudo-filename/),
    },
    {
      name: 'backing-nbd-url',
      what: 'backing name nbd://127.0.0.1:PORT/x (no connection may reach the listener)',
      spec: async () =>
        qcow2(await qcow2WithBacking(h('nbd-url.qcow2'), `nbd://127.0.0.1:${trap.port}/x`, 'raw')),
      outcome: refused('ImageUnsafe', /URL that QEMU would connect to/),
    },
    {
      name: 'backing-nbd-colon',
      what: 'backing name nbd:127.0.0.1:PORT:exportname=x',
      spec: async () =>
        qcow2(await qcow2WithBacking(h('nbd-colon.qcow2'), `nbd:127.0.0.1:${trap.port}:exportname=x`, 'raw')),
      outcome: refused('ImageUnsafe', /protocol "nbd:"/),
    },
    {
      name: 'backing-http',
      what: 'backing name http://127.0.0.1:PORT/x',
      spec: async () =>
        qcow2(await qcow2WithBacking(h('http.qcow2'), `http://127.0.0.1:${trap.port}/x`, 'raw')),
      outcome: refused('ImageUnsafe', notAPath),
    },
    {
      name: 'backing-file-protocol',
      what: 'backing name file:/… naming the secret',
      spec: async () =>
        qcow2(await qcow2WithBacking(h('file.qcow2'), `file:${join(outside, 'secret.raw')}`, 'raw')),
      outcome: refused('ImageUnsafe', /protocol "file:"/),
    },
    {
      name: 'backing-relative-escape',
      what: 'relative backing name escaping the root (../../outside/secret.raw)',
      spec: async () =>
        qcow2(
          await qcow2WithBacking(
            h('rel-escape.qcow2'),
            relative(join(node.images, 'h'), join(outside, 'secret.raw')),
            'raw',
          ),
        ),
      outcome: refused('PathNotAllowed', outsideRoots),
    },
    {
      name: 'backing-dotdot-etc',
      what: 'relative backing name ../../../../../../../etc/passwd',
      spec: async () =>
        qcow2(await qcow2WithBacking(h('etc.qcow2'), '../../../../../../../../../etc/passwd', 'raw')),
      outcome: refused('PathNotAllowed', /\/etc\/passwd.*outside the allowed roots/),
    },
    {
      name: 'backing-absolute-outside',
      what: 'absolute backing name outside the roots',
      spec: async () => qcow2(await qcow2WithBacking(h('abs-out.qcow2'), join(outside, 'secret.qcow2'))),
      outcome: refused('PathNotAllowed', outsideRoots),
    },
    {
      name: 'backing-symlink-outside',
      what: 'backing file that is a symlink inside the root to a file outside',
      spec: async () => {
        await symlink(join(outside, 'secret.qcow2'), h('link-to-secret.qcow2'));
        return qcow2(await qcow2WithBacking(h('via-link.qcow2'), 'link-to-secret.qcow2'));
      },
      outcome: refused('PathNotAllowed', outsideRoots),
    },
    {
      name: 'backing-hard-link',
      what: 'backing file hard-linked to a file outside the roots',
      spec: async () => {
        await createImage('qcow2', join(outside, 'hard-base.qcow2'), '1M');
        await link(join(outside, 'hard-base.qcow2'), h('hard-base.qcow2'));
        return qcow2(await qcow2WithBacking(h('via-hard.qcow2'), h('hard-base.qcow2')));
      },
      outcome: refused('ImageUnsafe', /hard links/),
    },
    {
      name: 'backing-fifo',
      what: 'backing file that is a FIFO (never opened)',
      spec: async () => qcow2(await qcow2WithBacking(h('via-fifo.qcow2'), await mkfifo(h('fifo.qcow2')))),
      outcome: refused('ImageUnsafe', /fifo|FIFO/),
    },
    {
      name: 'backing-char-device',
      what: 'backing file that is a character device node (/dev/zero)',
      spec: async () =>
        qcow2(await qcow2WithBacking(h('via-chr.qcow2'), await mknod(h('zero'), 'c', 1, 5), 'raw')),
      outcome: refused('ImageUnsafe', /character|not a regular file|only regular files/),
    },
    {
      name: 'backing-block-device',
      what: 'backing file that is a block device node',
      spec: async () =>
        qcow2(await qcow2WithBacking(h('via-blk.qcow2'), await mknod(h('loop-node'), 'b', 7, 250), 'raw')),
      outcome: refused('ImageUnsafe', /block|not a regular file|only regular files/),
    },
    {
      name: 'backing-directory',
      what: 'backing file that is a directory',
      spec: async () => {
        await mkdir(h('a-directory'));
        return qcow2(await qcow2WithBacking(h('via-dir.qcow2'), h('a-directory')));
      },
      outcome: refused('ImageUnsafe', /director/),
    },
    {
      name: 'backing-missing',
      what: 'backing file that does not exist',
      spec: async () => qcow2(await qcow2WithBacking(h('via-missing.qcow2'), h('no-such-base.qcow2'))),
      outcome: refused('BackingFileNotFound', /no-such-base\.qcow2.*does not exist/),
    },
    {
      name: 'loop-self',
      what: 'an image that is its own backing file',
      spec: async () => {
        const path = await createImage('qcow2', h('self.qcow2'), '4M');
        await rebaseUnsafe(path, path);
        return qcow2(path);
      },
      outcome: refused('ImageUnsafe', /loop/),
    },
    {
      name: 'loop-a-b',
      what: 'a backing loop a → b → a',
      spec: async () => {
        const a = await createImage('qcow2', h('loop-a.qcow2'), '4M');
        const b = await qcow2WithBacking(h('loop-b.qcow2'), a);
        await rebaseUnsafe(a, b);
        return qcow2(a);
      },
      outcome: refused('ImageUnsafe', /loop/),
    },
    {
      name: 'chain-too-deep',
      what: 'a chain of 17 backing files (the limit is 16)',
      spec: async () => qcow2(await chain('deep', 17)),
      outcome: refused('ImageUnsafe', /longer than 16 backing files/),
    },
    {
      name: 'chain-at-limit',
      what: 'a chain of exactly 16 backing files is served',
      spec: async () => qcow2(await chain('limit', 16)),
      outcome: served('qemu-storage-daemon'),
    },
    {
      name: 'encrypted-qcow2',
      what: 'qcow2 encrypted with LUKS',
      spec: async () => qcow2(await createEncrypted('qcow2', h('encrypted.qcow2'))),
      outcome: refused('Unsupported', /encrypted/),
    },
    {
      name: 'unknown-incompatible',
      what: 'qcow2 with an unknown incompatible feature bit (63)',
      spec: async () =>
        qcow2(
          await patchQcow2Field(
            await createImage('qcow2', h('unknown-bit.qcow2'), '4M'),
            QCOW2_FIELD.incompatibleFeatures,
            1n << 63n,
            'or',
          ),
        ),
      outcome: refused('Unsupported', /incompatible feature bits 63/),
    },
    {
      name: 'unknown-incompatible-backing',
      what: 'a backing file with an unknown incompatible feature bit (40)',
      spec: async () => {
        const base = await patchQcow2Field(
          await createImage('qcow2', h('unknown-bit-base.qcow2'), '4M'),
          QCOW2_FIELD.incompatibleFeatures,
          1n << 40n,
          'or',
        );
        return qcow2(await qcow2WithBacking(h('unknown-bit-top.qcow2'), base));
      },
      outcome: refused('Unsupported', /backing file.*incompatible feature bits 40/),
    },
    {
      name: 'corrupt-bit',
      what: 'qcow2 marked corrupt',
      spec: async () =>
        qcow2(
          await patchQcow2Field(
            await createImage('qcow2', h('corrupt.qcow2'), '4M'),
            QCOW2_FIELD.incompatibleFeatures,
            2n,
            'or',
          ),
        ),
      outcome: refused('ImageInvalid', /marked corrupt/),
    },
    {
      name: 'truncated-header',
      what: 'qcow2 header cut at 40 bytes, declared qcow2',
      spec: async () => qcow2(await truncateTo(await createImage('qcow2', h('cut.qcow2'), '4M'), 40)),
      outcome: refused('ImageInvalid', /malformed qcow2 header/),
    },
    {
      name: 'truncated-header-raw',
      what: 'qcow2 header cut at 40 bytes, declared raw',
      spec: async () => raw(await truncateTo(await createImage('qcow2', h('cut-raw.qcow2'), '4M'), 40)),
      outcome: refused('ImageFormatMismatch', /begins with a qcow2 header/),
    },
    {
      name: 'absurd-size',
      what: 'qcow2 declaring a virtual size of 2^62 bytes',
      spec: async () =>
        qcow2(
          await patchQcow2Field(
            await createImage('qcow2', h('huge.qcow2'), '4M'),
            QCOW2_FIELD.size,
            1n << 62n,
          ),
        ),
      outcome: refused('ImageInvalid', /virtual size/),
    },
    {
      name: 'zero-size',
      what: 'qcow2 declaring a virtual size of 0',
      spec: async () =>
        qcow2(await patchQcow2Field(await createImage('qcow2', h('zero.qcow2'), '4M'), QCOW2_FIELD.size, 0n)),
      outcome: refused('ImageInvalid', /virtual size of 0/),
    },
    {
      name: 'qcow2-as-raw',
      what: 'a QCOW2 declared raw',
      spec: async () => raw(await createImage('qcow2', h('qcow2-as-raw.qcow2'), '4M')),
      outcome: refused('ImageFormatMismatch', /begins with a qcow2 header/),
    },
    {
      name: 'qcow2-backing-as-raw',
      what: 'a qcow2 backing file recorded as raw',
      spec: async () => {
        const base = await createImage('qcow2', h('q-base.qcow2'), '4M');
        return qcow2(await qcow2WithBacking(h('q-top.qcow2'), base, 'raw'));
      },
      outcome: refused('ImageUnsafe', /read as raw but begins with a qcow2 header/),
    },
    {
      name: 'vmdk-backing',
      what: 'a qcow2 whose backing file is a VMDK',
      spec: async () => {
        const base = await createImage('vmdk', h('v-base.vmdk'), '4M');
        return qcow2(await qcow2WithBacking(h('v-top.qcow2'), base, 'vmdk'));
      },
      outcome: refused('Unsupported', /vmdk/),
    },
    ...foreignFormatCases(),
    {
      name: 'benign-chain',
      what: 'a benign qcow2 over a raw backing file inside the roots is served',
      spec: async () => {
        const base = h('benign-base.raw');
        await writeFile(base, Buffer.alloc(4 * MiB, 1));
        return qcow2(await qcow2WithBacking(h('benign-top.qcow2'), base, 'raw'));
      },
      outcome: served('qemu-storage-daemon'),
    },
  ];

  /** A top image over `depth` backing files, each a qcow2 in the same directory. */
  async function chain(label: string, depth: number): Promise<string> {
    let below = await createImage('qcow2', h(`${label}-0.qcow2`), '4M');
    for (let i = 1; i <= depth; i++) below = await qcow2WithBacking(h(`${label}-${i}.qcow2`), below);
    return below;
  }

  function foreignFormatCases(): HostileCase[] {
    const formats: { format: string; make: (path: string) => Promise<string> }[] = [
      { format: 'vmdk', make: (path) => createImage('vmdk', path, '4M') },
      {
        format: 'vmdk',
        make: (path) => vmdkDescriptor(path, join(outside, 'secret.raw'), MiB / 512),
      },
      { format: 'qed', make: (path) => createImage('qed', path, '4M') },
      { format: 'vdi', make: (path) => createImage('vdi', path, '4M') },
      { format: 'vpc', make: (path) => createImage('vpc', path, '4M') },
      { format: 'vhdx', make: (path) => createImage('vhdx', path, '4M') },
      { format: 'luks', make: (path) => createEncrypted('luks', path) },
    ];
    const cases: HostileCase[] = [];
    for (const [index, { format, make }] of formats.entries()) {
      const label = index === 1 ? 'vmdk-extent-outside' : format;
      for (const declared of ['raw', 'qcow2'] as const)
        cases.push({
          name: `${label}-as-${declared}`,
          what: `${label === format ? format.toUpperCase() : 'a VMDK descriptor naming an extent outside the roots'} declared ${declared}`,
          spec: async () => (declared === 'raw' ? raw : qcow2)(await make(h(`${label}-${declared}.img`))),
          outcome: refused(
            'ImageFormatMismatch',
            declared === 'raw'
              ? new RegExp(`begins with a ${format} header`)
              : new RegExp(`is ${format}, but the spec says qcow2`),
          ),
        });
    }
    return cases;
  }
});

// ---------------------------------------------------------------------------------------------
// Names and paths
// ---------------------------------------------------------------------------------------------

caseClass('names and paths', 'names.yaml', () => {
  const n = (file: string) => join(node.images, 'n', file);
  const rawAt = (path: string, extra: Record<string, unknown> = {}) => ({
    ...extra,
    source: { file: { path, format: 'raw' } },
  });
  const badName = (name: string, what: string, exportName: string): HostileCase => ({
    name,
    what: `export name with ${what}`,
    spec: async () => {
      await writeFile(n(`${name}.raw`), Buffer.alloc(MiB));
      return rawAt(n(`${name}.raw`), { exportName });
    },
    outcome: refused('InvalidSpec', /spec\.exportName/),
  });
  const badPath = (name: string, what: string, path: () => string): HostileCase => ({
    name,
    what: `path with ${what}`,
    spec: () => Promise.resolve(rawAt(path())),
    outcome: refused('InvalidSpec', /spec\.source\.file\.path/),
  });
  const long = `long-${'x'.repeat(248)}`;
  return [
    badName('name-nul', 'a NUL', 'a\0b'),
    badName('name-newline', 'a newline and a section header', 'x]\n[generic'),
    badName('name-equals', '=', 'a=b'),
    badName('name-brackets', '[ and ]', '[a]'),
    badName('name-space', 'a space', 'a b'),
    badName('name-backslash', 'a backslash', 'a\\b'),
    badName('name-non-ascii', 'U+00FF (YAML "\\xFF")', 'a\u00ffb'),
    badName('name-generic', 'the reserved name generic', 'generic'),
    badName('name-too-long', '321 characters', `a${'b'.repeat(320)}`),
    badName('name-slash', 'a slash', 'a/../b'),
    badPath('path-nul', 'a NUL', () => `${n('p')}\0.raw`),
    badPath('path-newline', 'a newline and a config line', () => `${n('p.raw')}\nprerun = touch /tmp/pwned`),
    badPath('path-equals', '=', () => n('a=b.raw')),
    badPath('path-brackets', '[ and ]', () => n('[generic].raw')),
    badPath('path-space', 'a space', () => n('a b.raw')),
    badPath('path-backslash', 'a backslash', () => n('a\\b.raw')),
    badPath('path-non-ascii', 'U+00FF', () => n('\u00ff.raw')),
    badPath('path-relative', 'no leading slash', () => 'images/n/x.raw'),
    {
      name: 'path-dotdot',
      what: 'path with .. leaving the root',
      spec: () => Promise.resolve(rawAt(`${node.images}/n/../../outside/secret.raw`)),
      outcome: refused('InvalidSpec', /spec\.source\.file\.path.*must be normalised/),
    },
    {
      name: long,
      what: 'metadata.name of 253 characters is served under its 256-character export name',
      spec: async () => {
        await writeFile(n('long.raw'), Buffer.alloc(MiB, 3));
        return rawAt(n('long.raw'));
      },
      outcome: served('nbd-server'),
    },
  ];
});

// ---------------------------------------------------------------------------------------------
// Escapes through links
// ---------------------------------------------------------------------------------------------

caseClass('escapes through links', 'escapes.yaml', () => {
  const e = (file: string) => join(node.images, 'e', file);
  const at = (path: string, format = 'raw') => ({ source: { file: { path, format } } });
  return [
    {
      name: 'symlink-out',
      what: 'a symlink inside a root to a file outside',
      spec: async () => {
        await symlink(join(outside, 'secret.raw'), e('symlink.raw'));
        return at(e('symlink.raw'));
      },
      outcome: refused('PathNotAllowed', /secret\.raw/),
    },
    {
      name: 'symlink-out-qcow2',
      what: 'a symlink inside a root to a qcow2 outside',
      spec: async () => {
        await symlink(join(outside, 'secret.qcow2'), e('symlink.qcow2'));
        return at(e('symlink.qcow2'), 'qcow2');
      },
      outcome: refused('PathNotAllowed', /secret\.qcow2/),
    },
    {
      name: 'hard-link-out',
      what: 'a hard link inside a root to a file outside',
      spec: async () => {
        await writeFile(join(outside, 'hard-secret.raw'), Buffer.alloc(MiB, 0x42));
        await link(join(outside, 'hard-secret.raw'), e('hard.raw'));
        return at(e('hard.raw'));
      },
      outcome: refused('ImageUnsafe', /hard links/),
    },
    {
      name: 'symlinked-dir-out',
      what: 'a path through a symlinked directory that leads outside',
      spec: async () => {
        await symlink(outside, e('outdir'));
        return at(join(e('outdir'), 'secret.raw'));
      },
      outcome: refused('PathNotAllowed', /outside/),
    },
  ];
});

describe('escapes swapped in after Ready', () => {
  const BOUND_MS = 90_000;

  it('a file or a parent directory swapped for a symlink outside is retired within 90 s', async () => {
    caseCount += 3;
    const swap = join(node.images, 'swap');
    await mkdir(join(swap, 'dir'), { recursive: true });
    await writeFile(join(swap, 'file.raw'), Buffer.alloc(MiB, 1));
    await writeFile(join(swap, 'dir', 'disk.raw'), Buffer.alloc(MiB, 2));
    await createImage('qcow2', join(swap, 'file.qcow2'), '1M');
    await mkdir(join(outside, 'dir'));
    await writeFile(join(outside, 'dir', 'disk.raw'), Buffer.alloc(MiB, 0x5a));
    await node.writeExports('swap.yaml', [
      nbdExport('swap-file', { source: { file: { path: join(swap, 'file.raw'), format: 'raw' } } }),
      nbdExport('swap-qcow2', { source: { file: { path: join(swap, 'file.qcow2'), format: 'qcow2' } } }),
      nbdExport('swap-parent', { source: { file: { path: join(swap, 'dir', 'disk.raw'), format: 'raw' } } }),
    ]);
    const uris = await Promise.all(
      ['swap-file', 'swap-qcow2', 'swap-parent'].map(async (name) => node.uri(await node.waitForReady(name))),
    );
    const secretBefore = await sha256File(join(outside, 'secret.raw'));

    // The swaps, each atomic (rename over the name), as an attacker with write access to the root would.
    await symlink(join(outside, 'secret.raw'), join(swap, '.file.raw.new'));
    await rename(join(swap, '.file.raw.new'), join(swap, 'file.raw'));
    await symlink(join(outside, 'secret.qcow2'), join(swap, '.file.qcow2.new'));
    await rename(join(swap, '.file.qcow2.new'), join(swap, 'file.qcow2'));
    await rename(join(swap, 'dir'), join(swap, 'dir.old'));
    await symlink(join(outside, 'dir'), join(swap, 'dir'));
    const swappedAt = Date.now();

    const retiredAfter: number[] = await Promise.all(
      ['swap-file', 'swap-qcow2', 'swap-parent'].map(async (name, i) => {
        await node.waitForReady(name, 'False', 'PathNotAllowed', BOUND_MS);
        await waitFor(
          `${name} to be refused to new clients`,
          async () => ((await isServed(uris[i] ?? '')) ? undefined : true),
          { timeoutMs: Math.max(1_000, BOUND_MS - (Date.now() - swappedAt)) },
        );
        return Date.now() - swappedAt;
      }),
    );
    console.log(
      `hostile-input: swapped-in symlinks retired after ${retiredAfter.map((ms) => `${ms} ms`).join(', ')}`,
    );
    for (const ms of retiredAfter) expect(ms).toBeLessThanOrEqual(BOUND_MS);
    expect(await sha256File(join(outside, 'secret.raw'))).toBe(secretBefore);
    await expectControllerServing();

    await node.removeExports('swap.yaml');
    for (const name of ['swap-file', 'swap-qcow2', 'swap-parent']) await waitForNoStatus(name);
  });
});

// ---------------------------------------------------------------------------------------------
// Plain-host input: the source directory itself
// ---------------------------------------------------------------------------------------------

describe('plain-host input', () => {
  interface SourceCase {
    what: string;
    /** The entry's name in the source directory. */
    entry: string;
    /**
     * Puts the hostile entry into the source directory. `witness` is a good NbdExport document
     * (JSON) to put into the same file when the file is one that is read: its Ready proves the
     * file was read.
     */
    plant: (witness: string) => Promise<void>;
    /** The refusal the controller must log for the entry; undefined when the file is read. */
    refusal?: string;
    /** For a file that is read: a line the controller must log about it. */
    logs?: RegExp;
    /** Resources the entry names that must not exist. */
    absent: string[];
  }
  const document = (name: string) =>
    JSON.stringify(
      nbdExport(name, { source: { file: { path: join(node.images, 'n', 'never.raw'), format: 'raw' } } }),
    );
  const file = (name: string) => join(node.exportsDir, name);
  const sourceCases: SourceCase[] = [
    {
      what: 'a YAML alias bomb (a billion laughs in 700 bytes)',
      entry: 'bomb.yaml',
      plant: async () => {
        const lines = ['a0: &a0 [x, x, x, x, x, x, x, x, x, x]'];
        for (let i = 1; i < 10; i++)
          lines.push(
            `a${i}: &a${i} [${Array(10)
              .fill(`*a${i - 1}`)
              .join(', ')}]`,
          );
        lines.push(
          'kind: NbdExport',
          'apiVersion: nbd.dev/v1alpha1',
          'metadata: {name: src-bomb, namespace: it}',
        );
        await writeFile(file('bomb.yaml'), `${lines.join('\n')}\n`);
      },
      refusal: 'too-many-aliases',
      absent: ['src-bomb'],
    },
    {
      what: 'a 10 MB document',
      entry: 'huge.yaml',
      plant: async () => {
        const temporary = join(node.root, 'huge.yaml');
        await writeFile(
          temporary,
          `${document('src-huge').slice(0, -1)}, "padding": "${'p'.repeat(10 * MiB)}"}\n`,
        );
        await rename(temporary, file('huge.yaml'));
      },
      refusal: 'too-large',
      absent: ['src-huge'],
    },
    {
      what: 'YAML nested 5000 deep',
      entry: 'deep.yaml',
      plant: async () =>
        writeFile(
          file('deep.yaml'),
          `${document('src-deep').slice(0, -1)}, "x": ${'['.repeat(5000)}${']'.repeat(5000)}}\n`,
        ),
      refusal: 'too-deep',
      absent: ['src-deep'],
    },
    {
      what: 'a FIFO named x.yaml (never opened: the controller does not block on it)',
      entry: 'x.yaml',
      plant: async () => void (await mkfifo(file('x.yaml'))),
      refusal: 'not-a-regular-file',
      absent: [],
    },
    {
      what: 'a directory named y.yaml',
      entry: 'y.yaml',
      plant: async () => {
        await mkdir(file('y.yaml'));
        await writeFile(join(file('y.yaml'), 'inner.yaml'), document('src-inner'));
      },
      refusal: 'not-a-regular-file',
      absent: ['src-inner'],
    },
    {
      what: 'a symlink z.yaml to a document outside',
      entry: 'z.yaml',
      plant: async () => {
        await writeFile(join(outside, 'z.yaml'), document('src-symlink'));
        await symlink(join(outside, 'z.yaml'), file('z.yaml'));
      },
      refusal: 'not-a-regular-file',
      absent: ['src-symlink'],
    },
    {
      what: 'bytes that are not UTF-8',
      entry: 'latin1.yaml',
      plant: async () =>
        writeFile(
          file('latin1.yaml'),
          Buffer.concat([
            Buffer.from(document('src-latin1').slice(0, -1)),
            Buffer.from(', "x": "\xff\xfe"}', 'latin1'),
          ]),
        ),
      refusal: 'syntax',
      absent: ['src-latin1'],
    },
    {
      what: 'a document of another kind next to a good one',
      entry: 'kind.yaml',
      plant: async (witness) =>
        writeFile(
          file('kind.yaml'),
          [document('src-kind').replace('"kind":"NbdExport"', '"kind":"ConfigMap"'), witness].join('\n---\n'),
        ),
      absent: ['src-kind'],
    },
    {
      what: 'a document of another apiVersion next to a good one',
      entry: 'version.yaml',
      plant: async (witness) =>
        writeFile(
          file('version.yaml'),
          [document('src-version').replace('nbd.dev/v1alpha1', 'nbd.dev/v1'), witness].join('\n---\n'),
        ),
      logs: /NbdExport must have apiVersion nbd\.dev\/v1alpha1/,
      absent: ['src-version'],
    },
    {
      what: 'metadata.names that are not DNS subdomains (254 characters; upper case) next to a good one',
      entry: 'badname.yaml',
      plant: async (witness) =>
        writeFile(
          file('badname.yaml'),
          [document(`a${'b'.repeat(253)}`), document('Upper-Case'), witness].join('\n---\n'),
        ),
      logs: /needs a valid metadata\.name/,
      absent: [],
    },
  ];
  caseCount += sourceCases.length + 1;

  it.each(sourceCases.map((c, i) => [c.what, c, i] as const))(
    '%s defines nothing, and the controller carries on',
    async (_what, c, index) => {
      const witnessName = `witness-${index}`;
      const witness = nbdExport(witnessName, {
        source: {
          file: {
            path: join(node.images, 'n', `${witnessName}.raw`),
            format: 'raw',
            create: { size: '1Mi' },
          },
        },
        deletionPolicy: 'Delete',
      });
      const before = await snapshot();
      await c.plant(JSON.stringify(witness));
      if (c.refusal !== undefined) {
        const reason = c.refusal;
        await waitFor(`the controller to log that it refused ${c.entry} (${reason})`, async () =>
          (await refusalLogged(c.entry, reason)) ? true : undefined,
        );
        // The directory is still read: a good file written now becomes Ready.
        await node.writeExports(`${witnessName}.yaml`, [witness]);
      }
      await node.waitForReady(witnessName);
      if (c.logs !== undefined) {
        const logs = c.logs;
        await waitFor(`the controller to log ${String(logs)}`, async () =>
          logs.test(await controllerLog()) ? true : undefined,
        );
      }
      for (const name of c.absent) expect(await readObject(name)).toBeUndefined();
      await expectControllerServing();

      await node.removeExports(c.refusal === undefined ? c.entry : `${witnessName}.yaml`);
      await waitForNoStatus(witnessName);
      const after = await snapshot();
      expect(after.confFiles).toEqual(before.confFiles);
      expect(after.qemuExports).toEqual(before.qemuExports);
    },
  );

  it('duplicate names across files: one resource, from one file, and the duplicate is logged', async () => {
    await writeFile(join(node.images, 'n', 'dup.raw'), Buffer.alloc(MiB, 9));
    const spec = (readOnly: boolean) => ({
      source: { file: { path: join(node.images, 'n', 'dup.raw'), format: 'raw' } },
      readOnly,
    });
    await writeFile(file('dup-a.yaml'), JSON.stringify(nbdExport('src-dup', spec(true))));
    await writeFile(file('dup-b.yaml'), JSON.stringify(nbdExport('src-dup', spec(false))));
    const object = await node.waitForReady('src-dup');
    await waitFor('the duplicate to be logged', async () =>
      /resource defined twice; the first definition wins/.test(await controllerLog()) ? true : undefined,
    );
    const definedBy = object.metadata.annotations?.['nbd.dev/source-file'] ?? '';
    expect(definedBy).toMatch(/dup-[ab]\.yaml$/);
    // The definition that won is the one served, whole: not a mix of the two.
    expect(object.spec.readOnly).toBe(definedBy.endsWith('dup-a.yaml'));
    const statusFiles = (await readdir(node.statusDir)).filter((f) => f.includes('src-dup'));
    expect(statusFiles).toEqual([statusFileName(NAMESPACE, 'src-dup')]);
    await expectControllerServing();

    for (const entry of ['bomb.yaml', 'huge.yaml', 'deep.yaml', 'x.yaml', 'y.yaml', 'z.yaml', 'latin1.yaml'])
      await rm(file(entry), { recursive: true, force: true });
    await node.removeExports('dup-a.yaml');
    await node.removeExports('dup-b.yaml');
    await waitForNoStatus('src-dup');
    expect(await readObject('control-raw')).toBeDefined();
  });
});

async function nbdServerPid(): Promise<string> {
  return (await readFile(join(node.stateDir, 'nbd-server', 'nbd-server.pid'), 'utf8')).trim();
}

/** Whether the controller logged that it refused the source file `entry` for `reason`. */
async function refusalLogged(entry: string, reason: string): Promise<boolean> {
  for (const line of (await controllerLog()).split('\n')) {
    if (!line.includes('source file refused')) continue;
    const record = JSON.parse(line) as { file?: string; reason?: string };
    if (record.reason === reason && (record.file === entry || record.file?.endsWith(`/${entry}`)))
      return true;
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// Network: floods and garbage on both NBD ports while a real client transfers
// ---------------------------------------------------------------------------------------------

describe('network', () => {
  it('a client that stalls its handshake cannot reach an export retired meanwhile, nor stop the retirement', async () => {
    caseCount += 1;
    await node.writeExports('stall.yaml', [
      nbdExport('stall-target', {
        source: { file: { path: join(node.images, 'stall.raw'), format: 'raw', create: { size: '4Mi' } } },
        deletionPolicy: 'Delete',
      }),
    ]);
    const uri = node.uri(await node.waitForReady('stall-target'));
    // Forked while the export is served; it holds the listening socket and the old export set.
    const stalled = await StalledHandshake.open(node.nbdPort);
    try {
      await node.removeExports('stall.yaml');
      await waitForNoStatus('stall-target');
      await waitFor('the retired export to be refused to new clients', async () =>
        (await isServed(uri)) ? undefined : true,
      );
      expect(await stalled.go(`${NAMESPACE}.stall-target`)).toBe('closed');
    } finally {
      stalled.destroy();
    }
    await expectControllerServing();
  });

  it('a flood of connections, garbage and truncated handshakes on both ports: a transfer stays bit-exact, new exports become Ready', async () => {
    caseCount += 4;
    const payload = join(node.root, 'net-payload.bin');
    await writeRandomFile(payload, 64 * MiB);
    const qcow2Payload = join(node.root, 'net-payload-q.bin');
    await writeRandomFile(qcow2Payload, 16 * MiB);

    // Real clients write the control exports, and hold their connections open halfway through
    // while the attack and a hand-over restart of nbd-server happen.
    const transfers = [
      new HeldTransfer(payload, controlRaw, 32 * MiB),
      new HeldTransfer(qcow2Payload, controlQcow2, 8 * MiB),
    ];
    for (const transfer of transfers) await transfer.firstHalfWritten();

    const sockets: Socket[] = [];
    const attack = async (port: number) => {
      // 200 idle connections, held open during the rest of the attack.
      for (let i = 0; i < 200; i++) sockets.push(await open(port));
      // Garbage bytes, and handshakes cut at every stage of fixed newstyle negotiation.
      const client = Buffer.alloc(4); // client flags: fixed newstyle | no zeroes
      client.writeUInt32BE(3);
      const option = Buffer.alloc(16);
      Buffer.from('IHAVEOPT').copy(option);
      option.writeUInt32BE(7, 8); // NBD_OPT_GO
      option.writeUInt32BE(0xffffffff, 12); // a 4 GiB option length, never sent
      const attempts = [
        randomBytes(4096),
        Buffer.alloc(0),
        client,
        Buffer.concat([client, option]),
        Buffer.concat([client, option.subarray(0, 10)]),
      ];
      for (let round = 0; round < 10; round++)
        for (const bytes of attempts) {
          const socket = await open(port);
          socket.end(bytes);
          sockets.push(socket);
        }
    };
    const nbdServerBefore = await nbdServerPid();
    await Promise.all([attack(node.nbdPort), attack(node.qemuPort)]);
    expect(await establishedConnections(node.nbdPort)).toBeGreaterThanOrEqual(200);
    // Not counted on qemu-storage-daemon's port: QEMU drops a client that has not finished its
    // handshake within 10 s (measured), so the earliest of them may be gone already.

    // Held open: a new client is still served by both servers, and a new export becomes Ready.
    await expectControllerServing();
    await node.writeExports('net.yaml', [
      nbdExport('net-raw', {
        source: { file: { path: join(node.images, 'net.raw'), format: 'raw', create: { size: '4Mi' } } },
        deletionPolicy: 'Delete',
      }),
      nbdExport('net-qcow2', {
        source: { file: { path: join(node.images, 'net.qcow2'), format: 'qcow2', create: { size: '4Mi' } } },
        deletionPolicy: 'Delete',
      }),
    ]);
    await node.waitForReady('net-raw');
    await node.waitForReady('net-qcow2');
    // The new raw export took a hand-over restart of nbd-server while the idle connections were held.
    expect(await nbdServerPid()).not.toBe(nbdServerBefore);
    for (const socket of sockets) socket.destroy();

    const results = await Promise.all(transfers.map((transfer) => transfer.finish()));
    for (const result of results) expect(result.exitCode, result.stderr).toBe(0);
    const back = join(node.root, 'net-back.bin');
    await nbdcopy(controlRaw, back);
    expect(await sha256File(back)).toBe(await sha256File(payload));
    const backQ = join(node.root, 'net-back-q.bin');
    await execa('nbdcopy', ['--connections=1', controlQcow2, backQ]);
    expect(await sha256File(backQ)).toBe(await sha256File(qcow2Payload));
    await expectControllerServing();

    await node.removeExports('net.yaml');
    await waitForNoStatus('net-raw');
    await waitForNoStatus('net-qcow2');
  });
});

/**
 * A client that connects, reads the server's greeting and then waits: the server has forked a
 * child for it, with the export set of that moment. `go(name)` finishes the handshake later
 * with NBD_OPT_GO and says what came back.
 */
class StalledHandshake {
  readonly #socket: Socket;
  #received = Buffer.alloc(0);
  #closed = false;

  private constructor(socket: Socket) {
    this.#socket = socket;
    socket.on('data', (chunk: Buffer) => (this.#received = Buffer.concat([this.#received, chunk])));
    socket.on('close', () => (this.#closed = true));
    socket.on('error', () => undefined);
  }

  static async open(port: number): Promise<StalledHandshake> {
    const client = new StalledHandshake(await open(port));
    // NBDMAGIC, IHAVEOPT and the 16-bit handshake flags: 18 bytes.
    await waitFor('the greeting', () => (client.#received.length >= 18 ? true : undefined), {
      timeoutMs: 30_000,
      intervalMs: 20,
    });
    if (client.#received.subarray(0, 8).toString('latin1') !== 'NBDMAGIC')
      throw new Error(`not an NBD greeting: ${client.#received.toString('hex')}`);
    client.#received = Buffer.alloc(0);
    return client;
  }

  /** 'closed' when the server ended the connection, else the first option reply's type. */
  async go(exportName: string): Promise<'closed' | 'ack' | 'info' | 'error'> {
    const name = Buffer.from(exportName);
    const option = Buffer.alloc(16 + 4 + name.length + 2);
    Buffer.from('IHAVEOPT').copy(option, 0);
    option.writeUInt32BE(7, 8); // NBD_OPT_GO
    option.writeUInt32BE(4 + name.length + 2, 12);
    option.writeUInt32BE(name.length, 16);
    name.copy(option, 20);
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(3); // fixed newstyle, no zeroes
    if (!this.#closed) this.#socket.write(Buffer.concat([flags, option]));
    return waitFor(
      'a reply or the end of the connection',
      () => {
        if (this.#received.length >= 20) {
          const type = this.#received.readUInt32BE(16);
          return type === 1 ? 'ack' : type === 3 ? 'info' : 'error';
        }
        return this.#closed ? 'closed' : undefined;
      },
      { timeoutMs: 30_000, intervalMs: 20 },
    );
  }

  destroy(): void {
    this.#socket.destroy();
  }
}

/** A connected socket to 127.0.0.1:port; errors after connecting (a reset) are ignored. */
function open(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1');
    socket.once('connect', () => {
      socket.on('error', () => undefined);
      socket.on('data', () => undefined);
      resolve(socket);
    });
    socket.once('error', reject);
  });
}

describe('with --allow-raw-over-foreign-header', () => {
  let allowing: PlainHostNode;

  beforeAll(async () => {
    allowing = await PlainHostNode.create();
    await allowing.start(['--allow-raw-over-foreign-header']);
  }, 180_000);

  afterAll(async () => {
    await allowing?.destroy();
  });

  it('a QCOW2 declared raw is served as its own bytes, header included, and its external data file is never reached', async () => {
    caseCount += 2;
    const secret = join(allowing.root, 'secret.data');
    const guest = await createImage('qcow2', join(allowing.images, 'guest.qcow2'), '4M');
    const withData = await createImage(
      'qcow2',
      join(allowing.images, 'with-data.qcow2'),
      '1M',
      '-o',
      `data_file=${secret},data_file_raw=on`,
    );
    await writeFile(secret, Buffer.alloc(MiB, 0x5a));
    await allowing.writeExports('allowed.yaml', [
      nbdExport('guest', { source: { file: { path: guest, format: 'raw' } }, readOnly: true }),
      nbdExport('with-data', { source: { file: { path: withData, format: 'raw' } }, readOnly: true }),
    ]);
    for (const [name, path] of [
      ['guest', guest],
      ['with-data', withData],
    ] as const) {
      const object = await allowing.waitForReady(name);
      expect(object.status?.server).toBe('nbd-server');
      const copy = join(allowing.root, `${name}.read`);
      await nbdcopy(allowing.uri(object), copy);
      // Exactly the container's bytes: the qcow2 magic first, and nothing of the data file.
      expect(await sha256File(copy)).toBe(await sha256File(path));
      expect((await readFile(copy)).subarray(0, 4).toString('latin1')).toBe('QFI\xfb');
    }
    await allowing.removeExports('allowed.yaml');
    await allowing.waitForGone('guest');
    await allowing.waitForGone('with-data');
  });
});
