/**
 * Loopback TCP throughput, the ceiling of any NBD export on this host: one process sends
 * `bytes` in 4 MiB writes to another that discards them, both separate from the benchmark.
 */
import { execa } from 'execa';

const SINK = `
const server = require('node:net').createServer((socket) => {
  let received = 0;
  socket.on('data', (chunk) => { received += chunk.length; });
  socket.on('end', () => { socket.end(String(received)); server.close(); });
});
server.listen(0, '127.0.0.1', () => console.log(server.address().port));
`;

const SOURCE = `
const [port, bytes] = process.argv.slice(1).map(Number);
const chunk = Buffer.alloc(4 << 20, 7);
let started = 0;
const socket = require('node:net').connect(port, '127.0.0.1', () => {
  started = performance.now();
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
});
let reply = '';
socket.on('data', (d) => { reply += d; });
socket.on('end', () => {
  if (Number(reply) !== bytes) { console.error('sink got ' + reply); process.exit(1); }
  console.log((performance.now() - started) / 1000);
});
`;

/** Seconds to move `bytes` over loopback TCP (measured by the sender from connect to the sink's count). */
export async function timeLoopbackTcp(bytes: number): Promise<number> {
  const sink = execa(process.execPath, ['-e', SINK]);
  const port = await new Promise<number>((resolve, reject) => {
    sink.stdout.once('data', (line: Buffer) => resolve(Number(String(line).trim())));
    sink.then(
      () => reject(new Error('the TCP sink exited before listening')),
      (error: unknown) => reject(new Error('the TCP sink failed', { cause: error })),
    );
  });
  const { stdout } = await execa(process.execPath, ['-e', SOURCE, String(port), String(bytes)]);
  await sink;
  return Number(stdout.trim());
}
