/**
 * Why a file in the source directory was not used. Each reason is counted separately in
 * the store's metrics, so an operator can tell an attack (aliases, size) from a typo.
 */
export const REFUSAL_REASONS = [
  /** A FIFO, socket, device, directory or symbolic link named `*.yaml`: never opened for reading. */
  'not-a-regular-file',
  /** Larger than the documented maximum; not read at all. */
  'too-large',
  /** open/read failed (permissions, I/O error). */
  'unreadable',
  /** The file changed while it was being read; read again on the next scan. */
  'changed-while-reading',
  /** Not UTF-8, or not YAML. */
  'syntax',
  /** Collections nested deeper than allowed (aliases included). */
  'too-deep',
  /** More alias nodes (`*name`) in one document than allowed. */
  'too-many-aliases',
  /** Would expand (aliases followed) to more nodes than allowed: the "billion laughs". */
  'too-many-nodes',
] as const;

export type RefusalReason = (typeof REFUSAL_REASONS)[number];

/** A source or status file that is not used, with what a person needs to fix it. */
export class SourceFileRefusal extends Error {
  readonly file: string;
  readonly reason: RefusalReason;
  /** The version of the file refused, when it was seen (see read-regular-file.ts). */
  readonly identity: string | undefined;

  constructor(
    file: string,
    reason: RefusalReason,
    detail: string,
    options?: { cause?: unknown; identity?: string },
  ) {
    super(
      `${file}: ${reason}: ${detail}`,
      options?.cause === undefined ? undefined : { cause: options.cause },
    );
    this.name = 'SourceFileRefusal';
    this.file = file;
    this.reason = reason;
    this.identity = options?.identity;
  }
}
