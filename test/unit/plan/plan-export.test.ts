import { describe, expect, it } from 'vitest';
import { fingerprintOf, type ExportConfig } from '../../../src/api/export-config.js';
import { FINALIZER, type NbdExport, type NbdExportSpec } from '../../../src/api/types.js';
import type { Action, ActionKind } from '../../../src/plan/actions.js';
import type { NodePolicy } from '../../../src/plan/node-policy.js';
import type { ObservedExport, ServingObservation } from '../../../src/plan/observed-state.js';
import { desiredExportOf } from '../../../src/plan/desired-export.js';
import { planExport as planWithDesired, type PlanInput } from '../../../src/plan/plan-export.js';

/** The planner as the reconciler calls it: the spec parsed once, beside the observation. */
function planExport(input: Omit<PlanInput, 'desired'>) {
  return planWithDesired({ ...input, desired: desiredExportOf(input.resource, input.policy) });
}

const policy: NodePolicy = {
  nodeName: 'storage-01',
  allowedRoots: ['/var/lib/nbd-exports'],
  allowedDevices: ['/dev/disk/by-id/*'],
  advertiseHost: '10.20.1.5',
  probeHost: '127.0.0.1',
  nbdServerPort: 10809,
  qemuPort: 10810,
  rawServer: 'nbd-server',
  maxBackingDepth: 16,
  allowRawOverForeignHeader: false,
};

const QCOW = '/var/lib/nbd-exports/vm-1/full.qcow2';
const RAW = '/var/lib/nbd-exports/vm-1/disk.raw';

function resource(spec: Partial<NbdExportSpec> = {}, meta: Partial<NbdExport['metadata']> = {}): NbdExport {
  return {
    apiVersion: 'nbd.dev/v1alpha1',
    kind: 'NbdExport',
    metadata: {
      name: 'vm-1-full',
      namespace: 'backups',
      uid: 'uid-1',
      generation: 1,
      creationTimestamp: '2026-11-25T10:00:00Z',
      finalizers: [FINALIZER],
      ...meta,
    },
    spec: {
      nodeName: 'storage-01',
      source: { file: { path: QCOW, format: 'qcow2', create: { size: '1Gi' } } },
      ...spec,
    },
  };
}

const qcowConfig: ExportConfig = {
  exportName: 'backups.vm-1-full',
  server: 'qemu-storage-daemon',
  path: QCOW,
  format: 'qcow2',
  blockDevice: false,
  readOnly: false,
  maxConnections: 1,
  allowedClients: [],
};
const qcowPrint = fingerprintOf(qcowConfig);
const GiB = 1024 ** 3;

/** A node that serves the default resource exactly as specified. */
function converged(
  overrides: { [K in keyof ObservedExport]?: ObservedExport[K] | undefined } = {},
): ObservedExport {
  const base: ObservedExport = {
    path: {
      kind: 'resolved',
      realPath: QCOW,
      exists: true,
      parentExists: true,
      isFile: true,
      isBlockDevice: false,
    },
    image: {
      kind: 'present',
      info: { format: 'qcow2', virtualSize: GiB, actualSize: 196608, backingChain: [] },
    },
    lock: { locked: false },
    desired: {
      server: 'qemu-storage-daemon',
      exportName: 'backups.vm-1-full',
      running: true,
      served: qcowPrint,
    },
    owned: {
      server: 'qemu-storage-daemon',
      exportName: 'backups.vm-1-full',
      running: true,
      served: qcowPrint,
    },
    ledger: {
      uid: 'uid-1',
      key: 'backups/vm-1-full',
      exportName: 'backups.vm-1-full',
      server: 'qemu-storage-daemon',
      createdImage: { path: QCOW, inode: 4242 },
    },
    probe: { fingerprint: qcowPrint, ok: true, size: GiB, message: 'ok', ageMs: 0 },
  };
  const merged: Record<string, unknown> = { ...base, ...overrides };
  for (const key of Object.keys(merged)) if (merged[key] === undefined) delete merged[key];
  return merged;
}

const rawConfig: ExportConfig = { ...qcowConfig, server: 'nbd-server', path: RAW, format: 'raw' };

/** A 1 GiB raw file that the ledger assigns to nbd-server; `desired` says what nbd-server does with it. */
function rawOnNbdServer(desired: Partial<ServingObservation>): ObservedExport {
  return {
    path: {
      kind: 'resolved',
      realPath: RAW,
      exists: true,
      parentExists: true,
      isFile: true,
      isBlockDevice: false,
    },
    image: { kind: 'present', info: { format: 'raw', virtualSize: GiB, actualSize: GiB, backingChain: [] } },
    lock: { locked: false },
    desired: { server: 'nbd-server', exportName: 'backups.vm-1-full', running: true, ...desired },
    ledger: { uid: 'uid-1', key: 'backups/vm-1-full', exportName: 'backups.vm-1-full', server: 'nbd-server' },
  };
}

const kinds = (actions: Action[]) => actions.map((a) => a.kind);
const ready = (plan: ReturnType<typeof planExport>) => plan.conditions.find((c) => c.type === 'Ready');

describe('planExport: converging', () => {
  it('everything present → empty plan and Ready=True', () => {
    const plan = planExport({ resource: resource(), observed: converged(), policy });
    expect(plan.actions).toEqual([]);
    expect(ready(plan)).toMatchObject({ status: 'True', reason: 'Served' });
    expect(plan.conditions.map((c) => [c.type, c.status])).toEqual([
      ['Ready', 'True'],
      ['ImageReady', 'True'],
      ['Exported', 'True'],
    ]);
    expect(plan.fields).toEqual({
      exportName: 'backups.vm-1-full',
      server: 'qemu-storage-daemon',
      format: 'qcow2',
      uri: 'nbd://10.20.1.5:10810/backups.vm-1-full',
      virtualSize: GiB,
      actualSize: 196608,
      access: {
        allowedClients: [],
        clientCertificate: false,
        enforcedBy:
          "nothing per export: qemu-storage-daemon's shared port serves any client that reaches it (name allowedClients or maxConnections to give the export a port of its own under those rules)",
      },
    });
  });

  it('no finalizer yet → adds it before touching the node', () => {
    const plan = planExport({ resource: resource({}, { finalizers: [] }), observed: converged(), policy });
    expect(kinds(plan.actions)).toEqual(['addFinalizer']);
  });

  it('nothing present → record ownership, then create the image', () => {
    const plan = planExport({
      resource: resource(),
      observed: {
        path: {
          kind: 'resolved',
          realPath: QCOW,
          exists: false,
          parentExists: false,
          isFile: false,
          isBlockDevice: false,
        },
        image: { kind: 'missing' },
      },
      policy,
    });
    expect(plan.actions).toEqual([
      { kind: 'makeParentDirectories', path: QCOW },
      { kind: 'recordOwnership', createdImage: { path: QCOW } },
      { kind: 'createImage', path: QCOW, format: 'qcow2', sizeBytes: GiB },
    ]);
    expect(ready(plan)?.status).toBe('False');
  });

  it('incremental: takes the backing format and size from our reading of the backing image', () => {
    const backing = '/var/lib/nbd-exports/vm-1/base.qcow2';
    const plan = planExport({
      resource: resource({
        source: { file: { path: QCOW, format: 'qcow2', create: { backingFile: backing } } },
      }),
      observed: {
        path: {
          kind: 'resolved',
          realPath: QCOW,
          exists: false,
          parentExists: true,
          isFile: false,
          isBlockDevice: false,
        },
        image: { kind: 'missing' },
        backingPath: {
          kind: 'resolved',
          realPath: backing,
          exists: true,
          parentExists: true,
          isFile: true,
          isBlockDevice: false,
        },
        backingImage: {
          kind: 'present',
          info: { format: 'qcow2', virtualSize: GiB, actualSize: 1, backingChain: [] },
        },
      },
      policy,
    });
    expect(plan.actions.at(-1)).toEqual({
      kind: 'createImage',
      path: QCOW,
      format: 'qcow2',
      backingFile: backing,
      backingFormat: 'qcow2',
      sizeBytes: GiB,
    });
  });

  it('image present, not served → add to qemu-storage-daemon', () => {
    const plan = planExport({
      resource: resource(),
      observed: converged({
        desired: { server: 'qemu-storage-daemon', exportName: 'backups.vm-1-full', running: true },
        owned: undefined,
        ledger: { uid: 'uid-1', key: 'backups/vm-1-full' },
        probe: undefined,
      }),
      policy,
    });
    expect(plan.actions).toEqual([
      { kind: 'claimExport', exportName: 'backups.vm-1-full', server: 'qemu-storage-daemon' },
      { kind: 'addQemuExport', config: qcowConfig },
    ]);
  });

  it('served but not yet probed → probe with the expected virtual size', () => {
    const plan = planExport({ resource: resource(), observed: converged({ probe: undefined }), policy });
    expect(plan.actions).toEqual([
      {
        kind: 'probe',
        server: 'qemu-storage-daemon',
        exportName: 'backups.vm-1-full',
        fingerprint: qcowPrint,
        expectedSize: GiB,
      },
    ]);
  });

  it('a probe that saw the wrong size is not Ready, and looks again later', () => {
    const plan = planExport({
      resource: resource(),
      observed: converged({
        probe: { fingerprint: qcowPrint, ok: true, size: 196608, message: 'ok', ageMs: 0 },
      }),
      policy,
    });
    expect(plan.actions).toEqual([]);
    expect(ready(plan)).toMatchObject({ status: 'False', reason: 'ProbeFailed' });
    expect(plan.requeueAfterMs).toBeGreaterThan(0);
  });

  it('a changed spec (read-only now) → replace the qemu export, gently', () => {
    const plan = planExport({ resource: resource({ readOnly: true }), observed: converged(), policy });
    const config = { ...qcowConfig, readOnly: true };
    expect(plan.actions).toEqual([
      { kind: 'removeQemuExport', exportName: 'backups.vm-1-full', force: false },
      { kind: 'addQemuExport', config },
    ]);
  });

  it('raw file → nbd-server: write config and request one coalesced restart', () => {
    const plan = planExport({
      resource: resource({
        source: { file: { path: RAW, format: 'raw' } },
        allowedClients: ['10.20.0.0/16'],
      }),
      observed: rawOnNbdServer({}),
      policy,
    });
    // The list as the user wrote it: the probe is let in by its process, not by widening the list.
    expect(plan.actions).toEqual([
      { kind: 'writeNbdServerExport', config: { ...rawConfig, allowedClients: ['10.20.0.0/16'] } },
      { kind: 'applyNbdServer' },
    ]);
    expect(plan.fields.access).toMatchObject({
      allowedClients: ['10.20.0.0/16'],
      maxConnections: 1,
      clientCertificate: false,
    });
    expect(plan.fields.access?.enforcedBy).toContain("nbd-server's admission hook");
  });

  it('nbd-server is told which file was checked (it opens the path again at every connection)', () => {
    const observed = rawOnNbdServer({});
    const plan = planExport({
      resource: resource({
        source: { file: { path: RAW, format: 'raw' } },
        readOnly: true,
        maxConnections: 3,
      }),
      observed: {
        ...observed,
        image: {
          kind: 'present',
          info: { format: 'raw', fileId: '64768:131', virtualSize: GiB, actualSize: GiB, backingChain: [] },
        },
      },
      policy: { ...policy, tls: true },
    });
    expect(plan.actions[0]).toEqual({
      kind: 'writeNbdServerExport',
      config: { ...rawConfig, readOnly: true, maxConnections: 3, fileId: '64768:131' },
    });
    expect(plan.fields.access).toMatchObject({ maxConnections: 3, clientCertificate: true });
  });

  it('qemu-storage-daemon is not given a file id: it holds the file it opened', () => {
    const plan = planExport({ resource: resource({ readOnly: true }), observed: converged(), policy });
    const add = plan.actions.find((action) => action.kind === 'addQemuExport');
    expect(add && 'config' in add ? add.config.fileId : 'no add').toBeUndefined();
  });

  it('nbd-server config written but not yet loaded → waits for the planned restart', () => {
    const plan = planExport({
      resource: resource({ source: { file: { path: RAW, format: 'raw' } } }),
      observed: rawOnNbdServer({ configured: fingerprintOf(rawConfig) }),
      policy,
    });
    expect(kinds(plan.actions)).toEqual(['applyNbdServer']);
    expect(ready(plan)).toMatchObject({ status: 'False', reason: 'RestartPending' });
  });

  it('nbd-server that fails to start is reported with its error, and retried', () => {
    const plan = planExport({
      resource: resource({ source: { file: { path: RAW, format: 'raw' } } }),
      observed: rawOnNbdServer({
        running: false,
        configured: fingerprintOf(rawConfig),
        failure: 'port 10809 is held by pid 42 (sshd)',
      }),
      policy,
    });
    expect(kinds(plan.actions)).toEqual(['applyNbdServer']);
    expect(ready(plan)).toMatchObject({ status: 'False', reason: 'ServerUnavailable' });
    expect(ready(plan)?.message).toContain('port 10809 is held');
    expect(plan.requeueAfterMs).toBeGreaterThan(0);
  });

  it('nbd-server: clients from before a change keep Ready=False until they leave', () => {
    const plan = planExport({
      resource: resource({ source: { file: { path: RAW, format: 'raw' } } }),
      observed: rawOnNbdServer({
        configured: fingerprintOf(rawConfig),
        served: fingerprintOf(rawConfig),
        staleConnections: 2,
      }),
      policy,
    });
    expect(plan.actions).toEqual([]);
    expect(ready(plan)).toMatchObject({ status: 'False', reason: 'RestartPending' });
    expect(ready(plan)?.message).toMatch(/2 client\(s\) connected before the last change/);
    expect(plan.requeueAfterMs).toBeGreaterThan(0);
  });

  it('a renamed export retires the old name first', () => {
    const plan = planExport({
      resource: resource({ exportName: 'new-name' }),
      observed: converged(),
      policy,
    });
    expect(plan.actions).toEqual([
      { kind: 'removeQemuExport', exportName: 'backups.vm-1-full', force: false },
    ]);
  });

  it('an operator who serves raw with qemu-storage-daemon gets it there', () => {
    const plan = planExport({
      resource: resource({ source: { file: { path: RAW, format: 'raw' } } }),
      observed: converged({
        path: {
          kind: 'resolved',
          realPath: RAW,
          exists: true,
          parentExists: true,
          isFile: true,
          isBlockDevice: false,
        },
        image: {
          kind: 'present',
          info: { format: 'raw', virtualSize: GiB, actualSize: GiB, backingChain: [] },
        },
        desired: { server: 'qemu-storage-daemon', exportName: 'backups.vm-1-full', running: true },
        owned: undefined,
        ledger: undefined,
      }),
      policy: { ...policy, rawServer: 'qemu-storage-daemon' },
    });
    expect(kinds(plan.actions)).toEqual(['claimExport', 'addQemuExport']);
    expect(plan.fields.uri).toBe('nbd://10.20.1.5:10810/backups.vm-1-full');
    const withTls = planExport({
      resource: resource({ source: { file: { path: RAW, format: 'raw' } } }),
      observed: converged({
        path: {
          kind: 'resolved',
          realPath: RAW,
          exists: true,
          parentExists: true,
          isFile: true,
          isBlockDevice: false,
        },
        image: {
          kind: 'present',
          info: { format: 'raw', virtualSize: GiB, actualSize: GiB, backingChain: [] },
        },
        desired: { server: 'qemu-storage-daemon', exportName: 'backups.vm-1-full', running: true },
        owned: undefined,
        ledger: undefined,
      }),
      policy: { ...policy, rawServer: 'qemu-storage-daemon', tls: true },
    });
    // --tls-dir: clients must use TLS, and the URI tells libnbd and QEMU so.
    expect(withTls.fields.uri).toBe('nbds://10.20.1.5:10810/backups.vm-1-full');
  });
});

describe('planExport: refusing, with nothing done on the node', () => {
  const cases: {
    name: string;
    resource: NbdExport;
    observed: ObservedExport;
    reason: string;
    message: RegExp;
  }[] = [
    {
      name: 'invalid spec',
      resource: resource({ maxConnections: 0 }),
      observed: converged(),
      reason: 'InvalidSpec',
      message: /spec\.maxConnections: must be between 1 and 128/,
    },
    {
      name: 'path outside the allowed roots (via a symlink)',
      resource: resource(),
      observed: converged({
        path: {
          kind: 'resolved',
          realPath: '/etc/shadow',
          exists: true,
          parentExists: true,
          isFile: true,
          isBlockDevice: false,
        },
      }),
      reason: 'PathNotAllowed',
      message: /resolves to \/etc\/shadow, outside/,
    },
    {
      name: 'a qcow2 whose backing file lies outside the roots',
      resource: resource(),
      // The judge (src/plan/image-header.ts) refuses it while inspecting; the planner reports it.
      observed: converged({
        image: {
          kind: 'refused',
          reason: 'PathNotAllowed',
          message: 'names backing file /etc/passwd (symlinks resolved), which is outside the allowed roots',
        },
      }),
      reason: 'PathNotAllowed',
      message: /backing file \/etc\/passwd/,
    },
    {
      name: 'raw spec on a qcow2 file',
      resource: resource({ source: { file: { path: QCOW, format: 'raw' } } }),
      observed: converged({
        image: {
          kind: 'refused',
          reason: 'ImageFormatMismatch',
          message: 'it holds a qcow2 image; serving it raw would expose the qcow2 container',
        },
      }),
      reason: 'ImageFormatMismatch',
      message: /expose the qcow2 container/,
    },
    {
      name: 'missing file without create',
      resource: resource({ source: { file: { path: QCOW, format: 'qcow2' } } }),
      observed: converged({
        path: {
          kind: 'resolved',
          realPath: QCOW,
          exists: false,
          parentExists: true,
          isFile: false,
          isBlockDevice: false,
        },
        image: { kind: 'missing' },
      }),
      reason: 'WaitingForImage',
      message: /does not exist/,
    },
    {
      name: 'a foreign writer holds the lock',
      resource: resource(),
      observed: converged({
        lock: { locked: true, message: 'Failed to get "write" lock' },
        owned: undefined,
      }),
      reason: 'ImageInUse',
      message: /Failed to get "write" lock/,
    },
    {
      name: 'export name taken by an older resource',
      resource: resource(),
      observed: converged({
        owned: undefined,
        ledger: { uid: 'uid-1', key: 'backups/vm-1-full' },
        conflict: { reason: 'ExportNameConflict', message: 'taken by backups/older' },
      }),
      reason: 'ExportNameConflict',
      message: /taken by backups\/older/,
    },
    {
      name: 'device outside the allowed patterns',
      resource: resource({ source: { blockDevice: { path: '/dev/sda' } } }),
      observed: converged({
        path: {
          kind: 'resolved',
          realPath: '/dev/sda',
          exists: true,
          parentExists: true,
          isFile: false,
          isBlockDevice: true,
        },
      }),
      reason: 'DeviceNotAllowed',
      message: /matches none/,
    },
    {
      name: 'allow-list on a qcow2 export',
      resource: resource({ allowedClients: ['10.0.0.0/8'] }),
      observed: converged(),
      reason: 'Unsupported',
      message: /allowedClients/,
    },
    {
      name: 'backing file missing',
      resource: resource({
        source: {
          file: {
            path: QCOW,
            format: 'qcow2',
            create: { backingFile: '/var/lib/nbd-exports/vm-1/base.qcow2' },
          },
        },
      }),
      observed: {
        path: {
          kind: 'resolved',
          realPath: QCOW,
          exists: false,
          parentExists: true,
          isFile: false,
          isBlockDevice: false,
        },
        image: { kind: 'missing' },
        backingPath: {
          kind: 'resolved',
          realPath: '/var/lib/nbd-exports/vm-1/base.qcow2',
          exists: false,
          parentExists: true,
          isFile: false,
          isBlockDevice: false,
        },
        backingImage: { kind: 'missing' },
      },
      reason: 'BackingFileNotFound',
      message: /does not exist/,
    },
  ];

  /** Refusals retire what the resource served before (the table's nodes served it). */
  const refusals = new Set([
    'InvalidSpec',
    'PathNotAllowed',
    'DeviceNotAllowed',
    'Unsupported',
    'ImageFormatMismatch',
    'ImageInvalid',
  ]);
  for (const c of cases) {
    it(`${c.name} → Ready=False ${c.reason}`, () => {
      const plan = planExport({ resource: c.resource, observed: c.observed, policy });
      const servedBefore = c.observed.owned?.served !== undefined;
      expect(plan.actions).toEqual(
        refusals.has(c.reason) && servedBefore
          ? [{ kind: 'removeQemuExport', exportName: 'backups.vm-1-full', force: true }]
          : [],
      );
      expect(ready(plan)?.status).toBe('False');
      expect(ready(plan)?.reason).toBe(c.reason);
      expect(ready(plan)?.message).toMatch(c.message);
    });
  }

  it('a conflict loser that serves nothing gives up its claim, and looks again soon', () => {
    const plan = planExport({
      resource: resource(),
      observed: converged({
        owned: { server: 'qemu-storage-daemon', exportName: 'backups.vm-1-full', running: true },
        conflict: { reason: 'ExportNameConflict', message: 'taken' },
      }),
      policy,
    });
    expect(plan.actions).toEqual([{ kind: 'releaseExport' }]);
    expect(plan.requeueAfterMs).toBeGreaterThan(0);
  });

  it('a resource moved to another file forgets the image it created for the old one', () => {
    const plan = planExport({
      resource: resource({
        source: { file: { path: '/var/lib/nbd-exports/vm-1/other.qcow2', format: 'qcow2' } },
      }),
      observed: converged({
        path: {
          kind: 'resolved',
          realPath: '/var/lib/nbd-exports/vm-1/other.qcow2',
          exists: true,
          parentExists: true,
          isFile: true,
          isBlockDevice: false,
        },
      }),
      policy,
    });
    expect(plan.actions).toEqual([{ kind: 'forgetCreatedImage' }]);
  });

  it('a conflict loser that served the name before retires it', () => {
    const plan = planExport({
      resource: resource(),
      observed: converged({ conflict: { reason: 'ExportNameConflict', message: 'taken' } }),
      policy,
    });
    expect(plan.actions).toEqual([
      { kind: 'removeQemuExport', exportName: 'backups.vm-1-full', force: false },
    ]);
  });
});

describe('planExport: deletion', () => {
  const deleting = (policyName: 'Retain' | 'Delete') =>
    resource({ deletionPolicy: policyName }, { deletionTimestamp: '2026-11-25T11:00:00Z' });

  it('first stops serving, forcibly (the user asked for deletion)', () => {
    const plan = planExport({ resource: deleting('Delete'), observed: converged(), policy });
    expect(plan.actions).toEqual([
      { kind: 'removeQemuExport', exportName: 'backups.vm-1-full', force: true },
    ]);
    expect(ready(plan)?.reason).toBe('Deleting');
  });

  it('then deletes a file it created when the policy says Delete', () => {
    const plan = planExport({
      resource: deleting('Delete'),
      observed: converged({
        owned: { server: 'qemu-storage-daemon', exportName: 'backups.vm-1-full', running: true },
      }),
      policy,
    });
    expect(plan.actions).toEqual([
      { kind: 'deleteImage', path: QCOW, inode: 4242 },
      { kind: 'forgetOwnership' },
      { kind: 'removeFinalizer' },
    ]);
  });

  it('keeps a created file whose inode was never recorded (creation not proven)', () => {
    const plan = planExport({
      resource: deleting('Delete'),
      observed: converged({
        owned: undefined,
        ledger: { uid: 'uid-1', key: 'backups/vm-1-full', createdImage: { path: QCOW } },
      }),
      policy,
    });
    expect(kinds(plan.actions)).toEqual(['forgetOwnership', 'removeFinalizer']);
  });

  it('keeps a created file another resource still exports', () => {
    const plan = planExport({
      resource: deleting('Delete'),
      observed: converged({ owned: undefined, createdImageUsedBy: ['backups/reader'] }),
      policy,
    });
    expect(kinds(plan.actions)).toEqual(['forgetOwnership', 'removeFinalizer']);
  });

  it('keeps the file with Retain', () => {
    const plan = planExport({
      resource: deleting('Retain'),
      observed: converged({ owned: undefined }),
      policy,
    });
    expect(kinds(plan.actions)).toEqual(['forgetOwnership', 'removeFinalizer']);
  });

  it('never deletes a file it did not create, whatever the policy', () => {
    const plan = planExport({
      resource: deleting('Delete'),
      observed: converged({ owned: undefined, ledger: { uid: 'uid-1', key: 'backups/vm-1-full' } }),
      policy,
    });
    expect(kinds(plan.actions)).toEqual(['forgetOwnership', 'removeFinalizer']);
  });

  it('nbd-server: removes the config, waits for the restart, then cuts lingering clients', () => {
    const owned = { server: 'nbd-server' as const, exportName: 'x', running: true };
    const observe = (
      o: Partial<typeof owned> & { configured?: string; served?: string; connections?: number },
    ) =>
      planExport({ resource: deleting('Retain'), observed: converged({ owned: { ...owned, ...o } }), policy })
        .actions;
    expect(observe({ configured: 'f', served: 'f' })).toEqual([
      { kind: 'removeNbdServerExport', exportName: 'x' },
      { kind: 'applyNbdServer' },
    ]);
    expect(observe({ served: 'f' })).toEqual([{ kind: 'applyNbdServer' }]);
    expect(observe({ connections: 2 })).toEqual([{ kind: 'disconnectNbdServerClients', exportName: 'x' }]);
    expect(kinds(observe({}))).toEqual(['forgetOwnership', 'removeFinalizer']);
  });

  it('a resource without our finalizer needs nothing', () => {
    const plan = planExport({
      resource: resource({}, { deletionTimestamp: '2026-11-25T11:00:00Z', finalizers: [] }),
      observed: converged(),
      policy,
    });
    expect(plan.actions).toEqual([]);
  });
});

describe('planExport: an action that failed in the last step', () => {
  const cases: { action: ActionKind; reason: string }[] = [
    { action: 'createImage', reason: 'ImageCreateFailed' },
    { action: 'makeParentDirectories', reason: 'ImageCreateFailed' },
    { action: 'writeNbdServerExport', reason: 'ExportFailed' },
    { action: 'addQemuExport', reason: 'ExportFailed' },
    { action: 'removeQemuExport', reason: 'ExportFailed' },
    { action: 'claimExport', reason: 'ReconcileFailed' },
  ];
  for (const { action, reason } of cases)
    it(`${action} → ${reason}, no further action, the cause in the message`, () => {
      const plan = planExport({
        resource: resource(),
        observed: converged({ executionFailure: { action, message: 'disk on fire', permanent: false } }),
        policy,
      });
      expect(plan.actions).toEqual([]);
      expect(plan.failed).toEqual({ permanent: false, message: 'disk on fire' });
      expect(plan.conditions[0]).toMatchObject({ status: 'False', reason });
      expect(plan.conditions[0]?.message).toContain('disk on fire');
      expect(plan.events).toEqual([
        { type: 'Warning', reason: 'Failed', message: plan.conditions[0]?.message },
      ]);
    });

  it('a permanent failure says it is not retried', () => {
    const plan = planExport({
      resource: resource(),
      observed: converged({
        executionFailure: { action: 'createImage', message: 'malformed', permanent: true },
      }),
      policy,
    });
    expect(plan.failed?.permanent).toBe(true);
    expect(plan.conditions[0]?.message).toMatch(/not retried until the resource changes/);
  });
});

describe('planExport: probe freshness', () => {
  it('trusts a good handshake for a minute and a failed one for two seconds', () => {
    const probe = (ok: boolean, ageMs: number) =>
      planExport({
        resource: resource(),
        observed: converged({
          probe: ok
            ? { fingerprint: qcowPrint, ok, size: GiB, message: 'ok', ageMs }
            : { fingerprint: qcowPrint, ok, message: 'refused', ageMs },
        }),
        policy,
      }).actions.map((a) => a.kind);
    expect(probe(true, 59_999)).toEqual([]);
    expect(probe(true, 60_000)).toEqual(['probe']);
    expect(probe(false, 1_999)).toEqual([]);
    expect(probe(false, 2_000)).toEqual(['probe']);
  });
});

describe('planExport: a cleanup step that failed', () => {
  it('stops and reports instead of repeating the failed action', () => {
    const plan = planExport({
      resource: resource({}, { deletionTimestamp: '2026-11-25T11:00:00Z' }),
      observed: converged({
        executionFailure: { action: 'removeQemuExport', message: 'QMP timed out', permanent: false },
      }),
      policy,
    });
    expect(plan.actions).toEqual([]);
    expect(plan.conditions[0]).toMatchObject({ status: 'False', reason: 'ExportFailed' });
    expect(plan.failed).toEqual({ permanent: false, message: 'QMP timed out' });
  });
});

describe('planExport: refusing means retiring', () => {
  const outside = {
    kind: 'resolved',
    realPath: '/etc/shadow',
    exists: true,
    parentExists: true,
    isFile: true,
    isBlockDevice: false,
  } as const;

  it('nothing served before: nothing changes on the node, and the status says so', () => {
    const plan = planExport({
      resource: resource(),
      observed: converged({ path: outside, owned: undefined, ledger: undefined }),
      policy,
    });
    expect(plan.actions).toEqual([]);
    expect(ready(plan)).toMatchObject({
      reason: 'PathNotAllowed',
      message: expect.stringMatching(/Nothing on the node was changed/) as unknown,
    });
  });

  it('a raw export on nbd-server: its configuration goes, the server hands over, then its clients are cut and the claim dropped', () => {
    const owned = { server: 'nbd-server', exportName: 'backups.vm-1-full', running: true } as const;
    const step = (o: Partial<ServingObservation>) =>
      planExport({
        resource: resource({ source: { file: { path: RAW, format: 'raw' } } }),
        observed: { ...rawOnNbdServer({}), path: { ...outside }, owned: { ...owned, ...o } },
        policy,
      });
    const print = fingerprintOf(rawConfig);
    expect(step({ configured: print, served: print }).actions).toEqual([
      { kind: 'removeNbdServerExport', exportName: 'backups.vm-1-full' },
      { kind: 'applyNbdServer' },
    ]);
    expect(step({ served: print }).actions).toEqual([{ kind: 'applyNbdServer' }]);
    const last = step({});
    expect(last.actions).toEqual([
      { kind: 'disconnectNbdServerClients', exportName: 'backups.vm-1-full' },
      { kind: 'releaseExport' },
    ]);
    expect(ready(last)?.message).toMatch(/taken down and its clients are disconnected/);
  });

  it('an invalid spec retires too', () => {
    const plan = planExport({
      resource: resource({ source: {} }),
      observed: converged(),
      policy,
    });
    expect(ready(plan)?.reason).toBe('InvalidSpec');
    expect(plan.actions).toEqual([
      { kind: 'removeQemuExport', exportName: 'backups.vm-1-full', force: true },
    ]);
  });

  it('a deleted resource is cleaned up as usual, not refused', () => {
    const plan = planExport({
      resource: resource({}, { deletionTimestamp: '2026-11-25T11:00:00Z' }),
      observed: converged({ path: outside }),
      policy,
    });
    expect(ready(plan)?.reason).toBe('Deleting');
  });
});

describe('planExport: the size a client is told', () => {
  it('a raw file of odd size on qemu-storage-daemon is probed for whole sectors, on nbd-server for its own size', () => {
    const odd = 1_000_000;
    const observed = (server: 'nbd-server' | 'qemu-storage-daemon'): ObservedExport => ({
      ...rawOnNbdServer({}),
      image: {
        kind: 'present',
        info: { format: 'raw', virtualSize: odd, actualSize: odd, backingChain: [] },
      },
      desired: { server, exportName: 'backups.vm-1-full', running: true },
    });
    const probeSize = (rawServer: 'nbd-server' | 'qemu-storage-daemon') => {
      const plan = planExport({
        resource: resource({ source: { file: { path: RAW, format: 'raw' } } }),
        observed: observed(rawServer),
        policy: { ...policy, rawServer },
      });
      return { fields: plan.fields.virtualSize };
    };
    expect(probeSize('nbd-server')).toEqual({ fields: odd });
    expect(probeSize('qemu-storage-daemon')).toEqual({ fields: 1_000_448 });
  });
});

describe('planExport: a block device that is not there', () => {
  it('is ImageNotFound and looked at again, since no event tells when it appears', () => {
    const plan = planExport({
      resource: resource({ source: { blockDevice: { path: '/dev/disk/by-id/nvme-x' } } }),
      observed: converged({
        path: {
          kind: 'resolved',
          realPath: '/dev/disk/by-id/nvme-x',
          exists: false,
          parentExists: true,
          isFile: false,
          isBlockDevice: false,
        },
        owned: undefined,
      }),
      policy,
    });
    expect(ready(plan)?.reason).toBe('ImageNotFound');
    expect(plan.requeueAfterMs).toBe(15_000);
  });
});

describe('planExport: client rules on qemu-storage-daemon', () => {
  const rules = { allowedClients: ['10.30.0.0/16'], maxConnections: 2 };
  const ownConfig: ExportConfig = { ...qcowConfig, ...rules, dedicatedDaemon: true };
  const ownPrint = fingerprintOf(ownConfig);
  const withFirewall: NodePolicy = { ...policy, clientFirewall: true };
  const ownProbe = { fingerprint: ownPrint, ok: true, size: GiB, message: 'ok', ageMs: 0 };
  /** Served by the export's own daemon on `port`, as `config` says. */
  const servedOwn = (config: ExportConfig, port = 10903): ObservedExport => {
    const serving: ServingObservation = {
      server: 'qemu-storage-daemon',
      exportName: 'backups.vm-1-full',
      running: true,
      served: fingerprintOf(config),
      servedConfig: config,
      port,
    };
    return converged({
      desired: serving,
      owned: serving,
      probe: ownProbe,
    });
  };

  it('without a firewall, an export with rules is refused as Unsupported, saying why', () => {
    const plan = planExport({
      resource: resource(rules),
      observed: converged(),
      policy: { ...policy, clientFirewall: 'iptables: not root' },
    });
    expect(ready(plan)).toMatchObject({ status: 'False', reason: 'Unsupported' });
    expect(ready(plan)?.message).toContain('iptables: not root');
    // What it served before is retired: nothing is served under rules that are not enforced.
    expect(kinds(plan.actions)).toContain('removeQemuExport');
  });

  it('is served by a daemon of its own: no URI until it has a port, then that port, probed there', () => {
    const unserved = planExport({
      resource: resource(rules),
      observed: converged({
        desired: { server: 'qemu-storage-daemon', exportName: 'backups.vm-1-full', running: false },
      }),
      policy: withFirewall,
    });
    expect(unserved.fields.uri).toBeUndefined();
    expect(unserved.actions).toContainEqual({ kind: 'addQemuExport', config: ownConfig });

    const probing = planExport({
      resource: resource(rules),
      observed: servedOwn(ownConfig),
      policy: withFirewall,
    });
    expect(probing.fields.uri).toBe('nbd://10.20.1.5:10903/backups.vm-1-full');
    expect(probing.fields.access).toMatchObject({ ...rules, clientCertificate: false });
    expect(probing.fields.access?.enforcedBy).toContain("the node's firewall");
    expect(ready(probing)).toMatchObject({ status: 'True', reason: 'Served' });

    const stale = planExport({
      resource: resource(rules),
      observed: { ...servedOwn(ownConfig), probe: { ...ownProbe, ageMs: 10 * 60_000 } },
      policy: withFirewall,
    });
    expect(stale.actions).toContainEqual(expect.objectContaining({ kind: 'probe', port: 10903 }));
  });

  it('a change of client rules alone is applied in place; any other change serves the export anew', () => {
    const before: ExportConfig = { ...ownConfig, allowedClients: ['10.40.0.0/16'], maxConnections: 1 };
    const inPlace = planExport({
      resource: resource(rules),
      observed: servedOwn(before),
      policy: withFirewall,
    });
    expect(inPlace.actions).toEqual([{ kind: 'updateQemuExportAccess', config: ownConfig }]);
    expect(ready(inPlace)?.message).toMatch(/connected clients keep their connections/);

    const readOnlyBefore: ExportConfig = { ...ownConfig, readOnly: true };
    const anew = planExport({
      resource: resource(rules),
      observed: servedOwn(readOnlyBefore),
      policy: withFirewall,
    });
    expect(kinds(anew.actions)).toEqual(['removeQemuExport', 'addQemuExport']);
  });

  it('an export without rules stays on the shared daemon and port', () => {
    const plan = planExport({ resource: resource(), observed: converged(), policy: withFirewall });
    expect(plan.fields.uri).toBe('nbd://10.20.1.5:10810/backups.vm-1-full');
    expect(plan.fields.access?.maxConnections).toBeUndefined();
  });
});
