import { describe, expect, it } from 'vitest';
import type { ConditionDraft } from '../../../src/api/conditions.js';
import { FINALIZER, type NbdExport } from '../../../src/api/types.js';
import { desiredExportOf } from '../../../src/plan/desired-export.js';
import type { ChecksumJob } from '../../../src/plan/observed-state.js';
import type { ExportPlan } from '../../../src/plan/plan-export.js';
import { planSeal } from '../../../src/plan/plan-seal.js';

const SIZE = 64 * 1024 * 1024;

function resource(
  readOnly: boolean,
  status: NbdExport['status'] = {},
  annotations: Record<string, string> = {},
): NbdExport {
  return {
    apiVersion: 'nbd.dev/v1alpha1',
    kind: 'NbdExport',
    metadata: { name: 'full', namespace: 'b', uid: 'u', generation: 3, finalizers: [FINALIZER], annotations },
    spec: { nodeName: 'n', readOnly, source: { file: { path: '/data/full.qcow2', format: 'qcow2' } } },
    status,
  };
}

const ready: ConditionDraft = { type: 'Ready', status: 'True', reason: 'Served', message: 'ok' };
const servedPlan: ExportPlan = { actions: [], conditions: [ready], fields: { virtualSize: SIZE } };

function seal(r: NbdExport, checksum?: ChecksumJob, plan = servedPlan) {
  const desired = desiredExportOf(r, { rawServer: 'nbd-server' });
  return planSeal(plan, { resource: r, desired, observed: checksum ? { checksum } : {} });
}

describe('planSeal', () => {
  it('a writable export carries no seal and reads nothing', () => {
    const plan = seal(resource(false));
    expect(plan.actions).toEqual([]);
    expect(plan.fields.seal).toBeUndefined();
  });

  it('a read-only export that is Ready starts a seal of its generation', () => {
    const plan = seal(resource(true));
    expect(plan.actions).toEqual([
      {
        kind: 'startChecksum',
        server: 'qemu-storage-daemon',
        exportName: 'b.full',
        request: { kind: 'seal', generation: 3, totalBytes: SIZE },
      },
    ]);
    expect(plan.fields.seal).toMatchObject({ state: 'Computing', generation: 3, progressPercent: 0 });
    expect(plan.requeueAfterMs).toBe(5_000);
  });

  it('nothing is read while the export is not served', () => {
    const notServed: ExportPlan = {
      actions: [{ kind: 'addQemuExport', config: {} as never }],
      conditions: [{ ...ready, status: 'False', reason: 'ConfigPending' }],
      fields: { virtualSize: SIZE },
    };
    expect(seal(resource(true), undefined, notServed).actions).toHaveLength(1);
  });

  it('reports progress, then the digest, and keeps it without reading again', () => {
    const running: ChecksumJob = {
      kind: 'seal',
      generation: 3,
      totalBytes: SIZE,
      state: 'running',
      bytesRead: SIZE / 4,
    };
    expect(seal(resource(true), running).fields.seal).toMatchObject({
      state: 'Computing',
      progressPercent: 25,
    });
    expect(seal(resource(true), running).actions).toEqual([]);

    const done: ChecksumJob = {
      ...running,
      state: 'done',
      digest: 'abc',
      bytesRead: SIZE,
      completedAt: '2026-11-25T10:05:00.000Z',
    };
    const sealed = seal(resource(true), done);
    expect(sealed.fields.seal).toEqual({
      state: 'Sealed',
      generation: 3,
      algorithm: 'sha256',
      digest: 'abc',
      bytes: SIZE,
      sealedAt: '2026-11-25T10:05:00.000Z',
    });
    expect(sealed.requeueAfterMs).toBeUndefined();
    // After a restart the job is forgotten, the status keeps the seal, and nothing is read again.
    const kept = seal(resource(true, { seal: sealed.fields.seal! }));
    expect(kept.actions).toEqual([]);
    expect(kept.fields.seal).toEqual(sealed.fields.seal);
  });

  it('a new generation seals again; a seal computing when the controller died is started again', () => {
    const old = { state: 'Sealed', generation: 2, algorithm: 'sha256', digest: 'abc' } as const;
    expect(seal(resource(true, { seal: old })).actions.map((a) => a.kind)).toEqual(['startChecksum']);
    const orphan = { state: 'Computing', generation: 3, algorithm: 'sha256' } as const;
    expect(seal(resource(true, { seal: orphan })).actions.map((a) => a.kind)).toEqual(['startChecksum']);
  });

  it('the verify-seal annotation reads it again and compares', () => {
    const sealedStatus = {
      seal: { state: 'Sealed', generation: 3, algorithm: 'sha256', digest: 'abc' } as const,
    };
    const asked = resource(true, sealedStatus, { 'nbd.dev/verify-seal': 'restore-7' });
    const start = seal(asked);
    expect(start.actions).toEqual([
      expect.objectContaining({
        request: { kind: 'verify', generation: 3, totalBytes: SIZE, token: 'restore-7' },
      }),
    ]);
    expect(start.fields.verification).toMatchObject({ token: 'restore-7', state: 'Verifying' });

    const verify = (digest: string) =>
      seal(asked, {
        kind: 'verify',
        token: 'restore-7',
        generation: 3,
        totalBytes: SIZE,
        state: 'done',
        digest,
        bytesRead: SIZE,
        completedAt: '2026-11-25T11:00:00.000Z',
      }).fields.verification;
    expect(verify('abc')).toMatchObject({ token: 'restore-7', state: 'Match' });
    expect(verify('def')).toMatchObject({
      state: 'Mismatch',
      message: expect.stringContaining('abc') as unknown,
    });

    // Answered: the same token asks nothing more.
    const answered = resource(
      true,
      { ...sealedStatus, verification: verify('abc')! },
      { 'nbd.dev/verify-seal': 'restore-7' },
    );
    expect(seal(answered).actions).toEqual([]);
  });
});
