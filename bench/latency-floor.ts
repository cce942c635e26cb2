/**
 * The machine's own floor under post-copy fault latency: a 4 KiB request/response between two
 * processes over loopback TCP, each end a thread that does nothing else (it sleeps between
 * exchanges, so the scheduler favours it on wake-up), measured while nothing else runs and while
 * the two processes' main threads move a bulk stream between them — the shape of a post-copy push:
 * each exchanging thread scheduled as the fault threads are (`priority`, see FaultThreadPriority);
 * the sender copies each 1 MiB frame out of shared memory, the receiver copies each chunk into
 * shared memory. No engine code is involved; whatever tail these exchanges have, any user-space
 * design of the fault path on this machine has too (the engine serves faults on its main threads,
 * which also carry the push).
 *
 * The parent forks this file (FERRY_BENCH_FLOOR=1) for the far end; each end runs its exchanging
 * thread as a worker of this same file.
 */
import { fork } from 'node:child_process';
import net from 'node:net';
import { fileURLToPath } from 'node:url';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { raisePriority, type FaultThreadPriority } from '../src/node/engine/thread-priority.js';
import { connect, pinServer } from './congestion.js';

const PAGE = 4096;
const MiB = 1 << 20;

export interface ExchangeFloor {
  /** Round-trip times with the machine otherwise quiet, ms, sorted. */
  idle: number[];
  /** Round-trip times while the bulk stream runs, ms, sorted. */
  loaded: number[];
  /** Bulk stream rate during the loaded exchanges, bytes/s. */
  bulkBytesPerSec: number;
}

type Role = ({ role: 'responder' } | { role: 'requester'; port: number; exchanges: number; gapMs: number }) & { priority: FaultThreadPriority };

/** One exchange: an 8-byte request, answered with a page and a 16-byte head. */
const REPLY = PAGE + 16;

async function requester(port: number, exchanges: number, gapMs: number): Promise<number[]> {
  const s = connect(port, { noDelay: true });
  await new Promise<void>((r, j) => { s.once('connect', () => r()); s.once('error', j); });
  const rtts: number[] = [];
  const req = Buffer.alloc(8);
  for (let i = 0; i < exchanges; i++) {
    const t0 = performance.now();
    await new Promise<void>((resolve) => {
      let got = 0;
      const on = (d: Buffer) => {
        got += d.length;
        if (got >= REPLY) { s.off('data', on); resolve(); }
      };
      s.on('data', on);
      req.writeUInt32LE(i, 0);
      s.write(req);
    });
    rtts.push(performance.now() - t0);
    await new Promise((r) => setTimeout(r, gapMs));
  }
  s.destroy();
  return rtts.sort((a, b) => a - b);
}

function responder(): Promise<number> {
  const page = Buffer.alloc(REPLY, 0x5a);
  const server = net.createServer((s) => {
    s.setNoDelay(true);
    let pending = 0;
    s.on('data', (d) => {
      pending += d.length;
      for (; pending >= 8; pending -= 8) s.write(page);
    });
    s.on('error', () => undefined);
  });
  return new Promise((r) => server.listen(0, '127.0.0.1', () => r((pinServer(server).address() as net.AddressInfo).port)));
}

if (!isMainThread && (workerData as Role | undefined)?.role) {
  const w = workerData as Role;
  raisePriority(w.priority);
  if (w.role === 'responder') parentPort!.postMessage(await responder());
  else parentPort!.postMessage(await requester(w.port, w.exchanges, w.gapMs));
} else if (isMainThread && process.env.FERRY_BENCH_FLOOR === '1' && process.send) {
  // The far end: the responding thread, and a bulk sink that copies every chunk into shared memory.
  const worker = new Worker(fileURLToPath(import.meta.url), { workerData: { role: 'responder', priority: (process.env.FERRY_BENCH_FLOOR_PRIORITY ?? 'default') as FaultThreadPriority } satisfies Role });
  const port = await new Promise<number>((r) => worker.once('message', r));
  const memory = new Uint8Array(new SharedArrayBuffer(64 * MiB));
  const sink = net.createServer((s) => {
    let at = 0;
    s.on('data', (d) => {
      if (at + d.length > memory.length) at = 0;
      memory.set(d, at);
      at += d.length;
    });
    s.on('error', () => undefined);
  });
  await new Promise<void>((r) => sink.listen(0, '127.0.0.1', () => r()));
  process.send({ port, sink: (sink.address() as net.AddressInfo).port });
  process.on('disconnect', () => process.exit(0));
}

/**
 * Measures the exchange floor: `exchanges` round trips quiet, then as many under the bulk stream,
 * paced at `bulkBytesPerSec` (as fast as it goes when omitted).
 */
export async function exchangeFloor(exchanges: number, bulkBytesPerSec?: number, gapMs = 1, priority: FaultThreadPriority = 'default'): Promise<ExchangeFloor> {
  const child = fork(fileURLToPath(import.meta.url), [], { env: { ...process.env, FERRY_BENCH_FLOOR: '1', FERRY_BENCH_FLOOR_PRIORITY: priority }, stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
  try {
    const far = await new Promise<{ port: number; sink: number }>((resolve, reject) => {
      child.once('message', (m) => resolve(m as { port: number; sink: number }));
      child.once('exit', (code) => reject(new Error(`latency-floor process exited (${code})`)));
    });
    const exchange = async () => {
      const w = new Worker(fileURLToPath(import.meta.url), { workerData: { role: 'requester', port: far.port, exchanges, gapMs, priority } satisfies Role });
      const rtts = await new Promise<number[]>((resolve, reject) => { w.once('message', resolve); w.once('error', reject); });
      await w.terminate();
      return rtts;
    };
    const idle = await exchange();
    // The push: frames copied out of shared memory into one reused buffer, written with backpressure.
    const memory = new Uint8Array(new SharedArrayBuffer(64 * MiB));
    for (let i = 0; i < memory.length; i += PAGE) memory[i] = i & 0xff;
    const frame = Buffer.alloc(MiB);
    const bulk = connect(far.sink);
    await new Promise<void>((r) => bulk.once('connect', () => r()));
    let stop = false;
    let sent = 0;
    const t0 = performance.now();
    const pushing = (async () => {
      for (let at = 0; !stop; at = (at + MiB) % memory.length) {
        frame.set(memory.subarray(at, at + MiB));
        sent += MiB;
        // Each frame is copied before the next write; wait until the socket has taken it.
        await new Promise<void>((r) => bulk.write(frame, () => r()));
        const ahead = bulkBytesPerSec ? (sent / bulkBytesPerSec) * 1000 - (performance.now() - t0) : 0;
        if (ahead > 1) await new Promise((r) => setTimeout(r, ahead));
      }
    })();
    const loaded = await exchange();
    stop = true;
    await pushing;
    const rate = sent / ((performance.now() - t0) / 1000);
    bulk.destroy();
    return { idle, loaded, bulkBytesPerSec: rate };
  } finally {
    child.kill();
  }
}

/**
 * How long this machine takes to wake a thread: a worker blocked in Atomics.wait (a futex) after
 * 5–25 ms asleep, woken by this thread, which then spins on its own core until the worker says it
 * runs. Samples in ms, sorted. The floors above move bytes on one thread (raw TCP) or between two
 * threads that each wait once; a migration's downtime crosses threads and processes several times
 * in a row (pause, sender thread, hasher, vCPU boot and run, the answers back), each a wake like
 * this one. On a virtual machine whose idle vCPUs halt, the tail of this is the hypervisor's.
 */
export async function threadWake(samples: number): Promise<number[]> {
  const sab = new SharedArrayBuffer(32);
  const flag = new Int32Array(sab, 0, 2);
  const woke = new Float64Array(sab, 8, 1);
  const worker = new Worker(`
    const { workerData } = require('node:worker_threads');
    const flag = new Int32Array(workerData, 0, 2), woke = new Float64Array(workerData, 8, 1);
    for (let seen = 0; seen >= 0;) {
      Atomics.wait(flag, 0, seen);
      seen = Atomics.load(flag, 0);
      woke[0] = performance.timeOrigin + performance.now();
      Atomics.store(flag, 1, seen);
    }`, { eval: true, workerData: sab });
  try {
    const out: number[] = [];
    for (let k = 1; k <= samples; k++) {
      await new Promise((r) => setTimeout(r, 5 + Math.random() * 20));
      const t = performance.timeOrigin + performance.now();
      Atomics.store(flag, 0, k);
      Atomics.notify(flag, 0);
      const deadline = performance.now() + 1000;
      while (Atomics.load(flag, 1) !== k && performance.now() < deadline) { /* spin: this core stays busy */ }
      if (Atomics.load(flag, 1) === k) out.push(woke[0] - t);
    }
    return out.sort((a, b) => a - b);
  } finally {
    Atomics.store(flag, 0, -1);
    Atomics.notify(flag, 0);
    await worker.terminate();
  }
}
