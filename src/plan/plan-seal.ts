/**
 * The integrity seal: once a read-only export is Ready, its guest-visible data is read
 * through the server and hashed in the background, and the digest is kept in status with
 * the generation it describes. A new value of the verify-seal annotation reads it again and
 * compares, so a restore can prove it read the backup that was sealed. Pure, like the planner.
 */
import { ConditionType } from '../api/reasons.js';
import {
  VERIFY_SEAL_ANNOTATION,
  type IntegritySeal,
  type NbdExport,
  type SealVerification,
} from '../api/types.js';
import type { Action } from './actions.js';
import type { DesiredExport, InvalidExport } from './desired-export.js';
import type { ChecksumJob, ChecksumRequest, ObservedExport } from './observed-state.js';
import type { ExportPlan } from './plan-export.js';

/** While a checksum runs, its progress reaches status this often. */
export const CHECKSUM_PROGRESS_MS = 5_000;

export interface SealInput {
  resource: NbdExport;
  desired: DesiredExport | InvalidExport;
  observed: ObservedExport;
}

/** Adds the seal and verification to a plan: their status, and the job to start when one is due. */
export function planSeal(plan: ExportPlan, { resource, desired, observed }: SealInput): ExportPlan {
  // Only a read-only export has data that stays put; a writable one carries no seal.
  if (!desired.ok || !desired.readOnly || resource.metadata.deletionTimestamp !== undefined) return plan;
  const generation = resource.metadata.generation ?? 0;
  const servedNow =
    plan.actions.length === 0 &&
    plan.conditions.some((c) => c.type === ConditionType.Ready && c.status === 'True');
  const totalBytes = plan.fields.virtualSize;
  const job = observed.checksum;
  const actions: Action[] = [];
  const port = observed.desired?.port;
  const start = (request: ChecksumRequest) =>
    actions.push({
      kind: 'startChecksum',
      server: desired.server,
      exportName: desired.exportName,
      request,
      ...(port === undefined ? {} : { port }),
    });

  // The seal: kept while the generation stands, else computed afresh.
  const previous = resource.status?.seal;
  let seal = previous?.generation === generation ? previous : undefined;
  if (job?.kind === 'seal' && job.generation === generation) seal = sealFrom(job, generation);
  const sealIsRunning = job?.kind === 'seal' && job.generation === generation && job.state === 'running';
  // A job the controller no longer knows of (it restarted): computing never ends, and a
  // failure is worth one more try.
  const sealIsOrphaned =
    (seal?.state === 'Computing' && !sealIsRunning) || (seal?.state === 'Failed' && job === undefined);
  if ((seal === undefined || sealIsOrphaned) && servedNow && totalBytes !== undefined) {
    start({ kind: 'seal', generation, totalBytes });
    seal = { state: 'Computing', generation, algorithm: 'sha256', progressPercent: 0 };
  }

  // A verification, when the annotation asks for one the status has not answered.
  const token = resource.metadata.annotations?.[VERIFY_SEAL_ANNOTATION];
  let verification = token === undefined ? undefined : resource.status?.verification;
  if (verification?.token !== token) verification = undefined;
  if (token !== undefined && seal?.state === 'Sealed') {
    if (job?.kind === 'verify' && job.token === token) verification = verificationFrom(job, token, seal);
    const verifyIsRunning = job?.kind === 'verify' && job.token === token && job.state === 'running';
    const verifyIsOrphaned = verification?.state === 'Verifying' && !verifyIsRunning;
    if ((verification === undefined || verifyIsOrphaned) && servedNow && totalBytes !== undefined) {
      start({ kind: 'verify', generation, totalBytes, token });
      verification = { token, state: 'Verifying', progressPercent: 0 };
    }
  }

  const running = seal?.state === 'Computing' || verification?.state === 'Verifying';
  return {
    ...plan,
    // Only on a plan that has nothing else to do: the job reads what is served now.
    actions: servedNow ? [...plan.actions, ...actions] : plan.actions,
    fields: {
      ...plan.fields,
      ...(seal ? { seal } : {}),
      ...(verification ? { verification } : {}),
    },
    ...(running
      ? { requeueAfterMs: Math.min(plan.requeueAfterMs ?? CHECKSUM_PROGRESS_MS, CHECKSUM_PROGRESS_MS) }
      : {}),
  };
}

function percent(job: ChecksumJob): number {
  return job.totalBytes === 0 ? 100 : Math.floor((100 * job.bytesRead) / job.totalBytes);
}

function sealFrom(job: ChecksumJob, generation: number): IntegritySeal {
  const base = { generation, algorithm: 'sha256' as const };
  switch (job.state) {
    case 'running':
      return { ...base, state: 'Computing', progressPercent: percent(job) };
    case 'done':
      return {
        ...base,
        state: 'Sealed',
        digest: job.digest,
        bytes: job.bytesRead,
        sealedAt: job.completedAt,
      };
    case 'failed':
      return { ...base, state: 'Failed', message: job.message, sealedAt: job.completedAt };
  }
}

function verificationFrom(job: ChecksumJob, token: string, seal: IntegritySeal): SealVerification {
  switch (job.state) {
    case 'running':
      return { token, state: 'Verifying', progressPercent: percent(job) };
    case 'done':
      return {
        token,
        state: job.digest === seal.digest ? 'Match' : 'Mismatch',
        digest: job.digest,
        verifiedAt: job.completedAt,
        ...(job.digest === seal.digest
          ? {}
          : {
              message: `read ${job.digest}, but the seal of generation ${seal.generation} is ${seal.digest}`,
            }),
      };
    case 'failed':
      return { token, state: 'Failed', message: job.message, verifiedAt: job.completedAt };
  }
}
