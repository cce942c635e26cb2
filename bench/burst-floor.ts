/**
 * What moving one burst of bytes between two processes costs on this machine, with no engine code:
 * the sender writes `bytes` from shared memory on an established loopback connection that has been
 * quiet for a while (as the final round of a pre-copy follows the pause), the receiver reads them
 * straight into shared memory (node:net `onread`, as ferry's destination reads RUN frames) and
 * answers with one byte once all are in. The time includes that answer's trip, as the downtime
 * floor includes a round trip.
 *
 * Why: the downtime floor divides the final round by the bulk rate of raw TCP measured inside one
 * process, where sender and receiver never wait for each other to be scheduled. A burst between
 * two processes pays that waiting; this measures how much, for the same bytes.
 *
 * The parent forks this file (FERRY_BENCH_BURST=1) for the receiving end.
 */
import { fork } from 'node:child_process';
import net from 'node:net';
import { fileURLToPath } from 'node:url';
import { randomFillSync } from 'node:crypto';
import { pinServer } from './congestion.js';

const MiB = 1 << 20;

if (process.env.FERRY_BENCH_BURST === '1' && process.send) {
  const send = process.send.bind(process);
  process.once('message', (m: { port: number; bytes: number }) => {
    const memory = new Uint8Array(new SharedArrayBuffer(Math.max(m.bytes, MiB)));
    let got = 0;
    const sock: net.Socket = net.connect({
      port: m.port, host: '127.0.0.1', noDelay: true,
      onread: {
        buffer: () => memory.subarray(got),
        callback: (n: number) => {
          got += n;
          if (got >= m.bytes) {
            got = 0;
            sock.write(new Uint8Array(1));
          }
          return true;
        },
      },
    });
    sock.on('error', () => undefined);
    send('connected');
  });
  process.on('disconnect', () => process.exit(0));
}

/** Times of `reps` bursts of `bytes` (after one warm-up), ms, sorted; each after `quietMs` of quiet. */
export async function burstFloor(bytes: number, reps: number, quietMs = 300): Promise<number[]> {
  const child = fork(fileURLToPath(import.meta.url), [], { env: { ...process.env, FERRY_BENCH_BURST: '1' }, stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
  const server = net.createServer();
  try {
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    pinServer(server); // the accepted socket sends the bursts
    const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
    child.send({ port: (server.address() as net.AddressInfo).port, bytes });
    const sock = await accepted;
    sock.setNoDelay(true);
    const data = new Uint8Array(new SharedArrayBuffer(bytes));
    for (let at = 0; at < bytes; at += 65536) randomFillSync(data, at, Math.min(65536, bytes - at));
    const times: number[] = [];
    for (let i = -1; i < reps; i++) {
      await new Promise((r) => setTimeout(r, quietMs));
      const t0 = performance.now();
      const answered = new Promise<void>((r) => sock.once('data', () => r()));
      for (let at = 0; at < bytes; at += MiB) {
        if (!sock.write(data.subarray(at, Math.min(bytes, at + MiB)))) await new Promise<void>((r) => sock.once('drain', () => r()));
      }
      await answered;
      if (i >= 0) times.push(performance.now() - t0);
    }
    sock.destroy();
    return times.sort((a, b) => a - b);
  } finally {
    server.close();
    child.kill();
  }
}
