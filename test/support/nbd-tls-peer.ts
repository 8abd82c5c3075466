/**
 * The serial number of the certificate an NBD server presents after NBD_OPT_STARTTLS: which
 * certificate a server process really uses (libnbd's tools do not show it).
 */
import { connect } from 'node:net';
import { connect as connectTls } from 'node:tls';

const IHAVEOPT = 0x49484156454f5054n;
const OPT_STARTTLS = 5;

export async function serverCertificateSerial(
  port: number,
  credentials: { ca: string; cert: string; key: string },
): Promise<string> {
  const socket = connect({ host: '127.0.0.1', port });
  socket.setTimeout(10_000, () => socket.destroy(new Error('no answer within 10 s')));
  try {
    let received = Buffer.alloc(0);
    const read = (n: number) =>
      new Promise<Buffer>((resolve, reject) => {
        const check = () => {
          if (received.length < n) return;
          socket.off('data', onData);
          socket.off('error', reject);
          const out = received.subarray(0, n);
          received = received.subarray(n);
          resolve(out);
        };
        const onData = (chunk: Buffer) => {
          received = Buffer.concat([received, chunk]);
          check();
        };
        socket.on('data', onData);
        socket.once('error', reject);
        check();
      });
    const greeting = await read(18);
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(1 | (greeting.readUInt16BE(16) & 2));
    socket.write(flags);
    const option = Buffer.alloc(16);
    option.writeBigUInt64BE(IHAVEOPT, 0);
    option.writeUInt32BE(OPT_STARTTLS, 8);
    socket.write(option);
    const reply = await read(20);
    if (reply.readUInt32BE(12) !== 1) throw new Error(`STARTTLS refused: reply ${reply.readUInt32BE(12)}`);
    socket.pause();
    const secure = connectTls({ socket, ...credentials, checkServerIdentity: () => undefined });
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', resolve);
      secure.once('error', reject);
    });
    const serial = secure.getPeerCertificate().serialNumber.toUpperCase();
    secure.destroy();
    return serial;
  } finally {
    socket.destroy();
  }
}
