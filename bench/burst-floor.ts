/**
 * What moving one burst of bytes between two processes costs on this machine, with no engine code:
 * the sender writes `bytes` from shared memory on established loopback connections that have been
 * quiet for a while (as the final round of a pre-copy follows the pause), the receiver reads them
 * straight into shared memory (node:net `onread`, as ferry's destination reads RUN frames) on its
 * one event loop and answers with one byte once all are in. The time includes that answer's trip,
 * as the downtime floor includes a round trip.
 *
 * With several streams the burst is split as the engine splits a round: the first stream is
 * written by the sender's main thread, each other one by a thread of its own (as ferry's sender
 * threads write the data streams past the first), told to start by a message.
 *
 * Why: the downtime floor divides the final round by the bulk rate of raw TCP measured inside one
 * process, where sender and receiver never wait for each other to be scheduled. A burst between
 * two processes pays that waiting; this measures how much, for the same bytes.
 *
 * The parent forks this file (FERRY_BENCH_BURST=1) for the receiving end; the sending threads run
 * it as workers (role 'burst-sender').
 */
import { fork } from 'node:child_process';
import net from 'node:net';
import { fileURLToPath } from 'node:url';
import { randomFillSync } from 'node:crypto';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { pinServer } from './congestion.js';

const MiB = 1 << 20;
const HERE = fileURLToPath(import.meta.url);

/** The bytes of `bytes` that stream `i` of `n` carries: [from, to). */
const share = (bytes: number, i: number, n: number): [number, number] => [Math.floor((bytes * i) / n), Math.floor((bytes * (i + 1)) / n)];

if (process.env.FERRY_BENCH_BURST === '1' && process.send && isMainThread) {
  const send = process.send.bind(process);
  process.once('message', (m: { ports: number[]; bytes: number }) => {
    const memory = new Uint8Array(new SharedArrayBuffer(Math.max(m.bytes, MiB)));
    const n = m.ports.length;
    const got = m.ports.map(() => 0);
    let done = 0;
    const socks = m.ports.map((port, i) => {
      const [from, to] = share(m.bytes, i, n);
      const sock: net.Socket = net.connect({
        port, host: '127.0.0.1', noDelay: true,
        onread: {
          buffer: () => memory.subarray(from + got[i], Math.max(to, from + got[i] + 1)),
          callback: (k: number) => {
            got[i] += k;
            if (got[i] >= to - from) {
              got[i] = 0;
              if (++done === n) {
                done = 0;
                socks[0].write(new Uint8Array(1));
              }
            }
            return true;
          },
        },
      });
      sock.on('error', () => undefined);
      return sock;
    });
    send('connected');
  });
  process.on('disconnect', () => process.exit(0));
}

interface SenderInit {
  role: 'burst-sender';
  data: SharedArrayBuffer;
  from: number;
  to: number;
}

/** A sending thread: accepts one connection, then writes its share at each 'go' and says 'sent'. */
if (!isMainThread && (workerData as SenderInit | undefined)?.role === 'burst-sender') {
  const init = workerData as SenderInit;
  const data = new Uint8Array(init.data);
  const server = net.createServer();
  server.listen(0, '127.0.0.1', () => parentPort!.postMessage((pinServer(server).address() as net.AddressInfo).port));
  server.once('connection', (sock) => {
    sock.setNoDelay(true);
    parentPort!.on('message', async () => {
      await writeAll(sock, data, init.from, init.to);
      parentPort!.postMessage('sent');
    });
  });
}

async function writeAll(sock: net.Socket, data: Uint8Array, from: number, to: number): Promise<void> {
  for (let at = from; at < to; at += MiB) {
    if (!sock.write(data.subarray(at, Math.min(to, at + MiB)))) await new Promise<void>((r) => sock.once('drain', () => r()));
  }
}

/**
 * Times of `reps` bursts of `bytes` (after one warm-up), ms, sorted; each after `quietMs` of quiet,
 * over `streams` connections (the first written by this thread, each other by a thread of its own).
 */
export async function burstFloor(bytes: number, reps: number, quietMs = 300, streams = 1): Promise<number[]> {
  const child = fork(HERE, [], { env: { ...process.env, FERRY_BENCH_BURST: '1' }, stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
  const server = net.createServer();
  const data = new Uint8Array(new SharedArrayBuffer(bytes));
  for (let at = 0; at < bytes; at += 65536) randomFillSync(data, at, Math.min(65536, bytes - at));
  const senders: Worker[] = [];
  try {
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    pinServer(server); // the accepted socket sends the bursts
    const ports = [(server.address() as net.AddressInfo).port];
    for (let i = 1; i < streams; i++) {
      const [from, to] = share(bytes, i, streams);
      const w = new Worker(HERE, { workerData: { role: 'burst-sender', data: data.buffer as SharedArrayBuffer, from, to } satisfies SenderInit });
      senders.push(w);
      ports.push(await new Promise<number>((r) => w.once('message', r)));
    }
    const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
    child.send({ ports, bytes });
    const sock = await accepted;
    sock.setNoDelay(true);
    const [from0, to0] = share(bytes, 0, streams);
    const times: number[] = [];
    for (let i = -1; i < reps; i++) {
      await new Promise((r) => setTimeout(r, quietMs));
      const t0 = performance.now();
      const answered = new Promise<void>((r) => sock.once('data', () => r()));
      const sent = senders.map((w) => new Promise((r) => w.once('message', r)));
      for (const w of senders) w.postMessage('go');
      await writeAll(sock, data, from0, to0);
      await Promise.all([answered, ...sent]);
      if (i >= 0) times.push(performance.now() - t0);
    }
    sock.destroy();
    return times.sort((a, b) => a - b);
  } finally {
    server.close();
    child.kill();
    for (const w of senders) await w.terminate();
  }
}
