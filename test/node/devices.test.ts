import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import binaryen from 'binaryen';
import { FERRY_IMPORTS, NetRecord, WASI_IMPORTS } from '../../src/core/abi.js';
import { Bitmap } from '../../src/core/bitmap.js';
import { NetRing, ringLayout, type NetRecordData } from '../../src/core/net-ring.js';
import { CONSOLE_MAX_LINE, DeviceStateError, Devices, Errno, GuestExitError, SOFT_PAGE_COUNT, type DeviceHooks, type DevicesInit } from '../../src/node/vm/devices/index.js';
import { SAMPLE_DEVICE_STATE, parseDeviceState } from '../../src/node/vm/devices/state-schema.js';
import { FerryError } from '../../src/core/errors.js';
import type { GuestMemoryAccess } from '../../src/node/vm/guest-memory.js';

class FakeMemory implements GuestMemoryAccess {
  readonly bytes: Uint8Array;
  private readonly dv: DataView;
  /** Guest pages (4 KiB) marked dirty through write*() or touched(). */
  readonly dirty = new Set<number>();
  /** Ranges handed out by view(). */
  readonly views: Array<[number, number]> = [];

  /** `live`: use these bytes in place (a real Wasm memory); otherwise a copy of `init` or zeros. */
  constructor(size: number, init?: Uint8Array, live?: Uint8Array) {
    this.bytes = live ?? (init ? init.slice() : new Uint8Array(size));
    this.dv = new DataView(this.bytes.buffer, this.bytes.byteOffset, this.bytes.byteLength);
  }

  get byteLength(): number { return this.bytes.length; }

  checkRange(addr: number, len: number): void {
    if (!Number.isInteger(addr) || !Number.isInteger(len) || addr < 0 || len < 0 || addr + len > this.bytes.length) {
      throw new FerryError('ERR_GUEST_MEMORY_RANGE', `[${addr}, ${addr + len}) outside ${this.bytes.length}`);
    }
  }

  touched(addr: number, len: number): void {
    if (len <= 0) return;
    for (let p = Math.floor(addr / 4096); p <= Math.floor((addr + len - 1) / 4096); p++) this.dirty.add(p);
  }

  read(addr: number, len: number): Uint8Array {
    this.checkRange(addr, len);
    return this.bytes.slice(addr, addr + len);
  }

  write(addr: number, data: Uint8Array): void {
    this.checkRange(addr, data.length);
    this.bytes.set(data, addr);
    this.touched(addr, data.length);
  }

  /** Ranges made present: by view() (unless told not to) and by ensure(). */
  readonly ensured: Array<[number, number]> = [];

  view(addr: number, len: number, present = true): Uint8Array {
    this.checkRange(addr, len);
    this.views.push([addr, len]);
    if (present) this.ensured.push([addr, len]);
    return this.bytes.subarray(addr, addr + len);
  }

  ensure(addr: number, len: number): void {
    this.checkRange(addr, len);
    this.ensured.push([addr, len]);
  }

  /** Whether byte `i` lies in a range made present. */
  isEnsured(i: number): boolean {
    return this.ensured.some(([a, l]) => i >= a && i < a + l);
  }

  readU32(addr: number): number {
    this.checkRange(addr, 4);
    return this.dv.getUint32(addr, true);
  }

  writeU32(addr: number, value: number): void {
    this.checkRange(addr, 4);
    this.dv.setUint32(addr, value, true);
    this.touched(addr, 4);
  }

  writeU64(addr: number, value: bigint): void {
    this.checkRange(addr, 8);
    this.dv.setBigUint64(addr, value, true);
    this.touched(addr, 8);
  }

  /** Runs `f` and returns the pages whose bytes changed but were not marked dirty (should be empty). */
  unmarkedChanges(f: () => void): number[] {
    const before = this.bytes.slice();
    this.dirty.clear();
    f();
    const bad = new Set<number>();
    for (let i = 0; i < before.length; i++) if (before[i] !== this.bytes[i] && !this.dirty.has(Math.floor(i / 4096))) bad.add(Math.floor(i / 4096));
    return [...bad];
  }
}

class RecordingHooks implements DeviceHooks {
  lines: string[] = [];
  tx: NetRecordData[][] = [];
  halts: number[] = [];
  aborts: string[] = [];
  overflows: Array<{ code: string; conns: number[] }> = [];
  credits: number[] = [];
  netRxCredit(bytes: number): void { this.credits.push(bytes); }
  console(text: string): void { this.lines.push(text); }
  netTx(records: NetRecordData[]): void { this.tx.push(records); }
  halt(code: number): void { this.halts.push(code); }
  abort(message: string): void { this.aborts.push(message); }
  netRxOverflow(err: FerryError & { conns: number[] }): void { this.overflows.push({ code: err.code, conns: err.conns }); }
}

/** A controllable host clock (ns). */
class FakeClock {
  t = 1_000_000n;
  now = (): bigint => this.t;
  advance(ns: number): void { this.t += BigInt(ns); }
}

// ---------------------------------------------------------------------------------------------

const MEM = 256 * 1024;
const FERRY = 'ferry';
const WASI = 'wasi_snapshot_preview1';
type Fn = (...args: never[]) => unknown;

function setup(opts: { config?: string; block?: { path: string; sizeBytes: number }; mem?: FakeMemory; rxQueueLimit?: number } = {}) {
  const mem = opts.mem ?? new FakeMemory(MEM);
  const hooks = new RecordingHooks();
  const clock = new FakeClock();
  const init: DevicesInit = { config: opts.config ?? 'keys=10 pattern=zipf', ...(opts.block ? { block: opts.block } : {}) };
  const dev = new Devices(init, mem, hooks, { now: clock.now, wallNs: () => 1_700_000_000_000_000_000n, ...(opts.rxQueueLimit ? { rxQueueLimit: opts.rxQueueLimit } : {}) });
  const imp = dev.imports();
  const f = (name: string) => (imp[FERRY] as Record<string, Fn>)[name] as unknown as (...a: (number | bigint)[]) => number & bigint;
  const w = (name: string) => (imp[WASI] as Record<string, Fn>)[name] as unknown as (...a: (number | bigint)[]) => number;
  return { mem, hooks, clock, dev, init, f, w };
}

function tmpDisk(): { dir: string; path: string } {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-dev-'));
  return { dir, path: join(dir, 'disk.img') };
}

const text = (s: string) => new TextEncoder().encode(s);
const dec = (b: Uint8Array) => new TextDecoder().decode(b);
function rec(conn: number, type: number, payload: string | Uint8Array = ''): NetRecordData {
  return { conn, type, payload: typeof payload === 'string' ? text(payload) : payload };
}
function bytesOf(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 7 + seed * 13) & 0xff;
  return b;
}

/** The guest's side of the rings, over the fake memory's raw bytes. */
function guestRings(mem: FakeMemory, base: number, size: number) {
  const { rx, tx } = ringLayout(base, size);
  return { rx: new NetRing(mem.bytes, rx, size), tx: new NetRing(mem.bytes, tx, size), rxAt: rx, txAt: tx };
}
const simple = (rs: NetRecordData[]) => rs.map((r) => ({ conn: r.conn, type: r.type, payload: Array.from(r.payload) }));

test('imports are exactly the ABI lists', () => {
  const { dev } = setup();
  const imp = dev.imports();
  assert.deepEqual(Object.keys(imp).sort(), [FERRY, WASI].sort());
  assert.deepEqual(Object.keys(imp[FERRY]).sort(), Object.keys(FERRY_IMPORTS).sort());
  assert.deepEqual(Object.keys(imp[WASI]).sort(), Object.keys(WASI_IMPORTS).sort());
  for (const [name, sig] of Object.entries(FERRY_IMPORTS)) assert.equal((imp[FERRY][name] as Fn).length, sig.params.length, name);
  for (const [name, sig] of Object.entries(WASI_IMPORTS)) assert.equal((imp[WASI][name] as Fn).length, sig.params.length, name);
});

test('config_read: length probe, truncation, full copy, dirty marks', () => {
  const { mem, f } = setup({ config: 'keys=1000000 pattern=zipf' });
  const cfg = 'keys=1000000 pattern=zipf';
  mem.dirty.clear();
  assert.equal(f('config_read')(100, 0), cfg.length);
  assert.equal(mem.dirty.size, 0, 'cap 0 writes nothing');
  assert.equal(f('config_read')(100, 4), cfg.length);
  assert.equal(dec(mem.bytes.subarray(100, 105)), 'keys\0');
  assert.deepEqual([...mem.dirty], [0]);
  assert.equal(f('config_read')(8190, 64), cfg.length);
  assert.equal(dec(mem.bytes.subarray(8190, 8190 + cfg.length)), cfg);
  assert.deepEqual([...mem.dirty].sort(), [0, 1, 2], 'a write straddling a page boundary marks both pages');
  assert.throws(() => f('config_read')(MEM - 2, 64), { code: 'ERR_GUEST_MEMORY_RANGE' });
});

test('console_write splits lines, keeps the partial line (also across UTF-8 splits), flushes on demand', () => {
  const { mem, hooks, f, dev } = setup();
  const put = (s: Uint8Array) => { mem.bytes.set(s, 1000); f('console_write')(1000, s.length); };
  put(text('hello\nwor'));
  assert.deepEqual(hooks.lines, ['hello']);
  const euro = text('€'); // 3 bytes, split across two writes
  put(euro.subarray(0, 1));
  put(Uint8Array.from([...euro.subarray(1), 0x0a, 0x0a]));
  put(text('tail'));
  assert.deepEqual(hooks.lines, ['hello', 'wor€', '']);
  dev.flushConsole();
  assert.deepEqual(hooks.lines, ['hello', 'wor€', '', 'tail']);
  dev.flushConsole();
  assert.equal(hooks.lines.length, 4, 'nothing left to flush');
  const long = new Uint8Array(CONSOLE_MAX_LINE + 10).fill(0x61);
  mem.bytes.set(long, 0);
  f('console_write')(0, long.length);
  assert.equal(hooks.lines.length, 5, 'an over-long partial line is emitted to keep the buffer bounded');
  assert.equal(hooks.lines[4].length, CONSOLE_MAX_LINE);
});

test('random_fill fills through the memory interface; out of range traps', () => {
  const { mem, f, w } = setup();
  mem.dirty.clear();
  f('random_fill')(4096 * 3 + 100, 5000);
  assert.deepEqual([...mem.dirty].sort(), [3, 4]);
  const region = mem.bytes.subarray(4096 * 3 + 100, 4096 * 3 + 5100);
  assert.ok(region.some((b) => b !== 0), 'random bytes written');
  assert.equal(mem.bytes[4096 * 3 + 99], 0);
  assert.equal(mem.bytes[4096 * 3 + 5100], 0);
  assert.throws(() => f('random_fill')(MEM - 10, 11), { code: 'ERR_GUEST_MEMORY_RANGE' });
  assert.equal(w('random_get')(MEM - 10, 11), Errno.FAULT);
  assert.equal(w('random_get')(64, 16), Errno.SUCCESS);
});

test('clock_ns starts at 0, is monotonic, and is frozen while paused', () => {
  const { f, clock, dev } = setup();
  assert.equal(f('clock_ns')(), 0n);
  clock.advance(500);
  assert.equal(f('clock_ns')(), 500n);
  dev.pause();
  clock.advance(1_000_000_000); // a long downtime
  assert.equal(f('clock_ns')(), 500n, 'paused: frozen');
  dev.pause();
  dev.resume();
  assert.equal(f('clock_ns')(), 500n, 'resumes where it stopped, not by the downtime');
  clock.advance(250);
  dev.resume();
  assert.equal(f('clock_ns')(), 750n);
  clock.t -= 100n; // a host clock that steps back must not make the guest clock go back
  assert.equal(f('clock_ns')(), 750n);
  clock.advance(200);
  assert.equal(f('clock_ns')(), 850n);
});

test('net_init validates its arguments and writes fresh headers (dirty-marked)', () => {
  const { mem, f } = setup();
  assert.equal(f('net_init')(0, 1000), -1, 'not a power of two');
  assert.equal(f('net_init')(0, 2048), -1, 'too small');
  assert.equal(f('net_init')(0, 32 << 20), -1, 'too big');
  assert.equal(f('net_init')(MEM - 4096, 4096), -1, 'outside memory');
  assert.equal(f('net_init')(-4096, 4096), -1, 'negative base (huge unsigned)');
  mem.bytes.fill(0xee, 8192, 8192 + 16);
  mem.dirty.clear();
  assert.equal(f('net_init')(8192, 4096), 0);
  const { rxAt, txAt } = guestRings(mem, 8192, 4096);
  for (const h of [rxAt, txAt]) {
    assert.deepEqual([mem.readU32(h), mem.readU32(h + 4), mem.readU32(h + 8), mem.readU32(h + 12)], [0, 0, 4096, 0]);
    assert.ok(mem.dirty.has(Math.floor(h / 4096)));
  }
  assert.equal(f('net_init')(8192, 4096), -1, 'only once');
});

test('rx delivery: full ring keeps records queued; later delivery wraps around, in order, dirty-marked', () => {
  const { mem, f, dev, hooks } = setup();
  const base = 16384;
  assert.equal(f('net_init')(base, 4096), 0);
  const g = guestRings(mem, base, 4096);
  const sent = [rec(7, NetRecord.OPEN)];
  for (let i = 0; i < 10; i++) sent.push(rec(7, NetRecord.DATA, bytesOf(1001 + i, i)));
  sent.push(rec(7, NetRecord.CLOSE));
  assert.equal(dev.hasPendingInput(), false);
  assert.equal(dev.deliverNet(sent), true);
  assert.equal(dev.hasPendingInput(), false, 'queued but not yet in the ring');
  const received: NetRecordData[] = [];
  let rounds = 0;
  while (received.length < sent.length) {
    assert.ok(rounds++ < 20, 'delivery must make progress');
    assert.deepEqual(mem.unmarkedChanges(() => dev.betweenQuanta()), [], 'every byte the host wrote is dirty-marked');
    assert.ok(g.rx.used <= 4096);
    if (rounds === 1) {
      assert.equal(dev.hasPendingInput(), true);
      assert.ok(dev.rxQueuedBytes() > 0, 'a 4 KiB ring cannot take 10 KiB: the rest stays queued');
      dev.betweenQuanta();
      assert.equal(g.rx.used, 12 + 1016 * 4, 'OPEN + 4 DATA records (1016 bytes each): nothing more fits until the guest consumes');
    }
    const one = g.rx.pop(); // the guest consumes one record per quantum
    if (one) received.push(one);
  }
  assert.equal(dev.rxQueuedBytes(), 0);
  assert.equal(dev.hasPendingInput(), false);
  assert.ok(g.rx.tail > 4096 * 2, 'the ring wrapped around');
  assert.equal(hooks.credits.reduce((a, b) => a + b, 0), sent.reduce((a, r) => a + r.payload.length, 0), 'credit = payload bytes moved into the ring');
  assert.ok(hooks.credits.length > 1 && hooks.credits.every((c) => c > 0));
  assert.deepEqual(simple(received), simple(sent));
});

test('the device makes present only the ring bytes it touches: the header, the tx records queued, the rx space used (a post-copy destination fetches no more)', () => {
  const { mem, f, dev, hooks } = setup();
  const base = 8192;
  const size = 65536; // 16 pages a ring
  assert.equal(f('net_init')(base, size), 0);
  const g = guestRings(mem, base, size);
  // Twice round, so the second time the records straddle the ring's end.
  for (let round = 0; round < 2; round++) {
    const start = round === 0 ? 0 : size - 100;
    if (round === 1) {
      for (const h of [g.rxAt, g.txAt]) { mem.writeU32(h, start); mem.writeU32(h + 4, start); }
    }
    const out = [rec(3, NetRecord.DATA, bytesOf(300, round)), rec(4, NetRecord.DATA, 'bye')];
    for (const r of out) assert.ok(g.tx.push(r));
    const into = [rec(5, NetRecord.DATA, bytesOf(500, round + 1)), rec(5, NetRecord.CLOSE)];
    assert.equal(dev.deliverNet(into), true);
    mem.ensured.length = 0;
    const before = mem.bytes.slice();
    dev.betweenQuanta();
    assert.deepEqual(simple(hooks.tx.at(-1)!), simple(out), 'the guest’s records went out');
    const got = [g.rx.pop()!, g.rx.pop()!];
    assert.deepEqual(simple(got), simple(into), 'the host’s records came in');
    const changed: number[] = [];
    for (let i = 0; i < before.length; i++) if (before[i] !== mem.bytes[i]) changed.push(i);
    assert.ok(changed.length > 500 && changed.every((i) => mem.isEnsured(i)), 'every byte the device wrote was made present first');
    const ensuredBytes = mem.ensured.reduce((n, [, l]) => n + l, 0);
    assert.ok(ensuredBytes < 2048, `${ensuredBytes} bytes made present, of two ${size}-byte rings`);
  }
});

test('tx drain: guest records reach hooks.netTx in order; the head advance is dirty-marked', () => {
  const { mem, f, dev, hooks } = setup();
  const base = 4096 * 5;
  f('net_init')(base, 4096);
  const g = guestRings(mem, base, 4096);
  dev.betweenQuanta();
  assert.equal(hooks.tx.length, 0, 'no call for an empty ring');
  const out = [rec(3, NetRecord.DATA, 'HTTP/1.1 200 OK\r\n'), rec(4, NetRecord.DATA, bytesOf(3000, 1)), rec(3, NetRecord.CLOSE)];
  let pushed = 0;
  const all: NetRecordData[] = [];
  for (let round = 0; round < 4; round++) {
    for (const r of out) { assert.ok(g.tx.push(r)); pushed++; }
    assert.deepEqual(mem.unmarkedChanges(() => dev.betweenQuanta()), []);
    assert.ok(mem.dirty.has(Math.floor(g.txAt / 4096)));
    assert.equal(g.tx.used, 0);
    all.push(...hooks.tx.at(-1)!);
  }
  assert.equal(hooks.tx.length, 4);
  assert.equal(all.length, pushed);
  assert.deepEqual(simple(all), simple([...out, ...out, ...out, ...out]));
  assert.equal(hooks.aborts.length, 0);
});

test('a corrupt tx ring aborts the VM once with a clear message (no crash, no more ring access)', () => {
  const { mem, f, dev, hooks } = setup();
  f('net_init')(0, 4096);
  const g = guestRings(mem, 0, 4096);
  g.tx.push(rec(1, NetRecord.DATA, 'ok'));
  mem.writeU32(g.txAt + 4, mem.readU32(g.txAt + 4) + 9000); // tail beyond the ring
  dev.deliverNet([rec(1, NetRecord.DATA, 'x')]);
  dev.betweenQuanta();
  assert.equal(hooks.aborts.length, 1);
  assert.match(hooks.aborts[0], /network device: .*corrupt/);
  dev.betweenQuanta();
  assert.equal(hooks.aborts.length, 1, 'reported once');
  assert.equal(dev.hasPendingInput(), false);
  assert.equal(dev.exportState().net.failed, true);
});

test('corrupt rx ring and bad tx record types abort', () => {
  {
    const { mem, f, dev, hooks } = setup();
    f('net_init')(0, 4096);
    mem.writeU32(0, 12345); // rx head moved past the tail by the guest
    dev.deliverNet([rec(1, NetRecord.OPEN)]);
    dev.betweenQuanta();
    assert.equal(hooks.aborts.length, 1);
    assert.match(hooks.aborts[0], /corrupt/);
  }
  {
    const { mem, f, dev, hooks } = setup();
    f('net_init')(0, 4096);
    const g = guestRings(mem, 0, 4096);
    g.tx.push(rec(1, NetRecord.DATA, 'first'));
    g.tx.push(rec(1, NetRecord.OPEN));
    dev.betweenQuanta();
    assert.equal(hooks.aborts.length, 1);
    assert.match(hooks.aborts[0], /type 1/);
    assert.deepEqual(simple(hooks.tx.flat()), simple([rec(1, NetRecord.DATA, 'first')]), 'records before the bad one are still delivered');
  }
  {
    const { mem, f, dev, hooks } = setup();
    f('net_init')(0, 4096);
    const g = guestRings(mem, 0, 4096);
    // A record header claiming 70000 bytes.
    mem.writeU32(g.txAt + 16, 70000);
    mem.writeU32(g.txAt + 4, 16);
    dev.betweenQuanta();
    assert.equal(hooks.aborts.length, 1);
  }
});

test('rx queue overflow refuses the whole batch, reports the connections, keeps earlier records', () => {
  const { f, dev, hooks, mem } = setup({ rxQueueLimit: 10_000 });
  f('net_init')(0, 4096);
  assert.equal(dev.deliverNet([rec(1, NetRecord.DATA, bytesOf(6000, 1))]), true);
  assert.equal(dev.deliverNet([rec(2, NetRecord.OPEN), rec(2, NetRecord.DATA, bytesOf(6000, 2))]), false);
  assert.deepEqual(hooks.overflows, [{ code: 'ERR_NET_RX_OVERFLOW', conns: [2] }]);
  assert.equal(dev.exportState().net.rx.length, 1);
  assert.equal(dev.deliverNet([rec(2, NetRecord.CLOSE), rec(1, NetRecord.CLOSE)]), true, 'CLOSE-only batches are always taken');
  assert.equal(dev.exportState().net.rx.length, 3);
  assert.throws(() => dev.deliverNet([rec(1, 9)]), { code: 'ERR_INVALID_ARGUMENT' });
  assert.throws(() => dev.deliverNet([rec(1, NetRecord.DATA, new Uint8Array(65537))]), { code: 'ERR_INVALID_ARGUMENT' });
  void mem;
});

test('block device: sparse creation, zeros, round trip, bounds, write bitmap', () => {
  const { dir, path } = tmpDisk();
  try {
    const size = 1 << 20;
    const { mem, f, dev } = setup({ block: { path, sizeBytes: size } });
    assert.equal(statSync(path).size, size, 'created at the disk size');
    assert.equal(f('block_size')(), BigInt(size));
    mem.bytes.fill(0xaa, 0, 8192);
    mem.dirty.clear();
    assert.equal(f('block_read')(100_000n, 10, 8000), 0);
    assert.ok(mem.bytes.subarray(10, 8010).every((b) => b === 0), 'unwritten area reads as zeros');
    assert.equal(mem.bytes[8010], 0xaa);
    assert.deepEqual([...mem.dirty].sort(), [0, 1]);
    assert.deepEqual([...dev.blockWriteBitmap()!], [], 'reads do not mark');

    mem.bytes.set(bytesOf(10_000, 5), 20_000);
    assert.equal(f('block_write')(BigInt(4096 * 3 - 1), 20_000, 10_000), 0);
    assert.deepEqual([...dev.blockWriteBitmap()!], [2, 3, 4, 5], 'every 4 KiB block touched');
    assert.equal(f('block_read')(BigInt(4096 * 3 - 1), 40_000, 10_000), 0);
    assert.deepEqual(mem.bytes.subarray(40_000, 50_000), bytesOf(10_000, 5));
    assert.deepEqual(new Uint8Array(readFileSync(path).subarray(4096 * 3 - 1, 4096 * 3 - 1 + 10_000)), bytesOf(10_000, 5), 'on the disk file');

    assert.equal(f('block_read')(BigInt(size - 10), 0, 11), -1, 'past the end');
    assert.equal(f('block_write')(BigInt(size - 10), 0, 11), -1);
    assert.equal(f('block_read')(-1n, 0, 1), -1);
    assert.equal(f('block_read')(0n, 0, -1), -1, 'negative length is huge unsigned');
    assert.equal(f('block_read')(BigInt(size), 0, 0), 0, 'empty read at the end');
    assert.equal(f('block_write')(BigInt(size - 4096), 0, 4096), 0);
    assert.equal(dev.blockWriteBitmap()!.get(255), true);
    assert.throws(() => f('block_read')(0n, MEM - 1, 2), { code: 'ERR_GUEST_MEMORY_RANGE' });

    dev.clearBlockWrites();
    assert.equal(dev.blockWriteBitmap()!.count(), 0);
    dev.close();

    // An existing (shorter) file is used as it is: never truncated, the rest reads as zeros.
    writeFileSync(path, bytesOf(5000, 9));
    const again = setup({ block: { path, sizeBytes: size } });
    assert.equal(statSync(path).size, 5000);
    again.mem.bytes.fill(0xcc, 0, 8192);
    assert.equal(again.f('block_read')(0n, 0, 8192), 0);
    assert.deepEqual(again.mem.bytes.subarray(0, 5000), bytesOf(5000, 9));
    assert.ok(again.mem.bytes.subarray(5000, 8192).every((b) => b === 0));
    again.dev.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('no disk: block_size 0, reads and writes fail', () => {
  const { f, dev } = setup();
  assert.equal(f('block_size')(), 0n);
  assert.equal(f('block_read')(0n, 0, 16), -1);
  assert.equal(f('block_write')(0n, 0, 16), -1);
  assert.equal(dev.blockWriteBitmap(), null);
});

test('soft pages: whole pages only, free/in-use, device writes and markInUse reclaim', () => {
  const { f, dev } = setup();
  assert.equal(dev.softPages().size, SOFT_PAGE_COUNT);
  f('soft_pages')(4096 + 1, 4096 * 4, 1); // pages 2..4 whole; 1 and 5 partial
  assert.deepEqual([...dev.softPages()], [2, 3, 4]);
  f('soft_pages')(0, 4096 * 64 * 2, 1); // a word-aligned run
  assert.equal(dev.softPages().count(), 128);
  f('soft_pages')(4096 * 10, 4096 * 2, 0);
  assert.equal(dev.softPages().get(10), false);
  assert.equal(dev.softPages().get(11), false);
  assert.equal(dev.softPages().get(12), true);
  f('random_fill')(4096 * 20 + 5, 1); // a device write makes the page in use
  assert.equal(dev.softPages().get(20), false);
  f('config_read')(4096 * 21 - 2, 4);
  assert.equal(dev.softPages().get(20), false);
  assert.equal(dev.softPages().get(21), false);
  dev.markInUse([30, 31]);
  const bm = new Bitmap(SOFT_PAGE_COUNT);
  bm.set(40);
  dev.markInUse(bm);
  const s = dev.softPages();
  assert.equal(s.get(30) || s.get(31) || s.get(40), false);
  assert.equal(s.count(), 128 - 2 - 2 - 3);
  s.clearAll();
  assert.equal(dev.softPages().count(), 128 - 7, 'softPages() returns a copy');
  f('soft_pages')(MEM * 1000, 4096 * 4, 1); // beyond the current memory: recorded, no trap
});

test('a free report zeroes its whole pages, marked dirty; a page the guest writes afterwards leaves the soft set for good', () => {
  const { f, dev, mem } = setup();
  mem.bytes.fill(9, 0, 4096 * 8);
  f('soft_pages')(4096 + 100, 4096 * 4, 1); // pages 2..4 whole; 1 and 5 partial
  for (const p of [2, 3, 4]) assert.ok(mem.bytes.subarray(p * 4096, (p + 1) * 4096).every((b) => b === 0), `page ${p} zeroed`);
  for (const p of [1, 5]) assert.ok(mem.bytes.subarray(p * 4096, (p + 1) * 4096).every((b) => b === 9), `partial page ${p} untouched`);
  assert.deepEqual([...mem.dirty].sort((a, b) => a - b), [2, 3, 4]);
  assert.deepEqual([...dev.softPages()], [2, 3, 4]);
  mem.bytes[3 * 4096 + 5] = 1; // a guest store: devices do not see it
  mem.bytes.fill(0, 4 * 4096, 4 * 4096 + 64); // zeros over zeros: nothing to tell
  assert.deepEqual([...dev.softPages()], [2, 4]);
  mem.bytes[3 * 4096 + 5] = 0;
  assert.deepEqual([...dev.softPages()], [2, 4], 'in use again until reported free again');
  f('soft_pages')(MEM, 4096 * 2, 1); // beyond the memory: recorded, nothing to zero
  assert.equal(dev.softPages().get(MEM / 4096), true);
});

test('rx ring writes reclaim soft pages', () => {
  const { f, dev } = setup();
  f('soft_pages')(0, MEM, 1);
  f('net_init')(4096 * 8, 4096);
  assert.equal(dev.softPages().get(8), false, 'ring headers');
  dev.deliverNet([rec(1, NetRecord.DATA, bytesOf(3000, 1))]);
  dev.betweenQuanta();
  assert.equal(dev.softPages().get(9), false, 'rx data written');
  assert.equal(dev.softPages().get(12), true);
});

test('soft pages: what a pause exports stops at the last page ever reported free, and a restore keeps every bit', () => {
  const a = setup();
  assert.equal(a.dev.softPageWords().length, 0, 'nothing reported, nothing to export');
  a.f('soft_pages')(4096 * 10, 4096 * 3, 1); // pages 10..12, in memory
  const beyond = MEM / 4096 + 1000; // beyond memory as it is now: stays as reported
  a.f('soft_pages')(4096 * beyond, 4096, 1);
  const words = a.dev.softPageWords();
  assert.equal(words.length, Math.ceil((beyond + 1) / 32));
  const expect = [10, 11, 12, beyond];
  assert.deepEqual([...new Bitmap(words.length * 32, words)], expect);
  a.mem.bytes[11 * 4096 + 7] = 1; // the guest wrote page 11 again: in use
  expect.splice(1, 1);
  assert.deepEqual([...a.dev.softPages()], expect);
  a.dev.pause();
  const restored = Devices.fromState(parseDeviceState(JSON.parse(JSON.stringify(a.dev.exportState()))), a.init, new FakeMemory(MEM, a.mem.bytes), new RecordingHooks());
  assert.deepEqual([...restored.softPages()], expect);
  assert.ok(restored.softPageWords().length >= Math.ceil((beyond + 1) / 32), 'the bound survives the restore');
});

test('state: export → JSON → fromState continues identically', () => {
  const { dir, path } = tmpDisk();
  try {
    const a = setup({ block: { path, sizeBytes: 65536 }, config: 'x=1' });
    a.f('net_init')(8192, 4096);
    a.f('soft_pages')(4096 * 40, 4096 * 3, 1);
    a.mem.bytes.set(bytesOf(100, 3), 0);
    a.f('block_write')(4096n * 5n, 0, 100);
    a.mem.bytes.set(text('partial li'), 200);
    a.f('console_write')(200, 10);
    const recs = [rec(9, NetRecord.OPEN), ...[0, 1, 2, 3, 4, 5].map((i) => rec(9, NetRecord.DATA, bytesOf(1500, i)))];
    a.dev.deliverNet(recs);
    a.dev.betweenQuanta();
    a.clock.advance(12345);
    a.dev.pause();
    const queuedBefore = a.dev.rxQueuedBytes();
    assert.ok(queuedBefore > 0);
    const json = JSON.stringify(a.dev.exportState());
    const state = JSON.parse(json) as unknown;
    assert.ok(json.length < 100_000, 'bounded');

    // The destination: a copy of guest memory, the same disk, a different host clock.
    const b = setup({ block: { path, sizeBytes: 65536 }, config: 'x=1', mem: new FakeMemory(MEM, a.mem.bytes) });
    b.dev.close();
    const hooks = new RecordingHooks();
    const clock = new FakeClock();
    clock.t = 999_999_999_999n;
    const restored = Devices.fromState(parseDeviceState(state), b.init, b.mem, hooks, { now: clock.now });
    assert.deepEqual(restored.exportState(), JSON.parse(json), 'export of a fresh restore is the same state');
    const imp = restored.imports()[FERRY] as Record<string, Fn>;
    const clockNs = imp.clock_ns as unknown as () => bigint;
    assert.equal(clockNs(), 12345n, 'clock continues from its value');
    clock.advance(1000);
    assert.equal(clockNs(), 12345n, 'frozen until resume');
    restored.resume();
    clock.advance(5);
    assert.equal(clockNs(), 12350n);
    assert.equal(restored.rxQueuedBytes(), queuedBefore);
    assert.deepEqual([...restored.softPages()], [40, 41, 42]);
    assert.deepEqual([...restored.blockWriteBitmap()!], [5]);
    assert.equal((imp.net_init as unknown as (a: number, b: number) => number)(0, 4096), -1, 'the ring is still attached');

    // Both continue with the same guest behaviour: identical memory and output.
    a.dev.resume();
    for (const side of [{ dev: a.dev, mem: a.mem }, { dev: restored, mem: b.mem }]) {
      const g = guestRings(side.mem, 8192, 4096);
      for (let i = 0; i < 8; i++) {
        side.dev.betweenQuanta();
        g.rx.pop();
      }
    }
    assert.deepEqual(b.mem.bytes, a.mem.bytes);
    assert.equal(restored.rxQueuedBytes(), 0);
    (imp.console_write as unknown as (p: number, l: number) => void)(200, 0);
    b.mem.bytes.set(text('ne\n'), 300);
    (imp.console_write as unknown as (p: number, l: number) => void)(300, 3);
    assert.deepEqual(hooks.lines, ['partial line']);
    restored.close();
    a.dev.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('fromState refuses bad state with ERR_DEVICE_STATE', () => {
  const { dir, path } = tmpDisk();
  try {
    const a = setup({ block: { path, sizeBytes: 8192 } });
    a.f('net_init')(0, 4096);
    const good = a.dev.exportState();
    a.dev.close();
    const clone = () => JSON.parse(JSON.stringify(good)) as Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
    const bad: unknown[] = [
      null, 42, 'state', {},
      { ...clone(), version: 2 },
      (() => { const s = clone(); s.clock.ns = '-5'; return s; })(),
      (() => { const s = clone(); s.clock.ns = '99999999999999999999'; return s; })(),
      (() => { const s = clone(); s.net.ring = { base: MEM, size: 4096 }; return s; })(),
      (() => { const s = clone(); s.net.rx = [{ conn: 1, type: 7, payload: '' }]; return s; })(),
      (() => { const s = clone(); s.net.rx = [{ conn: 1, type: 2, payload: '!!!' }]; return s; })(),
      (() => { const s = clone(); s.soft.size = 12; return s; })(),
      (() => { const s = clone(); s.soft.words = 'AAAA'.repeat(50000); return s; })(),
      (() => { const s = clone(); s.block.sizeBytes = 4096; return s; })(),
      (() => { const s = clone(); s.block.written.words = 'AQAAAAEAAAA='; return s; })(),
      (() => { const s = clone(); s.block = null; return s; })(),
      (() => { const s = clone(); s.extra = 1; return s; })(),
    ];
    for (const [i, s] of bad.entries()) {
      assert.throws(() => Devices.fromState(parseDeviceState(s), { config: '', block: { path, sizeBytes: 8192 } }, new FakeMemory(MEM), new RecordingHooks()), { code: 'ERR_DEVICE_STATE' }, `case ${i}`);
      assert.throws(() => Devices.fromState(parseDeviceState(s), { config: '', block: { path, sizeBytes: 8192 } }, new FakeMemory(MEM), new RecordingHooks()), (e: unknown) => {
        assert.ok(e instanceof DeviceStateError, `case ${i}: ${String(e)}`);
        assert.equal((e as DeviceStateError).code, 'ERR_DEVICE_STATE');
        return true;
      });
    }
    assert.throws(() => Devices.fromState(parseDeviceState(good), { config: '' }, new FakeMemory(MEM), new RecordingHooks()), { code: 'ERR_DEVICE_STATE' }, 'state has a disk, VM has none');
    Devices.fromState(parseDeviceState(good), { config: '', block: { path, sizeBytes: 8192 } }, new FakeMemory(MEM), new RecordingHooks()).close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('WASI fd_write goes to the console; other fds are EBADF', () => {
  const { mem, w, hooks } = setup();
  mem.bytes.set(text('hello, '), 1000);
  mem.bytes.set(text('world\nbye\n'), 2000);
  const dv = new DataView(mem.bytes.buffer);
  dv.setUint32(500, 1000, true); dv.setUint32(504, 7, true);
  dv.setUint32(508, 2000, true); dv.setUint32(512, 10, true);
  mem.dirty.clear();
  assert.equal(w('fd_write')(1, 500, 2, 600), Errno.SUCCESS);
  assert.equal(mem.readU32(600), 17);
  assert.ok(mem.dirty.has(0), 'nwritten is dirty-marked');
  assert.deepEqual(hooks.lines, ['hello, world', 'bye']);
  assert.equal(w('fd_write')(2, 500, 1, 600), Errno.SUCCESS);
  assert.equal(w('fd_write')(3, 500, 1, 600), Errno.BADF);
  assert.equal(w('fd_write')(0, 500, 1, 600), Errno.BADF);
  assert.equal(w('fd_write')(1, MEM - 4, 1, 600), Errno.FAULT);
  assert.equal(w('fd_write')(1, 500, 1, MEM), Errno.FAULT);
});

test('WASI fd_close/fd_seek/fd_fdstat_get, args, environ, clocks', () => {
  const { mem, w, clock, dev } = setup({ config: 'keys=5' });
  assert.equal(w('fd_close')(5), Errno.BADF);
  assert.equal(w('fd_close')(1), Errno.SUCCESS);
  assert.equal(w('fd_seek')(1, 0n, 0, 100), Errno.SPIPE);
  assert.equal(w('fd_seek')(9, 0n, 0, 100), Errno.BADF);
  mem.bytes.fill(0xff, 100, 124);
  assert.equal(w('fd_fdstat_get')(1, 100), Errno.SUCCESS);
  assert.equal(mem.bytes[100], 2, 'character device');
  assert.equal(new DataView(mem.bytes.buffer).getBigUint64(108, true), 1n << 6n, 'fd_write right');
  assert.equal(new DataView(mem.bytes.buffer).getBigUint64(116, true), 0n);
  assert.equal(w('fd_fdstat_get')(4, 100), Errno.BADF);

  assert.equal(w('args_sizes_get')(200, 204), Errno.SUCCESS);
  assert.deepEqual([mem.readU32(200), mem.readU32(204)], [1, 7]);
  assert.equal(w('args_get')(300, 400), Errno.SUCCESS);
  assert.equal(mem.readU32(300), 400);
  assert.equal(dec(mem.bytes.subarray(400, 407)), 'keys=5\0');
  mem.writeU32(500, 99); mem.writeU32(504, 99);
  assert.equal(w('environ_sizes_get')(500, 504), Errno.SUCCESS);
  assert.deepEqual([mem.readU32(500), mem.readU32(504)], [0, 0]);
  assert.equal(w('environ_get')(500, 504), Errno.SUCCESS);

  clock.advance(777);
  assert.equal(w('clock_time_get')(1, 0n, 600), Errno.SUCCESS);
  assert.equal(new DataView(mem.bytes.buffer).getBigUint64(600, true), 777n);
  assert.equal(w('clock_time_get')(0, 0n, 608), Errno.SUCCESS);
  assert.equal(new DataView(mem.bytes.buffer).getBigUint64(608, true), 1_700_000_000_000_000_000n + 777n);
  dev.pause();
  clock.advance(10_000);
  assert.equal(w('clock_time_get')(1, 0n, 600), Errno.SUCCESS);
  assert.equal(new DataView(mem.bytes.buffer).getBigUint64(600, true), 777n, 'frozen while paused');
  assert.equal(w('clock_time_get')(2, 0n, 600), Errno.INVAL);
  assert.equal(w('clock_time_get')(1, 0n, MEM - 4), Errno.FAULT);
});

test('proc_exit flushes the console, calls halt, and never returns to the guest', () => {
  const { mem, w, f, hooks } = setup();
  mem.bytes.set(text('bye'), 0);
  f('console_write')(0, 3);
  assert.throws(() => w('proc_exit')(3), (e: unknown) => e instanceof GuestExitError && e.code === 'ERR_GUEST_EXIT' && e.exitCode === 3);
  assert.deepEqual(hooks.halts, [3]);
  assert.deepEqual(hooks.lines, ['bye']);
  // A hook that unwinds itself wins.
  const mem2 = new FakeMemory(MEM);
  const dev2 = new Devices({ config: '' }, mem2, { ...new RecordingHooks(), console() {}, netTx() {}, abort() {}, halt(code) { throw new Error(`halt ${code}`); } });
  assert.throws(() => ((dev2.imports()[WASI] as Record<string, Fn>).proc_exit as unknown as (c: number) => void)(0), /halt 0/);
});

test('abort decodes AssemblyScript strings best effort', () => {
  const { mem, f, hooks } = setup();
  const asString = (at: number, s: string) => {
    const units = new Uint16Array([...s].map((c) => c.charCodeAt(0)));
    mem.writeU32(at - 4, units.length * 2);
    mem.bytes.set(new Uint8Array(units.buffer), at);
  };
  asString(1004, 'index out of range');
  asString(2004, 'assembly/index.ts');
  assert.throws(() => f('abort')(1004, 2004, 12, 7), { code: 'ERR_GUEST_TRAP' });
  assert.equal(hooks.aborts[0], 'index out of range at assembly/index.ts:12:7');
  assert.throws(() => f('abort')(0, 0, 0, 0), { code: 'ERR_GUEST_TRAP' });
  assert.equal(hooks.aborts[1], 'abort');
  mem.writeU32(3000, 0x7fffffff); // absurd length
  assert.throws(() => f('abort')(3004, MEM + 50, 1, 1), { code: 'ERR_GUEST_TRAP' });
  assert.match(hooks.aborts[2], /at <unreadable string at \d+>:1:1$/);
  assert.ok(hooks.aborts[2].length < 10_000);
});

test('a real Wasm guest calls the imports (i64 offsets and clock as BigInt)', () => {
  const wat = `(module
    (import "ferry" "clock_ns" (func $clock (result i64)))
    (import "ferry" "config_read" (func $cfg (param i32 i32) (result i32)))
    (import "ferry" "block_write" (func $bw (param i64 i32 i32) (result i32)))
    (import "ferry" "block_read" (func $br (param i64 i32 i32) (result i32)))
    (import "ferry" "console_write" (func $cw (param i32 i32)))
    (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
    (memory (export "memory") 2)
    (data (i32.const 16) "hi from wasm\\0a")
    (func (export "clock") (result i64) (call $clock))
    (func (export "cfg") (param i32 i32) (result i32) (call $cfg (local.get 0) (local.get 1)))
    (func (export "bw") (param i64 i32 i32) (result i32) (call $bw (local.get 0) (local.get 1) (local.get 2)))
    (func (export "br") (param i64 i32 i32) (result i32) (call $br (local.get 0) (local.get 1) (local.get 2)))
    (func (export "say") (call $cw (i32.const 16) (i32.const 13)))
    (func (export "exit") (param i32) (call $exit (local.get 0))))`;
  const mod = binaryen.parseText(wat);
  assert.ok(mod.validate());
  const bin = mod.emitBinary();
  const wasm = new Uint8Array(new ArrayBuffer(bin.length));
  wasm.set(bin);
  mod.dispose();
  const { dir, path } = tmpDisk();
  try {
    let memory: WebAssembly.Memory | null = null;
    const lazy = new Proxy({} as FakeMemory, {
      get: (_t, k) => {
        const m = new FakeMemory(0, undefined, new Uint8Array(memory!.buffer));
        const v = (m as unknown as Record<string | symbol, unknown>)[k];
        return typeof v === 'function' ? (v as Fn).bind(m) : v;
      },
    });
    const hooks = new RecordingHooks();
    hooks.halt = (code: number) => { hooks.halts.push(code); throw new Error(`halted ${code}`); };
    const clock = new FakeClock();
    const size = 2 ** 33; // 8 GiB sparse: offsets beyond 32 bits
    const dev = new Devices({ config: 'mode=wasm', block: { path, sizeBytes: size } }, lazy, hooks, { now: clock.now });
    const instance = new WebAssembly.Instance(new WebAssembly.Module(wasm), dev.imports());
    memory = instance.exports.memory as WebAssembly.Memory;
    const e = instance.exports as Record<string, (...a: (number | bigint)[]) => number & bigint>;
    clock.advance(4242);
    assert.equal(e.clock(), 4242n);
    assert.equal(e.cfg(1000, 64), 9);
    assert.equal(dec(new Uint8Array(memory.buffer, 1000, 9)), 'mode=wasm');
    e.say();
    assert.deepEqual(hooks.lines, ['hi from wasm']);
    const far = 2n ** 32n + 4090n;
    assert.equal(e.bw(far, 1000, 9), 0);
    assert.deepEqual([...dev.blockWriteBitmap()!], [Number(far / 4096n), Number(far / 4096n) + 1]);
    assert.equal(e.br(far, 2000, 9), 0);
    assert.equal(dec(new Uint8Array(memory.buffer, 2000, 9)), 'mode=wasm');
    assert.equal(e.br(-1n, 0, 1), -1);
    assert.equal(e.br(BigInt(size) - 4n, 0, 5), -1);
    assert.throws(() => e.br(0n, 65536 * 2 - 2, 4), { code: 'ERR_GUEST_MEMORY_RANGE' }, 'a bad pointer traps');
    assert.throws(() => e.exit(7), /halted 7/);
    assert.deepEqual(hooks.halts, [7]);
    dev.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('the sample that warms device-state validation is a valid state, every optional part present', () => {
  // A sample the schema rejected would fail every destination at its creation (warmDeviceStateValidation).
  assert.deepEqual(parseDeviceState(structuredClone(SAMPLE_DEVICE_STATE)), SAMPLE_DEVICE_STATE);
  assert.notEqual(SAMPLE_DEVICE_STATE.net.ring, null);
  assert.notEqual(SAMPLE_DEVICE_STATE.block, null);
  assert.ok(SAMPLE_DEVICE_STATE.net.rx.length > 0);
});
