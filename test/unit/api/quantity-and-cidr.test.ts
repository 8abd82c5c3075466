import { describe, expect, it } from 'vitest';
import { cidrProblem } from '../../../src/api/cidr.js';
import { parseQuantity } from '../../../src/api/quantity.js';

describe('parseQuantity', () => {
  it.each([
    ['10Gi', 10 * 1024 ** 3],
    ['512Mi', 512 * 1024 ** 2],
    ['1.5Gi', 1.5 * 1024 ** 3],
    ['500M', 500_000_000],
    ['1073741824', 1073741824],
    [4096, 4096],
    ['0.5', 1],
  ])('%s is %d bytes', (input, bytes) => {
    expect(parseQuantity(input)).toEqual({ ok: true, bytes });
  });

  it.each(['10GB', '-1Gi', '1e9', '', 'Gi', '0', '0Ki', '100Ei'])('rejects %j', (input) => {
    expect(parseQuantity(input).ok).toBe(false);
  });
});

describe('cidrProblem', () => {
  it.each(['10.0.0.0/8', '192.168.1.7', '0.0.0.0/0', 'fd00::/8', '::1', '2001:db8::/128'])(
    'accepts %s',
    (v) => {
      expect(cidrProblem(v)).toBeUndefined();
    },
  );
  it.each([
    '10.0.0.0/33',
    '10.0.0/8',
    'fe80::1%eth0',
    '10.0.0.0/8/1',
    '10.0.0.0/08',
    'example.com',
    '::/129',
  ])('rejects %s', (v) => {
    expect(cidrProblem(v)).toBeDefined();
  });
});
