/**
 * Checks an export the way a client would: the NBD fixed-newstyle handshake with
 * NBD_OPT_GO for the export name, reading the size the server announces, then a clean
 * NBD_CMD_DISC. (nbd-server answers NBD_OPT_INFO with size 0 before the export is
 * opened, so only GO proves the export really opens.) No data is read or written.
 *
 * With `tls`, the probe asks for NBD_OPT_STARTTLS first and continues inside TLS with a
 * client certificate, as the servers require under `run --tls-dir`.
 */
import { connect, type Socket } from 'node:net';
import { connect as connectTls } from 'node:tls';

export interface ProbeTarget {
  host: string;
  port: number;
  exportName: string;
  /** Give up after this long. Default 10 s. */
  timeoutMs?: number;
  /** Speak TLS (STARTTLS) with this client identity; absent: plain NBD. */
  tls?: ProbeTlsCredentials;
}

/** PEM texts: the CA the server's certificate must chain to, and the probe's own certificate. */
export interface ProbeTlsCredentials {
  ca: string;
  cert: string;
  key: string;
}

export type ProbeResult = { ok: true; size: number; readOnly: boolean } | { ok: false; message: string };

const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
const REPLY_MAGIC = 0x3e889045565a9n;
const FLAG_FIXED_NEWSTYLE = 1;
const FLAG_NO_ZEROES = 2;
const OPT_STARTTLS = 5;
const OPT_GO = 7;
const REP_ACK = 1;
const REP_INFO = 3;
const INFO_EXPORT = 0;
const REQUEST_MAGIC = 0x25609513;
const CMD_DISC = 2;
const TRANSMISSION_FLAG_READ_ONLY = 2;
const REP_ERRORS: Record<number, string> = {
  1: 'unsupported option',
  2: 'denied by server policy',
  3: 'invalid request',
  4: 'server platform error',
  5: 'TLS required',
  6: 'unknown export',
  7: 'server shutting down',
  8: 'block size negotiation required',
};

export async function probeExport(target: ProbeTarget): Promise<ProbeResult> {
  let socket: Socket = connect({ host: target.host, port: target.port });
  const timeoutMs = target.timeoutMs ?? 10_000;
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<ProbeResult>((resolve) => {
    timer = setTimeout(() => resolve({ ok: false, message: `no answer within ${timeoutMs} ms` }), timeoutMs);
  });
  try {
    const negotiate = async (): Promise<ProbeResult> => {
      let reader = new SocketReader(socket);
      const negotiated = await greet(socket, reader);
      if (!negotiated.ok) return negotiated;
      if (target.tls !== undefined) {
        const started = await startTls(socket, reader);
        if (!started.ok) return started;
        reader.detach();
        socket = await upgrade(socket, target.tls);
        reader = new SocketReader(socket);
      }
      return await go(socket, reader, target.exportName);
    };
    return await Promise.race([negotiate(), timeout]);
  } catch (error) {
    return { ok: false, message: error instanceof Error ? error.message : String(error) };
  } finally {
    clearTimeout(timer);
    socket.destroy();
  }
}

/** The server's greeting and our flags: fixed newstyle, the server's "no zeroes" echoed. */
async function greet(socket: Socket, reader: SocketReader): Promise<{ ok: true } | ProbeResult> {
  const greeting = await reader.read(18);
  if (greeting.readBigUInt64BE(0) !== NBDMAGIC || greeting.readBigUInt64BE(8) !== IHAVEOPT)
    return { ok: false, message: 'not an NBD server speaking the newstyle protocol' };
  const serverFlags = greeting.readUInt16BE(16);
  if (!(serverFlags & FLAG_FIXED_NEWSTYLE))
    return { ok: false, message: 'server lacks fixed-newstyle negotiation' };
  const clientFlags = Buffer.alloc(4);
  clientFlags.writeUInt32BE(FLAG_FIXED_NEWSTYLE | (serverFlags & FLAG_NO_ZEROES));
  socket.write(clientFlags);
  return { ok: true };
}

/** NBD_OPT_STARTTLS; the server answers ACK and then expects a TLS ClientHello. */
async function startTls(socket: Socket, reader: SocketReader): Promise<{ ok: true } | ProbeResult> {
  const option = Buffer.alloc(16);
  option.writeBigUInt64BE(IHAVEOPT, 0);
  option.writeUInt32BE(OPT_STARTTLS, 8);
  option.writeUInt32BE(0, 12);
  socket.write(option);
  const header = await reader.read(20);
  if (header.readBigUInt64BE(0) !== REPLY_MAGIC) return { ok: false, message: 'malformed option reply' };
  const type = header.readUInt32BE(12);
  const length = header.readUInt32BE(16);
  const data = length > 0 ? await reader.read(length) : Buffer.alloc(0);
  if (type === REP_ACK) return { ok: true };
  const what =
    type & 0x80000000 ? (REP_ERRORS[type & 0x7fffffff] ?? `error ${type & 0x7fffffff}`) : `reply ${type}`;
  const detail = data.toString('utf8').trim();
  return { ok: false, message: `the server refused STARTTLS: ${what}${detail ? `: ${detail}` : ''}` };
}

/**
 * TLS over the negotiated socket. The chain is verified against the node's CA; the host name
 * is not: the probe reaches its own server at the probe address (loopback), which the
 * server certificate, made for the names clients use, need not list.
 */
function upgrade(socket: Socket, credentials: ProbeTlsCredentials): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const secure = connectTls({
      socket,
      ca: credentials.ca,
      cert: credentials.cert,
      key: credentials.key,
      checkServerIdentity: () => undefined,
    });
    const failed = (error: Error): void =>
      reject(new Error(`TLS handshake failed: ${error.message}`, { cause: error }));
    secure.once('error', failed);
    secure.once('secureConnect', () => {
      secure.off('error', failed);
      resolve(secure);
    });
  });
}

/** NBD_OPT_GO for the export: its size and flags, then a clean disconnect. */
async function go(socket: Socket, reader: SocketReader, exportName: string): Promise<ProbeResult> {
  const name = Buffer.from(exportName, 'utf8');
  const option = Buffer.alloc(16 + 4 + name.length + 2);
  option.writeBigUInt64BE(IHAVEOPT, 0);
  option.writeUInt32BE(OPT_GO, 8);
  option.writeUInt32BE(4 + name.length + 2, 12);
  option.writeUInt32BE(name.length, 16);
  name.copy(option, 20);
  option.writeUInt16BE(0, 20 + name.length); // no extra info requested: NBD_INFO_EXPORT always comes
  socket.write(option);

  let size: number | undefined;
  let readOnly = false;
  for (;;) {
    const header = await reader.read(20);
    if (header.readBigUInt64BE(0) !== REPLY_MAGIC) return { ok: false, message: 'malformed option reply' };
    const type = header.readUInt32BE(12);
    const length = header.readUInt32BE(16);
    const data = length > 0 ? await reader.read(length) : Buffer.alloc(0);
    if (type & 0x80000000) {
      const what = REP_ERRORS[type & 0x7fffffff] ?? `error ${type & 0x7fffffff}`;
      const detail = data.toString('utf8').trim();
      return { ok: false, message: `export "${exportName}": ${what}${detail ? `: ${detail}` : ''}` };
    }
    if (type === REP_INFO && data.length >= 12 && data.readUInt16BE(0) === INFO_EXPORT) {
      const announced = data.readBigUInt64BE(2);
      // Above 2^53 a Number rounds, and no real image is that large: nbd-server announces
      // 2^64-1 when it cannot tell a device's size (a detached loop device, a reset zram device).
      if (announced > BigInt(Number.MAX_SAFE_INTEGER))
        return {
          ok: false,
          message: `export "${exportName}": the server announces ${announced} bytes, which is no real size; it could not determine the size of what it serves (a block device without a medium?)`,
        };
      size = Number(announced);
      readOnly = (data.readUInt16BE(10) & TRANSMISSION_FLAG_READ_ONLY) !== 0;
    } else if (type === REP_ACK) break;
  }
  if (size === undefined) return { ok: false, message: 'the server acknowledged without announcing a size' };

  const disconnect = Buffer.alloc(28);
  disconnect.writeUInt32BE(REQUEST_MAGIC, 0);
  disconnect.writeUInt16BE(CMD_DISC, 6);
  socket.end(disconnect);
  return { ok: true, size, readOnly };
}

/** Reads exact byte counts from a socket, failing on close or error. */
class SocketReader {
  #buffered = Buffer.alloc(0);
  #waiter: (() => void) | undefined;
  #failure: Error | undefined;
  readonly #socket: Socket;
  readonly #onData = (chunk: Buffer): void => {
    this.#buffered = Buffer.concat([this.#buffered, chunk]);
    this.#wake();
  };
  readonly #onError = (error: Error): void => {
    this.#failure = error;
    this.#wake();
  };
  readonly #onClose = (): void => {
    this.#failure ??= new Error('the server closed the connection during the handshake');
    this.#wake();
  };

  constructor(socket: Socket) {
    this.#socket = socket;
    socket.on('data', this.#onData);
    socket.on('error', this.#onError);
    socket.on('close', this.#onClose);
  }

  /** Stops reading: the socket's bytes now belong to TLS layered over it. */
  detach(): void {
    this.#socket.off('data', this.#onData);
    this.#socket.off('error', this.#onError);
    this.#socket.off('close', this.#onClose);
  }

  async read(n: number): Promise<Buffer> {
    while (this.#buffered.length < n) {
      if (this.#failure) throw this.#failure;
      await new Promise<void>((resolve) => (this.#waiter = resolve));
    }
    const out = this.#buffered.subarray(0, n);
    this.#buffered = this.#buffered.subarray(n);
    return out;
  }

  #wake(): void {
    const waiter = this.#waiter;
    this.#waiter = undefined;
    waiter?.();
  }
}
