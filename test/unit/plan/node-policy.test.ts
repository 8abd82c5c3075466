import { describe, expect, it } from 'vitest';
import { isInsideRoot, matchesDevicePattern } from '../../../src/plan/node-policy.js';

describe('isInsideRoot', () => {
  it.each([
    ['/data/a', '/data', true],
    ['/data', '/data', true],
    ['/database/a', '/data', false],
    ['/etc/passwd', '/data', false],
    ['/anything', '/', true],
  ])('%s in %s → %s', (path, root, expected) => {
    expect(isInsideRoot(path, root)).toBe(expected);
  });
});

describe('matchesDevicePattern', () => {
  it.each([
    ['/dev/disk/by-id/nvme-X', '/dev/disk/by-id/*', true],
    ['/dev/disk/by-id/a/b', '/dev/disk/by-id/*', false],
    ['/dev/disk/by-id/a/b', '/dev/disk/**', true],
    ['/dev/sdb', '/dev/sd?', true],
    ['/dev/sdb1', '/dev/sd?', false],
    ['/dev/loop0', '/dev/loop[0]', false],
  ])('%s ~ %s → %s', (path, pattern, expected) => {
    expect(matchesDevicePattern(path, pattern)).toBe(expected);
  });
});
