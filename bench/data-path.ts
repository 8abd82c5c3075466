/**
 * The data path side by side, every figure from the same run (issue 8): through the
 * controller's exports (plain-host mode, the real binary), through the same server started by
 * hand, and the physical references (dd into a new file and over an existing one, loopback
 * TCP, a memory copy). Raw files and block devices (a loop device, a zram device of its own)
 * on nbd-server; QCOW2, fresh and over a backing file, on qemu-storage-daemon. First write
 * (a new image), rewrite, read, with nbdcopy (`--flush` on writes, as dd's `conv=fsync`).
 * Then 1, 2, 4, 8 concurrent writers into new QCOW2 exports of the controller. Medians of
 * `--reps`; controller and hand runs alternate, so load hits both alike. Prints the ratios the
 * issue sets as targets and writes every sample and median as JSON. Asserts nothing.
 *
 *   bench/run.sh data-path [--sizes=1024,4096] [--reps=3] [--writers=1,2,4,8] [--writer-mib=512]
 *                          [--settings-mib=512] [--json=bench/data-path.json]
 *   bench/run.sh data-path --report-from=bench/data-path.json    # the tables of a run, again
 *
 * `--settings-mib`: size for the sweep of qemu-storage-daemon/qemu-img settings by hand (0: skip).
 * Needs root (losetup, zram). Cleans up everything it creates, also on SIGINT/SIGTERM.
 */
import { execSync } from 'node:child_process';
import { open, readFile, rm, writeFile } from 'node:fs/promises';
import { loadavg, cpus } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { execa, type ResultPromise } from 'execa';
import { format } from 'prettier';
import { nbdExport, PlainHostNode } from '../test/integration/harness/plain-host-controller.js';
import { writeRandomFile } from '../test/support/nbd.js';
import {
  addZramDevice,
  attachLoopDevice,
  releaseAllBlockDevices,
  releaseBlockDevice,
} from './support/block-devices.js';
import {
  startNbdServerByHand,
  startQemuStorageDaemonByHand,
  stopAllHandServers,
  type HandServer,
} from './support/hand-servers.js';
import { timeLoopbackTcp } from './support/loopback-tcp.js';

const { values: flags } = parseArgs({
  options: {
    sizes: { type: 'string', default: '1024,4096' },
    reps: { type: 'string', default: '3' },
    writers: { type: 'string', default: '1,2,4,8' },
    'writer-mib': { type: 'string', default: '512' },
    'settings-mib': { type: 'string', default: '512' },
    json: { type: 'string', default: join(import.meta.dirname, 'data-path.json') },
    'report-from': { type: 'string' },
  },
});
interface RunSettings {
  sizesMiB: number[];
  reps: number;
  writerCounts: number[];
  writerMiB: number;
  settingsMiB: number;
}

/** `--report-from=JSON`: print the report of an earlier run again (same tables, no measuring). */
const earlier = flags['report-from']
  ? (JSON.parse(await readFile(flags['report-from'], 'utf8')) as { settings: RunSettings; samples: Sample[] })
  : undefined;
const { sizesMiB, reps, writerCounts, writerMiB, settingsMiB }: RunSettings = earlier?.settings ?? {
  sizesMiB: flags.sizes.split(',').filter(Boolean).map(Number),
  reps: Number(flags.reps),
  writerCounts: flags.writers.split(',').filter(Boolean).map(Number),
  writerMiB: Number(flags['writer-mib']),
  settingsMiB: Number(flags['settings-mib']),
};

/** What is exported, in the order of the tables (`SUBJECTS` below says how). */
const SUBJECT_NAMES = [
  'raw file',
  'qcow2 fresh',
  'qcow2 over backing',
  'loop device',
  'zram device',
] as const;

type Operation = 'first write' | 'rewrite' | 'read';
const OPERATIONS: readonly Operation[] = ['first write', 'rewrite', 'read'];

interface Sample {
  subject: string;
  variant: string;
  operation: string;
  sizeMiB: number;
  rep: number;
  gibPerSecond: number;
}

const samples: Sample[] = earlier?.samples ?? [];
const inFlight = new Set<ResultPromise>();
if (earlier) {
  printReport(targetChecks());
  process.exit(0);
}
const node = await PlainHostNode.create();
let cleanedUp = false;

/**
 * Servers first (a device in use cannot be released), then devices, then files. Every step
 * runs even when one before it failed; the failures are reported.
 */
async function cleanUp(): Promise<void> {
  if (cleanedUp) return;
  cleanedUp = true;
  for (const child of inFlight) child.kill('SIGKILL');
  const steps: [string, () => Promise<void>][] = [
    ['stop the hand-started servers', stopAllHandServers],
    ['stop the controller', () => node.stop('SIGKILL')],
    ["stop the controller's servers", () => node.stopServers()],
    ['release the loop and zram devices', releaseAllBlockDevices],
    ['remove the files', () => node.destroy()],
  ];
  for (const [what, step] of steps)
    await step().catch((error: unknown) => console.error(`cleanup: could not ${what}:`, error));
}

for (const signal of ['SIGINT', 'SIGTERM'] as const)
  process.once(signal, () => {
    console.error(`\n${signal}: cleaning up`);
    void cleanUp().finally(() => process.exit(130));
  });

async function run(command: string, args: string[]): Promise<void> {
  const child = execa(command, args);
  inFlight.add(child);
  try {
    await child;
  } finally {
    inFlight.delete(child);
  }
}

async function seconds(action: () => Promise<unknown>): Promise<number> {
  const started = performance.now();
  await action();
  return (performance.now() - started) / 1000;
}

function record(sample: Omit<Sample, 'gibPerSecond'>, bytes: number, elapsed: number): number {
  const gibPerSecond = bytes / 1024 ** 3 / elapsed;
  samples.push({ ...sample, gibPerSecond });
  console.error(
    `  ${sample.subject} | ${sample.variant} | ${sample.operation} | ${sample.sizeMiB} MiB #${sample.rep}: ${gibPerSecond.toFixed(2)} GiB/s`,
  );
  return gibPerSecond;
}

/** Keeps the source in the page cache, so no write measures the source's disk. */
async function warm(source: string): Promise<void> {
  await run('dd', [`if=${source}`, 'of=/dev/null', 'bs=4M', 'status=none']);
}

async function measureExport(
  subject: string,
  variant: string,
  uri: string,
  source: string,
  sizeMiB: number,
  rep: number,
  clientFlush = true,
): Promise<void> {
  const bytes = sizeMiB * 1024 * 1024;
  await warm(source);
  for (const operation of OPERATIONS) {
    const args = operation === 'read' ? [uri, 'null:'] : [...(clientFlush ? ['--flush'] : []), source, uri];
    record({ subject, variant, operation, sizeMiB, rep }, bytes, await seconds(() => run('nbdcopy', args)));
  }
}

let exportSerial = 0;

/** Serves `source` through the controller, runs `measure` on its URI, removes the export. */
async function throughController(
  spec: Record<string, unknown>,
  measure: (uri: string) => Promise<void>,
): Promise<void> {
  const name = `bench-${++exportSerial}`;
  const file = `${name}.yaml`;
  // nbdcopy opens 4 connections where the server offers multi-conn (nbd-server does), as by hand.
  const exportSpec = { maxConnections: 4, ...spec, deletionPolicy: 'Retain' };
  await node.writeExports(file, [nbdExport(name, exportSpec)]);
  const uri = node.uri(await node.waitForReady(name, 'True', undefined, 300_000));
  try {
    await measure(uri);
  } finally {
    await node.removeExports(file);
    await node.waitForGone(name);
  }
}

async function byHand(
  start: () => Promise<HandServer>,
  measure: (uri: string) => Promise<void>,
): Promise<void> {
  const server = await start();
  try {
    await measure(server.uri);
  } finally {
    await server.stop();
  }
}

/** One thing to export, by the controller and by hand, with a fresh image per rep where it has one. */
interface Subject {
  name: string;
  /** Creates what one rep needs; returns the controller's spec and how to start the hand server. */
  prepare(sizeMiB: number, rep: number, who: 'controller' | 'hand'): Promise<Prepared>;
}

interface Prepared {
  spec: Record<string, unknown>;
  hand: () => Promise<HandServer>;
  cleanUp: () => Promise<void>;
}

const images = node.images;
const removeFile = (path: string) => () => rm(path, { force: true });

async function qemuImgCreate(
  path: string,
  format: string,
  options: string[],
  sizeMiB?: number,
): Promise<void> {
  await run('qemu-img', [
    'create',
    '-q',
    '-f',
    format,
    ...options,
    path,
    ...(sizeMiB === undefined ? [] : [`${sizeMiB}M`]),
  ]);
}

const backingFiles = new Map<number, string>();

/** A full backup to write an incremental over: the source converted to QCOW2, once per size. */
async function backingFileOf(sizeMiB: number, source: string): Promise<string> {
  const existing = backingFiles.get(sizeMiB);
  if (existing) return existing;
  const path = join(images, `base-${sizeMiB}.qcow2`);
  await run('qemu-img', ['convert', '-O', 'qcow2', source, path]);
  backingFiles.set(sizeMiB, path);
  return path;
}

const blockDevices = new Map<string, string>();

async function deviceOf(kind: 'loop' | 'zram', sizeMiB: number): Promise<string> {
  const key = `${kind}-${sizeMiB}`;
  const existing = blockDevices.get(key);
  if (existing) return existing;
  let device: string;
  if (kind === 'zram') device = await addZramDevice(sizeMiB * 1024 * 1024);
  else {
    const file = join(images, `loop-${sizeMiB}.img`);
    await run('fallocate', ['-l', `${sizeMiB}MiB`, file]);
    device = await attachLoopDevice(file);
  }
  blockDevices.set(key, device);
  return device;
}

function fileSubject(name: string, format: 'raw' | 'qcow2', withBacking: boolean): Subject {
  return {
    name,
    async prepare(sizeMiB, rep, who) {
      const path = join(images, `${name.replaceAll(' ', '-')}-${sizeMiB}-${rep}-${who}.${format}`);
      const backingFile = withBacking ? await backingFileOf(sizeMiB, sourceOf(sizeMiB)) : undefined;
      const create = backingFile ? { backingFile, backingFormat: 'qcow2' } : { size: `${sizeMiB}Mi` };
      if (who === 'hand')
        await qemuImgCreate(
          path,
          format,
          backingFile ? ['-b', backingFile, '-F', 'qcow2'] : [],
          backingFile ? undefined : sizeMiB,
        );
      return {
        spec: { source: { file: { path, format, create } } },
        hand: () =>
          format === 'raw'
            ? startNbdServerByHand({ path, flush: true, directory: node.root })
            : startQemuStorageDaemonByHand({ path, format, blockDevice: false, directory: node.root }),
        cleanUp: removeFile(path),
      };
    },
  };
}

function deviceSubject(name: string, kind: 'loop' | 'zram'): Subject {
  return {
    name,
    async prepare(sizeMiB) {
      const path = await deviceOf(kind, sizeMiB);
      return {
        spec: { source: { blockDevice: { path } } },
        hand: () => startNbdServerByHand({ path, flush: true, directory: node.root }),
        cleanUp: () => Promise.resolve(), // the device stays for the next rep
      };
    },
  };
}

const SUBJECTS: Subject[] = [
  fileSubject(SUBJECT_NAMES[0], 'raw', false),
  fileSubject(SUBJECT_NAMES[1], 'qcow2', false),
  fileSubject(SUBJECT_NAMES[2], 'qcow2', true),
  deviceSubject(SUBJECT_NAMES[3], 'loop'),
  deviceSubject(SUBJECT_NAMES[4], 'zram'),
];

const sources = new Map<number, string>();
function sourceOf(sizeMiB: number): string {
  const source = sources.get(sizeMiB);
  if (!source) throw new Error(`no source of ${sizeMiB} MiB`);
  return source;
}

/**
 * One source per size, repeating a 256 MiB random block (generating 5 GiB of random bytes took
 * minutes; no server here compresses or deduplicates across blocks). Synced, so the first
 * measurement does not pay for the sources' writeback.
 */
async function writeSources(sizes: Set<number>): Promise<void> {
  const blockPath = join(node.root, 'random-block.bin');
  const blockBytes = 256 * 1024 * 1024;
  await writeRandomFile(blockPath, blockBytes);
  const block = await readFile(blockPath);
  await rm(blockPath);
  for (const sizeMiB of sizes) {
    const path = join(node.root, `source-${sizeMiB}.bin`);
    const file = await open(path, 'w');
    try {
      for (let written = 0, bytes = sizeMiB * 1024 * 1024; written < bytes; written += blockBytes)
        await file.write(block, 0, Math.min(blockBytes, bytes - written));
      await file.sync();
    } finally {
      await file.close();
    }
    sources.set(sizeMiB, path);
  }
}

async function physicalReferences(sizeMiB: number, rep: number): Promise<void> {
  const bytes = sizeMiB * 1024 * 1024;
  const source = sourceOf(sizeMiB);
  const target = join(images, `dd-${sizeMiB}.bin`);
  const sample = (variant: string) => ({ subject: 'reference', variant, operation: 'copy', sizeMiB, rep });
  await warm(source);
  const ddInto = (extra: string) =>
    run('dd', [`if=${source}`, `of=${target}`, 'bs=4M', `conv=fsync${extra}`, 'status=none']);
  record(sample('dd into a new file'), bytes, await seconds(() => ddInto('')));
  record(sample('dd over an existing file'), bytes, await seconds(() => ddInto(',notrunc')));
  await rm(target);
  record(
    sample('memory copy (dd cached file to /dev/null)'),
    bytes,
    await seconds(() => run('dd', [`if=${source}`, 'of=/dev/null', 'bs=4M', 'status=none'])),
  );
  record(sample('loopback TCP'), bytes, await timeLoopbackTcp(bytes));
  // The devices' own speed, past the page cache: the ceiling of their exports.
  for (const kind of ['loop', 'zram'] as const) {
    const device = await deviceOf(kind, sizeMiB);
    record(
      sample(`dd into the ${kind} device (O_DIRECT)`),
      bytes,
      await seconds(() =>
        run('dd', [`if=${source}`, `of=${device}`, 'bs=4M', 'oflag=direct', 'status=none']),
      ),
    );
    record(
      sample(`dd from the ${kind} device (O_DIRECT)`),
      bytes,
      await seconds(() =>
        run('dd', [`if=${device}`, 'of=/dev/null', 'bs=4M', 'iflag=direct', 'status=none']),
      ),
    );
  }
}

async function sideBySide(sizeMiB: number, rep: number): Promise<void> {
  const source = sourceOf(sizeMiB);
  for (const subject of SUBJECTS) {
    // Alternate who goes first, so a burst of load elsewhere does not always hit the same one.
    const order = rep % 2 === 0 ? (['controller', 'hand'] as const) : (['hand', 'controller'] as const);
    for (const who of order) {
      const prepared = await subject.prepare(sizeMiB, rep, who);
      const measure = (uri: string) => measureExport(subject.name, who, uri, source, sizeMiB, rep);
      try {
        if (who === 'controller') await throughController(prepared.spec, measure);
        else await byHand(prepared.hand, measure);
      } finally {
        await prepared.cleanUp();
      }
    }
  }
}

/**
 * Settings a user or the controller could choose for a new QCOW2 (or raw file) on
 * qemu-storage-daemon, each by hand against the default, same source, same run.
 */
async function settingsSweep(sizeMiB: number, rep: number): Promise<void> {
  const source = sourceOf(sizeMiB);
  const settings: {
    variant: string;
    format: 'raw' | 'qcow2';
    create: string[];
    protocolOptions?: string;
    preallocateFilter?: boolean;
  }[] = [
    { variant: 'qcow2 default (as the controller)', format: 'qcow2', create: [] },
    { variant: 'qcow2 preallocation=metadata', format: 'qcow2', create: ['-o', 'preallocation=metadata'] },
    { variant: 'qcow2 preallocation=falloc', format: 'qcow2', create: ['-o', 'preallocation=falloc'] },
    {
      variant: 'qcow2 extended_l2=on cluster_size=2M',
      format: 'qcow2',
      create: ['-o', 'extended_l2=on,cluster_size=2M'],
    },
    { variant: 'qcow2 preallocate filter', format: 'qcow2', create: [], preallocateFilter: true },
    {
      variant: 'qcow2 cache.direct=on aio=native',
      format: 'qcow2',
      create: [],
      protocolOptions: 'cache.direct=on,aio=native',
    },
    { variant: 'qcow2 aio=io_uring', format: 'qcow2', create: [], protocolOptions: 'aio=io_uring' },
  ];
  for (const setting of settings) {
    const path = join(images, `setting-${sizeMiB}-${rep}.${setting.format}`);
    await qemuImgCreate(path, setting.format, setting.create, sizeMiB);
    try {
      await byHand(
        () =>
          startQemuStorageDaemonByHand({
            path,
            format: setting.format,
            blockDevice: false,
            directory: node.root,
            ...(setting.protocolOptions ? { protocolOptions: setting.protocolOptions } : {}),
            ...(setting.preallocateFilter ? { preallocateFilter: true } : {}),
          }),
        (uri) => measureExport('qcow2 settings', setting.variant, uri, source, sizeMiB, rep),
      );
    } finally {
      await rm(path, { force: true });
    }
  }
  // Block devices: nbd-server and QSD's default write through the device's page cache; QSD can
  // open it with O_DIRECT. A new zram device per variant, so each first write is a first write.
  const zramVariants: { variant: string; start: (path: string) => Promise<HandServer> }[] = [
    {
      variant: 'zram on nbd-server (as the controller)',
      start: (path) => startNbdServerByHand({ path, flush: true, directory: node.root }),
    },
    {
      variant: 'zram on qemu-storage-daemon, page cache',
      start: (path) =>
        startQemuStorageDaemonByHand({ path, format: 'raw', blockDevice: true, directory: node.root }),
    },
    {
      variant: 'zram on qemu-storage-daemon, cache.direct=on',
      start: (path) =>
        startQemuStorageDaemonByHand({
          path,
          format: 'raw',
          blockDevice: true,
          directory: node.root,
          protocolOptions: 'cache.direct=on',
        }),
    },
  ];
  for (const { variant, start } of zramVariants) {
    const device = await addZramDevice(sizeMiB * 1024 * 1024);
    try {
      await byHand(
        () => start(device),
        (uri) => measureExport('zram settings', variant, uri, source, sizeMiB, rep),
      );
    } finally {
      await releaseBlockDevice(device);
    }
  }
  // What the "bare nbd-server by hand" most likely was: without `flush = true`
  // nbd-server offers no flush (nbdcopy --flush fails), so the client cannot send one and the
  // data need not have reached the disk when the copy ends. Both servers, no client flush.
  for (const flush of [true, false]) {
    const raw = join(images, `setting-${sizeMiB}-${rep}.raw`);
    await qemuImgCreate(raw, 'raw', [], sizeMiB);
    const variant = `nbd-server ${flush ? 'with' : 'without'} flush = true, nbdcopy without --flush`;
    try {
      await byHand(
        () => startNbdServerByHand({ path: raw, flush, directory: node.root }),
        (uri) => measureExport('raw settings', variant, uri, source, sizeMiB, rep, false),
      );
    } finally {
      await rm(raw, { force: true });
    }
  }
}

async function concurrentWriters(count: number, rep: number): Promise<void> {
  const source = sourceOf(writerMiB);
  const names = Array.from({ length: count }, () => `bench-${++exportSerial}`);
  const file = `writers-${count}-${rep}.yaml`;
  await node.writeExports(
    file,
    names.map((name) =>
      nbdExport(name, {
        source: {
          file: { path: join(images, `${name}.qcow2`), format: 'qcow2', create: { size: `${writerMiB}Mi` } },
        },
        deletionPolicy: 'Retain',
      }),
    ),
  );
  try {
    const uris: string[] = [];
    for (const name of names) uris.push(node.uri(await node.waitForReady(name, 'True', undefined, 300_000)));
    await warm(source);
    const bytes = writerMiB * 1024 * 1024;
    const started = performance.now();
    const streams = await Promise.all(
      uris.map((uri) => seconds(() => run('nbdcopy', ['--flush', source, uri]))),
    );
    const wall = (performance.now() - started) / 1000;
    const base = { subject: 'concurrent writers', sizeMiB: writerMiB, rep };
    record({ ...base, variant: `${count} writers`, operation: 'aggregate first write' }, bytes * count, wall);
    record(
      { ...base, variant: `${count} writers`, operation: 'slowest stream first write' },
      bytes,
      Math.max(...streams),
    );
    // The streams start together, so the slowest one ends with the wall clock: its share is its
    // rate against the mean of the streams' own rates (1 when they are served alike).
    const meanRate = streams.reduce((sum, s) => sum + bytes / s, 0) / streams.length;
    record({ ...base, variant: `${count} writers`, operation: 'mean stream first write' }, meanRate, 1);
  } finally {
    await node.removeExports(file);
    for (const name of names) await node.waitForGone(name);
    for (const name of names) await rm(join(images, `${name}.qcow2`), { force: true });
  }
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2
    ? (sorted[middle] ?? NaN)
    : ((sorted[middle - 1] ?? NaN) + (sorted[middle] ?? NaN)) / 2;
}

function medianOf(subject: string, variant: string, operation: string, sizeMiB: number): number {
  return median(
    samples
      .filter(
        (s) =>
          s.subject === subject &&
          s.variant === variant &&
          s.operation === operation &&
          s.sizeMiB === sizeMiB,
      )
      .map((s) => s.gibPerSecond),
  );
}

interface Median extends Omit<Sample, 'rep' | 'gibPerSecond'> {
  medianGibPerSecond: number;
  reps: number;
}

function allMedians(): Median[] {
  const keys = new Map<string, Omit<Sample, 'rep' | 'gibPerSecond'>>();
  for (const { subject, variant, operation, sizeMiB } of samples)
    keys.set(JSON.stringify([subject, variant, operation, sizeMiB]), {
      subject,
      variant,
      operation,
      sizeMiB,
    });
  return [...keys.values()].map((key) => ({
    ...key,
    medianGibPerSecond: medianOf(key.subject, key.variant, key.operation, key.sizeMiB),
    reps: samples.filter(
      (s) =>
        s.subject === key.subject &&
        s.variant === key.variant &&
        s.operation === key.operation &&
        s.sizeMiB === key.sizeMiB,
    ).length,
  }));
}

interface TargetCheck {
  target: string;
  sizeMiB: number;
  ratio: number;
  bar: number;
  met: boolean;
}

function targetChecks(): TargetCheck[] {
  const checks: TargetCheck[] = [];
  const check = (target: string, sizeMiB: number, ratio: number, bar: number) =>
    checks.push({ target, sizeMiB, ratio, bar, met: ratio >= bar });
  for (const sizeMiB of sizesMiB) {
    for (const subject of SUBJECT_NAMES)
      for (const operation of OPERATIONS)
        check(
          `${subject} ${operation}: controller / by hand`,
          sizeMiB,
          medianOf(subject, 'controller', operation, sizeMiB) / medianOf(subject, 'hand', operation, sizeMiB),
          0.95,
        );
    const ddNew = medianOf('reference', 'dd into a new file', 'copy', sizeMiB);
    check(
      'qcow2 fresh first write (controller) / dd into a new file',
      sizeMiB,
      medianOf('qcow2 fresh', 'controller', 'first write', sizeMiB) / ddNew,
      0.8,
    );
    check(
      'qcow2 fresh read / raw file read (controller)',
      sizeMiB,
      medianOf('qcow2 fresh', 'controller', 'read', sizeMiB) /
        medianOf('raw file', 'controller', 'read', sizeMiB),
      0.8,
    );
    const tcp = medianOf('reference', 'loopback TCP', 'copy', sizeMiB);
    for (const operation of OPERATIONS)
      check(
        `zram device ${operation} (controller) / loopback TCP`,
        sizeMiB,
        medianOf('zram device', 'controller', operation, sizeMiB) / tcp,
        0.5,
      );
  }
  return checks;
}

/** A Mermaid bar chart (GitHub renders it) of the controller's medians and the references at one size. */
function chart(sizeMiB: number): string[] {
  const short: Record<Operation, string> = { 'first write': 'W1', rewrite: 'W2', read: 'R' };
  const bars: [string, number][] = [];
  for (const subject of SUBJECT_NAMES)
    for (const operation of OPERATIONS)
      bars.push([
        `${subject.replace(' device', '').replace('qcow2 over backing', 'qcow2+b')} ${short[operation]}`,
        medianOf(subject, 'controller', operation, sizeMiB),
      ]);
  for (const [label, variant] of [
    ['dd new', 'dd into a new file'],
    ['dd over', 'dd over an existing file'],
    ['TCP', 'loopback TCP'],
  ] as const)
    bars.push([label, medianOf('reference', variant, 'copy', sizeMiB)]);
  const values = bars.map(([, v]) => (Number.isFinite(v) ? Number(v.toFixed(2)) : 0));
  return [
    '',
    `## Chart: controller exports and references, ${sizeMiB} MiB, GiB/s (W1 first write, W2 rewrite, R read)`,
    '',
    '```mermaid',
    'xychart-beta',
    `  x-axis [${bars.map(([label]) => JSON.stringify(label)).join(', ')}]`,
    `  y-axis "GiB/s" 0 --> ${Math.ceil(Math.max(...values, 1))}`,
    `  bar [${values.join(', ')}]`,
    '```',
  ];
}

function printReport(checks: TargetCheck[]): void {
  const out: string[] = [];
  const g = (value: number) => (Number.isFinite(value) ? value.toFixed(2) : '  -  ');
  for (const sizeMiB of sizesMiB) {
    out.push('', `## ${sizeMiB} MiB, GiB/s, median of ${reps}`, '');
    out.push(
      '| export | operation | controller | by hand | controller / hand |',
      '| --- | --- | --: | --: | --: |',
    );
    for (const subject of SUBJECT_NAMES)
      for (const operation of OPERATIONS) {
        const controller = medianOf(subject, 'controller', operation, sizeMiB);
        const hand = medianOf(subject, 'hand', operation, sizeMiB);
        out.push(`| ${subject} | ${operation} | ${g(controller)} | ${g(hand)} | ${g(controller / hand)} |`);
      }
    out.push('', '| physical reference | GiB/s |', '| --- | --: |');
    for (const variant of [
      'dd into a new file',
      'dd over an existing file',
      'memory copy (dd cached file to /dev/null)',
      'loopback TCP',
      'dd into the loop device (O_DIRECT)',
      'dd from the loop device (O_DIRECT)',
      'dd into the zram device (O_DIRECT)',
      'dd from the zram device (O_DIRECT)',
    ])
      out.push(`| ${variant} | ${g(medianOf('reference', variant, 'copy', sizeMiB))} |`);
  }
  const settingsRows = allMedians().filter((m) => m.subject.endsWith(' settings'));
  if (settingsRows.length > 0) {
    out.push('', `## Settings by hand, ${settingsMiB} MiB, GiB/s, median of ${reps}`, '');
    out.push('| setting | first write | rewrite | read |', '| --- | --: | --: | --: |');
    for (const variant of new Set(settingsRows.map((m) => m.variant))) {
      const subject = settingsRows.find((m) => m.variant === variant)?.subject ?? '';
      out.push(
        `| ${variant} | ${OPERATIONS.map((op) => g(medianOf(subject, variant, op, settingsMiB))).join(' | ')} |`,
      );
    }
  }
  if (writerCounts.length > 0) {
    out.push('', `## Concurrent writers, new QCOW2 exports of the controller, ${writerMiB} MiB each`, '');
    out.push(
      '| writers | aggregate GiB/s | slowest stream GiB/s | mean stream GiB/s | slowest / mean stream |',
    );
    out.push('| --: | --: | --: | --: | --: |');
    for (const count of writerCounts) {
      const aggregate = medianOf(
        'concurrent writers',
        `${count} writers`,
        'aggregate first write',
        writerMiB,
      );
      const slowest = medianOf(
        'concurrent writers',
        `${count} writers`,
        'slowest stream first write',
        writerMiB,
      );
      const mean = medianOf('concurrent writers', `${count} writers`, 'mean stream first write', writerMiB);
      out.push(`| ${count} | ${g(aggregate)} | ${g(slowest)} | ${g(mean)} | ${g(slowest / mean)} |`);
    }
  }
  const largest = Math.max(...sizesMiB);
  const smallest = Math.min(...sizesMiB);
  if (sizesMiB.length > 0)
    out.push(
      '',
      `## Time for the plan's sizes at the ${largest} MiB medians (controller)`,
      '',
      `| export | operation | rate ${largest} / ${smallest} MiB | 10 GB | 100 GB | 500 GB |`,
      '| --- | --- | --: | --: | --: | --: |',
    );
  for (const subject of sizesMiB.length > 0 ? SUBJECT_NAMES : [])
    for (const operation of ['first write', 'read'] as const) {
      const rate = medianOf(subject, 'controller', operation, largest) * 1024 ** 3;
      const time = (gb: number) => {
        const s = (gb * 1e9) / rate;
        return s >= 3600
          ? `${(s / 3600).toFixed(1)} h`
          : s >= 60
            ? `${(s / 60).toFixed(1)} min`
            : `${s.toFixed(0)} s`;
      };
      const trend = rate / (medianOf(subject, 'controller', operation, smallest) * 1024 ** 3);
      out.push(`| ${subject} | ${operation} | ${g(trend)} | ${time(10)} | ${time(100)} | ${time(500)} |`);
    }
  if (sizesMiB.length > 0) out.push(...chart(largest));
  out.push(
    '',
    '## Targets',
    '',
    '| target | size MiB | ratio | bar | met |',
    '| --- | --: | --: | --: | --- |',
  );
  for (const c of checks)
    out.push(`| ${c.target} | ${c.sizeMiB} | ${g(c.ratio)} | ${c.bar} | ${c.met ? 'yes' : '**no**'} |`);
  console.log(out.join('\n'));
}

function versionOf(command: string): string {
  try {
    return execSync(command, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).split('\n')[0] ?? '';
  } catch {
    return 'unknown';
  }
}

try {
  const startedAt = new Date().toISOString();
  const loadBefore = loadavg();
  await node.start(['--allowed-device=/dev/loop*', '--allowed-device=/dev/zram*', '--log-level=info']);
  await writeSources(new Set([...sizesMiB, writerMiB, ...(settingsMiB > 0 ? [settingsMiB] : [])]));
  for (const sizeMiB of sizesMiB)
    for (let rep = 0; rep < reps; rep++) {
      console.error(`${sizeMiB} MiB, rep ${rep + 1}/${reps}`);
      await physicalReferences(sizeMiB, rep);
      await sideBySide(sizeMiB, rep);
    }
  if (settingsMiB > 0)
    for (let rep = 0; rep < reps; rep++) {
      console.error(`settings, ${settingsMiB} MiB, rep ${rep + 1}/${reps}`);
      await settingsSweep(settingsMiB, rep);
    }
  for (let rep = 0; rep < reps; rep++)
    for (const count of writerCounts) {
      console.error(`${count} concurrent writers, rep ${rep + 1}/${reps}`);
      await concurrentWriters(count, rep);
    }
  const checks = targetChecks();
  printReport(checks);
  const result = {
    startedAt,
    finishedAt: new Date().toISOString(),
    host: {
      cpus: cpus().length,
      loadAverageBefore: loadBefore,
      loadAverageAfter: loadavg(),
      kernel: versionOf('uname -r'),
      nbdServer: versionOf('nbd-server -V 2>&1'),
      qemuStorageDaemon: versionOf('qemu-storage-daemon --version'),
      nbdcopy: versionOf('nbdcopy --version'),
      fileSystem: versionOf(`findmnt -no SOURCE,FSTYPE,OPTIONS -T ${node.root}`),
    },
    settings: { sizesMiB, reps, writerCounts, writerMiB, settingsMiB },
    medians: allMedians(),
    targets: checks,
    samples,
  };
  // Formatted as the repository's `prettier --check .` wants it, so a new run can be committed as is.
  await writeFile(flags.json, await format(JSON.stringify(result), { parser: 'json' }));
  console.error(`wrote ${flags.json}`);
} finally {
  await cleanUp();
}
