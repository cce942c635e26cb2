/**
 * The rewriter: relocates a guest above ferry's reserved region and adds the dirty marks or
 * presence checks of one variant. See docs/guest-abi.md ("Rewriting") and src/core/abi.ts.
 */
import binaryen from 'binaryen';
import { DIRTY_MAP_OFFSET, PRESENCE_MAP_OFFSET, RESERVED_BYTES, RESERVED_PAGES, RESERVED_WASM_PAGES, REWRITE } from '../../../core/abi.js';
import { BugIndicatingError } from '../../../core/errors.js';
import type { Analysis } from './inspect.js';
import { textOffset } from './inspect.js';
import { stripStartSection } from './sections.js';
import { call, walk } from './walk.js';

export type Variant = 'plain' | 'dirty' | 'presence';

type Ref = number;
const { i32, i64, none } = binaryen;
const PAGE_SHIFT = 12;

const H = {
  ea: '__ferry_ea',
  grow: '__ferry_grow',
  fill: '__ferry_fill',
  copy: '__ferry_copy',
  init: '__ferry_init', // + counter
  markRange: '__ferry_mark_range',
  checkRange: '__ferry_check_range',
  faultSpan: '__ferry_fault_span',
  fault: '__ferry_fault',
} as const;

const ops = binaryen as unknown as Record<string, number>;
const SIMD_LOAD_BYTES = new Map<number, number>([
  [ops.Load8SplatVec128, 1], [ops.Load16SplatVec128, 2], [ops.Load32SplatVec128, 4], [ops.Load64SplatVec128, 8],
  [ops.Load8x8SVec128, 8], [ops.Load8x8UVec128, 8], [ops.Load16x4SVec128, 8], [ops.Load16x4UVec128, 8],
  [ops.Load32x2SVec128, 8], [ops.Load32x2UVec128, 8], [ops.Load32ZeroVec128, 4], [ops.Load64ZeroVec128, 8],
]);
const LANE_BYTES = new Map<number, number>([
  [ops.Load8LaneVec128, 1], [ops.Load16LaneVec128, 2], [ops.Load32LaneVec128, 4], [ops.Load64LaneVec128, 8],
  [ops.Store8LaneVec128, 1], [ops.Store16LaneVec128, 2], [ops.Store32LaneVec128, 4], [ops.Store64LaneVec128, 8],
]);
if (SIMD_LOAD_BYTES.size !== 12 || LANE_BYTES.size !== 8 || [...SIMD_LOAD_BYTES.keys(), ...LANE_BYTES.keys()].some((k) => typeof k !== 'number')) {
  throw new BugIndicatingError('binaryen.js lacks SIMD load/lane op constants at run time');
}

/** Rewrites `a.module` in place for `variant` and returns the binary. */
export function rewrite(a: Analysis, variant: Variant): Uint8Array {
  const m = a.module;
  const mem = a.memoryName;
  const c32 = (n: number): Ref => m.i32.const(n | 0);
  const get32 = (l: number): Ref => m.local.get(l, i32);
  /** Page index of physical address `local + k` (i32 arithmetic). */
  const pageOf = (l: number, k: number): Ref => m.i32.shr_u(m.i32.add(get32(l), c32(k)), c32(PAGE_SHIFT));
  /**
   * Dirty mark of the page holding physical `local + k`, after a write there succeeded (so the sum
   * is below 4 GiB). RESERVED_BYTES is whole pages: (p + g + RESERVED_BYTES) >> 12 is
   * ((p + g) >> 12) + RESERVED_PAGES, and the constant goes into the store's offset (one add less
   * per write; for the common g = 0, none at all).
   */
  const mark = (l: number, k: number): Ref => {
    const g = k - RESERVED_BYTES;
    return m.i32.store8(DIRTY_MAP_OFFSET + RESERVED_PAGES, 1, m.i32.shr_u(g === 0 ? get32(l) : m.i32.add(get32(l), c32(g)), c32(PAGE_SHIFT)), c32(1), mem);
  };
  const present = (l: number, k: number): Ref => m.i32.load8_u(PRESENCE_MAP_OFFSET, 1, pageOf(l, k), mem);
  const used = new Set<string>();
  const use = (name: string): string => { used.add(name); return name; };

  /** Dirty marks for a `bytes`-wide write at physical `local + k`, which has just succeeded. */
  // The second mark is needed only when the write straddles into the next page: a well-predicted
  // branch is cheaper than a second store on every write.
  const straddles = (l: number, k: number, bytes: number): Ref => {
    const g = (k - RESERVED_BYTES) & 4095; // whole pages change nothing within a page
    return m.i32.gt_u(m.i32.and(g === 0 ? get32(l) : m.i32.add(get32(l), c32(g)), c32(4095)), c32(4096 - bytes));
  };
  const marks = (l: number, k: number, bytes: number): Ref[] => (bytes === 1 ? [mark(l, k)] : [mark(l, k), m.if(straddles(l, k, bytes), mark(l, k + bytes - 1))]);
  /** Presence check before a `bytes`-wide access at physical `local + k`. */
  const check = (l: number, k: number, bytes: number): Ref => {
    if (bytes === 1) return m.if(m.i32.eqz(present(l, k)), m.call(use(H.fault), [pageOf(l, k)], none));
    // and-then-eqz measured ~25 % faster than or-of-eqz. If both bytes are nonzero but share no bit
    // the slow path runs for nothing (it re-checks each); an absent (0) byte is never missed.
    return m.if(
      m.i32.eqz(m.i32.and(present(l, k), present(l, k + bytes - 1))),
      m.call(use(H.faultSpan), [m.i32.add(get32(l), c32(k)), c32(bytes - 1)], none),
    );
  };

  const segments = readSegments(m);
  // After instantiation an active segment is dropped, i.e. empty. Boot drops it on a cold boot, but
  // a migration destination never boots: code that memory.inits from it reads this empty one instead.
  let dropped = '__ferry_dropped';
  while (segments.some((s) => s.name === dropped)) dropped += '_';
  const active = new Set(segments.filter((s) => s.offset !== null).map((s) => s.name));
  const initHelpers = new Map<string, string>();
  const initHelper = (original: string): string => {
    const segment = active.has(original) ? dropped : original;
    let h = initHelpers.get(segment);
    if (!h) { h = `${H.init}${initHelpers.size}`; initHelpers.set(segment, h); }
    return h;
  };

  for (let fi = 0; fi < m.getNumFunctions(); fi++) {
    const func = m.getFunctionByIndex(fi);
    const info = binaryen.getFunctionInfo(func);
    if (info.module || !info.body) continue;
    const temps = new Map<string, number>();
    /** A scratch local per type and nesting level, so a nested access never clobbers an outer one's. */
    const temp = (type: number, slot: string | number): number => {
      const key = `${type}:${slot}`;
      let l = temps.get(key);
      if (l === undefined) {
        l = (binaryen as unknown as { _BinaryenFunctionAddVar(f: number, t: number): number })._BinaryenFunctionAddVar(func, type);
        temps.set(key, l);
      }
      return l;
    };

    const visit = (e: Ref, depth: number): Ref => {
      const id = binaryen.getExpressionId(e);
      const type = binaryen.getExpressionType(e);
      const live = type !== binaryen.unreachable;
      switch (id) {
        case binaryen.LoadId:
        case binaryen.SIMDLoadId: {
          const cls = id === binaryen.LoadId ? 'Load' : 'SIMDLoad';
          const k = (call<number>(cls, 'getOffset', e) >>> 0) + RESERVED_BYTES;
          call(cls, 'setOffset', e, k);
          if (variant !== 'presence' || !live) return e;
          const bytes = id === binaryen.LoadId ? call<number>('Load', 'getBytes', e) : SIMD_LOAD_BYTES.get(call<number>('SIMDLoad', 'getOp', e)) as number;
          const p = temp(i32, depth);
          const ptr = call<Ref>(cls, 'getPtr', e);
          call(cls, 'setPtr', e, get32(p));
          return m.block(null, [m.local.set(p, ptr), check(p, k, bytes), e], type);
        }
        case binaryen.StoreId:
        case binaryen.AtomicRMWId:
        case binaryen.AtomicCmpxchgId:
        case binaryen.SIMDLoadStoreLaneId: {
          const cls = id === binaryen.StoreId ? 'Store' : id === binaryen.AtomicRMWId ? 'AtomicRMW'
            : id === binaryen.AtomicCmpxchgId ? 'AtomicCmpxchg' : 'SIMDLoadStoreLane';
          const k = (call<number>(cls, 'getOffset', e) >>> 0) + RESERVED_BYTES;
          call(cls, 'setOffset', e, k);
          const writes = id !== binaryen.SIMDLoadStoreLaneId || call<boolean>(cls, 'isStore', e);
          if (variant === 'plain' || !live || (variant === 'dirty' && !writes)) return e;
          const bytes = id === binaryen.SIMDLoadStoreLaneId ? LANE_BYTES.get(call<number>(cls, 'getOp', e)) as number : call<number>(cls, 'getBytes', e);
          const p = temp(i32, depth);
          const ptr = call<Ref>(cls, 'getPtr', e);
          call(cls, 'setPtr', e, get32(p));
          if (variant === 'presence') return m.block(null, [m.local.set(p, ptr), check(p, k, bytes), e], type);
          if (type === none) return m.block(null, [m.local.set(p, ptr), e, ...marks(p, k, bytes)], none);
          // A read-modify-write returns the old value: keep it while marking.
          const r = temp(type, 'result');
          return m.block(null, [m.local.set(p, ptr), m.local.set(r, e), ...marks(p, k, bytes), m.local.get(r, type)], type);
        }
        case binaryen.AtomicWaitId:
        case binaryen.AtomicNotifyId: {
          // binaryen.js can neither read nor set these offsets: rebuild with the address computed by
          // the checked helper, operands hoisted so they still evaluate before any trap.
          if (!live) return e; // an operand never returns: the access never happens
          const off = textOffset(e);
          const p = temp(i32, depth);
          if (id === binaryen.AtomicNotifyId) {
            const n = temp(i32, `${depth}:count`);
            return m.block(null, [
              m.local.set(p, call<Ref>('AtomicNotify', 'getPtr', e)),
              m.local.set(n, call<Ref>('AtomicNotify', 'getNotifyCount', e)),
              m.memory.atomic.notify(m.call(use(H.ea), [get32(p), c32(off)], i32), get32(n), mem),
            ], type);
          }
          const et = call<number>('AtomicWait', 'getExpectedType', e);
          const x = temp(et, `${depth}:expected`);
          const t = temp(i64, `${depth}:timeout`);
          const wait = et === i64 ? m.memory.atomic.wait64 : m.memory.atomic.wait32;
          return m.block(null, [
            m.local.set(p, call<Ref>('AtomicWait', 'getPtr', e)),
            m.local.set(x, call<Ref>('AtomicWait', 'getExpected', e)),
            m.local.set(t, call<Ref>('AtomicWait', 'getTimeout', e)),
            ...(variant === 'presence' ? [check(p, off + RESERVED_BYTES, et === i64 ? 8 : 4)] : []),
            wait(m.call(use(H.ea), [get32(p), c32(off)], i32), m.local.get(x, et), m.local.get(t, i64), mem),
          ], type);
        }
        case binaryen.MemoryFillId:
          return m.call(use(H.fill), [call<Ref>('MemoryFill', 'getDest', e), call<Ref>('MemoryFill', 'getValue', e), call<Ref>('MemoryFill', 'getSize', e)], none);
        case binaryen.MemoryCopyId:
          return m.call(use(H.copy), [call<Ref>('MemoryCopy', 'getDest', e), call<Ref>('MemoryCopy', 'getSource', e), call<Ref>('MemoryCopy', 'getSize', e)], none);
        case binaryen.MemoryInitId:
          return m.call(initHelper(call<string>('MemoryInit', 'getSegment', e)), [
            call<Ref>('MemoryInit', 'getDest', e), call<Ref>('MemoryInit', 'getOffset', e), call<Ref>('MemoryInit', 'getSize', e),
          ], none);
        case binaryen.MemorySizeId:
          return m.i32.sub(e, c32(RESERVED_WASM_PAGES));
        case binaryen.MemoryGrowId:
          return m.call(use(H.grow), [call<Ref>('MemoryGrow', 'getDelta', e)], i32);
        default:
          return e;
      }
    };
    (binaryen as unknown as { Function: { setBody(f: number, b: Ref): void } }).Function.setBody(func, walk(info.body, visit));
  }

  if (initHelpers.has(dropped)) segments.push({ name: dropped, data: new Uint8Array(0), offset: null });
  relocateModule(a, variant, segments, use);
  addHelpers(m, mem, variant, used, initHelpers);

  // Keep a name section the guest had (function names in guest trap stacks). binaryen's switch is
  // process-wide, so set it only around this synchronous call.
  const debug = binaryen.getDebugInfo();
  let out: Uint8Array;
  try {
    binaryen.setDebugInfo(a.names);
    out = m.emitBinary();
  } finally {
    binaryen.setDebugInfo(debug);
  }
  return stripStartSection(out);
}

/** Run-time methods of binaryen.js's Module that its type declarations omit. */
interface DataSegmentAccess {
  getNumDataSegments(): number;
  getDataSegmentByIndex(i: number): number;
  getDataSegmentInfo(s: number): { name: string; offset: number | null; data: ArrayBuffer; passive: boolean };
}

interface Segment { name: string; data: Uint8Array; /** Null for a passive segment. */ offset: number | null }

function readSegments(m: binaryen.Module): Segment[] {
  const segments: Segment[] = [];
  const dm = m as unknown as DataSegmentAccess;
  for (let i = 0; i < dm.getNumDataSegments(); i++) {
    const s = dm.getDataSegmentInfo(dm.getDataSegmentByIndex(i));
    segments.push({ name: s.name, data: new Uint8Array(s.data), offset: s.passive ? null : (s.offset ?? 0) >>> 0 });
  }
  return segments;
}

/** Memory import, passive data segments, exported globals and the boot entry. */
function relocateModule(a: Analysis, variant: Variant, segments: Segment[], use: (name: string) => string): void {
  const m = a.module;
  const mem = a.memoryName;
  const memoryExports: string[] = [];
  for (let i = 0; i < m.getNumExports(); i++) {
    const x = binaryen.getExportInfo(m.getExportByIndex(i));
    if (x.kind === binaryen.ExternalMemory) memoryExports.push(x.name);
  }
  for (const name of memoryExports) m.removeExport(name);
  m.setMemory(RESERVED_WASM_PAGES + a.initialPages, 65536, null,
    segments.map((s) => ({ name: s.name, data: s.data, passive: true, offset: 0 })), true, false, mem);
  m.addMemoryImport(mem, REWRITE.memoryModule, REWRITE.memoryName, true);
  for (const name of memoryExports) m.addMemoryExport(mem, name);

  for (const g of a.mutableGlobals) m.addGlobalExport(g.name, `${REWRITE.globalPrefix}${g.index}`);

  const boot: Ref[] = [];
  for (const s of segments) {
    if (s.offset === null) continue;
    const phys = s.offset + RESERVED_BYTES;
    if (phys + s.data.length > 2 ** 32) { boot.push(m.unreachable()); break; }
    boot.push(m.memory.init(s.name, m.i32.const(phys | 0), m.i32.const(0), m.i32.const(s.data.length), mem));
    if (variant === 'dirty') boot.push(m.call(use(H.markRange), [m.i32.const(phys | 0), m.i32.const(s.data.length)], none));
    boot.push(m.data.drop(s.name));
  }
  const start = m.getStart();
  if (start) boot.push(m.call(binaryen.getFunctionInfo(start).name, [], none));
  m.addFunction(REWRITE.boot, none, none, [], m.block(null, boot, none));
  m.addFunctionExport(REWRITE.boot, REWRITE.boot);
}

function addHelpers(m: binaryen.Module, mem: string, variant: Variant, used: Set<string>, inits: Map<string, string>): void {
  const c32 = (n: number): Ref => m.i32.const(n | 0);
  const g = (l: number, t: number = i32): Ref => m.local.get(l, t);
  // binaryen.js 132 takes one bigint here, whatever its type declarations say.
  const c64 = (n: bigint): Ref => (m.i64.const as unknown as (v: bigint) => Ref)(n);
  const bulk = variant !== 'plain';
  if (variant === 'presence') used.add(H.fault);
  if (inits.size > 0 || used.has(H.fill) || used.has(H.copy)) used.add(H.ea);
  if (bulk && (inits.size > 0 || used.has(H.fill) || used.has(H.copy))) used.add(variant === 'dirty' ? H.markRange : H.checkRange);

  if (used.has(H.fault)) m.addFunctionImport(H.fault, REWRITE.memoryModule, REWRITE.faultName, i32, none);

  if (used.has(H.ea)) {
    // (guest address, static offset) -> physical address; traps beyond 4 GiB like the original access would.
    m.addFunction(H.ea, binaryen.createType([i32, i32]), i32, [i64], m.block(null, [
      m.local.set(2, m.i64.add(m.i64.add(m.i64.extend_u(g(0)), m.i64.extend_u(g(1))), c64(BigInt(RESERVED_BYTES)))),
      m.if(m.i64.gt_u(g(2, i64), c64(0xffffffffn)), m.unreachable()),
      m.i32.wrap(g(2, i64)),
    ], i32));
  }
  if (used.has(H.grow)) {
    m.addFunction(H.grow, i32, i32, [i32], m.block(null, [
      m.local.set(1, m.memory.grow(g(0), mem)),
      m.if(m.i32.eq(g(1), c32(-1)), m.return(c32(-1))),
      // Memory the guest grows into on a post-copy destination never existed on the source: it is
      // fresh zeros, present from the start (16 presence bytes per 64 KiB page).
      ...(variant === 'presence' ? [m.memory.fill(m.i32.add(m.i32.shl(g(1), c32(4)), c32(PRESENCE_MAP_OFFSET)), c32(1), m.i32.shl(g(0), c32(4)), mem)] : []),
      m.i32.sub(g(1), c32(RESERVED_WASM_PAGES)),
    ], i32));
  }
  const pages = (p: Ref): Ref => m.i32.shr_u(p, c32(PAGE_SHIFT));
  if (used.has(H.markRange)) {
    // (physical address, length), after a successful bulk write: every page in range is dirty.
    m.addFunction(H.markRange, binaryen.createType([i32, i32]), none, [], m.if(g(1),
      m.memory.fill(
        m.i32.add(pages(g(0)), c32(DIRTY_MAP_OFFSET)),
        c32(1),
        m.i32.add(m.i32.sub(pages(m.i32.sub(m.i32.add(g(0), g(1)), c32(1))), pages(g(0))), c32(1)),
        mem)));
  }
  if (used.has(H.checkRange)) {
    // (physical address, length), before a bulk access: fault in every absent page. An access that
    // will trap anyway (out of bounds) faults nothing.
    const loop = '__ferry_pages';
    m.addFunction(H.checkRange, binaryen.createType([i32, i32]), none, [i32, i32], m.block(null, [
      m.if(m.i32.eqz(g(1)), m.return()),
      m.if(m.i64.gt_u(m.i64.add(m.i64.extend_u(g(0)), m.i64.extend_u(g(1))), m.i64.shl(m.i64.extend_u(m.memory.size(mem)), c64(16n))), m.return()),
      m.local.set(2, pages(g(0))),
      m.local.set(3, pages(m.i32.sub(m.i32.add(g(0), g(1)), c32(1)))),
      m.loop(loop, m.block(null, [
        m.if(m.i32.eqz(m.i32.load8_u(PRESENCE_MAP_OFFSET, 1, g(2), mem)), m.call(H.fault, [g(2)], none)),
        m.local.set(2, m.i32.add(g(2), c32(1))),
        m.br(loop, m.i32.le_u(g(2), g(3))),
      ], none)),
    ], none));
  }
  if (used.has(H.faultSpan)) {
    // (physical address, bytes - 1): the slow path of a single access whose first or last page is absent.
    m.addFunction(H.faultSpan, binaryen.createType([i32, i32]), none, [i32, i32], m.block(null, [
      m.local.set(2, pages(g(0))),
      m.local.set(3, pages(m.i32.add(g(0), g(1)))),
      m.if(m.i32.eqz(m.i32.load8_u(PRESENCE_MAP_OFFSET, 1, g(2), mem)), m.call(H.fault, [g(2)], none)),
      m.if(m.i32.and(m.i32.ne(g(3), g(2)), m.i32.eqz(m.i32.load8_u(PRESENCE_MAP_OFFSET, 1, g(3), mem))), m.call(H.fault, [g(3)], none)),
    ], none));
  }
  const before = (p: number, n: number): Ref[] => (variant === 'presence' ? [m.call(H.checkRange, [g(p), g(n)], none)] : []);
  const after = (p: number, n: number): Ref[] => (variant === 'dirty' ? [m.call(H.markRange, [g(p), g(n)], none)] : []);
  const reloc = (l: number): Ref => m.local.set(l, m.call(H.ea, [g(l), c32(0)], i32));
  const three = binaryen.createType([i32, i32, i32]);
  if (used.has(H.fill)) {
    m.addFunction(H.fill, three, none, [], m.block(null, [
      reloc(0), ...before(0, 2), m.memory.fill(g(0), g(1), g(2), mem), ...after(0, 2),
    ], none));
  }
  if (used.has(H.copy)) {
    m.addFunction(H.copy, three, none, [], m.block(null, [
      reloc(0), reloc(1), ...before(1, 2), ...before(0, 2), m.memory.copy(g(0), g(1), g(2), mem, mem), ...after(0, 2),
    ], none));
  }
  for (const [segment, name] of inits) {
    m.addFunction(name, three, none, [], m.block(null, [
      reloc(0), ...before(0, 2), m.memory.init(segment, g(0), g(1), g(2), mem), ...after(0, 2),
    ], none));
  }
}
