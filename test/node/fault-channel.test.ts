/**
 * Post-copy faults fetched by the vCPU's own thread (vm/fault-channel.ts) over a connection taken
 * off its event loop (transport/tcp.ts detachTcp, net/blocking-socket.ts). Real sockets, real
 * threads at the source; this test's thread plays the vCPU, which blocks while it fetches.
 */
import { getPriority, setPriority } from 'node:os';
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { xxh3 } from '@node-rs/xxhash';
import { PRESENCE_MAP_OFFSET, RESERVED_BYTES, RESERVED_PAGES } from '../../src/core/abi.js';
import { Bitmap } from '../../src/core/bitmap.js';
import { FrameDecoder } from '../../src/core/protocol/decoder.js';
import { encodeFrame } from '../../src/core/protocol/encode.js';
import { FramedConnection } from '../../src/core/transport/framed.js';
import type { Connection } from '../../src/core/transport/transport.js';
import type { FaultThreadEvents } from '../../src/core/engine/types.js';
import { FaultThreadListener, SourceFaultThreads, type NodeDestinationFaultLink } from '../../src/node/engine/fault-thread.js';
import { BlockingSocket, BlockingSocketError, SendPacer } from '../../src/node/net/blocking-socket.js';
import { LATENCY_SLICE_US, fairScheduling } from '../../src/node/fair-scheduling.js';
import { detachTcp, tcp } from '../../src/node/transport/tcp.js';
import { joinedFaultThread } from '../helpers/fault-listener.js';
import { FaultChannelBlock, FaultFetcher, LOG_READ_MS, rehearseFaultPath } from '../../src/node/vm/fault-channel.js';
import { SharedGuestMemory } from '../../src/node/vm/memory-access.js';

const PAGE = 4096;

/** A VM's memory as both ends see it: `pages` guest pages after the reserved area. */
function memory(pages: number): { buffer: SharedArrayBuffer; bytes: Uint8Array; presence: Uint8Array; page: (p: number) => Uint8Array } {
  const buffer = new SharedArrayBuffer(RESERVED_BYTES + pages * PAGE);
  const bytes = new Uint8Array(buffer);
  return {
    buffer, bytes,
    presence: new Uint8Array(buffer, PRESENCE_MAP_OFFSET + RESERVED_PAGES, pages),
    page: (p) => bytes.subarray(RESERVED_BYTES + p * PAGE, RESERVED_BYTES + (p + 1) * PAGE),
  };
}

/** A destination's fault thread and a source's fault threads, both ended with the test. */
async function bothEnds(t: TestContext): Promise<{ listener: FaultThreadListener; threads: SourceFaultThreads; port: number }> {
  const listener = new FaultThreadListener('127.0.0.1');
  const threads = new SourceFaultThreads();
  t.after(async () => {
    await listener.close();
    await threads.close();
  });
  return { listener, threads, port: await listener.port() };
}

const until = async (ok: () => boolean, what: string) => {
  for (let i = 0; i < 400 && !ok(); i++) await new Promise((r) => setTimeout(r, 5));
  assert.ok(ok(), what);
};

/**
 * The destination's side of a joined, detached link: guest memory with the `absent` pages missing,
 * the vCPU's channel block holding the detached socket, and the fault thread started on them.
 */
function destinationSide(link: NodeDestinationFaultLink, pages: number, absent: number[], events: FaultThreadEvents): { dst: ReturnType<typeof memory>; block: FaultChannelBlock } {
  const dst = memory(pages);
  dst.presence.fill(1);
  for (const p of absent) dst.presence[p] = 0;
  const block = FaultChannelBlock.create(pages);
  block.setSocket(link.fd!);
  link.start({ memory: dst.buffer, ctl: new SharedArrayBuffer(64), channel: block.buffer, pages }, events);
  return { dst, block };
}

test('detachTcp: the connection outlives its node:net socket, and a blocking socket carries both directions', async (t) => {
  let peer: Connection | null = null;
  const listener = await tcp().listen({ onConnection: (c) => { peer = c; } });
  t.after(() => listener.close());
  const conn = await tcp().dial(listener.address);
  await until(() => peer !== null, 'accepted');
  const fd = await detachTcp(conn);
  const socket = new BlockingSocket(fd);
  t.after(() => socket.close());
  assert.equal(await conn.closed, undefined, 'the Connection is done, without an error');
  await assert.rejects(conn.write(new Uint8Array(1)), { code: 'ERR_TRANSPORT_CLOSED' });

  const framed = new FramedConnection(peer!);
  socket.sendAll(encodeFrame({ type: 'PING', seq: 7, time: 1.5 }));
  assert.deepEqual(await framed.next(), { type: 'PING', seq: 7, time: 1.5 });
  await framed.send({ type: 'PONG', seq: 7, time: 1.5 });
  const into = new Uint8Array(256);
  const decoder = new FrameDecoder();
  const got = [];
  while (got.length === 0) {
    const n = socket.recvSome(into, 1000);
    assert.ok(n > 0, 'bytes arrive');
    got.push(...decoder.push(into.subarray(0, n)));
  }
  assert.deepEqual(got, [{ type: 'PONG', seq: 7, time: 1.5 }]);
  assert.equal(socket.recvSome(into, 10), -1, 'nothing more: the wait times out');
  await framed.close();
  assert.equal(socket.recvSome(into, 1000), 0, 'the peer’s end is read as 0 bytes');
});

test('detachTcp refuses what is not a TCP connection, and a connection already closed, by name', async (t) => {
  await assert.rejects(detachTcp({ constructor: { name: 'MemoryConnection' } } as unknown as Connection), { code: 'ERR_INVALID_ARGUMENT' });
  const listener = await tcp().listen({ onConnection: () => undefined });
  t.after(() => listener.close());
  const conn = await tcp().dial(listener.address);
  conn.abort();
  await assert.rejects(detachTcp(conn), { code: 'ERR_TRANSPORT_CLOSED' });
  assert.throws(() => new BlockingSocket(-1), BlockingSocketError);
});

test('post-copy, vCPU-fetched faults: the page comes from the source thread into guest memory, present pages are never overwritten, the fault thread reports each install', async (t) => {
  const pages = 64;
  const { listener, threads, port } = await bothEnds(t);
  const token = '3c'.repeat(16);
  const link = listener.expect(token) as NodeDestinationFaultLink;

  // The source: every page filled with its own number; page 9 zero, page 11 reported free.
  const src = memory(pages);
  for (let p = 0; p < pages; p++) src.page(p).fill(p === 9 ? 0 : p + 1);
  const sourceLink = await threads.open('127.0.0.1', port, token, () => ({ buffer: src.buffer, pages }));
  await until(() => link.joined, 'the fault connection joined');
  assert.ok(link.fd !== null && link.fd >= 0, 'an unshaped connection is detached for the vCPU');
  const soft = new Bitmap(pages);
  soft.set(11);
  const served: number[] = [];
  sourceLink.serve(soft, (p) => served.push(...p), (e) => assert.fail(e));

  // The destination: pages 3, 9 and 20 absent; page 4 present with the guest's own content.
  const installed: [number, bigint, number | null][] = [];
  const failures: Error[] = [];
  const { dst, block } = destinationSide(link, pages, [3, 9, 20], {
    installed: (page, hash, waited) => installed.push([page, hash, waited]),
    failed: (e) => failures.push(e),
  });
  dst.page(4).fill(0xee);
  // The session's own thread may install a page while the vCPU waits for it: `push` plays that
  // when the vCPU next looks whether it should stop (it looks before each wait).
  let push: (() => void) | null = null;
  const whileWaiting: { nice: number; sliceUs: number }[] = [];
  const stopping = () => {
    whileWaiting.push(fairScheduling());
    push?.();
    return false;
  };
  // An answer that lost the claim to the session's thread waits for that thread's install.
  const awaited: number[] = [];
  const awaitInstall = (physical: number) => {
    awaited.push(physical);
    push?.();
  };
  // While it waits for a page the vCPU runs at the fault threads' nice value (one below its own
  // here), where it may raise itself (root or CAP_SYS_NICE); back at its own once the page is in.
  const own = getPriority(0);
  const raised = own - 1;
  const mayRaise = (() => {
    try {
      setPriority(0, raised);
      setPriority(0, own);
      return true;
    } catch {
      return false;
    }
  })();
  // And with the kernel's shortest slice, where the kernel keeps slices of its own (Linux ≥ 6.12).
  const ownSlice = fairScheduling().sliceUs;
  const fetcher = new FaultFetcher({ block, memory: () => dst.buffer, pages, stopping, waitNice: raised, shape: null, awaitInstall });

  assert.equal(fetcher.fetch(3 + RESERVED_PAGES), true);
  assert.ok(whileWaiting.length > 0 && whileWaiting.every((x) => x.nice === (mayRaise ? raised : own)), `waited at nice ${whileWaiting.map((x) => x.nice).join(', ')}`);
  if (ownSlice > 0) assert.ok(whileWaiting.every((x) => x.sliceUs === LATENCY_SLICE_US), `waited with slices of ${whileWaiting.map((x) => x.sliceUs).join(', ')} µs`);
  // Raised until the quantum ends (the vCPU loop calls relax there): the guest runs on with its page first.
  if (mayRaise) assert.equal(getPriority(0), raised, 'still raised after the wait');
  fetcher.relax();
  assert.deepEqual(fairScheduling(), { nice: own, sliceUs: ownSlice }, 'back at its own nice value and slice at the quantum’s end');
  assert.ok(dst.page(3).every((b) => b === 4), 'page 3 holds the source’s content');
  assert.equal(dst.presence[3], 1);
  assert.equal(fetcher.fetch(9 + RESERVED_PAGES), true);
  assert.ok(dst.page(9).every((b) => b === 0) && dst.presence[9] === 1, 'a zero page arrives as zero');
  assert.equal(fetcher.fetch(pages + RESERVED_PAGES), false, 'a page beyond the VM is not asked for (the access traps)');
  assert.equal(fetcher.fetch(2), false, 'nor is one in the reserved area');
  assert.deepEqual(awaited, [], 'answers that were installed need no other wait');
  // Page 20 claimed by the session's own thread (a push under way) before the answer comes: the
  // answer is not installed, and the vCPU waits for the push's install (nothing more comes on
  // its socket), then runs on.
  assert.equal(block.claim(20), true);
  push = () => {
    if (awaited.length === 0) return;
    dst.page(20).fill(0xaa);
    dst.presence[20] = 1;
  };
  assert.equal(fetcher.fetch(20 + RESERVED_PAGES), true);
  push = null;
  assert.deepEqual(awaited, [20 + RESERVED_PAGES], 'the vCPU waited for the install of page 20');
  assert.ok(dst.page(20).every((b) => b === 0xaa), 'the pushed content stays: the answer lost the claim');
  assert.ok(dst.page(4).every((b) => b === 0xee), 'a present page keeps what the guest wrote');
  fetcher.relax();

  await until(() => installed.length >= 3, 'the fault thread reported the installs');
  assert.deepEqual(installed.map(([p]) => p), [3, 9, 20]);
  assert.equal(installed[0][1], xxh3.xxh64(src.page(3)), 'the hash is the digest hash of what was installed');
  assert.equal(installed[2][1], 0n, 'page 20: only the wait is news (the push reports its hash)');
  assert.ok(installed.every(([, , ms]) => ms !== null && ms >= 0), 'each was a fault, with its service time');
  await until(() => served.length >= 3, 'the source counted what it served');
  assert.deepEqual(served, [3, 9, 20]);
  assert.deepEqual(failures, []);

  // The session ends: the thread takes the socket back; the vCPU no longer fetches on it.
  await link.close();
  await sourceLink.close();
  dst.presence[30] = 0;
  assert.equal(fetcher.fetch(30 + RESERVED_PAGES), false, 'no socket any more: the vCPU waits as without a channel');
  assert.ok(LOG_READ_MS > 0);
});

test('post-copy, vCPU-fetched faults: a source that answers with a frame the fault channel does not carry fails the session by name', async (t) => {
  const pages = 8;
  // A source of the test's own: it answers the first request with a RESUMED.
  const { link, source } = await joinedFaultThread(t, '4d'.repeat(16));
  await until(() => link.fd !== null, 'detached');
  const failures: Error[] = [];
  const { dst, block } = destinationSide(link, pages, [5], { installed: () => undefined, failed: (e) => failures.push(e) });
  // The answer is on its way before the vCPU asks (this thread blocks while it fetches).
  await source.send({ type: 'RESUMED', pagesMissing: 0 });
  const fetcher = new FaultFetcher({ block, memory: () => dst.buffer, pages, stopping: () => false, waitNice: null, shape: null, awaitInstall: () => assert.fail('nothing was answered') });
  assert.equal(fetcher.fetch(5 + RESERVED_PAGES), false, 'the channel failed: the vCPU waits as without one');
  assert.equal(dst.presence[5], 0, 'nothing was installed');
  await until(() => failures.length > 0, 'the failure reached the session');
  assert.equal((failures[0] as { code?: string }).code, 'ERR_PROTOCOL_SEQUENCE');
  assert.match(failures[0].message, /RESUMED on the fault channel/);
  await link.close();
});

test('a fault link shape that shapes nothing (no bandwidth, latency 0) is no shape: the connection is detached for the vCPU', async (t) => {
  const { link } = await joinedFaultThread(t, '6e'.repeat(16), { latencyMs: 0 });
  await until(() => link.fd !== null, 'detached');
  assert.ok(link.fd !== null && link.fd >= 0);
});

test('a shaped fault link (a one-way latency each way) is detached too: the vCPU and the source thread pace their own sends, and a fault takes the link’s round trip', async (t) => {
  const pages = 16;
  const latencyMs = 15;
  const { listener, threads, port } = await bothEnds(t);
  listener.shape = { latencyMs };
  const token = '5d'.repeat(16);
  const link = listener.expect(token) as NodeDestinationFaultLink;
  assert.deepEqual(link.shape, { latencyMs }, 'the vCPU is told the shape of its requests');
  const src = memory(pages);
  for (let p = 0; p < pages; p++) src.page(p).fill(p + 1);
  const sourceLink = await threads.open('127.0.0.1', port, token, () => ({ buffer: src.buffer, pages }), { latencyMs });
  await until(() => link.joined, 'the fault connection joined');
  assert.ok(link.fd !== null && link.fd >= 0, 'a shaped connection is detached for the vCPU as well');
  sourceLink.serve(new Bitmap(pages), () => undefined, (e) => assert.fail(e));
  const waits: number[] = [];
  const { dst, block } = destinationSide(link, pages, [6], { installed: (_p, _h, ms) => waits.push(ms ?? NaN), failed: (e) => assert.fail(e) });
  const fetcher = new FaultFetcher({ block, memory: () => dst.buffer, pages, stopping: () => false, waitNice: null, shape: link.shape, awaitInstall: () => assert.fail('no push here') });
  const t0 = performance.now();
  assert.equal(fetcher.fetch(6 + RESERVED_PAGES), true);
  const took = performance.now() - t0;
  assert.ok(dst.page(6).every((b) => b === 7), 'page 6 holds the source’s content');
  // The request waits one latency before it leaves, the answer another: the round trip of the link.
  assert.ok(took >= 2 * latencyMs, `the fault took ${took.toFixed(1)} ms, under the link's round trip of ${2 * latencyMs} ms`);
  await until(() => waits.length === 1, 'the fault thread reported the install');
  assert.ok(waits[0] >= 2 * latencyMs, `service time ${waits[0]} ms`);
  await link.close();
  await sourceLink.close();
});

test('SendPacer: a blocking sender waits out the latency before each send and keeps to the cap over many', () => {
  const latency = new SendPacer({ latencyMs: 8 });
  let t0 = performance.now();
  latency.before(100);
  assert.ok(performance.now() - t0 >= 8, 'one latency before the send');
  // 1 MB/s with a 64 KiB bucket: 64 KiB go at once, the next 192 KiB take 192 ms.
  const capped = new SendPacer({ bandwidthBytesPerSec: 1e6, burstBytes: 65536 });
  t0 = performance.now();
  for (let i = 0; i < 4; i++) capped.before(65536);
  assert.ok(performance.now() - t0 >= 196, `4 × 64 KiB at 1 MB/s with 64 KiB of bucket took ${(performance.now() - t0).toFixed(0)} ms`);
});

test('source fault threads: each session has a thread of its own; one that ends starts the next session’s, which the next open takes; close ends them all', async (t) => {
  const { listener, threads, port } = await bothEnds(t);
  const open = async (token: string) => {
    const expected = listener.expect(token);
    const link = await threads.open('127.0.0.1', port, token, () => ({ buffer: new SharedArrayBuffer(8), pages: 0 }));
    return { link, expected };
  };
  const first = await open('7a'.repeat(16));
  await until(() => threads.threads === 1, 'one thread: the session’s');
  await first.link.close();
  await first.expected.close();
  // The second session takes the spare the first one's end started: one thread, once the first
  // session's has gone (a second thread started for it would stay beside the spare).
  const second = await open('7b'.repeat(16));
  await until(() => threads.threads === 1, 'the second session took the spare');
  await second.link.close();
  await second.expected.close();
  await threads.close();
  await until(() => threads.threads === 0, 'close ended the spare too');
  await assert.rejects(threads.open('127.0.0.1', port, '7c'.repeat(16), () => ({ buffer: new SharedArrayBuffer(8), pages: 0 })), { code: 'ERR_MIGRATION_FAULT_THREAD' });
});

test('post-copy, vCPU-fetched faults: several absent pages come with one request, each installed once, the first reported as the wait', async (t) => {
  const pages = 32;
  const { listener, threads, port } = await bothEnds(t);
  const token = '5e'.repeat(16);
  const link = listener.expect(token) as NodeDestinationFaultLink;
  const src = memory(pages);
  for (let p = 0; p < pages; p++) src.page(p).fill(p + 1);
  const sourceLink = await threads.open('127.0.0.1', port, token, () => ({ buffer: src.buffer, pages }));
  await until(() => link.joined, 'the fault connection joined');
  const requests: number[][] = [];
  sourceLink.serve(new Bitmap(pages), (p) => requests.push([...p]), (e) => assert.fail(e));
  const installed: [number, number | null][] = [];
  const { dst, block } = destinationSide(link, pages, [3, 5, 7, 9], { installed: (page, _hash, waited) => installed.push([page, waited]), failed: (e) => assert.fail(e) });
  const fetcher = new FaultFetcher({ block, memory: () => dst.buffer, pages, stopping: () => false, waitNice: null, shape: null, awaitInstall: () => undefined });

  assert.equal(fetcher.fetchAll([5, 3, 7].map((p) => p + RESERVED_PAGES)), true);
  for (const p of [3, 5, 7]) {
    assert.equal(dst.presence[p], 1, `page ${p} present`);
    assert.ok(dst.page(p).every((b) => b === p + 1), `page ${p} holds the source's content`);
  }
  assert.equal(dst.presence[9], 0, 'a page not asked for stays absent');
  await until(() => requests.length >= 1 && installed.length >= 3, 'the source served it and the fault thread reported the installs');
  assert.deepEqual(requests, [[5, 3, 7]], 'one request for the three pages');
  assert.deepEqual(installed.map(([p]) => p).sort((a, b) => a - b), [3, 5, 7]);
  assert.deepEqual(installed.filter(([, w]) => w !== null).map(([p]) => p), [5], 'one wait, the first page’s: the vCPU stopped once');
  assert.equal(fetcher.fetchAll([]), false, 'nothing to ask for');
  assert.equal(fetcher.fetchAll([9 + RESERVED_PAGES, pages + RESERVED_PAGES]), false, 'a page beyond the VM: nothing is asked for');
  assert.equal(dst.presence[9], 0);
  fetcher.relax();
  await link.close();
  await sourceLink.close();
});

test('host code on the vCPU thread (devices) waits once for a range of absent pages, and per page without a way to ask for several', () => {
  const pages = 16;
  const memory = new WebAssembly.Memory({ initial: RESERVED_BYTES / 65536 + 1, maximum: RESERVED_BYTES / 65536 + 1, shared: true });
  const presence = new Uint8Array(memory.buffer, PRESENCE_MAP_OFFSET, RESERVED_PAGES + pages);
  const absent = [2, 3, 4, 6, 12];
  const reset = () => {
    presence.fill(1);
    for (const p of absent) presence[RESERVED_PAGES + p] = 0;
  };
  const calls: string[] = [];
  const fault = (phys: number) => { calls.push(`one ${phys - RESERVED_PAGES}`); presence[phys] = 1; };
  const faultAll = (phys: number[]) => { calls.push(`all ${phys.map((p) => p - RESERVED_PAGES).join(',')}`); for (const p of phys) presence[p] = 1; };

  reset();
  const mem = new SharedGuestMemory(memory, fault, faultAll);
  mem.checkPresence = true;
  assert.equal(mem.view(1 * PAGE + 100, 7 * PAGE).length, 7 * PAGE); // pages 1-8
  assert.equal(mem.readU32(12 * PAGE), 0);
  mem.view(3 * PAGE, 2 * PAGE); // present by now: no wait
  assert.deepEqual(calls, ['all 2,3,4,6', 'one 12']);

  calls.length = 0;
  reset();
  const perPage = new SharedGuestMemory(memory, fault);
  perPage.checkPresence = true;
  perPage.view(1 * PAGE + 100, 7 * PAGE);
  assert.deepEqual(calls, ['one 2', 'one 3', 'one 4', 'one 6']);
});

test('rehearseFaultPath runs a request and its answer through the code a fault takes, installing into scratch memory', () => {
  // A raw page and a zero page, each installed once (the threads that serve and take faults run
  // it while they stand by, so a real fault after a resume finds that code warm).
  assert.equal(rehearseFaultPath(), 2);
  assert.equal(rehearseFaultPath(), 2, 'each rehearsal has scratch memory of its own');
});
