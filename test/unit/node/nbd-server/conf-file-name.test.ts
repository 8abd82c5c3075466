import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { isTemporaryName } from '../../../../src/shared/atomic-file.js';
import {
  admissionPathsOf,
  confFileNameOf,
  fileStemOf,
  slotsDirOf,
} from '../../../../src/node/nbd-server/conf-file-name.js';

const SAFE_FILE_NAME = /^[A-Za-z0-9_%~-][A-Za-z0-9._%~-]*$/;

describe('conf file names', () => {
  it.each([
    ['vm-1234-disk0', 'vm-1234-disk0'],
    ['backups.vm-1', 'backups.vm-1'],
    ['a:b', 'a%3Ab'],
    ['a/b', 'a%2Fb'],
    ['.hidden', '%2Ehidden'],
    ['100%', '100%25'],
    ['a~b', 'a%7Eb'],
    ['ö', '%C3%B6'],
    ['', '%'],
  ])('%s → %s', (name, stem) => {
    expect(fileStemOf(name)).toBe(stem);
    expect(confFileNameOf(name)).toBe(`${stem}.conf`);
  });

  it('names admission files by a digest: no "%" (printf) or "~" reaches the hook\'s command', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'binary', maxLength: 400 }), (name) => {
        const paths = admissionPathsOf('/var/lib/nbdx/nbd-server/auth', name);
        expect(paths.rulesPath).toMatch(/^\/var\/lib\/nbdx\/nbd-server\/auth\/[0-9a-f]{32}\.rules$/);
        expect(paths.lockPath).toBe(paths.rulesPath.replace(/\.rules$/, '.lock'));
        expect(slotsDirOf(paths.rulesPath)).toBe(paths.slotsDir);
        expect(paths.slotsDir).toBe(paths.rulesPath.replace(/\.rules$/, '.clients'));
      }),
      { numRuns: 500 },
    );
    expect(admissionPathsOf('/a', 'x').rulesPath).not.toBe(admissionPathsOf('/a', 'y').rulesPath);
  });

  it('is injective', () => {
    fc.assert(
      fc.property(
        fc.string({ unit: 'binary', maxLength: 400 }),
        fc.string({ unit: 'binary', maxLength: 400 }),
        (a, b) => {
          fc.pre(a !== b);
          expect(confFileNameOf(a)).not.toBe(confFileNameOf(b));
        },
      ),
      { numRuns: 2_000 },
    );
  });

  it('is injective on near-identical names, short and long', () => {
    fc.assert(
      fc.property(
        fc.string({ unit: fc.constantFrom('a', ':', '.', '/', '%', '~', 'ö', '-'), maxLength: 400 }),
        fc.string({ unit: fc.constantFrom('a', ':', '.', '/', '%', '~', 'ö', '-'), maxLength: 400 }),
        (a, b) => {
          fc.pre(a !== b);
          expect(fileStemOf(a)).not.toBe(fileStemOf(b));
        },
      ),
      { numRuns: 5_000 },
    );
  });

  it('gives safe names that fit a directory entry and that nbd-server and our cleanup never mistake', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'binary', maxLength: 1_000 }), (name) => {
        const file = confFileNameOf(name);
        expect(file).toMatch(SAFE_FILE_NAME);
        expect(Buffer.byteLength(file)).toBeLessThanOrEqual(255);
        expect(file.startsWith('.')).toBe(false);
        expect(isTemporaryName(file)).toBe(false);
      }),
      { numRuns: 2_000 },
    );
  });
});
