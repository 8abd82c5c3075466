/**
 * The certificate the controller's own NBD clients (the readiness probe, the checksum
 * reader) present when the servers require TLS. The operator's --tls-dir may hold
 * client-cert.pem/client-key.pem for them; otherwise the server certificate is used as client
 * certificate, which the servers accept only if the CA issued it for client auth too
 * (cert-manager: usages "server auth" and "client auth"). Nothing is generated here.
 */
import { access, mkdir, readFile, rm, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import type { ProbeTlsCredentials } from './nbd-probe.js';

export interface TlsClientIdentity {
  /** A directory in libnbd's layout (ca-cert.pem, client-cert.pem, client-key.pem), for `?tls-certificates=`. */
  certificatesDir: string;
  /** Reads the PEM files now: a rotated certificate is used by the next probe. */
  load(): Promise<ProbeTlsCredentials>;
}

/**
 * Without client-cert.pem in `tlsDir`, `stateDir/tls-client` gets symlinks named the way
 * libnbd wants them to the server's files (symlinks, so a renewed certificate is followed).
 */
export async function tlsClientIdentity(tlsDir: string, stateDir: string): Promise<TlsClientIdentity> {
  const ownClientCertificate = await access(join(tlsDir, 'client-cert.pem')).then(
    () => true,
    () => false,
  );
  let certificatesDir = tlsDir;
  if (!ownClientCertificate) {
    certificatesDir = join(stateDir, 'tls-client');
    await rm(certificatesDir, { recursive: true, force: true });
    await mkdir(certificatesDir, { recursive: true, mode: 0o700 });
    await symlink(join(tlsDir, 'ca-cert.pem'), join(certificatesDir, 'ca-cert.pem'));
    await symlink(join(tlsDir, 'server-cert.pem'), join(certificatesDir, 'client-cert.pem'));
    await symlink(join(tlsDir, 'server-key.pem'), join(certificatesDir, 'client-key.pem'));
  }
  return {
    certificatesDir,
    async load() {
      const [ca, cert, key] = await Promise.all(
        ['ca-cert.pem', 'client-cert.pem', 'client-key.pem'].map((name) =>
          readFile(join(certificatesDir, name), 'utf8'),
        ),
      );
      return { ca: ca ?? '', cert: cert ?? '', key: key ?? '' };
    },
  };
}
