/**
 * The built guests (build/guests/*.wasm, from `node scripts/build-guests.mjs`), run un-instrumented
 * on the bare test host: behaviour of kv, memstress, compute and the C guest, and their imports.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { FERRY_IMPORTS, RunStatus, WASI_IMPORTS } from '../../src/core/abi.js';
import { BareHost, GuestAbort, changedPages } from '../helpers/bare-host.js';
import { mulberry32 as prng } from '../helpers/prng.js';

function guest(name: string): string {
  const p = fileURLToPath(new URL(`../../../build/guests/${name}.wasm`, import.meta.url));
  assert.ok(existsSync(p), `${p} is missing: run node scripts/build-guests.mjs`);
  return p;
}


test('every guest imports only names from the guest ABI', () => {
  for (const name of ['kv', 'memstress', 'compute', 'wordfreq']) {
    for (const imp of BareHost.imports(guest(name))) {
      const table: Record<string, unknown> = imp.module === 'ferry' ? FERRY_IMPORTS : imp.module === 'wasi_snapshot_preview1' ? WASI_IMPORTS : {};
      assert.ok(imp.name in table, `${name} imports ${imp.module}.${imp.name}`);
    }
  }
});

// ------------------------------------------------------------------------------------------------
// kv

/** A JS model of kv's protocol, for comparing against the guest. */
class KvModel {
  readonly map = new Map<string, string>();
  exec(line: string): string {
    if (line.endsWith('\r')) line = line.slice(0, -1);
    const m = /^(GET|DEL) (.*)$/s.exec(line);
    if (m) {
      const key = m[2];
      if (!this.keyOk(key)) return 'ERR';
      if (m[1] === 'GET') return this.map.has(key) ? `VALUE ${this.map.get(key)}\n` : 'NOTFOUND\n';
      return this.map.delete(key) ? 'DELETED\n' : 'NOTFOUND\n';
    }
    const s = /^SET ([^ ]*) (.*)$/s.exec(line);
    if (s) {
      if (!this.keyOk(s[1]) || Buffer.byteLength(s[2]) > 4000) return 'ERR';
      this.map.set(s[1], s[2]);
      return 'OK\n';
    }
    if (line === 'COUNT') return `COUNT ${this.map.size}\n`;
    return 'ERR';
  }
  private keyOk(k: string): boolean {
    return k.length >= 1 && Buffer.byteLength(k) <= 250 && !/[\x00-\x20\x7f]/.test(k);
  }
}

/** Replaces every "ERR <reason>" line with "ERR" so model and guest can be compared. */
const normErr = (s: string) => s.replace(/^ERR[^\n]*\n/gm, 'ERR');

function kvBoot(config = ''): BareHost {
  const h = BareHost.boot(guest('kv'), { config });
  assert.ok(h.netAttached, 'kv attaches the network device in init');
  return h;
}

function ask(h: BareHost, conn: number, text: string, budget = 1_000_000): string {
  h.send(conn, text);
  const status = h.runUntilIdle(budget);
  assert.equal(status, RunStatus.IDLE);
  return h.take(conn);
}

test('kv: SET/GET/DEL/COUNT and errors', () => {
  const h = kvBoot();
  h.open(7);
  const cases: [string, string][] = [
    ['COUNT\n', 'COUNT 0\n'],
    ['GET a\n', 'NOTFOUND\n'],
    ['SET a 1\n', 'OK\n'],
    ['GET a\n', 'VALUE 1\n'],
    ['SET a hello  world \n', 'OK\n'],
    ['GET a\n', 'VALUE hello  world \n'],
    ['SET b \n', 'OK\n'],
    ['GET b\n', 'VALUE \n'],
    ['COUNT\n', 'COUNT 2\n'],
    ['DEL a\n', 'DELETED\n'],
    ['DEL a\n', 'NOTFOUND\n'],
    ['GET a\n', 'NOTFOUND\n'],
    ['COUNT\n', 'COUNT 1\n'],
    ['SET c 3\r\n', 'OK\n'],
    ['GET c\r\n', 'VALUE 3\n'],
  ];
  for (const [req, want] of cases) assert.equal(ask(h, 7, req), want, JSON.stringify(req));
  for (const bad of ['FOO\n', '\n', 'get a\n', 'GET\n', 'GET a b\n', 'SET a\n', 'SET\n', 'DEL\n', 'COUNT 1\n', 'SET  x\n', 'GET \n']) {
    assert.match(ask(h, 7, bad), /^ERR [^\n]+\n$/, JSON.stringify(bad));
  }
  assert.equal(ask(h, 7, 'COUNT\n'), 'COUNT 2\n', 'errors change nothing (b and c)');
  assert.equal(h.progress(), BigInt(cases.length + 12), 'progress() counts requests answered');
});

test('kv: key and value limits, over-long lines', () => {
  const h = kvBoot();
  h.open(1);
  const k250 = 'k'.repeat(250);
  const v4000 = 'v '.repeat(2000);
  assert.equal(ask(h, 1, `SET ${k250} ${v4000}\n`), 'OK\n');
  assert.equal(ask(h, 1, `GET ${k250}\n`), `VALUE ${v4000}\n`);
  assert.match(ask(h, 1, `SET ${k250}k 1\n`), /^ERR key too long\n$/);
  assert.match(ask(h, 1, `GET ${k250}k\n`), /^ERR key too long\n$/);
  assert.match(ask(h, 1, `SET x ${v4000}v\n`), /^ERR value too long\n$/);
  assert.match(ask(h, 1, `SET x\ty 1\n`), /^ERR bad key\n$/);
  // a 20 kB line is refused once its end arrives, and the connection keeps working
  assert.match(ask(h, 1, `SET y ${'z'.repeat(20000)}\nGET ${k250}\n`), new RegExp(`^ERR line too long\nVALUE ${v4000}\n$`));
  // values are binary-safe apart from the newline
  const raw = Buffer.from([0, 1, 2, 255, 13, 32, 9, 200]);
  h.send(1, Buffer.concat([Buffer.from('SET bin '), raw, Buffer.from('\nGET bin\n')]));
  h.runUntilIdle(1000);
  assert.deepEqual(h.takeBytes(1), Buffer.concat([Buffer.from('OK\nVALUE '), raw, Buffer.from('\n')]));
});

test('kv: requests split byte by byte, pipelined and interleaved over connections match a model', () => {
  const rnd = prng(42);
  const model = new KvModel();
  const h = kvBoot('ring=64KiB');
  const conns = [3, 1000, 77, 0xfffffffe, 12, 5, 9, 100000];
  const pending = new Map<number, Buffer>();
  const partial = new Map<number, string>();
  const expected = new Map<number, string>();
  const got = new Map<number, string>();
  const keys = Array.from({ length: 12 }, (_, i) => `key${i}`);
  const pick = <T>(a: T[]) => a[Math.floor(rnd() * a.length)];
  for (const c of conns) {
    h.open(c);
    const lines: string[] = [];
    for (let i = 0; i < 150; i++) {
      const r = rnd();
      if (r < 0.35) lines.push(`SET ${pick(keys)} ${'x'.repeat(Math.floor(rnd() * 30))} v${Math.floor(rnd() * 1000)} w`);
      else if (r < 0.7) lines.push(`GET ${pick(keys)}`);
      else if (r < 0.85) lines.push(`DEL ${pick(keys)}`);
      else if (r < 0.93) lines.push('COUNT');
      else lines.push(pick(['HELLO', '', 'GET', 'SET k', 'GET a b']));
    }
    pending.set(c, Buffer.from(lines.map((l) => l + (rnd() < 0.2 ? '\r\n' : '\n')).join('')));
    partial.set(c, '');
    expected.set(c, '');
    got.set(c, '');
  }
  let records = 0;
  let quanta = 0;
  while ([...pending.values()].some((b) => b.length > 0)) {
    const live = conns.filter((c) => pending.get(c)!.length > 0);
    const c = pick(live);
    const buf = pending.get(c)!;
    const n = Math.min(buf.length, rnd() < 0.6 ? 1 : 1 + Math.floor(rnd() * 40));
    const chunk = buf.subarray(0, n);
    pending.set(c, buf.subarray(n));
    h.send(c, chunk);
    records++;
    // the model executes a line when its newline arrives, in ring order — as the guest must
    for (const ch of chunk.toString('latin1')) {
      if (ch === '\n') {
        expected.set(c, expected.get(c)! + model.exec(partial.get(c)!));
        partial.set(c, '');
      } else partial.set(c, partial.get(c)! + ch);
    }
    if (records % 37 === 0) {
      h.run(1 + Math.floor(rnd() * 5)); // small budgets: stop and resume in the middle of records
      quanta++;
      for (const d of conns) got.set(d, got.get(d)! + h.take(d));
    }
  }
  h.runUntilIdle(3);
  for (const c of conns) {
    got.set(c, got.get(c)! + h.take(c));
    assert.equal(normErr(got.get(c)!), expected.get(c), `connection ${c}`);
  }
  assert.ok(quanta > 10 && records > 2000);
  assert.equal(h.progress(), BigInt(150 * conns.length), 'progress() counts requests, not OPEN records');
});

test('kv: 1500 concurrent connections with partial lines; CLOSE discards a connection\'s buffer', () => {
  const h = kvBoot();
  const N = 1500;
  for (let i = 0; i < N; i++) { h.open(i * 7919); h.send(i * 7919, `SET c${i} `); }
  assert.equal(h.runUntilIdle(100_000), RunStatus.IDLE);
  for (let i = 0; i < N; i++) assert.equal(h.take(i * 7919), '');
  for (let i = 0; i < N; i++) h.send(i * 7919, `value${i}\nGET c${i}\n`);
  h.runUntilIdle(100_000);
  for (let i = 0; i < N; i++) assert.equal(h.take(i * 7919), `OK\nVALUE value${i}\n`);
  // leave garbage in half the buffers, close those connections, reuse the ids
  for (let i = 0; i < N; i += 2) { h.send(i * 7919, 'GARBAGE'); h.close(i * 7919); h.open(i * 7919); }
  for (let i = 0; i < N; i++) h.send(i * 7919, `GET c${i}\n`);
  h.runUntilIdle(100_000);
  for (let i = 0; i < N; i++) assert.equal(h.take(i * 7919), `VALUE value${i}\n`, `conn ${i}`);
  assert.equal(ask(h, 1, 'COUNT\n'), `COUNT ${N}\n`);
  // thousands of connections coming and going do not grow memory (after the first round)
  let before = 0;
  for (let round = 0; round < 20; round++) {
    if (round === 1) before = h.memory.buffer.byteLength;
    for (let i = 0; i < N; i++) { h.open(1_000_000 + round * N + i); h.send(1_000_000 + round * N + i, 'COUNT'); }
    h.runUntilIdle(100_000);
    for (let i = 0; i < N; i++) h.close(1_000_000 + round * N + i);
    h.runUntilIdle(100_000);
  }
  assert.equal(h.memory.buffer.byteLength, before);
});

test('kv: backpressure — a full tx ring pauses the guest mid-record and nothing is lost', () => {
  const h = kvBoot('ring=4096');
  h.open(1);
  const big = 'b'.repeat(4000);
  h.send(1, `SET big ${big}\n`, 1000);
  assert.equal(h.runUntilIdle(1000), RunStatus.IDLE);
  assert.equal(h.take(1), 'OK\n');
  // 300 GETs in 1 kB records = ~1.2 MB of replies through a 4 KiB tx ring
  h.send(1, 'GET big\n'.repeat(300), 1000);
  let out = '';
  let running = 0;
  for (let q = 0; q < 10_000; q++) {
    const s = h.run(1_000_000);
    out += h.take(1);
    if (s === RunStatus.RUNNING) running++;
    if (s === RunStatus.IDLE && h.pendingRecords === 0) break;
  }
  assert.equal(out, `VALUE ${big}\n`.repeat(300));
  assert.ok(running >= 250, `guest returned RUNNING while tx was full (${running} times)`);
});

test('kv: holds 1,000,000 keys; DEL+SET churn does not grow memory', () => {
  const h = kvBoot();
  const N = 1_000_000;
  const value = (i: number) => `value-${String(i).padStart(10, '0')}-${String((i * 2654435761) % 1e9).padStart(9, '0')}`.slice(0, 32);
  h.open(1);
  let batch: string[] = [];
  let oks = 0;
  const flush = () => {
    h.send(1, batch.join(''));
    batch = [];
    h.runUntilIdle(1_000_000);
    const out = h.take(1);
    oks += out.length / 3;
    assert.ok(/^(OK\n)*$/.test(out));
  };
  for (let i = 0; i < N; i++) {
    batch.push(`SET key${i} ${value(i)}\n`);
    if (batch.length === 5000) flush();
  }
  flush();
  assert.equal(oks, N);
  assert.equal(ask(h, 1, 'COUNT\n'), `COUNT ${N}\n`);
  const rnd = prng(7);
  const sample = Array.from({ length: 2000 }, () => Math.floor(rnd() * N));
  assert.equal(ask(h, 1, sample.map((i) => `GET key${i}\n`).join('')), sample.map((i) => `VALUE ${value(i)}\n`).join(''));
  const mem = h.memory.buffer.byteLength;
  assert.ok(mem <= 512 * 2 ** 20, `memory ${mem} bytes`);
  // churn: delete 200k keys and insert 200k new ones of the same sizes, twice
  for (let round = 0; round < 2; round++) {
    for (let j = 0; j < 200_000; j += 5000) {
      const lines: string[] = [];
      for (let i = j; i < j + 5000; i++) lines.push(`DEL key${i + round * 200_000}\nSET new${round}-${String(i).padStart(6, '0')} ${value(i)}\n`);
      assert.equal(ask(h, 1, lines.join('')), 'DELETED\nOK\n'.repeat(5000));
    }
  }
  assert.equal(h.memory.buffer.byteLength, mem, 'churn reuses freed entries');
  assert.equal(ask(h, 1, 'COUNT\nGET key999999\nGET key0\nGET new1-000123\n'), `COUNT ${N}\nVALUE ${value(999_999)}\nNOTFOUND\nVALUE ${value(123)}\n`);
});

// ------------------------------------------------------------------------------------------------
// memstress

interface Region { base: number; mem: number; wss: number; hotBytes: number }

function memstress(config: string): { h: BareHost; r: Region } {
  const h = BareHost.boot(guest('memstress'), { config });
  const m = /memstress: region (\d+) mem=(\d+) wss=(\d+) pattern=\S+(?: hotbytes=(\d+))?/.exec(h.console);
  assert.ok(m, `memstress prints its region: ${h.console}`);
  return { h, r: { base: Number(m[1]), mem: Number(m[2]), wss: Number(m[3]), hotBytes: Number(m[4] ?? 0) } };
}

const snapshot = (h: BareHost) => h.bytes().slice();
const digest = (h: BareHost) => createHash('sha256').update(h.bytes()).digest('hex');

/** Offsets (from the region base) of the `size`-byte words that differ. */
function changedWords(before: Uint8Array, after: Uint8Array, r: Region, size: number): number[] {
  const out: number[] = [];
  for (const p of changedPages(before, after)) {
    for (let off = p * 4096; off < p * 4096 + 4096; off += size) {
      for (let k = 0; k < size; k++) {
        if (before[off + k] !== after[off + k]) { out.push(off - r.base); break; }
      }
    }
  }
  return out;
}

test('memstress: init fills the whole region (no zero pages)', () => {
  const { h, r } = memstress('mem=3MiB wss=1MiB');
  assert.equal(r.mem, 3 << 20);
  assert.equal(r.wss, 1 << 20);
  assert.equal(r.base % 4096, 0);
  const b = h.bytes();
  for (let off = r.base; off < r.base + r.mem; off += 4096) {
    assert.ok(b.subarray(off, off + 4096).some((x) => x !== 0), `page at ${off} is zero`);
  }
});

test('memstress: every pattern and write size writes only inside its working set', () => {
  for (const pattern of ['uniform', 'hotcold', 'zipf', 'sequential']) {
    for (const write of [1, 2, 4, 8]) {
      const { h, r } = memstress(`mem=6MiB wss=2MiB pattern=${pattern} write=${write} seed=${write}`);
      const before = snapshot(h);
      assert.equal(h.run(300_000), RunStatus.RUNNING);
      const pages = changedPages(before, h.bytes());
      const first = r.base / 4096;
      const last = (r.base + r.wss) / 4096 - 1;
      assert.ok(pages.length > 0);
      for (const p of pages) assert.ok(p >= first && p <= last, `${pattern}/${write}: page ${p} outside [${first}, ${last}]`);
      if (pattern === 'uniform') assert.equal(pages.length, 512, `${pattern}/${write} covers the working set`);
      if (pattern === 'sequential') assert.equal(pages.length, Math.min(512, Math.ceil((300_000 * write) / 4096)), `${pattern}/${write}`);
      for (const off of changedWords(before, h.bytes(), r, write)) assert.equal(off % write, 0, 'writes are aligned');
      assert.equal(h.progress(), 300_000n);
    }
  }
});

test('memstress: sequential writes advance in order and wrap', () => {
  const { h, r } = memstress('mem=1MiB pattern=sequential write=4');
  let before = snapshot(h);
  h.run(1000);
  let words = changedWords(before, h.bytes(), r, 4);
  assert.deepEqual(words, Array.from({ length: 1000 }, (_, i) => i * 4));
  before = snapshot(h);
  h.run(500);
  h.run(500);
  words = changedWords(before, h.bytes(), r, 4);
  assert.deepEqual(words, Array.from({ length: 1000 }, (_, i) => 4000 + i * 4));
  // wrap: run to 10 words before the end, then 20 more
  h.run(r.wss / 4 - 2000 - 10);
  before = snapshot(h);
  h.run(20);
  words = changedWords(before, h.bytes(), r, 4).sort((a, b) => a - b);
  assert.deepEqual(words, [...Array.from({ length: 10 }, (_, i) => i * 4), ...Array.from({ length: 10 }, (_, i) => r.wss - 40 + i * 4)]);
});

test('memstress: hotcold sends hotp of the writes to the hot set', () => {
  for (const [hot, hotp] of [[0.1, 0.9], [0.25, 0.5]]) {
    const { h, r } = memstress(`mem=64MiB pattern=hotcold hot=${hot} hotp=${hotp} seed=3`);
    assert.equal(r.hotBytes, Math.floor(hot * r.wss / 8) * 8);
    const before = snapshot(h);
    h.run(20_000);
    const words = changedWords(before, h.bytes(), r, 8);
    const inHot = words.filter((o) => o < r.hotBytes).length;
    // a few hot writes collide on the same word; allow for that and sampling noise
    const share = inHot / 20_000;
    assert.ok(share > hotp - 0.03 && share < hotp + 0.02, `hot share ${share} for hotp=${hotp}`);
    assert.ok(words.length > 19_500, 'almost every write hits a distinct word');
  }
});

test('memstress: zipf concentrates writes on the first pages', () => {
  const { h, r } = memstress('mem=16MiB pattern=zipf zipf=0.99 seed=5');
  const before = snapshot(h);
  h.run(4000);
  const words = changedWords(before, h.bytes(), r, 8);
  const pages = r.wss / 4096;
  const top = words.filter((o) => o < (pages / 100) * 4096).length; // first 1 % of pages
  const tail = words.filter((o) => o >= (pages / 2) * 4096).length; // last 50 % of pages
  assert.ok(top > 1500, `top 1% of pages got ${top} of 4000 writes`);
  assert.ok(tail < 600, `last half of pages got ${tail} of 4000 writes`);
  assert.ok(top > 3 * tail);
  // the hottest page is page 0
  const p0 = words.filter((o) => o < 4096).length;
  const p100 = words.filter((o) => o >= 100 * 4096 && o < 101 * 4096).length;
  assert.ok(p0 > 200 && p0 > 10 * p100, `page 0: ${p0}, page 100: ${p100}`);
});

test('memstress: same seed → same memory, whatever the budget split; other seed → other memory', () => {
  for (const pattern of ['uniform', 'hotcold', 'zipf', 'sequential']) {
    const a = memstress(`mem=4MiB pattern=${pattern} seed=11`).h;
    const b = memstress(`mem=4MiB pattern=${pattern} seed=11`).h;
    const c = memstress(`mem=4MiB pattern=${pattern} seed=12`).h;
    assert.equal(digest(a), digest(b));
    a.run(100_000);
    for (let i = 0; i < 100; i++) b.run(1000);
    c.run(100_000);
    assert.equal(digest(a), digest(b), pattern);
    assert.notEqual(digest(a), digest(c), pattern);
    assert.equal(a.progress(), b.progress());
  }
});

test('memstress: rate paces writes with the guest clock and returns IDLE when ahead', () => {
  const { h } = memstress('mem=1MiB rate=8000000'); // 8 MB/s = 1,000,000 writes/s of 8 bytes
  assert.equal(h.run(1_000_000), RunStatus.IDLE, 'no time has passed: nothing to do');
  assert.equal(h.progress(), 0n);
  h.advanceClock(1_000_000); // 1 ms → ~1000 writes
  assert.equal(h.run(1_000_000), RunStatus.IDLE);
  const p1 = Number(h.progress());
  assert.ok(p1 >= 999 && p1 <= 1000, `${p1}`);
  assert.equal(h.run(1_000_000), RunStatus.IDLE, 'still ahead');
  assert.equal(Number(h.progress()), p1);
  h.advanceClock(2_000_000);
  assert.equal(h.run(500), RunStatus.RUNNING, 'budget-limited, more allowed');
  assert.equal(Number(h.progress()), p1 + 500);
  assert.equal(h.run(1_000_000), RunStatus.IDLE);
  const p2 = Number(h.progress());
  assert.ok(p2 >= p1 + 1999 && p2 <= p1 + 2001, `${p2 - p1}`);
  // a long stall does not turn into an unbounded burst (at most 100 ms of writes)
  h.advanceClock(10_000_000_000);
  h.run(1_000_000_000);
  const burst = Number(h.progress()) - p2;
  assert.ok(burst >= 99_000 && burst <= 100_001, `burst ${burst}`);
});

test('memstress: writes= halts, report= prints writes/s, bad configuration aborts', () => {
  const { h } = memstress('mem=1MiB writes=2500 report=1');
  assert.equal(h.run(1000), RunStatus.RUNNING);
  h.advanceClock(1_000_000_000);
  assert.equal(h.run(1000), RunStatus.RUNNING);
  assert.equal(h.run(1000), RunStatus.HALTED);
  assert.equal(h.progress(), 2500n);
  assert.match(h.console, /memstress: 2000 writes\/s /);
  assert.throws(() => memstress('pattern=bogus'), GuestAbort);
  assert.throws(() => memstress('mem=1MiB wss=2MiB'), GuestAbort);
  assert.throws(() => memstress('write=3'), GuestAbort);
  assert.throws(() => memstress('mem=lots'), GuestAbort);
  assert.equal(memstress('wss=64KiB').r.mem, 65536, 'mem defaults to wss');
  assert.equal(memstress('mem=1.5MB').r.mem, 1_500_000, 'decimal suffixes');
});

// ------------------------------------------------------------------------------------------------
// compute

function hashModel(seed: bigint, n: number): string {
  const M = (1n << 64n) - 1n;
  let v = seed;
  for (let i = 1n; i <= BigInt(n); i++) {
    v = (v + i * 0x9e3779b97f4a7c15n) & M;
    v ^= v >> 33n; v = (v * 0xff51afd7ed558ccdn) & M;
    v ^= v >> 33n; v = (v * 0xc4ceb9fe1a85ec53n) & M;
    v ^= v >> 33n;
  }
  return v.toString(16).padStart(16, '0');
}

function mandelModel(size: number, maxIter: number): { inside: number; steps: number } {
  let inside = 0;
  let steps = 0;
  for (let p = 0; p < size * size; p++) {
    const cr = -2 + (3 * (p % size)) / size;
    const ci = -1.5 + (3 * Math.floor(p / size)) / size;
    let r = 0, im = 0, k = 0;
    for (;;) {
      if (r * r + im * im > 4) break;
      if (k >= maxIter) { inside++; break; }
      const t = r * r - im * im + cr;
      im = 2 * r * im + ci;
      r = t;
      k++;
    }
    steps += k;
  }
  return { inside, steps };
}

test('compute: hash chain matches a reference, whatever the budget split, and writes almost no memory', () => {
  const a = BareHost.boot(guest('compute'), { config: 'iters=100000 seed=9' });
  const before = snapshot(a);
  let status: number = RunStatus.RUNNING;
  let quanta = 0;
  while (status !== RunStatus.HALTED) { status = a.run(777); quanta++; }
  assert.equal(quanta, Math.ceil(100_000 / 777));
  assert.equal(a.progress(), 100_000n);
  assert.equal(a.console, `compute: hash iters=100000 digest=${hashModel(9n, 100_000)}\n`);
  assert.ok(changedPages(before, a.bytes()).length <= 2, 'only the console buffer is written');
  // unbounded: runs and runs without writing memory
  const b = BareHost.boot(guest('compute'));
  const mem = snapshot(b);
  for (let i = 0; i < 50; i++) assert.equal(b.run(200_000), RunStatus.RUNNING);
  assert.equal(b.progress(), 10_000_000n);
  assert.deepEqual(changedPages(mem, b.bytes()), []);
});

test('compute: primes and mandel', () => {
  const p = BareHost.boot(guest('compute'), { config: 'kind=primes below=100000' });
  assert.equal(p.runUntilIdle(10_000), RunStatus.HALTED);
  assert.match(p.console, /^compute: primes below=100000 found=9592 iters=(\d+)\n$/);
  assert.equal(p.console, `compute: primes below=100000 found=9592 iters=${p.progress()}\n`);
  const m = BareHost.boot(guest('compute'), { config: 'kind=mandel size=40 maxiter=200' });
  const want = mandelModel(40, 200);
  const before = snapshot(m);
  for (let i = 0; i < 10_000 && !m.console.includes('frame=2'); i++) m.run(3333);
  assert.equal(m.console, `compute: mandel frame=1 inside=${want.inside} steps=${want.steps}\ncompute: mandel frame=2 inside=${want.inside} steps=${want.steps}\n`);
  assert.ok(changedPages(before, m.bytes()).length <= 2);
  assert.throws(() => BareHost.boot(guest('compute'), { config: 'kind=nope' }), GuestAbort);
});

// ------------------------------------------------------------------------------------------------
// wordfreq (C, wasi-libc)

function wordfreqModel(words: number, vocab: number, seed: number, top: number): string {
  const syl = ['ka', 'lo', 'mi', 'ne', 'ru', 'sa', 'ti', 'vo', 'ba', 'de', 'fi', 'go', 'hu', 'ja', 'ke', 'li'];
  let rng = seed >>> 0 || 1;
  const next = () => {
    rng = (rng ^ (rng << 13)) >>> 0;
    rng = (rng ^ (rng >>> 17)) >>> 0;
    rng = (rng ^ (rng << 5)) >>> 0;
    return rng;
  };
  const counts = new Map<string, number>();
  for (let i = 0; i < words; i++) {
    const a = next() % vocab;
    const b = next() % vocab;
    let k = (a * b - ((a * b) % vocab)) / vocab;
    let w = '';
    do { w += syl[k & 15]; k = Math.floor(k / 16); } while (k);
    next(); // decoration: case and punctuation do not change the counted word
    counts.set(w, (counts.get(w) ?? 0) + 1);
  }
  const all = [...counts].sort((x, y) => y[1] - x[1] || (x[0] < y[0] ? -1 : 1));
  const lines = [`wordfreq: ${words} words, ${counts.size} distinct`];
  all.slice(0, top).forEach(([w, c], i) => lines.push(`${i + 1}. ${w} ${c}`));
  lines.push('wordfreq: done');
  return lines.join('\n') + '\n';
}

test('wordfreq (C): counts, sorts and prints the expected frequencies; progress counts words', () => {
  for (const [config, words, vocab, seed, top, budget] of [
    ['words=20000 vocab=300 seed=5 top=15', 20000, 300, 5, 15, 1000],
    ['words=3000 seed=77', 3000, 5000, 77, 10, 7],
    ['words=200000', 200000, 5000, 1, 10, 65536],
  ] as const) {
    const h = BareHost.boot(guest('wordfreq'), { config });
    let status: number = RunStatus.RUNNING;
    let last = 0n;
    while (status !== RunStatus.HALTED) {
      status = h.run(budget);
      const p = h.progress();
      assert.ok(p > last || status === RunStatus.HALTED, 'progress grows every quantum');
      last = p;
    }
    assert.equal(h.progress(), BigInt(words));
    assert.equal(h.console, wordfreqModel(words, vocab, seed, top), config);
    assert.equal(h.exitCode, null);
  }
});
