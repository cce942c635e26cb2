/**
 * zero: an all-zero page goes as a flag (no bytes).
 *
 * Detection is the hot path (every page of every round passes through it), so it runs a tiny Wasm
 * SIMD routine (OR four v128 loads, `v128.any_true`) — FINDINGS measured 33 GB/s; plain JS tops
 * out near 5–7 GB/s on Int32 words, and Float64 compares are faster but take -0 for zero. When the
 * page lives in a `WebAssembly.Memory` the scanner was given (the guest's RAM), it scans in place;
 * otherwise it copies into its own scratch memory first (still ≥ 10 GB/s on this machine).
 */
import { PAGE_SIZE } from '../pages.js';
import { CodecErrorCode, ZERO_CODEC_ID, codecFail, type PageCodec, type PageDecoder, type PageEncoder } from './codec.js';

// (func (export "z") (param $p i32) (param $n i32) (result i32)): 1 when [p, p+n) is all zero; n % 64 == 0.
// (func (export "f") (param $p i32) (param $count i32) (param $zero i32) (result i32)): how many of
// the `count` 4 KiB pages from p come before the first whose "all zero" is `zero` (count if none):
// a stretch of pages scanned in one call.
// Built from WAT with binaryen (see test/core/codec.test.ts, which rebuilds and compares these bytes).
const TYPES = [0, 97, 115, 109, 1, 0, 0, 0, 1, 14, 2, 96, 2, 127, 127, 1, 127, 96, 3, 127, 127, 127, 1, 127];
const FUNCS = [
  3, 3, 2, 0, 1, 7, 9, 2, 1, 122, 0, 0, 1, 102, 0, 1, 10, 120, 2, 71, 0, 32, 0, 32, 1, 106, 33, 1, 3, 64, 32, 0, 32, 1, 73,
  4, 64, 32, 0, 253, 0, 4, 0, 32, 0, 253, 0, 4, 16, 253, 80, 32, 0, 253, 0, 4, 32, 32, 0, 253, 0, 4, 48, 253, 80, 253, 80,
  253, 83, 4, 64, 65, 0, 15, 5, 32, 0, 65, 64, 107, 33, 0, 12, 2, 11, 0, 11, 11, 65, 1, 11, 46, 1, 1, 127, 3, 64, 2, 64, 32,
  1, 32, 3, 77, 13, 0, 32, 0, 32, 3, 65, 12, 116, 106, 65, 128, 32, 16, 0, 32, 2, 70, 13, 0, 32, 3, 65, 1, 106, 33, 3, 12,
  1, 11, 11, 32, 3, 11,
];
/** Module importing `e.m` as a plain memory (min 0). */
export const ZERO_SCAN_WASM = new Uint8Array([...TYPES, 2, 8, 1, 1, 101, 1, 109, 2, 0, 0, ...FUNCS]);
/** Same, importing a shared memory (min 0, max 65536). */
export const ZERO_SCAN_WASM_SHARED = new Uint8Array([...TYPES, 2, 11, 1, 1, 101, 1, 109, 2, 3, 0, 128, 128, 4, ...FUNCS]);

interface Scan {
  /** 1 when [ptr, ptr + len) is all zero (len a multiple of 64). */
  z(ptr: number, len: number): number;
  /** Pages of the `count` from `ptr` before the first whose all-zero is `zero` (1 or 0); `count` if none. */
  f(ptr: number, count: number, zero: number): number;
}

/**
 * The two modules, compiled once per thread: a scanner is made for every VM that leaves a host,
 * and compiling per scanner had V8 compile the scan again (and optimise it again) in every migration.
 */
const compiled: { plain?: WebAssembly.Module | null; shared?: WebAssembly.Module | null } = {};

function instantiate(memory: WebAssembly.Memory, shared: boolean): Scan | null {
  const key = shared ? 'shared' : 'plain';
  try {
    const mod = (compiled[key] ??= new WebAssembly.Module(shared ? ZERO_SCAN_WASM_SHARED : ZERO_SCAN_WASM));
    return mod ? (new WebAssembly.Instance(mod, { e: { m: memory } }).exports as unknown as Scan) : null;
  } catch {
    compiled[key] ??= null;
    return null; // no SIMD (or no Wasm): the JS path below is correct, only slower
  }
}

/**
 * Fills out[at … at + count) with 1 for each zero page of the `count` pages from byte `ptr` of
 * the scanner's memory, 0 for the others; returns how many are zero. One call per stretch of
 * zero or non-zero pages (one per run of guest memory holding data): a call per page, 65536 per
 * 256 MiB, cost the source more than the scan.
 */
function mapStretches(scan: Scan, ptr: number, count: number, out: Uint8Array, at: number): number {
  let zeros = 0;
  for (let k = 0; k < count;) {
    const data = scan.f(ptr + k * PAGE_SIZE, count - k, 1);
    out.fill(0, at + k, at + k + data);
    k += data;
    if (k >= count) break;
    const z = scan.f(ptr + k * PAGE_SIZE, count - k, 0);
    out.fill(1, at + k, at + k + z);
    zeros += z;
    k += z;
  }
  return zeros;
}

/** Plain JS check (Int32 words when aligned, bytes otherwise). */
export function isZeroJs(bytes: Uint8Array): boolean {
  const n = bytes.length;
  if ((bytes.byteOffset & 3) === 0 && (n & 3) === 0) {
    const w = new Int32Array(bytes.buffer, bytes.byteOffset, n >> 2);
    const m = w.length;
    let i = 0;
    for (; i + 8 <= m; i += 8) if ((w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7]) !== 0) return false;
    for (; i < m; i++) if (w[i] !== 0) return false;
    return true;
  }
  for (let i = 0; i < n; i++) if (bytes[i] !== 0) return false;
  return true;
}

export interface ZeroScannerInit {
  /** Memory whose pages are scanned in place (typically the guest's RAM). */
  memory?: WebAssembly.Memory;
  /** Use the Wasm SIMD routine when available (default true). */
  simd?: boolean;
}

export interface ZeroScanner {
  /** True when the Wasm SIMD routine is in use. */
  readonly simd: boolean;
  isZero(bytes: Uint8Array): boolean;
  /** Sets `out[k]` to 1 for each zero page of `pages` (back-to-back PAGE_SIZE pages), else 0; returns the zero count. */
  zeroMap(pages: Uint8Array, out: Uint8Array): number;
}

const SCRATCH_BYTES = 1 << 20;

/** A zero-page scanner; in place over `init.memory`, through a 1 MiB scratch memory otherwise. */
export function zeroScanner(init: ZeroScannerInit = {}): ZeroScanner {
  const useSimd = init.simd ?? true;
  const guest = init.memory;
  const guestScan = useSimd && guest ? instantiate(guest, guest.buffer instanceof SharedArrayBuffer) : null;
  const scratchMem = useSimd ? new WebAssembly.Memory({ initial: SCRATCH_BYTES / 65536 }) : null;
  const scratchScan = scratchMem ? instantiate(scratchMem, false) : null;
  const scratch = scratchMem && scratchScan ? new Uint8Array(scratchMem.buffer) : null;

  const simdZero = (bytes: Uint8Array): boolean => {
    const n = bytes.length;
    const body = n & ~63;
    let ok: boolean;
    if (guestScan && bytes.buffer === guest!.buffer && bytes.byteOffset + body < 2 ** 32) {
      ok = guestScan.z(bytes.byteOffset, body) === 1;
    } else {
      ok = true;
      for (let at = 0; ok && at < body; at += SCRATCH_BYTES) {
        const len = Math.min(SCRATCH_BYTES, body - at);
        scratch!.set(bytes.subarray(at, at + len));
        ok = scratchScan!.z(0, len) === 1;
      }
    }
    for (let i = body; ok && i < n; i++) if (bytes[i] !== 0) ok = false;
    return ok;
  };
  const isZero = scratch ? simdZero : isZeroJs;

  return {
    simd: scratch !== null,
    isZero,
    zeroMap(pages, out) {
      const count = pages.length / PAGE_SIZE;
      if (!Number.isInteger(count) || out.length < count) throw new RangeError(`zeroMap needs whole pages and ${count} output slots`);
      let zeros = 0;
      // Whole-batch copy into scratch when the pages are not in the scanned memory: one copy per MiB.
      if (scratch && !(guestScan && pages.buffer === guest!.buffer)) {
        for (let at = 0; at < pages.length; at += SCRATCH_BYTES) {
          const len = Math.min(SCRATCH_BYTES, pages.length - at);
          scratch.set(pages.subarray(at, at + len));
          zeros += mapStretches(scratchScan!, 0, len / PAGE_SIZE, out, at / PAGE_SIZE);
        }
        return zeros;
      }
      // In place, straight at the pages' addresses.
      const at = pages.byteOffset;
      if (guestScan !== null && pages.buffer === guest!.buffer && at + pages.length <= 2 ** 32) return mapStretches(guestScan, at, count, out, 0);
      for (let k = 0; k < count; k++) {
        const z = isZero(pages.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE)) ? 1 : 0;
        out[k] = z;
        zeros += z;
      }
      return zeros;
    },
  };
}

export interface ZeroInit extends ZeroScannerInit {
  /** Wire id (default ZERO_CODEC_ID, the protocol's ZERO encoding). */
  id?: number;
}

/** The zero-page codec: encode → `{ id, bytes: [] }` for a zero page, null otherwise. */
export function zero(init: ZeroInit = {}): PageCodec {
  const id = init.id ?? ZERO_CODEC_ID;
  const name = 'zero';
  return {
    name,
    id,
    createEncoder(): PageEncoder {
      const scanner = zeroScanner(init);
      let pages = 0;
      let zeros = 0;
      return {
        name,
        encode(_pageIndex, page) {
          pages++;
          if (!scanner.isZero(page)) return null;
          zeros++;
          return { codecId: id, bytes: new Uint8Array(0) };
        },
        delivered() {},
        stats: () => ({ pages, zeros }),
      };
    },
    createDecoder(): PageDecoder {
      let zeros = 0;
      return {
        name,
        ids: [id],
        decode(pageIndex, codecId, bytes, page) {
          if (codecId !== id) codecFail(CodecErrorCode.UNKNOWN, `zero decoder got codec id ${codecId} for page ${pageIndex}`);
          if (bytes.length !== 0) codecFail(CodecErrorCode.CORRUPT, `zero page ${pageIndex} carries ${bytes.length} bytes`);
          if (page.length !== PAGE_SIZE) throw new RangeError(`destination page is ${page.length} bytes`);
          page.fill(0);
          zeros++;
        },
        delivered() {},
        stats: () => ({ zeros }),
      };
    },
  };
}
