/**
 * Kubernetes resource quantities for image sizes ("10Gi", "500M", "1073741824").
 * Only what a disk size needs: no negative, no milli, no exponent forms.
 */
const QUANTITY_PATTERN = /^([0-9]+)(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$/;

/** The CRD carries the same pattern, so both reject the same strings. */
export const QUANTITY_PATTERN_SOURCE = QUANTITY_PATTERN.source;

const MULTIPLIERS: Record<string, bigint> = {
  '': 1n,
  Ki: 1024n,
  Mi: 1024n ** 2n,
  Gi: 1024n ** 3n,
  Ti: 1024n ** 4n,
  Pi: 1024n ** 5n,
  Ei: 1024n ** 6n,
  k: 1000n,
  M: 1000n ** 2n,
  G: 1000n ** 3n,
  T: 1000n ** 4n,
  P: 1000n ** 5n,
  E: 1000n ** 6n,
};

export type QuantityResult = { ok: true; bytes: number } | { ok: false; message: string };

/** Parses a quantity into whole bytes (fractions round up), within Number's safe range. */
export function parseQuantity(value: string | number): QuantityResult {
  if (typeof value === 'number') {
    return Number.isSafeInteger(value) && value > 0
      ? { ok: true, bytes: value }
      : { ok: false, message: `must be a positive whole number of bytes, got ${value}` };
  }
  const match = QUANTITY_PATTERN.exec(value);
  if (!match) return { ok: false, message: `"${value}" is not a quantity such as 10Gi, 512Mi or 1073741824` };
  const [, whole = '0', fraction = '', suffix = ''] = match;
  const multiplier = MULTIPLIERS[suffix] ?? 1n;
  const digits = fraction.slice(1);
  const scale = 10n ** BigInt(digits.length);
  const numerator = (BigInt(whole) * scale + BigInt(digits || '0')) * multiplier;
  const bytes = (numerator + scale - 1n) / scale;
  if (bytes <= 0n) return { ok: false, message: `"${value}" must be greater than zero` };
  if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) return { ok: false, message: `"${value}" is too large` };
  return { ok: true, bytes: Number(bytes) };
}
