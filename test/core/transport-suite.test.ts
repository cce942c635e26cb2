/**
 * The transport compliance suite: one function of `{ setup, teardown }`, applied to every
 * Transport implementation (memory in transport-memory.test.ts, TCP in test/node/transport-tcp.test.ts).
 * This file registers no tests of its own.
 */
import { describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { setImmediate as tick } from 'node:timers/promises';
import { AbortError } from '../../src/core/errors.js';
import { TransportError, TransportErrorCode, type Connection, type Listener, type Transport } from '../../src/core/transport/index.js';

export interface TransportSuiteInit {
  setup(): Promise<Transport>;
  teardown?(): Promise<void>;
  /** One write this large must wait while the peer does not read (beyond all of the transport's buffers). */
  backpressureBytes: number;
  /**
   * Bound on bytes written (with their write promises resolved) but not yet read by the peer.
   * Omitted for transports whose bound depends on the OS (TCP: kernel socket buffers).
   */
  maxInFlightBytes?: number;
  /**
   * A reset reaching a peer that is not reading (paused by backpressure) may end its iteration
   * like a clean end of stream — TCP on Linux does this. Its writes must still fail with RESET.
   */
  resetMayLookLikeEnd?: boolean;
  /** Size of the large one-way transfer (default 64 MiB). */
  largeTransferBytes?: number;
}

/** Deterministic content: a byte depends on its position and the stream's seed, so loss, reordering and duplication all show. */
export function patternByte(seed: number, i: number): number {
  return (i * 131 + seed * 17 + (i >>> 16)) & 0xff;
}

export function fillPattern(seed: number, offset: number, n: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = patternByte(seed, offset + i);
  return b;
}

/** Reads to the end, checking the pattern; returns the byte count. */
async function readPattern(conn: Connection, seed: number, onChunk?: (received: number) => void | Promise<void>): Promise<number> {
  let n = 0;
  for await (const chunk of conn) {
    assert.ok(chunk instanceof Uint8Array);
    for (let i = 0; i < chunk.length; i++) {
      if (chunk[i] !== patternByte(seed, n + i)) assert.fail(`byte ${n + i} is ${chunk[i]}, expected ${patternByte(seed, n + i)}`);
    }
    n += chunk.length;
    await onChunk?.(n);
  }
  return n;
}

/** Writes `total` pattern bytes in pseudo-random write sizes (1 B … 1 MiB), awaiting each. */
async function writePattern(conn: Connection, seed: number, total: number): Promise<void> {
  let x = seed + 1;
  for (let off = 0; off < total;) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    const n = Math.min(total - off, x % 7 === 0 ? 1 + (x % 13) : 1 + (x % (1 << 20)));
    await conn.write(fillPattern(seed, off, n));
    off += n;
  }
}

async function ticks(n: number): Promise<void> {
  for (let i = 0; i < n; i++) await tick();
}

function isTransportError(code: string, causeMessage?: string) {
  return (e: unknown) => {
    assert.ok(e instanceof TransportError, `expected TransportError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    if (causeMessage !== undefined) assert.equal((e.cause as Error | undefined)?.message, causeMessage);
    return true;
  };
}

async function drain(conn: Connection): Promise<number> {
  let n = 0;
  for await (const c of conn) n += c.length;
  return n;
}

/** The peer of an aborted connection: its reading fails (or, if allowed, ends) and its writes fail with RESET. */
async function expectReset(conn: Connection, mayLookLikeEnd: boolean): Promise<void> {
  try {
    await drain(conn);
    if (!mayLookLikeEnd) assert.fail('reading ended cleanly after the peer aborted');
  } catch (e) {
    isTransportError(TransportErrorCode.RESET)(e);
  }
  // The OS may accept a few writes before it reports the reset.
  let err: unknown;
  for (let i = 0; i < 1000 && err === undefined; i++) {
    try {
      await conn.write(new Uint8Array(1024));
      await ticks(1);
    } catch (e) {
      err = e;
    }
  }
  isTransportError(TransportErrorCode.RESET)(err);
  assert.equal((await conn.closed)?.code, TransportErrorCode.RESET);
}

export function transportComplianceSuite(name: string, init: TransportSuiteInit): void {
  const large = init.largeTransferBytes ?? 64 << 20;

  describe(`${name}: transport compliance`, () => {
    interface World { transport: Transport; listener: Listener; accepted: Connection[]; conns: Connection[]; connect(): Promise<[Connection, Connection]> }

    async function world(): Promise<World> {
      const transport = await init.setup();
      const accepted: Connection[] = [];
      const waiting: ((c: Connection) => void)[] = [];
      const listener = await transport.listen({
        onConnection(c) {
          const w = waiting.shift();
          if (w) w(c);
          else accepted.push(c);
        },
      });
      const conns: Connection[] = [];
      return {
        transport, listener, accepted, conns,
        async connect() {
          const theirs = accepted.length > 0 ? Promise.resolve(accepted.shift()!) : new Promise<Connection>((r) => waiting.push(r));
          const ours = await transport.dial(listener.address);
          const pair: [Connection, Connection] = [ours, await theirs];
          conns.push(...pair);
          return pair;
        },
      };
    }

    async function done(w: World): Promise<void> {
      for (const c of w.conns) c.abort();
      await w.listener.close();
      await init.teardown?.();
    }

    async function withWorld(fn: (w: World) => Promise<void>): Promise<void> {
      const w = await world();
      try {
        await fn(w);
      } finally {
        await done(w);
      }
    }

    test(`bytes arrive in order and intact, ${large >> 20} MiB one way while 4 MiB go the other`, () => withWorld(async (w) => {
      const [a, b] = await w.connect();
      const results = await Promise.all([
        writePattern(a, 1, large).then(() => a.close()),
        writePattern(b, 2, 4 << 20).then(() => b.close()),
        readPattern(b, 1),
        readPattern(a, 2),
      ]);
      assert.equal(results[2], large);
      assert.equal(results[3], 4 << 20);
      assert.equal(await a.closed, undefined);
      assert.equal(await b.closed, undefined);
    }));

    test('addresses: each end names the other', () => withWorld(async (w) => {
      const [a, b] = await w.connect();
      assert.equal(typeof a.localAddress, 'string');
      assert.equal(a.remoteAddress, b.localAddress);
      assert.equal(b.remoteAddress, a.localAddress);
      assert.equal(a.remoteAddress, w.listener.address);
    }));

    test('a write waits while the peer does not read, and resolves as it reads (backpressure)', () => withWorld(async (w) => {
      const [a, b] = await w.connect();
      void b.close();
      const total = init.backpressureBytes;
      let resolved = false;
      const p = a.write(fillPattern(3, 0, total)).then(() => { resolved = true; });
      await ticks(50);
      assert.equal(resolved, false, 'write resolved although nobody read');
      void p.then(() => a.close());
      // Read a chunk at a time, letting the event loop settle before each read, so the read
      // after which the write resolved is known exactly.
      const it = b[Symbol.asyncIterator]();
      let received = 0;
      let receivedAtResolve = -1;
      for (;;) {
        await ticks(2);
        if (resolved && receivedAtResolve < 0) receivedAtResolve = received;
        const r = await it.next();
        if (r.done) break;
        for (let i = 0; i < r.value.length; i++) if (r.value[i] !== patternByte(3, received + i)) assert.fail(`byte ${received + i} differs`);
        received += r.value.length;
      }
      assert.equal(received, total);
      assert.ok(receivedAtResolve > 0, 'write resolved before the peer read anything');
      if (init.maxInFlightBytes !== undefined) {
        assert.ok(total - receivedAtResolve <= init.maxInFlightBytes, `${total - receivedAtResolve} bytes unread when the write resolved (bound ${init.maxInFlightBytes})`);
      }
      assert.equal(await b.closed.then(() => a.closed), undefined);
    }));

    test('a writer awaiting each write stays within the in-flight bound of a slow reader', (t: TestContext) => {
      if (init.maxInFlightBytes === undefined) {
        t.skip('the in-flight bound of this transport depends on OS buffers');
        return;
      }
      const bound = init.maxInFlightBytes;
      return withWorld(async (w) => {
        const [a, b] = await w.connect();
        let written = 0;
        const writer = (async () => {
          for (let i = 0; i < 64; i++) {
            await a.write(fillPattern(4, written, 65536));
            written += 65536;
          }
          await a.close();
        })();
        let worst = 0;
        const n = await readPattern(b, 4, async (read) => {
          worst = Math.max(worst, written - read);
          await ticks(2);
        });
        await writer;
        assert.equal(n, 64 * 65536);
        assert.ok(worst <= bound + 65536, `writer ran ${worst} bytes ahead (bound ${bound} + one write)`);
      });
    });

    test('close ends the peer\'s reading; the other direction stays open until it closes too', () => withWorld(async (w) => {
      const [a, b] = await w.connect();
      await a.write(fillPattern(5, 0, 1000));
      await a.close();
      await a.close(); // idempotent
      await assert.rejects(a.write(new Uint8Array(1)), isTransportError(TransportErrorCode.CLOSED));
      assert.equal(await readPattern(b, 5), 1000);
      await b.write(fillPattern(6, 0, 2000));
      const back = readPattern(a, 6);
      await b.close();
      assert.equal(await back, 2000);
      assert.equal(await a.closed, undefined);
      assert.equal(await b.closed, undefined);
      await assert.rejects(b.write(new Uint8Array(1)), isTransportError(TransportErrorCode.CLOSED));
      a.abort(); // after a clean close: no effect
      assert.equal(await a.closed, undefined);
    }));

    test('abort fails this end with ERR_TRANSPORT_ABORTED and the peer with ERR_TRANSPORT_RESET', () => withWorld(async (w) => {
      const [a, b] = await w.connect();
      await a.write(fillPattern(7, 0, 100));
      const first = await b[Symbol.asyncIterator]().next();
      assert.equal(first.done, false);
      const boom = new Error('boom');
      a.abort(boom);
      a.abort(new Error('second abort is ignored'));
      await assert.rejects(a[Symbol.asyncIterator]().next(), isTransportError(TransportErrorCode.ABORTED, 'boom'));
      await assert.rejects(a.write(new Uint8Array(1)), isTransportError(TransportErrorCode.ABORTED));
      await assert.rejects(a.close(), isTransportError(TransportErrorCode.ABORTED));
      const ea = await a.closed;
      assert.equal(ea?.code, TransportErrorCode.ABORTED);
      await expectReset(b, false);
    }));

    test('abort rejects a write that is waiting for the reader', () => withWorld(async (w) => {
      const [a, b] = await w.connect();
      const p = a.write(fillPattern(8, 0, init.backpressureBytes));
      await ticks(20);
      a.abort();
      await assert.rejects(p, isTransportError(TransportErrorCode.ABORTED));
      // b's reading is paused by backpressure at this point.
      await expectReset(b, init.resetMayLookLikeEnd ?? false);
    }));

    test('the peer may abort after we closed our side', () => withWorld(async (w) => {
      const [a, b] = await w.connect();
      await a.close();
      assert.equal(await drain(b), 0);
      b.abort(new Error('changed my mind'));
      await assert.rejects(drain(a), isTransportError(TransportErrorCode.RESET));
      assert.equal((await a.closed)?.code, TransportErrorCode.RESET);
    }));

    test('many connections to one listener stay apart', () => withWorld(async (w) => {
      const pairs = await Promise.all(Array.from({ length: 8 }, () => w.connect()));
      // Each stream starts with its seed byte so the accepting side can check it without knowing the order.
      await Promise.all(pairs.map(async ([a, b], i) => {
        const seed = 10 + i;
        const [, n] = await Promise.all([
          (async () => { await a.write(new Uint8Array([seed])); await writePattern(a, seed, 256 * 1024); await a.close(); })(),
          (async () => {
            const it = b[Symbol.asyncIterator]();
            const first = await it.next();
            assert.equal(first.done, false);
            const head = first.value as Uint8Array;
            assert.equal(head[0], seed);
            let count = 0;
            const check = (c: Uint8Array) => { for (let k = 0; k < c.length; k++) assert.equal(c[k], patternByte(seed, count + k)); count += c.length; };
            check(head.subarray(1));
            for (let r = await it.next(); !r.done; r = await it.next()) check(r.value);
            return count;
          })(),
        ]);
        assert.equal(n, 256 * 1024);
        await b.close();
      }));
    }));

    test('dialling where nobody listens is refused with ERR_TRANSPORT_REFUSED', () => withWorld(async (w) => {
      const other = await w.transport.listen({ onConnection: (c) => c.abort() });
      const address = other.address;
      await other.close();
      await other.close(); // idempotent
      await assert.rejects(w.transport.dial(address), isTransportError(TransportErrorCode.REFUSED));
    }));

    test('dial and listen honour an aborted AbortSignal', () => withWorld(async (w) => {
      const ac = new AbortController();
      ac.abort(new Error('stop'));
      await assert.rejects(w.transport.dial(w.listener.address, { signal: ac.signal }), AbortError);
      await assert.rejects(w.transport.listen({ onConnection: (c) => c.abort(), signal: ac.signal }), AbortError);
    }));

    test('a listener closed through its AbortSignal stops accepting', () => withWorld(async (w) => {
      const ac = new AbortController();
      const l = await w.transport.listen({ onConnection: (c) => c.abort(), signal: ac.signal });
      ac.abort();
      await ticks(2);
      await assert.rejects(w.transport.dial(l.address), isTransportError(TransportErrorCode.REFUSED));
    }));
  });
}
