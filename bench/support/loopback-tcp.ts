/**
 * Loopback TCP throughput, the ceiling of any NBD export on this host: one process sends
 * `bytes` in 4 MiB writes, another receives them into one reused 4 MiB buffer (`onread`:
 * with Node's default 'data' events, a fresh buffer per read, the receiver alone was the
 * limit at about 1.1 GiB/s where this reaches 2.4). Both are processes of their own.
 */
import { execa } from 'execa';

/** Listens, sends to the first connection, prints the seconds from accept to the sink's count. */
const SENDER = `
const bytes = Number(process.argv[1]);
const chunk = Buffer.alloc(4 << 20, 7);
const server = require('node:net').createServer((socket) => {
  const started = performance.now();
  let sent = 0;
  const pump = () => {
    while (sent < bytes) {
      const piece = sent + chunk.length <= bytes ? chunk : chunk.subarray(0, bytes - sent);
      sent += piece.length;
      if (!socket.write(piece)) return void socket.once('drain', pump);
    }
    socket.end();
  };
  pump();
  let reply = '';
  socket.on('data', (d) => { reply += d; });
  socket.on('end', () => {
    server.close();
    if (Number(reply) !== bytes) { console.error('the sink counted ' + reply); process.exit(1); }
    console.log((performance.now() - started) / 1000);
  });
});
server.listen(0, '127.0.0.1', () => console.error(server.address().port));
`;

/** Connects, counts what arrives, answers with the count. */
const SINK = `
let received = 0;
const socket = require('node:net').connect({
  port: Number(process.argv[1]),
  host: '127.0.0.1',
  onread: { buffer: Buffer.allocUnsafe(4 << 20), callback: (n) => { received += n; } },
});
socket.on('end', () => socket.end(String(received)));
`;

/** Seconds to move `bytes` over loopback TCP, as the sender measured them. */
export async function timeLoopbackTcp(bytes: number): Promise<number> {
  const sender = execa(process.execPath, ['-e', SENDER, String(bytes)]);
  const port = await new Promise<number>((resolve, reject) => {
    sender.stderr.once('data', (line: Buffer) => resolve(Number(String(line).trim())));
    sender.then(
      () => reject(new Error('the TCP sender exited before listening')),
      (error: unknown) => reject(new Error('the TCP sender failed', { cause: error })),
    );
  });
  await execa(process.execPath, ['-e', SINK, String(port)]);
  const { stdout } = await sender;
  return Number(stdout.trim());
}
