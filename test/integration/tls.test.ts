/**
 * `run --tls-dir`: both servers require TLS and a client certificate from the node's CA,
 * through the built controller on a plain host with real nbd-server, qemu-storage-daemon,
 * nbdinfo and nbdcopy. Certificates are made with openssl in the test's directory.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  exportSize,
  HeldTransfer,
  nbdcopy,
  sha256File,
  tryNbdcopy,
  writeRandomFile,
} from '../support/nbd.js';
import { serverCertificateSerial } from '../support/nbd-tls-peer.js';
import { waitFor } from '../support/poll.js';
import { requireBinary } from '../support/repo.js';
import { createCa, issueCertificate, type CertificateAuthority } from '../support/tls-certificates.js';
import { nbdExport, PlainHostNode } from './harness/plain-host-controller.js';

const MiB = 1024 * 1024;

/** nbdinfo --size, returning the exit code and stderr instead of throwing. */
async function trySize(uri: string): Promise<{ exitCode: number; stderr: string }> {
  const result = await execa('nbdinfo', ['--size', uri], { reject: false, timeout: 30_000 });
  return { exitCode: result.exitCode ?? -1, stderr: String(result.stderr) };
}

describe('TLS with client certificates (run --tls-dir)', () => {
  let node: PlainHostNode;
  let ca: CertificateAuthority;
  let tlsDir: string;
  let clientDir: string;
  let foreignDir: string;
  let firstServerSerial: string;

  /** The export's status.uri with the client's certificates, as a libnbd user writes it. */
  const withCertificates = (uri: string, dir: string) => `${uri}?tls-certificates=${dir}`;
  /** The same export without TLS. */
  const plain = (uri: string) => uri.replace(/^nbds:/, 'nbd:');

  beforeAll(async () => {
    await requireBinary('openssl');
    node = await PlainHostNode.create();
    ca = await createCa(join(node.root, 'ca'), 'node CA');
    const otherCa = await createCa(join(node.root, 'other-ca'), 'another CA');
    tlsDir = join(node.root, 'tls');
    // No client-cert.pem in the node's directory: the controller's own probe presents the
    // server certificate, which this CA issued for client auth too.
    firstServerSerial = await issueCertificate(ca, tlsDir, 'server', {
      commonName: 'node',
      usages: ['serverAuth', 'clientAuth'],
    });
    clientDir = join(node.root, 'client');
    await issueCertificate(ca, clientDir, 'client', { commonName: 'backup-client', usages: ['clientAuth'] });
    // Trusts the node's CA, but its own certificate comes from another CA.
    foreignDir = join(node.root, 'foreign');
    await issueCertificate(otherCa, foreignDir, 'client', { commonName: 'intruder', usages: ['clientAuth'] });
    await execa('cp', [ca.cert, join(foreignDir, 'ca-cert.pem')]);
    await node.start([`--tls-dir=${tlsDir}`]);
  });

  afterAll(async () => {
    await node?.destroy();
  });

  it('a raw (nbd-server) and a qcow2 (qemu-storage-daemon) export get Ready with an nbds:// URI', async () => {
    await node.writeExports('exports.yaml', [
      nbdExport('tls-raw', {
        source: { file: { path: join(node.images, 'a.raw'), format: 'raw', create: { size: '64Mi' } } },
        deletionPolicy: 'Delete',
      }),
      nbdExport('tls-qcow2', {
        source: { file: { path: join(node.images, 'b.qcow2'), format: 'qcow2', create: { size: '64Mi' } } },
        deletionPolicy: 'Delete',
      }),
    ]);
    const raw = await node.waitForReady('tls-raw');
    const qcow2 = await node.waitForReady('tls-qcow2');
    expect(raw.status).toMatchObject({
      server: 'nbd-server',
      uri: `nbds://127.0.0.1:${node.nbdPort}/it.tls-raw`,
    });
    expect(qcow2.status).toMatchObject({
      server: 'qemu-storage-daemon',
      uri: `nbds://127.0.0.1:${node.qemuPort}/it.tls-qcow2`,
    });
  });

  for (const name of ['tls-raw', 'tls-qcow2']) {
    it(`${name}: a client with a certificate from the node's CA writes and reads back bit-exact`, async () => {
      const uri = withCertificates(node.uri(await node.waitForReady(name)), clientDir);
      expect(await exportSize(uri)).toBe(64 * MiB);
      const payload = join(node.root, `${name}-payload.bin`);
      await writeRandomFile(payload, 64 * MiB);
      await execa('nbdcopy', ['--flush', '--connections=1', payload, uri]);
      const back = join(node.root, `${name}-back.bin`);
      await nbdcopy(uri, back);
      expect(await sha256File(back)).toBe(await sha256File(payload));
    });

    it(`${name}: a plain client and a client with another CA's certificate are refused`, async () => {
      const uri = node.uri(await node.waitForReady(name));
      const plainClient = await trySize(plain(uri));
      expect(plainClient.exitCode).not.toBe(0);
      expect(plainClient.stderr).toMatch(/TLS/);
      const foreign = await trySize(withCertificates(uri, foreignDir));
      expect(foreign.exitCode).not.toBe(0);
      const foreignCopy = await tryNbdcopy(withCertificates(uri, foreignDir), join(node.root, 'never.bin'));
      expect(foreignCopy.exitCode).not.toBe(0);
      // The same client with the right certificate still gets in: the refusals were about the certificate.
      expect(await exportSize(withCertificates(uri, clientDir))).toBe(64 * MiB);
    });
  }

  it('a renewed server certificate reaches nbd-server at the next change without cutting a held transfer', async () => {
    const raw = await node.waitForReady('tls-raw');
    const uri = withCertificates(node.uri(raw), clientDir);
    const credentials = {
      ca: await readFile(join(clientDir, 'ca-cert.pem'), 'utf8'),
      cert: await readFile(join(clientDir, 'client-cert.pem'), 'utf8'),
      key: await readFile(join(clientDir, 'client-key.pem'), 'utf8'),
    };
    expect(await serverCertificateSerial(node.nbdPort, credentials)).toBe(firstServerSerial);

    const payload = join(node.root, 'held-payload.bin');
    await writeRandomFile(payload, 64 * MiB);
    const transfer = new HeldTransfer(payload, uri, 32 * MiB);
    try {
      await transfer.firstHalfWritten();
      // The same CA issues a new certificate in place (what cert-manager does on renewal).
      const renewedSerial = await issueCertificate(ca, tlsDir, 'server', {
        commonName: 'node renewed',
        usages: ['serverAuth', 'clientAuth'],
      });
      expect(renewedSerial).not.toBe(firstServerSerial);
      // A change on the node: a hand-over restart of nbd-server's parent, which re-reads it.
      await node.writeExports('more.yaml', [
        nbdExport('tls-raw-2', {
          source: { file: { path: join(node.images, 'c.raw'), format: 'raw', create: { size: '16Mi' } } },
          deletionPolicy: 'Delete',
        }),
      ]);
      const second = await node.waitForReady('tls-raw-2');
      expect(await exportSize(withCertificates(node.uri(second), clientDir))).toBe(16 * MiB);
      expect(await serverCertificateSerial(node.nbdPort, credentials)).toBe(renewedSerial);

      const result = await transfer.finish();
      expect(result).toMatchObject({ exitCode: 0 });
    } finally {
      transfer.kill();
    }
    const back = join(node.root, 'held-back.bin');
    await nbdcopy(uri, back);
    expect(await sha256File(back)).toBe(await sha256File(payload));
  });

  it('a controller started again without --tls-dir serves both servers plain (an adopted TLS daemon is restarted)', async () => {
    const qemuPid = async () =>
      (await readFile(join(node.stateDir, 'qemu-storage-daemon', 'qemu-storage-daemon.pid'), 'utf8')).trim();
    const tlsDaemon = await qemuPid();
    await node.stop();
    await node.start();
    for (const name of ['tls-raw', 'tls-qcow2']) {
      const object = await waitFor(`${name} to read nbd://`, async () => {
        const current = await node.waitForReady(name);
        return current.status?.uri?.startsWith('nbd://') === true ? current : undefined;
      });
      expect(await exportSize(node.uri(object))).toBe(64 * MiB);
    }
    expect(await qemuPid()).not.toBe(tlsDaemon);
  });
});
