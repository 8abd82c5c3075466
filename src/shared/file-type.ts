/**
 * What kind of file a stat says, in the words the controller's messages use. One definition
 * for every reader of untrusted paths (image headers, the source directory), which all refuse
 * what is not a regular file (or, for images, a block device) before reading a byte.
 */

/** `file` and `block-device` double as the image reader's file types. */
export type FileType =
  'file' | 'block-device' | 'character device' | 'FIFO' | 'socket' | 'directory' | 'symlink' | 'special file';

/** The part of fs.Stats (number or bigint) that tells the kind of file. */
export interface FileKind {
  isFile(): boolean;
  isBlockDevice(): boolean;
  isCharacterDevice(): boolean;
  isFIFO(): boolean;
  isSocket(): boolean;
  isDirectory(): boolean;
  isSymbolicLink(): boolean;
}

export function fileTypeOf(info: FileKind): FileType {
  if (info.isFile()) return 'file';
  if (info.isBlockDevice()) return 'block-device';
  if (info.isCharacterDevice()) return 'character device';
  if (info.isFIFO()) return 'FIFO';
  if (info.isSocket()) return 'socket';
  if (info.isDirectory()) return 'directory';
  if (info.isSymbolicLink()) return 'symlink';
  return 'special file';
}
