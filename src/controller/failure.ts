/**
 * How the controller tells a failure that retrying may fix from one it cannot. Errors from
 * every layer say so the same way: a `PermanentError`, or an error carrying
 * `retryable: false` (the Kubernetes client's KubeApiError for a 4xx, say). A TypeError is
 * an executor refusing a malformed request: the same request fails the same way again.
 */
import { isPermanentError } from './work-queue.js';

export function isPermanentFailure(error: unknown): boolean {
  if (isPermanentError(error) || error instanceof TypeError) return true;
  return (error as { retryable?: unknown } | undefined)?.retryable === false;
}

/** An error's message, whatever was thrown. */
export function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
