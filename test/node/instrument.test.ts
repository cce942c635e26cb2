import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import binaryen from 'binaryen';
import { PRESENCE_MAP_OFFSET, RESERVED_BYTES, RESERVED_PAGES, RESERVED_WASM_PAGES } from '../../src/core/abi.js';
import { GuestModuleError } from '../../src/core/errors.js';
import { InstrumentCache, inspectGuest, instrument, REWRITER_VERSION } from '../../src/node/vm/instrument.js';
import type { Variant } from '../../src/node/vm/instrument.js';
import { mulberry32 as rng } from '../helpers/prng.js';

// ------------------------------------------------------------------------------------------ helpers

const PAGE = 4096;

const F = binaryen.Features;
/** Node 20's features plus memory64 and multi-memory, so tests can build modules ferry must refuse (no GC: it changes encodings). */
const WAT_FEATURES = F.Atomics | F.MutableGlobals | F.NontrappingFPToInt | F.SIMD128 | F.BulkMemory | F.BulkMemoryOpt |
  F.SignExt | F.ReferenceTypes | F.Multivalue | F.Memory64 | F.MultiMemory | F.CallIndirectOverlong;

/** Assembles WAT with binaryen; `names` keeps the name section (binaryen's global debug-info switch). */
function wat(text: string, names = false): Uint8Array {
  const m = binaryen.parseText(text);
  const debug = binaryen.getDebugInfo();
  try {
    m.setFeatures(WAT_FEATURES);
    binaryen.setDebugInfo(names);
    return m.emitBinary();
  } finally {
    binaryen.setDebugInfo(debug);
    m.dispose();
  }
}

const NO_IMPORTS = {};
type Exports = Record<string, unknown>;

interface Booted {
  exports: Exports;
  memory: WebAssembly.Memory;
  u8: () => Uint8Array;
  faults: number[];
  instance: WebAssembly.Instance;
}

interface BootOptions {
  /** Guest pages (64 KiB) the VM may grow to. Default 16. */
  maxPages?: number;
  /** Reuse this memory (a migration destination) instead of allocating one. */
  memory?: WebAssembly.Memory;
  /** Skip __ferry_boot (a migration destination). */
  noBoot?: boolean;
  /** Presence variant: physical pages to mark absent after boot (all others are present). */
  absent?: number[];
  imports?: Record<string, Record<string, unknown>>;
  /** Presence variant: called on a fault before the page is marked present (to install its content). */
  onFault?: (page: number, u8: Uint8Array) => void;
}

/** Instantiates a rewritten module the way the vCPU worker does, with a recording fault import. */
function boot(bytes: Uint8Array, variant: Variant, opts: BootOptions = {}): Booted {
  const r = instrument(bytes, variant);
  const guestPages = r.info.initialGuestBytes / 65536;
  const memory = opts.memory ?? new WebAssembly.Memory({
    initial: RESERVED_WASM_PAGES + guestPages, maximum: RESERVED_WASM_PAGES + (opts.maxPages ?? 16), shared: true,
  });
  const faults: number[] = [];
  const u8 = (): Uint8Array => new Uint8Array(memory.buffer);
  const fault = (page: number): void => {
    faults.push(page);
    opts.onFault?.(page, u8());
    u8()[PRESENCE_MAP_OFFSET + page] = 1;
  };
  const instance = new WebAssembly.Instance(r.module, { ...opts.imports, ferry_rt: { memory, fault } } as WebAssembly.Imports);
  const exports = instance.exports as Exports;
  if (variant === 'presence' && !opts.memory) u8().fill(1, PRESENCE_MAP_OFFSET, PRESENCE_MAP_OFFSET + (1 << 20));
  if (!opts.noBoot) (exports.__ferry_boot as () => void)();
  for (const p of opts.absent ?? []) u8()[PRESENCE_MAP_OFFSET + p] = 0;
  return { exports, memory, u8, faults, instance };
}

/** Physical pages whose dirty byte is set. */
function dirtyPages(u8: Uint8Array): number[] {
  const out: number[] = [];
  for (let i = 0; i < 1 << 20; i++) if (u8[i]) out.push(i);
  return out;
}
function clearDirty(u8: Uint8Array): void {
  u8.fill(0, 0, 1 << 20);
}
/** Physical page of guest address `a`. */
const pp = (a: number): number => RESERVED_PAGES + Math.floor(a / PAGE);
function pagesOf(a: number, len: number): number[] {
  if (len === 0) return [];
  const out: number[] = [];
  for (let p = pp(a); p <= pp(a + len - 1); p++) out.push(p);
  return out;
}
const sorted = (s: Iterable<number>): number[] => [...new Set(s)].sort((x, y) => x - y);

function callRun(b: Booted, ...args: unknown[]): unknown {
  return (b.exports.run as (...a: unknown[]) => unknown)(...args);
}

/** A guest with one exported function `f` per snippet, plus `run`. */
function guest(body: string, extra = '', memory = '(memory (export "memory") 4 16)'): Uint8Array {
  return wat(`(module ${memory} ${extra}
    (func (export "run") (param i32) (result i32) (local $t i32) ${body})
  )`);
}

// ------------------------------------------------------------------ randomized differential test


interface Program { text: string; writes: [number, number][]; reads: [number, number][] }

const GUEST_BYTES = 4 * 65536;

/**
 * A random straight-line guest mixing every kind of access (scalar, SIMD, atomic, bulk), with
 * unaligned and page-straddling addresses, pointers split between operand and offset, nested stores
 * inside value operands and pointer locals the value operand changes. Records every byte range it
 * writes and reads, so the test knows exactly which pages must be dirty or faulted.
 */
function randomProgram(seed: number): Program {
  const r = rng(seed);
  const int = (n: number): number => Math.floor(r() * n);
  const writes: [number, number][] = [];
  const reads: [number, number][] = [];
  const addr = (bytes: number, align = 1): number => {
    let a = r() < 0.35 ? (1 + int(GUEST_BYTES / PAGE - 1)) * PAGE - int(bytes + 1) : int(GUEST_BYTES - bytes);
    a -= a % align;
    return Math.max(0, Math.min(a, GUEST_BYTES - bytes));
  };
  /** `(ptr) offset=` split of a guest address. */
  const split = (a: number): [string, number] => {
    const off = r() < 0.5 ? 0 : int(Math.min(a, 3000) + 1);
    return [`(i32.const ${a - off})`, off];
  };
  const stores: [string, number, string][] = [
    ['i32.store8', 1, 'i32'], ['i32.store16', 2, 'i32'], ['i32.store', 4, 'i32'],
    ['i64.store8', 1, 'i64'], ['i64.store16', 2, 'i64'], ['i64.store32', 4, 'i64'], ['i64.store', 8, 'i64'],
    ['f32.store', 4, 'f32'], ['f64.store', 8, 'f64'], ['v128.store', 16, 'v128'],
  ];
  const constOf = (t: string): string => (t === 'v128' ? `(v128.const i32x4 ${int(2 ** 31)} ${int(2 ** 31)} ${int(2 ** 31)} ${int(2 ** 31)})`
    : t === 'f32' || t === 'f64' ? `(${t}.const ${(r() * 1e6).toFixed(3)})` : `(${t}.const ${int(2 ** 31)})`);
  const acc = (expr: string, t: string): string => {
    const asI64 = t === 'i64' ? expr : t === 'i32' ? `(i64.extend_i32_u ${expr})` : t === 'f32' ? `(i64.extend_i32_u (i32.reinterpret_f32 ${expr}))`
      : t === 'f64' ? `(i64.reinterpret_f64 ${expr})` : `(i64.add (i64x2.extract_lane 0 ${expr}) (i64x2.extract_lane 1 ${expr.replace(/^/, '')}))`;
    return `(global.set $acc (i64.add (i64.rotl (global.get $acc) (i64.const 5)) ${asI64}))`;
  };
  const ops: string[] = [];
  const simpleStore = (): string => {
    const [op, bytes, t] = stores[int(stores.length)];
    const a = addr(bytes);
    const [ptr, off] = split(a);
    writes.push([a, bytes]);
    return `(${op} offset=${off} align=1 ${ptr} ${constOf(t)})`;
  };
  for (let n = 0; n < 40; n++) {
    const k = int(14);
    if (k <= 2) {
      ops.push(simpleStore());
    } else if (k === 3) {
      // Nested store in the value operand (a different site depth), then the outer store.
      const [op, bytes, t] = stores[int(stores.length)];
      const a = addr(bytes);
      const [ptr, off] = split(a);
      const inner = simpleStore();
      writes.push([a, bytes]);
      ops.push(`(${op} offset=${off} align=1 ${ptr} (block (result ${t}) ${inner} ${constOf(t)}))`);
    } else if (k === 4) {
      // The value operand changes the local the pointer was read from: the store must use the old value.
      const a = addr(4);
      const [ptr, off] = split(a);
      writes.push([a, 4]);
      ops.push(`(local.set $t ${ptr}) (i32.store offset=${off} align=1 (local.get $t) (block (result i32) (local.set $t (i32.const 0)) (i32.const ${int(1000)})))`);
    } else if (k <= 6) {
      const loads: [string, number, string][] = [
        ['i32.load8_u', 1, 'i32'], ['i32.load16_s', 2, 'i32'], ['i32.load', 4, 'i32'], ['i64.load32_u', 4, 'i64'], ['i64.load', 8, 'i64'],
        ['f32.load', 4, 'f32'], ['f64.load', 8, 'f64'], ['v128.load', 16, 'v128'], ['v128.load8x8_s', 8, 'v128'], ['v128.load32_zero', 4, 'v128'],
        ['v128.load16_splat', 2, 'v128'],
      ];
      const [op, bytes, t] = loads[int(loads.length)];
      const a = addr(bytes);
      const [ptr, off] = split(a);
      reads.push([a, bytes]);
      ops.push(acc(`(${op} offset=${off} align=1 ${ptr})`, t));
    } else if (k === 7) {
      const a = addr(1);
      const len = Math.min(int(3 * PAGE), GUEST_BYTES - a);
      writes.push([a, len]);
      ops.push(`(memory.fill (i32.const ${a}) (i32.const ${int(256)}) (i32.const ${len}))`);
    } else if (k === 8) {
      const len = int(2 * PAGE);
      const s = int(GUEST_BYTES - len);
      const d = int(GUEST_BYTES - len);
      reads.push([s, len]);
      writes.push([d, len]);
      ops.push(`(memory.copy (i32.const ${d}) (i32.const ${s}) (i32.const ${len}))`);
    } else if (k === 9) {
      const rmw: [string, number, string][] = [
        ['i32.atomic.rmw.add', 4, 'i32'], ['i64.atomic.rmw8.xchg_u', 1, 'i64'], ['i32.atomic.rmw16.and_u', 2, 'i32'],
        ['i64.atomic.rmw.or', 8, 'i64'], ['i64.atomic.rmw32.sub_u', 4, 'i64'], ['i32.atomic.rmw8.xor_u', 1, 'i32'],
      ];
      const [op, bytes, t] = rmw[int(rmw.length)];
      const a = addr(bytes, bytes);
      const [ptr, off] = [`(i32.const ${a})`, 0];
      writes.push([a, bytes]);
      reads.push([a, bytes]);
      ops.push(acc(`(${op} offset=${off} ${ptr} (${t}.const ${int(1000)}))`, t));
    } else if (k === 10) {
      const a = addr(8, 8);
      writes.push([a, 8]);
      reads.push([a, 8]);
      ops.push(acc(`(i64.atomic.rmw.cmpxchg (i32.const ${a}) (i64.load (i32.const ${a})) (i64.const ${int(1e9)}))`, 'i64'));
      ops.push(`(i32.atomic.store (i32.const ${a}) (i32.const ${int(1e6)}))`);
    } else if (k === 11) {
      const lanes: [string, number][] = [['8', 1], ['16', 2], ['32', 4], ['64', 8]];
      const [w, bytes] = lanes[int(lanes.length)];
      const a = addr(bytes);
      const [ptr, off] = split(a);
      writes.push([a, bytes]);
      ops.push(`(v128.store${w}_lane offset=${off} align=1 1 ${ptr} ${constOf('v128')})`);
      const b = addr(bytes);
      reads.push([b, bytes]);
      ops.push(acc(`(v128.load${w}_lane align=1 0 (i32.const ${b}) (v128.const i64x2 0 0))`, 'v128'));
    } else if (k === 12) {
      const len = int(40);
      const src = int(64 - len);
      const d = addr(len || 1);
      writes.push([d, len]);
      ops.push(`(memory.init $seg (i32.const ${d}) (i32.const ${src}) (i32.const ${len}))`);
    } else {
      ops.push(acc('(memory.size)', 'i32'));
    }
  }
  const segBytes = Array.from({ length: 64 }, (_, i) => `\\${((i * 37 + seed) & 0xff).toString(16).padStart(2, '0')}`).join('');
  const text = `(module
    (memory (export "memory") 4 8)
    (global $acc (mut i64) (i64.const 0))
    (global $unused (mut f64) (f64.const 1.5))
    (data $seg "${segBytes}")
    (data (i32.const 4090) "straddling data")
    (func (export "run") (param $budget i32) (result i32) (local $t i32)
      ${ops.join('\n      ')}
      (global.set $acc (i64.add (global.get $acc) (i64.extend_i32_s (memory.grow (i32.const 1)))))
      (i32.wrap_i64 (global.get $acc)))
    (func (export "acc") (result i64) (global.get $acc)))`;
  return { text, writes, reads };
}

/** Reference run: the unrewritten module on its own memory. */
function reference(bytes: Uint8Array): { result: number; acc: bigint | undefined; mem: Uint8Array | undefined } {
  const inst = new WebAssembly.Instance(new WebAssembly.Module(bytes as Uint8Array<ArrayBuffer>), NO_IMPORTS);
  const x = inst.exports as Record<string, CallableFunction> & { memory?: WebAssembly.Memory };
  const result = x.run(0) as number;
  return { result, acc: x.acc?.() as bigint | undefined, mem: x.memory && new Uint8Array(x.memory.buffer).slice() };
}

for (const variant of ['plain', 'dirty', 'presence'] as const) {
  test(`differential: random programs behave the same after the ${variant} rewrite`, () => {
    for (let seed = 1; seed <= 25; seed++) {
      const prog = randomProgram(seed);
      const bytes = wat(prog.text);
      const ref = reference(bytes);
      const r = rng(seed * 7919);
      const absent = variant === 'presence' ? sorted(Array.from({ length: 20 }, () => RESERVED_PAGES + Math.floor(r() * (GUEST_BYTES / PAGE)))) : [];
      const b = boot(bytes, variant, { maxPages: 8, absent });
      if (variant === 'dirty') clearDirty(b.u8()); // boot's own marks are checked elsewhere
      const result = callRun(b);
      const msg = `seed ${seed}`;
      assert.equal(result, ref.result, msg);
      assert.equal((b.exports.acc as () => bigint)(), ref.acc, msg);
      const u8 = b.u8();
      assert.ok(ref.mem);
      assert.equal(u8.length - RESERVED_BYTES, ref.mem.length, `${msg}: guest memory size`);
      assert.ok(Buffer.from(u8.subarray(RESERVED_BYTES)).equals(Buffer.from(ref.mem)), `${msg}: guest memory differs`);
      const written = sorted(prog.writes.flatMap(([a, n]) => pagesOf(a, n)));
      if (variant === 'dirty') assert.deepEqual(dirtyPages(u8), written, `${msg}: dirty pages`);
      else assert.deepEqual(dirtyPages(u8), [], `${msg}: ${variant} must not mark`);
      if (variant === 'presence') {
        const touched = new Set([...written, ...prog.reads.flatMap(([a, n]) => pagesOf(a, n))]);
        assert.deepEqual(sorted(b.faults), absent.filter((p) => touched.has(p)), `${msg}: faulted pages`);
        assert.equal(new Set(b.faults).size, b.faults.length, `${msg}: a present page faulted`);
      }
    }
  });
}

/**
 * A guest whose addresses, sizes and control flow come from a PRNG at run time: a br_table
 * dispatch over every access kind, call_indirect, nested loops, memory growth. It checks what the
 * straight-line programs cannot: real control flow and addresses the rewriter cannot see.
 */
function interpreterGuest(seed: number): Uint8Array {
  const G = 4 * 65536;
  const W = 9000; // widest bulk op
  const cases = [
    '(i32.store8 (local.get $a) (i32.wrap_i64 (local.get $r)))',
    '(i64.store offset=5 align=1 (local.get $a) (local.get $r))',
    '(v128.store align=1 (local.get $a) (i64x2.splat (local.get $r)))',
    '(call $mix (i64.load align=1 (local.get $a)))',
    '(call $mix (i64.extend_i32_u (i32.load16_u offset=1 align=1 (local.get $a))))',
    `(memory.fill (i32.rem_u (local.get $a) (i32.const ${G - W})) (i32.wrap_i64 (local.get $r)) (i32.rem_u (local.get $a) (i32.const ${W})))`,
    `(memory.copy (i32.rem_u (local.get $a) (i32.const ${G - W})) (i32.rem_u (i32.wrap_i64 (i64.shr_u (local.get $r) (i64.const 7))) (i32.const ${G - W})) (i32.and (i32.wrap_i64 (i64.shr_u (local.get $r) (i64.const 40))) (i32.const 8191)))`,
    '(call_indirect (type $sink) (local.get $a) (local.get $r) (i32.and (i32.wrap_i64 (i64.shr_u (local.get $r) (i64.const 33))) (i32.const 1)))',
    '(call $mix (i64.atomic.rmw.add (i32.and (local.get $a) (i32.const -8)) (local.get $r)))',
    `(if (i32.wrap_i64 (i64.and (local.get $r) (i64.const 256)))
       (then (call $mix (i64.extend_i32_u (i32.atomic.rmw.cmpxchg (i32.and (local.get $a) (i32.const -4)) (i32.load (i32.and (local.get $a) (i32.const -4))) (i32.wrap_i64 (local.get $r))))))
       (else (v128.store32_lane align=1 2 (local.get $a) (i64x2.splat (local.get $r)))))`,
    '(call $mix (i64.extend_i32_u (i32.add (memory.size) (memory.grow (i32.wrap_i64 (i64.and (local.get $r) (i64.const 1)))))))',
    '(memory.init $seg (local.get $a) (i32.const 0) (i32.and (i32.wrap_i64 (local.get $r)) (i32.const 63)))',
    `(local.set $i (i32.const 0))
     (loop $inner
       (i32.store16 align=1 (i32.add (i32.rem_u (local.get $a) (i32.const ${G - W})) (i32.mul (local.get $i) (i32.const 601))) (local.get $i))
       (local.set $i (i32.add (local.get $i) (i32.const 1)))
       (br_if $inner (i32.lt_u (local.get $i) (i32.const 8))))`,
    '(f32.store align=1 (local.get $a) (f32.convert_i64_s (local.get $r))) (call $mix (i64.reinterpret_f64 (f64.load align=2 (local.get $a))))',
  ];
  let dispatch = `(br_table ${cases.map((_, i) => `$c${i}`).join(' ')} (i32.wrap_i64 (i64.rem_u (local.get $r) (i64.const ${cases.length}))))`;
  for (let i = 0; i < cases.length; i++) dispatch = `(block $c${i} ${dispatch})\n ${cases[i]} (br $end)`;
  return wat(`(module
    (memory (export "memory") 4 8)
    (type $sink (func (param i32 i64)))
    (table 2 funcref)
    (elem (i32.const 0) $sinkA $sinkB)
    (global $acc (mut i64) (i64.const 0))
    (global $x (mut i64) (i64.const ${seed * 2654435761 + 1}))
    (data $seg "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
    (func $next (result i64)
      (global.set $x (i64.xor (global.get $x) (i64.shl (global.get $x) (i64.const 13))))
      (global.set $x (i64.xor (global.get $x) (i64.shr_u (global.get $x) (i64.const 7))))
      (global.set $x (i64.xor (global.get $x) (i64.shl (global.get $x) (i64.const 17))))
      (global.get $x))
    (func $mix (param $v i64) (global.set $acc (i64.add (i64.rotl (global.get $acc) (i64.const 7)) (local.get $v))))
    (func $sinkA (param $a i32) (param $v i64) (i64.store align=1 (local.get $a) (local.get $v)))
    (func $sinkB (param $a i32) (param $v i64) (i32.store16 offset=3 align=1 (local.get $a) (i32.wrap_i64 (local.get $v))))
    (func (export "run") (param $n i32) (result i32) (local $r i64) (local $a i32) (local $i i32)
      (loop $top
        (local.set $r (call $next))
        (local.set $a (i32.wrap_i64 (i64.rem_u (i64.shr_u (local.get $r) (i64.const 20)) (i64.const ${G - 64}))))
        (block $end ${dispatch})
        (br_if $top (local.tee $n (i32.sub (local.get $n) (i32.const 1)))))
      (i32.wrap_i64 (global.get $acc)))
    (func (export "acc") (result i64) (global.get $acc)))`);
}

/** Physical pages whose guest content differs between two snapshots of guest memory. */
function changedPages(before: Uint8Array, after: Uint8Array): number[] {
  const out: number[] = [];
  for (let off = 0; off < after.length; off += PAGE) {
    const a = after.subarray(off, off + PAGE);
    const b = off < before.length ? before.subarray(off, off + PAGE) : new Uint8Array(PAGE);
    if (!Buffer.from(a).equals(Buffer.from(b))) out.push(RESERVED_PAGES + off / PAGE);
  }
  return out;
}

test('differential: a PRNG-driven interpreter guest (run-time addresses, br_table, call_indirect, loops, growth)', () => {
  for (let seed = 1; seed <= 6; seed++) {
    const bytes = interpreterGuest(seed);
    const orig = new WebAssembly.Instance(new WebAssembly.Module(bytes as Uint8Array<ArrayBuffer>)).exports as Record<string, CallableFunction> & { memory: WebAssembly.Memory };
    const plain = boot(bytes, 'plain', { maxPages: 8 });
    const dirty = boot(bytes, 'dirty', { maxPages: 8 });
    let presence: Booted | null = null;
    for (let round = 0; round < 5; round++) {
      const msg = `seed ${seed} round ${round}`;
      if (round === 2) {
        // Post-copy migration of the dirty VM: a destination over empty memory (everything absent)
        // whose faults install each page's content as of now. An access that skipped its check
        // reads zeros and diverges; globals travel through the __ferry_g exports.
        const source = dirty.u8().slice(RESERVED_BYTES);
        const memory = new WebAssembly.Memory({ initial: dirty.memory.buffer.byteLength / 65536, maximum: RESERVED_WASM_PAGES + 8, shared: true });
        presence = boot(bytes, 'presence', {
          memory, noBoot: true,
          onFault: (page, u8) => {
            const off = (page - RESERVED_PAGES) * PAGE;
            if (off < source.length) u8.set(source.subarray(off, off + PAGE), RESERVED_BYTES + off);
          },
        });
        for (const name of ['__ferry_g0', '__ferry_g1']) {
          (presence.exports[name] as WebAssembly.Global).value = (dirty.exports[name] as WebAssembly.Global).value;
        }
      }
      const vms = presence ? [plain, dirty, presence] : [plain, dirty];
      const before = new Uint8Array(orig.memory.buffer).slice();
      clearDirty(dirty.u8());
      const want = orig.run(500);
      for (const b of vms) assert.equal(callRun(b, 500), want, msg);
      const ref = new Uint8Array(orig.memory.buffer);
      for (const b of vms) {
        assert.ok(Buffer.from(b.u8().subarray(RESERVED_BYTES)).equals(Buffer.from(ref)), `${msg}: guest memory differs`);
        assert.equal((b.exports.acc as () => bigint)(), orig.acc(), msg);
      }
      const changed = changedPages(before, ref);
      const marked = new Set(dirtyPages(dirty.u8()));
      assert.deepEqual(changed.filter((p) => !marked.has(p)), [], `${msg}: changed pages without a dirty mark`);
      if (presence) {
        const faults: number[] = presence.faults;
        const faulted = new Set<number>(faults);
        assert.deepEqual(changed.filter((p) => !faulted.has(p)), [], `${msg}: pages written without a fault`);
        assert.equal(faulted.size, faults.length, `${msg}: a page faulted twice`);
        assert.ok(faults.length > 0);
      }
    }
  }
});

// ----------------------------------------------------------------------------------- dirty marks

test('dirty: a store straddling a page boundary marks both pages, a store inside one page marks one', () => {
  const bytes = guest(`
    (i64.store align=1 (local.get 0) (i64.const -1))
    (i32.const 0)`);
  const b = boot(bytes, 'dirty');
  clearDirty(b.u8());
  callRun(b, 2 * PAGE - 3);
  assert.deepEqual(dirtyPages(b.u8()), [pp(PAGE), pp(2 * PAGE)]);
  clearDirty(b.u8());
  callRun(b, 3 * PAGE + 8);
  assert.deepEqual(dirtyPages(b.u8()), [pp(3 * PAGE)]);
  // Data first, mark second: the bytes really landed.
  assert.deepEqual([...b.u8().subarray(RESERVED_BYTES + 2 * PAGE - 3, RESERVED_BYTES + 2 * PAGE + 5)], Array(8).fill(255));
});

test('dirty: bulk ops mark every page of their destination range, and nothing for length 0', () => {
  const bytes = guest(`
    (block $done
      (br_if $done (i32.ne (local.get 0) (i32.const 0)))
      (memory.fill (i32.const 4000) (i32.const 7) (i32.const 8288))  ;; guest pages 0..2
      (return (i32.const 0)))
    (block $done
      (br_if $done (i32.ne (local.get 0) (i32.const 1)))
      (memory.copy (i32.const 40000) (i32.const 100) (i32.const 5000))
      (return (i32.const 0)))
    (block $done
      (br_if $done (i32.ne (local.get 0) (i32.const 2)))
      (memory.init $p (i32.const 20476) (i32.const 0) (i32.const 8))
      (return (i32.const 0)))
    (memory.fill (i32.const 50000) (i32.const 7) (i32.const 0))
    (memory.copy (i32.const 60000) (i32.const 0) (i32.const 0))
    (i32.const 0)`, '(data $p "abcdefgh")');
  const b = boot(bytes, 'dirty');
  const cases: [number, number[]][] = [
    [0, pagesOf(4000, 8288)], [1, pagesOf(40000, 5000)], [2, [pp(20476), pp(20480)]], [3, []],
  ];
  for (const [arg, want] of cases) {
    clearDirty(b.u8());
    callRun(b, arg);
    assert.deepEqual(dirtyPages(b.u8()), want, `case ${arg}`);
  }
  assert.equal(pagesOf(4000, 8288).length, 3);
  assert.equal(new TextDecoder().decode(b.u8().subarray(RESERVED_BYTES + 20476, RESERVED_BYTES + 20484)), 'abcdefgh');
});

test('dirty: atomic RMW, cmpxchg, atomic store and SIMD stores mark; loads of every kind do not', () => {
  const bytes = guest(`
    (block $done (br_if $done (i32.ne (local.get 0) (i32.const 0)))
      (return (i32.wrap_i64 (i64.atomic.rmw.add (i32.const 8192) (i64.const 5)))))
    (block $done (br_if $done (i32.ne (local.get 0) (i32.const 1)))
      (return (i32.atomic.rmw.cmpxchg (i32.const 16384) (i32.const 0) (i32.const 9))))
    (block $done (br_if $done (i32.ne (local.get 0) (i32.const 2)))
      (i64.atomic.store16 (i32.const 24576) (i64.const 3)) (return (i32.const 0)))
    (block $done (br_if $done (i32.ne (local.get 0) (i32.const 3)))
      (v128.store align=1 (i32.const 32760) (v128.const i32x4 1 2 3 4)) (return (i32.const 0)))
    (block $done (br_if $done (i32.ne (local.get 0) (i32.const 4)))
      (v128.store64_lane align=1 1 (i32.const 45052) (v128.const i32x4 1 2 3 4)) (return (i32.const 0)))
    (i32.add (i32.add (i32.load (i32.const 4094)) (i32.wrap_i64 (i64.atomic.load (i32.const 8192))))
      (i32.add (i32x4.extract_lane 0 (v128.load (i32.const 12280)))
        (i32.add (i32x4.extract_lane 0 (v128.load8x8_u (i32.const 100)))
          (i32x4.extract_lane 0 (v128.load32_lane 1 (i32.const 200) (v128.const i64x2 0 0))))))`);
  const b = boot(bytes, 'dirty');
  const cases: [number, number[]][] = [
    [0, [pp(8192)]], [1, [pp(16384)]], [2, [pp(24576)]], [3, [pp(32760), pp(32768)]], [4, [pp(45052), pp(45056)]], [5, []],
  ];
  for (const [arg, want] of cases) {
    clearDirty(b.u8());
    callRun(b, arg);
    assert.deepEqual(dirtyPages(b.u8()), want, `case ${arg}`);
  }
  // The RMW still returns the old value.
  assert.equal(callRun(b, 0), 5);
  assert.equal(callRun(b, 1), 9);
});

test('dirty: __ferry_boot marks the pages its data segments fill', () => {
  const bytes = guest('(i32.const 0)', '(data (i32.const 8190) "xyzw")');
  const b = boot(bytes, 'dirty');
  assert.deepEqual(dirtyPages(b.u8()), [pp(8190), pp(8192)]);
});

// ------------------------------------------------------------------------------ relocation

test('memory.size and memory.grow speak guest pages; a failed grow stays -1', () => {
  const bytes = guest(`
    (if (i32.eq (local.get 0) (i32.const 0)) (then (return (memory.size))))
    (memory.grow (local.get 0))`, '', '(memory 3 16)');
  for (const variant of ['plain', 'dirty', 'presence'] as const) {
    const b = boot(bytes, variant, { maxPages: 5 });
    assert.equal(callRun(b, 0), 3, variant);
    assert.equal(callRun(b, 1), 3, variant);
    assert.equal(callRun(b, 0), 4, variant);
    assert.equal(callRun(b, 2), -1, `${variant}: beyond the VM's maximum`);
    assert.equal(callRun(b, 1), 4, variant);
    assert.equal(callRun(b, 0), 5, variant);
    assert.equal(b.memory.buffer.byteLength, RESERVED_BYTES + 5 * 65536, variant);
  }
});

test('guest addresses land 2 MiB up; the reserved region is out of reach; overflow traps', () => {
  const bytes = guest(`
    (i32.store (i32.const 0) (i32.const 0x11223344))
    (i32.store offset=65532 (i32.const 0) (i32.const 0x55667788))
    (if (i32.eq (local.get 0) (i32.const 1)) (then (i32.store (i32.const -4) (i32.const 1))))
    (if (i32.eq (local.get 0) (i32.const 2)) (then (memory.fill (i32.const -1) (i32.const 1) (i32.const 0))))
    (if (i32.eq (local.get 0) (i32.const 3)) (then (memory.fill (i32.const 0x40000) (i32.const 1) (i32.const 1))))
    (i32.load (i32.const 0))`, '', '(memory 4 16)');
  for (const variant of ['plain', 'dirty', 'presence'] as const) {
    const b = boot(bytes, variant);
    assert.equal(callRun(b, 0), 0x11223344);
    const dv = new DataView(b.memory.buffer);
    assert.equal(dv.getUint32(RESERVED_BYTES, true), 0x11223344);
    assert.equal(dv.getUint32(RESERVED_BYTES + 65532, true), 0x55667788);
    for (const arg of [1, 2, 3]) assert.throws(() => callRun(b, arg), WebAssembly.RuntimeError, `${variant} case ${arg}`);
  }
});

test('function names survive the rewrite (they appear in guest trap stacks)', () => {
  const bytes = wat(`(module (memory 1) (func $guest_boom (result i32) (unreachable))
    (func (export "run") (param i32) (result i32) (call $guest_boom)))`, true);
  const b = boot(bytes, 'dirty');
  assert.throws(() => callRun(b, 0), (e: unknown) => e instanceof WebAssembly.RuntimeError && /guest_boom/.test(e.stack ?? ''));
});

test('data segments are applied by __ferry_boot only; a destination instance leaves memory alone', () => {
  const bytes = guest('(i32.load8_u (i32.const 16))', '(data (i32.const 16) "A") (global $g (mut i32) (i32.const 1)) (start $s) (func $s (global.set $g (i32.const 42)))');
  const first = boot(bytes, 'plain', { noBoot: true });
  assert.equal(first.u8()[RESERVED_BYTES + 16], 0, 'instantiation alone must not apply data');
  assert.equal((first.exports.__ferry_g0 as WebAssembly.Global).value, 1, 'instantiation alone must not run start');
  (first.exports.__ferry_boot as () => void)();
  assert.equal(callRun(first), 65);
  assert.equal((first.exports.__ferry_g0 as WebAssembly.Global).value, 42, 'boot runs the start function');
  // The migrated memory has moved on; a second instance over it must not reset it.
  first.u8()[RESERVED_BYTES + 16] = 66;
  for (const variant of ['plain', 'dirty', 'presence'] as const) {
    const dest = boot(bytes, variant, { memory: first.memory, noBoot: true });
    if (variant === 'presence') dest.u8().fill(1, PRESENCE_MAP_OFFSET, PRESENCE_MAP_OFFSET + (1 << 20));
    assert.equal(callRun(dest), 66, variant);
    assert.equal((dest.exports.__ferry_g0 as WebAssembly.Global).value, 1, `${variant}: no start function ran`);
  }
});

test('memory.init from an active segment behaves as after instantiation (dropped), booted or not', () => {
  const bytes = guest('(memory.init $a (i32.const 64) (i32.const 0) (local.get 0)) (i32.load8_u (i32.const 64))', '(data $a (i32.const 0) "xyz")');
  const orig = new WebAssembly.Instance(new WebAssembly.Module(bytes as Uint8Array<ArrayBuffer>)).exports as Record<string, (n: number) => number>;
  assert.equal(orig.run(0), 0);
  assert.throws(() => orig.run(1), WebAssembly.RuntimeError);
  for (const noBoot of [false, true]) {
    const b = boot(bytes, 'dirty', { noBoot });
    assert.equal(callRun(b, 0), 0);
    assert.throws(() => callRun(b, 1), WebAssembly.RuntimeError, `noBoot=${noBoot}`);
  }
});

test('mutable globals are exported as __ferry_g<index> and settable; info describes them', () => {
  const bytes = guest('(global.set $b (i64.add (global.get $b) (i64.const 1))) (i32.wrap_i64 (global.get $b))', `
    (global $a i32 (i32.const 1))
    (global $b (mut i64) (i64.const 10))
    (global $c (mut f32) (f32.const 0.5))
    (global $d (mut v128) (v128.const i64x2 0 0))
    (func (export "init"))
    (func (export "progress") (result i64) (i64.const 0))`);
  const info = inspectGuest(bytes);
  assert.deepEqual(info.globals, [{ export: '__ferry_g1', type: 'i64' }, { export: '__ferry_g2', type: 'f32' }, { export: '__ferry_g3', type: 'v128' }]);
  assert.equal(info.initExport, 'init');
  assert.equal(info.hasProgress, true);
  assert.equal(info.initialGuestBytes, 4 * 65536);
  assert.equal(info.maxGuestBytes, 16 * 65536);
  assert.match(info.hash, /^[0-9a-f]{64}$/);
  const b = boot(bytes, 'dirty');
  const g = b.exports.__ferry_g1 as WebAssembly.Global;
  assert.equal(callRun(b), 11);
  g.value = 100n;
  assert.equal(callRun(b), 101);
  assert.equal(g.value, 101n);
  assert.equal(b.exports.__ferry_g0, undefined, 'immutable globals are not exported');
});

test('info lists function imports; a guest-imported memory is replaced and still exported under its name', () => {
  const bytes = wat(`(module
    (import "ferry" "clock_ns" (func $clock (result i64)))
    (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
    (import "env" "memory" (memory 2))
    (export "mem" (memory 0))
    (func (export "_initialize"))
    (func (export "run") (param i32) (result i32) (i32.store (i32.const 8) (i32.wrap_i64 (call $clock))) (i32.load (i32.const 8))))`);
  const info = inspectGuest(bytes);
  assert.deepEqual(info.imports, [{ module: 'ferry', name: 'clock_ns' }, { module: 'wasi_snapshot_preview1', name: 'fd_write' }]);
  assert.equal(info.initExport, '_initialize');
  assert.equal(info.hasProgress, false);
  assert.equal(info.maxGuestBytes, null);
  const r = instrument(bytes, 'plain');
  const imports = WebAssembly.Module.imports(r.module).map((i) => `${i.module}.${i.name}:${i.kind}`);
  assert.deepEqual(imports.sort(), ['ferry.clock_ns:function', 'ferry_rt.memory:memory', 'wasi_snapshot_preview1.fd_write:function']);
  const b = boot(bytes, 'plain', { imports: { ferry: { clock_ns: () => 77n }, wasi_snapshot_preview1: { fd_write: () => 0 } } });
  assert.equal(callRun(b), 77);
  assert.equal(b.exports.mem, b.memory);
});

test('the rewritten memory import is shared, sized reserved + initial guest pages, max 65536', () => {
  const r = instrument(guest('(i32.const 0)', '', '(memory 3)'), 'plain');
  // A memory with a smaller initial size is rejected; the declared max is 65536 pages.
  const small = new WebAssembly.Memory({ initial: RESERVED_WASM_PAGES + 2, maximum: 100, shared: true });
  assert.throws(() => new WebAssembly.Instance(r.module, { ferry_rt: { memory: small } }), WebAssembly.LinkError);
  const ok = new WebAssembly.Memory({ initial: RESERVED_WASM_PAGES + 3, maximum: 65536, shared: true });
  new WebAssembly.Instance(r.module, { ferry_rt: { memory: ok } });
  const unshared = new WebAssembly.Memory({ initial: RESERVED_WASM_PAGES + 3, maximum: 100 });
  assert.throws(() => new WebAssembly.Instance(r.module, { ferry_rt: { memory: unshared } }), WebAssembly.LinkError);
  assert.deepEqual(WebAssembly.Module.exports(r.module).map((e) => e.name).sort(), ['__ferry_boot', 'run']);
});

// ------------------------------------------------------------------------------ presence checks

test('presence: loads and stores to absent pages fault with the physical page index; present pages do not', () => {
  const bytes = guest(`
    (block $done (br_if $done (i32.ne (local.get 0) (i32.const 0)))
      (return (i32.load8_u (i32.const 12288))))
    (block $done (br_if $done (i32.ne (local.get 0) (i32.const 1)))
      (i64.store align=1 (i32.const 8188) (i64.const 1)) (return (i32.const 0)))
    (block $done (br_if $done (i32.ne (local.get 0) (i32.const 2)))
      (return (i32.atomic.rmw.add offset=20480 (i32.const 0) (i32.const 1))))
    (block $done (br_if $done (i32.ne (local.get 0) (i32.const 3)))
      (return (i32x4.extract_lane 0 (v128.load offset=4 align=1 (i32.const 28660)))))
    (i32.load (i32.const 40000))`);
  const b = boot(bytes, 'presence', { absent: [pp(12288), pp(4096), pp(8192), pp(20480), pp(28660), pp(28672)] });
  callRun(b, 4);
  assert.deepEqual(b.faults, [], 'a present page must not fault');
  callRun(b, 0);
  assert.deepEqual(b.faults, [pp(12288)]);
  callRun(b, 1);
  assert.deepEqual(b.faults.slice(1), [pp(4096), pp(8192)], 'a straddling store faults both pages');
  callRun(b, 2);
  assert.deepEqual(b.faults.slice(3), [pp(20480)]);
  callRun(b, 3);
  assert.deepEqual(b.faults.slice(4), [pp(28664), pp(28672)]);
  const n = b.faults.length;
  for (let arg = 0; arg <= 4; arg++) callRun(b, arg);
  assert.equal(b.faults.length, n, 'pages that arrived do not fault again');
  assert.equal(dirtyPages(b.u8()).length, 0, 'presence carries no dirty marks');
});

test('presence: memory the guest grows into is present (it never existed on the source)', () => {
  const bytes = guest(`
    (drop (memory.grow (i32.const 2)))
    (i64.store (i32.const ${4 * 65536 + 5000}) (i64.const 1))
    (i32.load (i32.const ${6 * 65536 - 4}))`);
  const b = boot(bytes, 'presence', { absent: pagesOf(0, 16 * 65536) });
  assert.equal(callRun(b), 0);
  assert.deepEqual(b.faults, []);
  assert.deepEqual([...b.u8().subarray(PRESENCE_MAP_OFFSET + pp(4 * 65536) - 1, PRESENCE_MAP_OFFSET + pp(6 * 65536) + 1)],
    [0, ...Array(32).fill(1), 0], 'exactly the grown pages became present');
});

test('presence: bulk ops fault every absent page of source and destination, in bounds only', () => {
  const bytes = guest(`
    (block $done (br_if $done (i32.ne (local.get 0) (i32.const 0)))
      (memory.fill (i32.const 4000) (i32.const 1) (i32.const 12400)) (return (i32.const 0)))
    (block $done (br_if $done (i32.ne (local.get 0) (i32.const 1)))
      (memory.copy (i32.const 65536) (i32.const 131000) (i32.const 9000)) (return (i32.const 0)))
    (block $done (br_if $done (i32.ne (local.get 0) (i32.const 2)))
      (memory.init $p (i32.const 196604) (i32.const 0) (i32.const 8)) (return (i32.const 0)))
    (block $done (br_if $done (i32.ne (local.get 0) (i32.const 3)))
      (memory.fill (i32.const 4096) (i32.const 1) (i32.const 0)) (return (i32.const 0)))
    (memory.fill (i32.const 200000) (i32.const 1) (i32.const 100000))
    (i32.const 0)`, '(data $p "abcdefgh")');
  const all = [...pagesOf(0, 4 * 65536)];
  const b = boot(bytes, 'presence', { absent: all });
  callRun(b, 0);
  assert.deepEqual(b.faults, pagesOf(4000, 12400));
  b.faults.length = 0;
  callRun(b, 1);
  assert.deepEqual(sorted(b.faults), sorted([...pagesOf(65536, 9000), ...pagesOf(131000, 9000)]));
  b.faults.length = 0;
  callRun(b, 2);
  assert.deepEqual(b.faults, [pp(196604), pp(196608)]);
  b.faults.length = 0;
  callRun(b, 3);
  assert.deepEqual(b.faults, [], 'length 0 touches nothing');
  assert.throws(() => callRun(b, 4), WebAssembly.RuntimeError);
  assert.deepEqual(b.faults, [], 'an out-of-bounds bulk op traps without faulting');
});

// ------------------------------------------------------------------------------------- refusals

const RUN = '(func (export "run") (param i32) (result i32) (i32.const 0))';
const MEM = '(memory 1)';

const refusals: [string, string, () => Uint8Array][] = [
  ['ERR_MODULE_INVALID', 'not wasm', () => new TextEncoder().encode('hello, world')],
  ['ERR_MODULE_INVALID', 'fails validation', () => {
    const good = guest('(i32.const 0)');
    const bad = good.slice();
    bad[bad.length - 3] ^= 0xff; // damage the code section
    return bad;
  }],
  ['ERR_MODULE_NO_RUN', 'no run', () => wat(`(module ${MEM} (func (export "main")))`)],
  ['ERR_MODULE_NO_RUN', 'run of the wrong type', () => wat(`(module ${MEM} (func (export "run") (param i64) (result i32) (i32.const 0)))`)],
  ['ERR_MODULE_NO_MEMORY', 'no memory', () => wat(`(module ${RUN})`)],
  ['ERR_MODULE_MEMORY64', 'memory64', () => wat(`(module (memory i64 1) ${RUN})`)],
  ['ERR_MODULE_MULTI_MEMORY', 'two memories', () => wat(`(module (memory 1) (memory 1) ${RUN})`)],
  ['ERR_MODULE_UNKNOWN_IMPORT', 'unknown function import', () => wat(`(module (import "env" "puts" (func (param i32))) ${MEM} ${RUN})`)],
  ['ERR_MODULE_UNKNOWN_IMPORT', 'unknown ferry name', () => wat(`(module (import "ferry" "launch_missiles" (func)) ${MEM} ${RUN})`)],
  ['ERR_MODULE_UNKNOWN_IMPORT', 'immutable global import', () => wat(`(module (import "env" "g" (global i32)) ${MEM} ${RUN})`)],
  ['ERR_MODULE_UNKNOWN_IMPORT', 'table import', () => wat(`(module (import "env" "t" (table 1 funcref)) ${MEM} ${RUN})`)],
  ['ERR_MODULE_UNKNOWN_IMPORT', 'an Object.prototype name', () => wat(`(module (import "ferry" "constructor" (func)) ${MEM} ${RUN})`)],
  ['ERR_MODULE_IMPORT_SIGNATURE', 'a ferry function imported as a global', () => wat(`(module (import "ferry" "clock_ns" (global i64)) ${MEM} ${RUN})`)],
  ['ERR_MODULE_IMPORT_SIGNATURE', 'wrong signature', () => wat(`(module (import "ferry" "clock_ns" (func (result i32))) ${MEM} ${RUN})`)],
  ['ERR_MODULE_IMPORT_SIGNATURE', 'wasi wrong signature', () => wat(`(module (import "wasi_snapshot_preview1" "proc_exit" (func (param i64))) ${MEM} ${RUN})`)],
  ['ERR_MODULE_TABLE_MUTATION', 'table.set', () => wat(`(module ${MEM} (table 2 funcref) (func $f) (func (export "run") (param i32) (result i32) (table.set (i32.const 0) (ref.func $f)) (i32.const 0)) (elem declare func $f))`)],
  ['ERR_MODULE_TABLE_MUTATION', 'table.grow', () => wat(`(module ${MEM} (table 2 funcref) (func (export "run") (param i32) (result i32) (table.grow (ref.null func) (i32.const 1))))`)],
  ['ERR_MODULE_TABLE_MUTATION', 'table.fill', () => wat(`(module ${MEM} (table 2 funcref) (func (export "run") (param i32) (result i32) (table.fill (i32.const 0) (ref.null func) (i32.const 1)) (i32.const 0)))`)],
  ['ERR_MODULE_TABLE_MUTATION', 'table.copy', () => wat(`(module ${MEM} (table 2 funcref) (func (export "run") (param i32) (result i32) (table.copy (i32.const 0) (i32.const 1) (i32.const 1)) (i32.const 0)))`)],
  ['ERR_MODULE_TABLE_MUTATION', 'table.init', () => wat(`(module ${MEM} (table 2 funcref) (func $f) (elem $e func $f) (func (export "run") (param i32) (result i32) (table.init $e (i32.const 0) (i32.const 0) (i32.const 1)) (i32.const 0)))`)],
  ['ERR_MODULE_TABLE_MUTATION', 'elem.drop', () => wat(`(module ${MEM} (func $f) (elem $e func $f) (func (export "run") (param i32) (result i32) (elem.drop $e) (i32.const 0)))`)],
  ['ERR_MODULE_REFERENCE_STATE', 'mutable funcref global', () => wat(`(module ${MEM} (global $g (mut funcref) (ref.null func)) ${RUN})`)],
  ['ERR_MODULE_REFERENCE_STATE', 'mutable externref global', () => wat(`(module ${MEM} (global $g (mut externref) (ref.null extern)) ${RUN})`)],
  ['ERR_MODULE_REFERENCE_STATE', 'imported mutable global', () => wat(`(module (import "env" "g" (global (mut i32))) ${MEM} ${RUN})`)],
  ['ERR_MODULE_RESERVED_NAME', 'reserved export', () => wat(`(module ${MEM} ${RUN} (func (export "__ferry_boot")))`)],
  ['ERR_MODULE_RESERVED_NAME', 'reserved import', () => wat(`(module (import "__ferry_x" "y" (func)) ${MEM} ${RUN})`)],
  ['ERR_MODULE_RESERVED_NAME', 'reserved function name', () => wat(`(module ${MEM} ${RUN} (func $__ferry_grow))`, true)],
  ['ERR_MODULE_OFFSET_OVERFLOW', 'huge offset', () => wat(`(module ${MEM} (func (export "run") (param i32) (result i32) (i32.load offset=4294000000 (local.get 0))))`)],
  ['ERR_MODULE_OFFSET_OVERFLOW', 'huge atomic wait offset', () => wat(`(module (memory 1 1 shared) (func (export "run") (param i32) (result i32) (memory.atomic.wait32 offset=4293918721 (local.get 0) (i32.const 0) (i64.const 0))))`)],
  ['ERR_MODULE_MEMORY_TOO_LARGE', 'initial memory over 4 GiB - 2 MiB', () => wat(`(module (memory 65505) ${RUN})`)],
];

for (const [code, what, make] of refusals) {
  test(`refuses ${what} with ${code}`, () => {
    const bytes = make();
    for (const attempt of [() => inspectGuest(bytes), () => instrument(bytes, 'dirty')]) {
      assert.throws(attempt, (e: unknown) => {
        assert.ok(e instanceof GuestModuleError, `expected GuestModuleError, got ${String(e)}`);
        assert.equal(e.code, code, e.message);
        assert.ok(e.message.length > 10);
        return true;
      });
    }
  });
}

test('refuses instructions outside the guest feature set (exception handling) with ERR_MODULE_INVALID', () => {
  const m = binaryen.parseText('(module (memory 1) (tag $e) (func (export "run") (param i32) (result i32) (try (do (throw $e)) (catch_all)) (i32.const 0)))');
  m.setFeatures(F.ExceptionHandling);
  const bytes = m.emitBinary();
  m.dispose();
  assert.ok(WebAssembly.validate(bytes as Uint8Array<ArrayBuffer>), 'Node accepts it');
  assert.throws(() => inspectGuest(bytes), (e: unknown) => e instanceof GuestModuleError && e.code === 'ERR_MODULE_INVALID' && /Try/.test(e.message));
});

test('multi-value blocks, tail calls and select keep working after the rewrite', () => {
  const bytes = wat(`(module (memory 1)
    (func $pair (param i32) (result i32 i32) (i32.load (local.get 0)) (i32.load offset=4 (local.get 0)))
    (func $tail (param i32) (result i32) (i32.store8 (local.get 0) (i32.const 9)) (i32.load8_u (local.get 0)))
    (func (export "run") (param i32) (result i32)
      (i64.store (i32.const 4092) (i64.const 0x0000000700000005))
      (call $pair (i32.const 4092))
      (i32.mul)
      (select (i32.const 100) (i32.load (i32.const 4096)) (local.get 0))
      (i32.add)
      (return_call $tail (i32.add (i32.const 1)))))`);
  const ref = reference(bytes);
  for (const variant of ['plain', 'dirty', 'presence'] as const) {
    const b = boot(bytes, variant);
    assert.equal(callRun(b, 0), ref.result, variant);
  }
});

test('memory accesses in dead code (an operand that never returns) are left alone and stay valid', () => {
  const bytes = wat(`(module (memory 1 1 shared)
    (func (export "run") (param i32) (result i32)
      (if (local.get 0) (then
        (i32.store (unreachable) (i32.const 1))
        (drop (i64.load (br 1)))
        (drop (i32.atomic.rmw.add (i32.const 0) (unreachable)))
        (drop (memory.atomic.wait32 (i32.const 0) (unreachable) (i64.const 0)))
        (memory.fill (i32.const 0) (unreachable) (i32.const 1))))
      (i32.const 3)))`);
  for (const variant of ['plain', 'dirty', 'presence'] as const) {
    const b = boot(bytes, variant);
    assert.equal(callRun(b, 0), 3, variant);
    assert.throws(() => callRun(b, 1), WebAssembly.RuntimeError, variant);
  }
});

test('code nested deeper than binaryen can recurse is refused as a module problem, and the rewriter keeps working', () => {
  const leb = (n: number): number[] => {
    const out: number[] = [];
    do {
      let b = n & 0x7f;
      n >>>= 7;
      if (n) b |= 0x80;
      out.push(b);
    } while (n);
    return out;
  };
  const section = (id: number, body: number[]): number[] => [id, ...leb(body.length), ...body];
  const deep = (n: number): Uint8Array => {
    // run: n nested empty blocks around (i32.store (i32.const 0) (i32.const 1)), then (i32.const 0)
    const body = [0, ...Array<number[]>(n).fill([0x02, 0x40]).flat(), 0x41, 0, 0x41, 1, 0x36, 2, 0, ...Array<number>(n).fill(0x0b), 0x41, 0, 0x0b];
    return new Uint8Array([0, 0x61, 0x73, 0x6d, 1, 0, 0, 0,
      ...section(1, [1, 0x60, 1, 0x7f, 1, 0x7f]), ...section(3, [1, 0]), ...section(5, [1, 0, 1]),
      ...section(7, [1, 3, ...new TextEncoder().encode('run'), 0, 0]), ...section(10, [1, ...leb(body.length), ...body])]);
  };
  const ok = boot(deep(100), 'dirty');
  clearDirty(ok.u8());
  assert.equal(callRun(ok), 0);
  assert.deepEqual(dirtyPages(ok.u8()), [RESERVED_PAGES]);
  assert.throws(() => instrument(deep(50_000), 'dirty'), (e: unknown) => e instanceof GuestModuleError && e.code === 'ERR_MODULE_INVALID' && /nests too deeply/.test(e.message));
  assert.equal(callRun(boot(deep(100), 'presence')), 0, 'binaryen still works after running out of stack');
});

test('accepts the largest initial memory and an offset exactly at the limit', () => {
  assert.equal(inspectGuest(wat(`(module (memory 65504) ${RUN})`)).initialGuestBytes, 65504 * 65536);
  const limit = 2 ** 32 - 1 - RESERVED_BYTES;
  const r = instrument(wat(`(module ${MEM} (func (export "run") (param i32) (result i32) (i32.load8_u offset=${limit} (local.get 0))))`), 'presence');
  assert.ok(r.bytes.length > 0);
});

test('refusal messages name the culprit', () => {
  assert.throws(() => inspectGuest(wat(`(module (import "env" "puts" (func (param i32))) ${MEM} ${RUN})`)), /"env" "puts"/);
  assert.throws(() => inspectGuest(wat(`(module (import "ferry" "clock_ns" (func (result i32))) ${MEM} ${RUN})`)), /clock_ns.*\(\) -> \(i32\).*\(\) -> \(i64\)/);
});

// ----------------------------------------------------------------------------------- atomics misc

test('atomic wait/notify are relocated (and keep their offsets)', () => {
  const bytes = wat(`(module (memory 2 4 shared)
    (func (export "run") (param i32) (result i32)
      (i32.atomic.store offset=16 (i32.const 0) (i32.const 5))
      (i32.add
        (i32.mul (memory.atomic.wait32 offset=16 (i32.const 0) (i32.const 4) (i64.const 0)) (i32.const 10))
        (i32.add (memory.atomic.wait32 offset=16 (i32.const 0) (i32.const 5) (i64.const 1000))
          (i32.mul (memory.atomic.notify offset=8 (i32.const 8) (i32.const 1)) (i32.const 100))))))`);
  const ref = reference(bytes);
  for (const variant of ['plain', 'dirty', 'presence'] as const) {
    const b = boot(bytes, variant);
    assert.equal(callRun(b), ref.result, variant);
    assert.equal(new DataView(b.memory.buffer).getInt32(RESERVED_BYTES + 16, true), 5);
  }
});

// ----------------------------------------------------------------------------------------- cache

test('InstrumentCache memoizes, and a disk hit reproduces the same bytes without rewriting', () => {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-instrument-'));
  try {
    const bytes = guest('(i32.store (i32.const 0) (i32.const 1)) (i32.const 0)');
    const a = new InstrumentCache({ dir });
    const first = a.get(bytes, 'dirty');
    assert.equal(a.get(bytes, 'dirty'), first, 'memoized in memory');
    assert.deepEqual(first.bytes, instrument(bytes, 'dirty').bytes, 'rewriting is deterministic');
    assert.notDeepEqual(a.get(bytes, 'plain').bytes, first.bytes);
    const files = readdirSync(dir).sort();
    assert.ok(files.some((f) => f.includes(first.info.hash) && f.includes('dirty') && f.includes(`v${REWRITER_VERSION}`)), files.join());

    const b = new InstrumentCache({ dir });
    const again = b.get(bytes, 'dirty');
    assert.notEqual(again, first);
    assert.deepEqual(again.bytes, first.bytes);
    assert.deepEqual(again.info, first.info);
    assert.ok(again.module instanceof WebAssembly.Module);

    // Proof that the hit came from disk: a planted (valid) module under the key is returned as is.
    const key = `${first.info.hash}-dirty-v${REWRITER_VERSION}`;
    const planted = instrument(bytes, 'presence');
    writeFileSync(join(dir, `${key}.wasm`), planted.bytes);
    const entry = JSON.parse(JSON.stringify({ version: REWRITER_VERSION, variant: 'dirty', sha256: sha256(planted.bytes), info: first.info }));
    writeFileSync(join(dir, `${key}.json`), JSON.stringify(entry));
    assert.deepEqual(new InstrumentCache({ dir }).get(bytes, 'dirty').bytes, planted.bytes);

    // A corrupted entry is a miss and gets rebuilt.
    writeFileSync(join(dir, `${key}.wasm`), new Uint8Array([1, 2, 3]));
    assert.deepEqual(new InstrumentCache({ dir }).get(bytes, 'dirty').bytes, first.bytes);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('InstrumentCache without a dir, and refusals are not cached as successes', () => {
  const c = new InstrumentCache();
  const bytes = guest('(i32.const 7)');
  assert.equal(c.get(bytes, 'plain'), c.get(bytes, 'plain'));
  const bad = wat(`(module ${RUN})`);
  assert.throws(() => c.get(bad, 'plain'), GuestModuleError);
  assert.throws(() => c.get(bad, 'plain'), GuestModuleError);
});

function sha256(b: Uint8Array): string {
  return createHash('sha256').update(b).digest('hex');
}

test('InstrumentCache.prepare: rewrites on the instrumenting thread, after which get is a hit with the same output; refusals are named alike', async () => {
  const { InstrumentThread } = await import('../../src/node/vm/instrument-thread.js');
  const thread = new InstrumentThread();
  try {
    const bytes = wat(`(module ${MEM} ${RUN} (global $g (mut i32) (i32.const 5)) (func (export "bump") (global.set $g (i32.add (global.get $g) (i32.const 1)))))`);
    const cache = new InstrumentCache();
    let ran = 0;
    const counting = { run: (b: Uint8Array, v: Variant) => { ran++; return thread.run(b, v); } } as unknown as typeof thread;
    await cache.prepare(bytes, ['plain', 'dirty', 'presence'], counting);
    assert.equal(ran, 3, 'each missing variant went to the thread');
    for (const v of ['plain', 'dirty', 'presence'] as const) {
      const hit = cache.get(bytes, v);
      assert.deepEqual(hit.bytes, instrument(bytes, v).bytes, `${v}: the thread's rewrite is the caller's`);
      assert.ok(hit.module instanceof WebAssembly.Module);
    }
    await cache.prepare(bytes, ['plain'], counting);
    assert.equal(ran, 3, 'a hit goes nowhere');
    // A refusal is the same named error get would throw.
    const bad = wat(`(module ${RUN})`);
    await assert.rejects(cache.prepare(bad, ['plain'], thread), (e: unknown) => e instanceof GuestModuleError && e.code === 'ERR_MODULE_NO_MEMORY');
    // A thread that cannot help leaves the rewrite to get.
    const fresh = new InstrumentCache();
    await fresh.prepare(bytes, ['plain'], { run: async () => null } as unknown as typeof thread);
    assert.deepEqual(fresh.get(bytes, 'plain').bytes, instrument(bytes, 'plain').bytes);
  } finally {
    await thread.close();
  }
});

test('InstrumentThread.warm({ rewrite }): the thread rewrites its sample guest in every variant, once per thread, and still serves rewrites', async () => {
  const { InstrumentThread } = await import('../../src/node/vm/instrument-thread.js');
  const thread = new InstrumentThread();
  try {
    // The sample is a guest the rewriter accepts in every variant (a refused one would resolve false).
    const warming = thread.warm({ rewrite: true });
    assert.equal(thread.warm({ rewrite: true }), warming, 'asked again while warming: the same warm-up');
    assert.equal(await warming, true);
    assert.equal(await thread.warm({ rewrite: true }), true);
    const bytes = wat(`(module ${MEM} ${RUN})`);
    assert.deepEqual((await thread.run(bytes, 'dirty'))?.bytes, instrument(bytes, 'dirty').bytes);
    // A new thread (after close) warms again.
    await thread.close();
    const again = thread.warm({ rewrite: true });
    assert.notEqual(again, warming);
    assert.equal(await again, true);
  } finally {
    await thread.close();
  }
});

test('InstrumentThread: a thread that ends settles only its own jobs, not those of the thread started after close()', async () => {
  const { InstrumentThread } = await import('../../src/node/vm/instrument-thread.js');
  const thread = new InstrumentThread();
  try {
    const bytes = wat(`(module ${MEM} ${RUN})`);
    assert.ok(await thread.run(bytes, 'plain'), 'the first thread rewrites');
    const closing = thread.close(); // not awaited: the old thread's end comes while the new one works
    const later = thread.run(bytes, 'dirty');
    await closing;
    assert.deepEqual((await later)?.bytes, instrument(bytes, 'dirty').bytes, 'the new thread answered (the old one\'s end did not turn it into "rewrite it yourself")');
  } finally {
    await thread.close();
  }
});
