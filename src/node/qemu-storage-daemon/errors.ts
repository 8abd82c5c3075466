/** Errors of qemu-storage-daemon exports that the controller acts on (matched by `name`). */

/** A foreign process holds the image (QEMU's write lock): nothing was added. */
export class ImageLockedError extends Error {
  override name = 'ImageLockedError';
  readonly path: string;
  constructor(path: string, qemuMessage: string, options?: { cause?: unknown }) {
    super(`${path} is in use by another process: ${qemuMessage}`, options);
    this.path = path;
  }
}

/** A client is connected to the export and the removal was not forced: nothing was removed. */
export class ExportBusyError extends Error {
  override name = 'ExportBusyError';
  readonly exportName: string;
  constructor(exportName: string, options?: { cause?: unknown }) {
    super(`export "${exportName}" has a connected client`, options);
    this.exportName = exportName;
  }
}

/** The daemon was retired (its export removed): nothing starts it again. */
export class DaemonRetiredError extends Error {
  override name = 'DaemonRetiredError';
  constructor(dir: string) {
    super(`the qemu-storage-daemon of ${dir} was retired with its export; it is not started again`);
  }
}
