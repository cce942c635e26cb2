/**
 * Data reduction and parallel streams in the migration engine, on real VMs: every codec set moves a
 * VM verified and says what it saved; parallel data streams and the post-copy fault channel over
 * real TCP; gang migration sending pages common to several VMs once; bad input refused by name.
 */
import { afterEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Vm } from '../../src/node/vm/vm.js';
import { InstrumentCache } from '../../src/node/vm/instrument.js';
import { guestsDir } from '../../src/node/paths.js';
import { migrateSource } from '../../src/core/engine/source.js';
import { MigrationAcceptor, serveDestination, type DestinationOutcome } from '../../src/core/engine/destination.js';
import { Gang, type CodecName } from '../../src/core/engine/codecs.js';
import { nodeEngineDeps, sourceVmOf } from '../../src/node/engine/adapters.js';
import type { EngineDeps, MigrationOptions, MigrationResult } from '../../src/core/engine/types.js';
import { FrameTypeId, HEADER_BYTES } from '../../src/core/protocol/frames.js';
import { encodeFrame } from '../../src/core/protocol/encode.js';
import { FramedConnection } from '../../src/core/transport/framed.js';
import { memoryPair } from '../../src/core/transport/memory.js';
import { tcp } from '../../src/node/transport/tcp.js';
import type { Connection } from '../../src/core/transport/transport.js';
import { FerryError } from '../../src/core/errors.js';
import { mulberry32 } from '../helpers/prng.js';
import { vmFactory } from '../helpers/destination.js';

const cache = new InstrumentCache();
const memstress = new Uint8Array(readFileSync(join(guestsDir(), 'memstress.wasm')));
const deps: EngineDeps = nodeEngineDeps();
const PAGE = 4096;
const MiB = 1 << 20;

/**
 * Every VM a test makes (sources, and destinations through `factory`) is stopped after it, pass or
 * fail: a vCPU thread left running keeps the test file from exiting (and CI waits for it).
 */
const sources: Vm[] = [];
const destinations: Vm[][] = [];
afterEach(async () => {
  for (const vm of [...sources.splice(0), ...destinations.splice(0).flat()]) await vm.stop().catch(() => undefined);
});
const factory = (made: Vm[]) => {
  destinations.push(made);
  return vmFactory(made, cache);
};

const WORDS = ['the', 'page', 'memory', 'migration', 'host', 'guest', 'dirty', 'round', 'copy', 'stream', 'delta', 'cache', 'of', 'and', 'to', 'a'];

/** Text-like page content (compressible), from a seeded generator. */
function textPage(rnd: () => number): Uint8Array {
  const s: string[] = [];
  let n = 0;
  while (n < PAGE) {
    const w = WORDS[Math.floor(rnd() * WORDS.length)];
    s.push(w);
    n += w.length + 1;
  }
  return new TextEncoder().encode(s.join(rnd() < 0.5 ? ' ' : '\n')).subarray(0, PAGE);
}

function randomPage(rnd: () => number): Uint8Array {
  const p = new Uint8Array(PAGE);
  for (let i = 0; i < PAGE; i += 4) new DataView(p.buffer).setUint32(i, Math.floor(rnd() * 2 ** 32));
  return p;
}

interface Content {
  /** Pages of the cold region (after the working set), as (index in region) → content. */
  cold(i: number): Uint8Array;
}

/**
 * A memstress VM writing into the first `wss` of a `mem` region; the rest of the region (the cold
 * part the guest never writes after its init) is overwritten with `content`.
 */
async function sourceVm(name: string, config: string, content?: Content): Promise<Vm> {
  const vm = Vm.create({ name, module: memstress, memoryBytes: 48 * MiB, config, cache });
  sources.push(vm);
  let line = '';
  vm.on('console', (l: string) => { if (l.startsWith('memstress: region')) line = l; });
  await vm.bootCold();
  for (let i = 0; i < 200 && !line; i++) await new Promise((r) => setTimeout(r, 5));
  const m = /region (\d+) mem=(\d+) wss=(\d+)/.exec(line);
  assert.ok(m, `memstress printed its region (${line})`);
  const [base, mem, wss] = [Number(m[1]), Number(m[2]), Number(m[3])];
  if (content) {
    const first = Math.ceil((base + wss) / PAGE);
    const end = Math.floor((base + mem) / PAGE);
    for (let p = first; p < end; p++) vm.pageView(p).set(content.cold(p - first));
  }
  await new Promise((r) => setTimeout(r, 20));
  return vm;
}

/** Cold pages: a third text, a third duplicates of a few pages, a third random. */
function mixed(seed: number): Content {
  const rnd = mulberry32(seed);
  const few = [0, 1, 2, 3].map(() => randomPage(rnd));
  return { cold: (i) => (i % 3 === 0 ? textPage(rnd) : i % 3 === 1 ? few[i % 4] : randomPage(rnd)) };
}

async function tcpDestination(onConn: (c: Connection) => void): Promise<{ address: string; close(): Promise<void> }> {
  const listener = await tcp().listen({ onConnection: onConn });
  return { address: listener.address, close: () => listener.close() };
}

async function migrateOverTcp(src: Vm, opts: MigrationOptions, acceptor = new MigrationAcceptor(deps)): Promise<{ result: MigrationResult; outcome: DestinationOutcome; made: Vm[] }> {
  const made: Vm[] = [];
  let outcome!: Promise<DestinationOutcome>;
  const dest = await tcpDestination((c) => {
    const r = acceptor.accept(c, factory(made));
    r.catch(() => undefined);
    void r.then((o) => { if (o) outcome = Promise.resolve(o); }, (e) => { outcome = Promise.reject(e); });
  });
  try {
    const result = await migrateSource(await tcp().dial(dest.address), sourceVmOf(src), deps, { connect: () => tcp().dial(dest.address), baselineMs: 0, ...opts });
    for (let i = 0; i < 100 && !outcome; i++) await new Promise((r) => setTimeout(r, 10));
    return { result, outcome: await outcome, made };
  } finally {
    await dest.close();
  }
}

const SETS: CodecName[][] = [[], ['xbzrle'], ['dedup'], ['lz4'], ['zstd'], ['xbzrle', 'dedup', 'zstd']];

for (const codecs of SETS) {
  test(`codecs [${codecs.join(', ') || 'zero pages only'}]: the VM moves verified and the report says what they saved`, async () => {
    const src = await sourceVm('reducer', 'mem=16MiB wss=1MiB pattern=hotcold rate=20000000', mixed(7));
    const [a, b] = memoryPair();
    const made: Vm[] = [];
    const dest = serveDestination(b, factory(made), deps);
    const result = await migrateSource(a, sourceVmOf(src), deps, { mode: 'precopy', codecs, compression: 'always', downtimeMs: 1, maxRounds: 4, baselineMs: 0 });
    await dest;
    const r = result.report;
    const t = r.transfer!;
    assert.equal(r.verified, true);
    assert.deepEqual(t.codecs, codecs);
    // At least one round re-sent hot pages (a loaded machine starves the guest, so pre-copy may converge before the round limit).
    assert.ok(r.rounds.length >= 2 && r.pages.resent > 0, `rounds re-sent the hot pages (${r.rounds.length} rounds, ${r.pages.resent} re-sent)`);
    const s = t.codecStats;
    if (codecs.includes('xbzrle')) {
      assert.ok(s['page.xbzrle.hits'] > 0, `re-dirtied pages went as deltas: ${JSON.stringify(s)}`);
      assert.ok(s['page.xbzrle.misses'] > 0);
    }
    if (codecs.includes('dedup')) assert.ok(s['page.dedup.refs'] > 1000, `duplicate cold pages went as references: ${s['page.dedup.refs']}`);
    if (codecs.includes('zstd') || codecs.includes('lz4')) {
      assert.ok(s.compressedBatches > 0 && s.compressedBytesOut < s.rawBytesIn / 2, `text pages compressed: ${s.compressedBytesOut} of ${s.rawBytesIn}`);
      assert.deepEqual(t.compression, { on: true, flips: 0, speedup: null });
    }
    // A third of the cold pages is text, a third copies of four pages, a third random.
    if (codecs.length > 0) assert.ok(t.reduction > (codecs.length > 1 ? 1.8 : 1.1), `the codecs reduced the page bytes (${t.reduction.toFixed(2)}×)`);
    else assert.ok(t.reduction < 1.1, 'without codecs only zero pages shrink (this memory has none in the region)');
    await made[0].stop();
  });
}

test('batchPages beyond what a compressor takes at once: encoded batches stay within it, the VM moves verified', async () => {
  // 4096 pages (16 MiB) a batch: unencoded pages go as RUN frames that big, but lz4 and zstd take
  // at most DEFAULT_BATCH_BYTES a batch (the destination refused bigger blobs by name).
  const src = await sourceVm('big-batches', 'mem=16MiB wss=1MiB pattern=hotcold rate=20000000', mixed(5));
  const [a, b] = memoryPair();
  const made: Vm[] = [];
  const dest = serveDestination(b, factory(made), deps);
  const result = await migrateSource(a, sourceVmOf(src), deps, { mode: 'precopy', codecs: ['lz4'], compression: 'always', batchPages: 4096, maxRounds: 2, baselineMs: 0 });
  await dest;
  assert.equal(result.report.verified, true);
  assert.ok(result.report.transfer!.codecStats.compressedBatches >= 16, `16 MiB went in batches of at most 1 MiB: ${result.report.transfer!.codecStats.compressedBatches} compressed`);
  await made[0].stop();
});

test('post-copy with XBZRLE agreed: every page crosses once, so the source encodes without it (no cache); dedup and zstd still work', async () => {
  const src = await sourceVm('postcopy-codecs', 'mem=16MiB wss=1MiB pattern=hotcold rate=20000000', mixed(9));
  const [a, b] = memoryPair();
  const made: Vm[] = [];
  const dest = serveDestination(b, factory(made), deps);
  const result = await migrateSource(a, sourceVmOf(src), deps, { mode: 'postcopy', codecs: ['xbzrle', 'dedup', 'zstd'], compression: 'always', baselineMs: 0 });
  await dest;
  const t = result.report.transfer!;
  assert.equal(result.report.verified, true);
  assert.deepEqual(t.codecs, ['xbzrle', 'dedup', 'zstd'], 'the report names what was agreed');
  assert.equal(Object.keys(t.codecStats).filter((k) => k.includes('xbzrle')).length, 0, `no XBZRLE encoder ran: ${JSON.stringify(t.codecStats)}`);
  assert.ok(t.codecStats['page.dedup.refs'] > 1000, 'duplicate pages went as references');
  assert.ok(t.codecStats.compressedBatches > 0);
  await made[0].stop();
});

test('parallel streams over TCP: pages spread over every stream, dedup definitions cross streams, verified', async () => {
  const src = await sourceVm('spread', 'mem=16MiB wss=1MiB pattern=uniform rate=10000000', mixed(11));
  const { result, outcome, made } = await migrateOverTcp(src, { mode: 'precopy', streams: 3, codecs: ['xbzrle', 'dedup'], downtimeMs: 1, maxRounds: 3 });
  assert.equal(result.report.verified, true);
  assert.equal(outcome.streams, 3);
  assert.equal(result.report.transfer!.streams, 3);
  assert.ok(result.report.transfer!.codecStats['page.dedup.refs'] > 1000);
  assert.equal(src.state, 'stopped');
  const p0 = made[0].stat().progress;
  for (let i = 0; i < 300 && made[0].stat().progress === p0; i++) await new Promise((r) => setTimeout(r, 10));
  assert.ok(made[0].stat().progress > p0, 'the guest runs on the destination');
  await made[0].stop();
});

test('post-copy page requests travel on their own channel, never on the control connection', async () => {
  const src = await sourceVm('faulty', 'mem=24MiB pattern=uniform rate=100000000');
  const made: Vm[] = [];
  const acceptor = new MigrationAcceptor(deps);
  const controlTypes: number[] = [];
  let first = true;
  let outcome: Promise<DestinationOutcome> | undefined;
  const dest = await tcpDestination((c) => {
    // The first connection is the control one: record the frame types the destination writes on it.
    const conn = first ? spyWrites(c, controlTypes) : c;
    first = false;
    const r = acceptor.accept(conn, factory(made));
    r.catch(() => undefined);
    void r.then((o) => { if (o) outcome = Promise.resolve(o); });
  });
  // The engine says what each extra connection is for (the node edge sends a data stream from a thread).
  const purposes: string[] = [];
  const connect = (purpose: 'data' | 'fault') => {
    purposes.push(purpose);
    return tcp().dial(dest.address);
  };
  const result = await migrateSource(await tcp().dial(dest.address), sourceVmOf(src), deps, { mode: 'postcopy', streams: 2, connect, baselineMs: 0 });
  assert.deepEqual(purposes.sort(), ['data', 'fault']);
  for (let i = 0; i < 100 && !outcome; i++) await new Promise((r) => setTimeout(r, 10));
  const o = await outcome!;
  await dest.close();
  assert.equal(result.report.verified, true);
  assert.equal(o.faultChannel, true);
  assert.ok(o.faults > 0, 'the guest faulted on absent pages');
  assert.equal(o.faultLatencyMs.count, o.faults, 'every fault was answered');
  assert.ok(!controlTypes.includes(FrameTypeId.PAGE_REQUEST), 'no PAGE_REQUEST on the control connection');
  assert.ok(controlTypes.includes(FrameTypeId.RESUMED));
  await made[0].stop();
});

/** A connection whose writes are recorded by frame type (each engine write is one whole frame). */
function spyWrites(c: Connection, types: number[]): Connection {
  return new Proxy(c, {
    get(target, prop, receiver) {
      if (prop === 'write') return (b: Uint8Array) => { types.push(b[4]); return target.write(b); };
      const v = Reflect.get(target, prop, receiver) as unknown;
      return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
    },
  });
}

test('gang migration: pages common to 4 VMs cross the wire once', async () => {
  // Every VM: 12 MiB of cold pages shared by all four (same seed), 3 MiB of its own.
  const shared = (i: number) => randomPage(mulberry32(1000 + i));
  const content = (vm: number): Content => ({ cold: (i) => (i < 3072 ? shared(i) : randomPage(mulberry32(vm * 1e6 + i))) });
  const config = 'mem=16MiB wss=256KiB rate=1000000';
  const separate: number[] = [];
  for (let v = 0; v < 4; v++) {
    const src = await sourceVm(`solo-${v}`, config, content(v));
    const { result, made } = await migrateOverTcp(src, { mode: 'precopy', codecs: ['dedup'] });
    assert.equal(result.report.verified, true);
    separate.push(result.report.bytes.wire);
    await made[0].stop();
  }
  const srcs = await Promise.all([0, 1, 2, 3].map((v) => sourceVm(`gang-${v}`, config, content(v))));
  const acceptor = new MigrationAcceptor(deps);
  const made: Vm[] = [];
  const dest = await tcpDestination((c) => void acceptor.accept(c, factory(made)).catch(() => undefined));
  const gang = new Gang('four');
  const results = await Promise.all(srcs.map(async (src) => migrateSource(await tcp().dial(dest.address), sourceVmOf(src), deps, { mode: 'precopy', gang, baselineMs: 0 })));
  await dest.close();
  for (const r of results) {
    assert.equal(r.report.verified, true);
    assert.equal(r.report.transfer!.gang, 'four');
  }
  const together = results.reduce((n, r) => n + r.report.bytes.wire, 0);
  const alone = separate.reduce((a, b) => a + b, 0);
  assert.ok(together < 0.55 * alone, `gang sent ${(together / MiB).toFixed(1)} MiB against ${(alone / MiB).toFixed(1)} MiB separately`);
  for (const vm of made) await vm.stop();
});

test('a JOIN naming no migration is refused by name', async () => {
  const [a, b] = memoryPair();
  const acceptor = new MigrationAcceptor(deps);
  const served = acceptor.accept(b, factory([]));
  const peer = new FramedConnection(a);
  await peer.send({ type: 'JOIN', token: 'ab'.repeat(16), stream: 1, role: 'data' });
  await assert.rejects(served, (e: unknown) => e instanceof FerryError && e.code === 'ERR_MIGRATION_UNKNOWN_SESSION');
  const reply = await peer.next();
  assert.equal(reply?.type, 'ERROR');
  assert.equal((reply as { code: string }).code, 'ERR_MIGRATION_UNKNOWN_SESSION');
});

test('a corrupt compressed batch fails the migration by name before the switchover; the VM runs on at the source', async () => {
  const src = await sourceVm('damaged', 'mem=8MiB wss=1MiB rate=1000000', { cold: (i) => textPage(mulberry32(i)) });
  const [a, b] = memoryPair();
  const dest = serveDestination(b, factory([]), deps).catch((e: unknown) => e);
  // Flip a byte inside the first compressed BATCH payload the source writes.
  let damaged = false;
  const bad = new Proxy(a, {
    get(target, prop, receiver) {
      if (prop === 'write') {
        return (buf: Uint8Array) => {
          if (!damaged && buf[4] === FrameTypeId.BATCH && buf[HEADER_BYTES + 4] !== 0) {
            damaged = true;
            buf = buf.slice();
            buf[buf.length - 20] ^= 0x5a;
          }
          return target.write(buf);
        };
      }
      const v = Reflect.get(target, prop, receiver) as unknown;
      return typeof v === 'function' ? (v as (...x: unknown[]) => unknown).bind(target) : v;
    },
  });
  await assert.rejects(migrateSource(bad, sourceVmOf(src), deps, { mode: 'precopy', codecs: ['zstd'], compression: 'always', baselineMs: 0 }),
    (e: unknown) => e instanceof FerryError && e.code === 'ERR_CODEC_CORRUPT');
  assert.ok(damaged, 'a compressed batch was sent');
  const err = await dest;
  assert.ok(err instanceof FerryError && err.code.startsWith('ERR_CODEC_'), `destination names a codec error: ${String(err)}`);
  assert.equal(src.state, 'running', 'the VM runs on at the source');
  await src.stop();
});

test('codec names and stream counts are checked before anything is sent', async () => {
  const src = await sourceVm('picky', 'mem=4MiB');
  const [a] = memoryPair();
  await assert.rejects(migrateSource(a, sourceVmOf(src), deps, { mode: 'precopy', codecs: ['brotli' as CodecName], baselineMs: 0 }), (e: unknown) => e instanceof FerryError && e.code === 'ERR_INVALID_ARGUMENT');
  const [l] = memoryPair();
  await assert.rejects(migrateSource(l, sourceVmOf(src), deps, { mode: 'precopy', codecs: ['lz4', 'zstd'], baselineMs: 0 }), (e: unknown) => e instanceof FerryError && e.code === 'ERR_INVALID_ARGUMENT' && /one compressor/.test(e.message));
  const [c] = memoryPair();
  await assert.rejects(migrateSource(c, sourceVmOf(src), deps, { mode: 'precopy', streams: 4, baselineMs: 0 }), (e: unknown) => e instanceof FerryError && e.code === 'ERR_MIGRATION_STREAMS');
  assert.equal(src.state, 'running');
  assert.throws(() => encodeFrame({ type: 'JOIN', token: 'ab'.repeat(16), stream: 0, role: 'data' }));
  await src.stop();
});

test('a data stream lost during pre-copy resumes the VM on the source; the destination discards its copy', async () => {
  const src = await sourceVm('severed', 'mem=16MiB wss=2MiB rate=20000000');
  const acceptor = new MigrationAcceptor(deps);
  const made: Vm[] = [];
  const [a, b] = memoryPair();
  const dest = acceptor.accept(b, factory(made)).catch((e: unknown) => e);
  const extra: Connection[] = [];
  const connect = async () => {
    const [x, y] = memoryPair();
    void acceptor.accept(y, factory(made)).catch(() => undefined);
    extra.push(y);
    return x;
  };
  let cut = false;
  const p = migrateSource(a, sourceVmOf(src), deps, {
    mode: 'precopy', streams: 3, connect, codecs: ['xbzrle', 'dedup'], baselineMs: 0,
    onProgress: (pr) => {
      if (!cut && pr.pagesSent > 1000) {
        cut = true;
        extra[1].abort(); // the destination end of data stream 2
      }
    },
  });
  await assert.rejects(p, FerryError);
  assert.ok(cut, 'the stream was cut mid-migration');
  assert.ok((await dest) instanceof Error, 'the destination session failed too');
  assert.equal(src.state, 'running', 'the source VM runs again');
  assert.equal(src.dirtyLogging, false);
  const p0 = src.stat().progress;
  for (let i = 0; i < 100 && src.stat().progress === p0; i++) await new Promise((r) => setTimeout(r, 10));
  assert.ok(src.stat().progress > p0, 'and keeps working');
  for (const vm of made) assert.equal(vm.state, 'stopped', 'the half-filled destination VM was discarded');
  await src.stop();
});

test('a destination that never answers the handshake fails the migration by name; the VM runs on', async () => {
  const src = await sourceVm('unanswered', 'mem=4MiB');
  const [a] = memoryPair(); // nobody reads the other end
  await assert.rejects(migrateSource(a, sourceVmOf(src), deps, { mode: 'precopy', baselineMs: 0, handshakeTimeoutMs: 200 }),
    (e: unknown) => e instanceof FerryError && e.code === 'ERR_MIGRATION_TIMEOUT' && /HELLO_ACK/.test(e.message));
  assert.equal(src.state, 'running');
  await src.stop();
});
