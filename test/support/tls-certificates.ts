/**
 * Throwaway X.509 material for TLS tests, made with openssl in a temporary directory (never
 * committed): a CA, certificates it signs, in the layouts QEMU (server side) and libnbd
 * (client side) read.
 */
import { copyFile, mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';

export interface CertificateAuthority {
  dir: string;
  cert: string;
  key: string;
}

/** A self-signed P-256 CA in `dir` (ca-cert.pem, ca-key.pem). */
export async function createCa(dir: string, name: string): Promise<CertificateAuthority> {
  await mkdir(dir, { recursive: true });
  const cert = join(dir, 'ca-cert.pem');
  const key = join(dir, 'ca-key.pem');
  await execa('openssl', [
    'req',
    '-x509',
    '-newkey',
    'ec',
    '-pkeyopt',
    'ec_paramgen_curve:P-256',
    '-nodes',
    '-keyout',
    key,
    '-out',
    cert,
    '-days',
    '2',
    '-subj',
    `/CN=${name}`,
  ]);
  return { dir, cert, key };
}

/**
 * A certificate signed by `ca`, written as `<prefix>-cert.pem`/`<prefix>-key.pem` into
 * `dir` with the CA's certificate as ca-cert.pem. `usages` are extendedKeyUsage names
 * (serverAuth, clientAuth). Returns the certificate's serial number (hex, upper case).
 */
export async function issueCertificate(
  ca: CertificateAuthority,
  dir: string,
  prefix: 'server' | 'client',
  options: { commonName: string; usages: string[] },
): Promise<string> {
  await mkdir(dir, { recursive: true });
  const key = join(dir, `${prefix}-key.pem`);
  const request = join(dir, `${prefix}.csr`);
  const extensions = join(dir, `${prefix}.ext`);
  const cert = join(dir, `${prefix}-cert.pem`);
  await execa('openssl', [
    'req',
    '-newkey',
    'ec',
    '-pkeyopt',
    'ec_paramgen_curve:P-256',
    '-nodes',
    '-keyout',
    key,
    '-out',
    request,
    '-subj',
    `/CN=${options.commonName}`,
  ]);
  await writeFile(
    extensions,
    [
      'basicConstraints=CA:FALSE',
      'keyUsage=digitalSignature',
      `extendedKeyUsage=${options.usages.join(',')}`,
      'subjectAltName=IP:127.0.0.1,DNS:localhost',
    ].join('\n'),
  );
  await execa('openssl', [
    'x509',
    '-req',
    '-in',
    request,
    '-CA',
    ca.cert,
    '-CAkey',
    ca.key,
    '-CAcreateserial',
    '-out',
    cert,
    '-days',
    '2',
    '-extfile',
    extensions,
  ]);
  if (join(dir, 'ca-cert.pem') !== ca.cert) await copyFile(ca.cert, join(dir, 'ca-cert.pem'));
  const { stdout } = await execa('openssl', ['x509', '-in', cert, '-noout', '-serial']);
  return stdout
    .trim()
    .replace(/^serial=/, '')
    .toUpperCase();
}
