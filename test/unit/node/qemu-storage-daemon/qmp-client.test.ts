/**
 * The QMP client against a scripted QMP server on a UNIX socket: negotiation, answers
 * matched by id (out of order), errors, events, timeouts and a closing server.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  QmpClient,
  QmpConnectionError,
  QmpError,
} from '../../../../src/node/qemu-storage-daemon/qmp-client.js';

interface Command {
  execute: string;
  arguments?: Record<string, unknown>;
  id?: string;
}

let dir: string;
let server: Server;
let socketPath: string;
let peer: Socket | undefined;
/** Decides what the fake server does with each command (after qmp_capabilities). */
let onCommand: (command: Command, send: (message: object) => void) => void;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'nbdx-qmp-'));
  socketPath = join(dir, 'qmp.sock');
  onCommand = (command, send) => send({ return: {}, id: command.id });
  server = createServer((socket) => {
    peer = socket;
    const send = (message: object) => socket.write(`${JSON.stringify(message)}\n`);
    send({ QMP: { version: { qemu: { major: 7, minor: 2, micro: 0 } }, capabilities: ['oob'] } });
    let buffer = '';
    socket.on('data', (chunk) => {
      buffer += chunk.toString();
      let end: number;
      while ((end = buffer.indexOf('\n')) >= 0) {
        const command = JSON.parse(buffer.slice(0, end)) as Command;
        buffer = buffer.slice(end + 1);
        if (command.execute === 'qmp_capabilities') send({ return: {}, id: command.id });
        else onCommand(command, send);
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
});

afterEach(async () => {
  peer?.destroy();
  await new Promise((resolve) => server.close(resolve));
  await rm(dir, { recursive: true, force: true });
});

describe('QmpClient', () => {
  it('matches answers to commands by id, in any order', async () => {
    const held: { command: Command; send: (m: object) => void }[] = [];
    onCommand = (command, send) => {
      held.push({ command, send });
      if (held.length === 2)
        for (const { command: c, send: s } of held.reverse()) s({ return: { echo: c.execute }, id: c.id });
    };
    const client = await QmpClient.connect(socketPath);
    const [a, b] = await Promise.all([client.execute('query-a'), client.execute('query-b')]);
    expect(a).toEqual({ echo: 'query-a' });
    expect(b).toEqual({ echo: 'query-b' });
    client.close();
  });

  it('sends arguments and turns errors into QmpError', async () => {
    onCommand = (command, send) =>
      send({
        error: { class: 'GenericError', desc: `no ${String(command.arguments?.['id'])}` },
        id: command.id,
      });
    const client = await QmpClient.connect(socketPath);
    const error = await client.execute('block-export-del', { id: 'x1' }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(QmpError);
    expect(error).toMatchObject({ class: 'GenericError', desc: 'no x1', command: 'block-export-del' });
    client.close();
  });

  it('delivers events to listeners and waiters', async () => {
    onCommand = (command, send) => {
      send({ event: 'BLOCK_EXPORT_DELETED', data: { id: 'other' } });
      send({ return: {}, id: command.id });
      send({ event: 'BLOCK_EXPORT_DELETED', data: { id: 'x1' }, timestamp: { seconds: 1, microseconds: 2 } });
    };
    const client = await QmpClient.connect(socketPath);
    const seen: string[] = [];
    client.onEvent((event) => seen.push(String(event.data['id'])));
    const waiter = client.waitForEvent(
      (e) => e.event === 'BLOCK_EXPORT_DELETED' && e.data['id'] === 'x1',
      5_000,
    );
    await client.execute('block-export-del', { id: 'x1' });
    expect((await waiter.promise).data).toEqual({ id: 'x1' });
    expect(seen).toEqual(['other', 'x1']);
    client.close();
  });

  it('times out a command that gets no answer, and ignores its late answer', async () => {
    let late: (() => void) | undefined;
    onCommand = (command, send) => {
      if (command.execute === 'slow') late = () => send({ return: 'late', id: command.id });
      else send({ return: 'fast', id: command.id });
    };
    const client = await QmpClient.connect(socketPath);
    await expect(client.execute('slow', undefined, { timeoutMs: 50 })).rejects.toBeInstanceOf(
      QmpConnectionError,
    );
    late?.();
    expect(await client.execute('fast')).toBe('fast');
    client.close();
  });

  it('rejects pending commands and waiters when the server goes away', async () => {
    onCommand = () => peer?.destroy();
    const client = await QmpClient.connect(socketPath);
    let closed = false;
    client.onClose(() => (closed = true));
    const waiter = client.waitForEvent(() => true, 5_000);
    await expect(client.execute('quit')).rejects.toThrow(/closed/);
    await expect(waiter.promise).rejects.toThrow(/closed/);
    expect(closed).toBe(true);
    expect(client.closed).toBe(true);
    await expect(client.execute('query-status')).rejects.toThrow(/closed/);
  });

  it('gives up when nobody greets', async () => {
    const silent = createServer(() => undefined);
    const path = join(dir, 'silent.sock');
    await new Promise<void>((resolve) => silent.listen(path, resolve));
    await expect(QmpClient.connect(path, { timeoutMs: 100 })).rejects.toThrow(/no QMP greeting/);
    await new Promise((resolve) => silent.close(resolve));
  });
});
