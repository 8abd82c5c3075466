import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { isValidNamespace, isValidObjectName } from '../../../src/api/object-name.js';
import {
  MAX_STATUS_FILE_NAME_BYTES,
  isStatusFileName,
  statusFileName,
} from '../../../src/source/status-file-name.js';

const alphanumeric = fc.constantFrom(...'abcdefghijklmnopqrstuvwxyz0123456789'.split(''));
const inner = (chars: string) => fc.constantFrom(...chars.split(''));

/** Valid names of every length, long ones as likely as short ones. */
function validString(maxLength: number, innerChars: string) {
  return fc
    .tuple(
      alphanumeric,
      fc.array(inner(innerChars), { minLength: 0, maxLength: maxLength - 2 }),
      fc.option(alphanumeric, { nil: undefined }),
    )
    .map(([first, middle, last]) =>
      last === undefined && middle.length === 0 ? first : `${first}${middle.join('')}${last ?? 'z'}`,
    );
}
const namespaceArb = validString(63, 'abcdefghijklmnopqrstuvwxyz0123456789-');
const nameArb = validString(253, 'abcdefghijklmnopqrstuvwxyz0123456789-.');
/** Pairs that share a long prefix: the case where a truncated name alone would collide. */
const longNamesSharingPrefix = fc
  .tuple(fc.constantFrom(200, 230, 245), validString(12, 'abc.-'), validString(12, 'abc.-'))
  .map(([prefixLength, a, b]) => ['x'.repeat(prefixLength) + a, 'x'.repeat(prefixLength) + b] as const)
  .filter(([a, b]) => a.length <= 253 && b.length <= 253);

describe('statusFileName', () => {
  it('generators make valid names only (else the properties below prove nothing)', () => {
    fc.assert(
      fc.property(namespaceArb, nameArb, (ns, name) => isValidNamespace(ns) && isValidObjectName(name)),
    );
  });

  it('fits NAME_MAX with room for the atomic-write temporary, for every valid name', () => {
    fc.assert(
      fc.property(namespaceArb, nameArb, (ns, name) => {
        const fileName = statusFileName(ns, name);
        expect(Buffer.byteLength(fileName)).toBeLessThanOrEqual(MAX_STATUS_FILE_NAME_BYTES);
        expect(Buffer.byteLength(`.${fileName}.0123abcd.tmp`)).toBeLessThanOrEqual(255);
        expect(fileName).not.toContain('/');
        expect(isStatusFileName(fileName)).toBe(true);
      }),
      { numRuns: 2_000 },
    );
  });

  it('never gives two resources one file', () => {
    fc.assert(
      fc.property(
        fc.uniqueArray(fc.tuple(namespaceArb, nameArb), {
          minLength: 2,
          maxLength: 40,
          selector: (k) => k.join('/'),
        }),
        (keys) => {
          const names = keys.map(([ns, name]) => statusFileName(ns, name));
          expect(new Set(names).size).toBe(keys.length);
        },
      ),
      { numRuns: 500 },
    );
    fc.assert(
      fc.property(namespaceArb, longNamesSharingPrefix, (ns, [a, b]) => {
        fc.pre(a !== b);
        expect(statusFileName(ns, a)).not.toBe(statusFileName(ns, b));
      }),
    );
  });

  it('is stable, and readable whenever the readable form fits', () => {
    expect(statusFileName('backups', 'vm-1.disk0')).toBe('backups_vm-1.disk0.yaml');
    const long = `vm-${'a'.repeat(246)}`;
    const hashed = statusFileName('backups', long);
    expect(hashed).toBe(statusFileName('backups', long));
    expect(hashed).toMatch(/^backups_vm-a+~[0-9a-f]{32}\.yaml$/);
    // 63 + 1 + 253 + 5: the longest key there is.
    const longest = statusFileName('n'.repeat(63), 'm'.repeat(253));
    expect(Buffer.byteLength(longest)).toBeLessThanOrEqual(MAX_STATUS_FILE_NAME_BYTES);
  });
});
