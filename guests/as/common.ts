// Shared helpers for ferry's AssemblyScript guests (see docs/guest-abi.md).
//
// The guests are built with `--runtime stub` and never allocate managed objects: every string
// literal used here is static data, read with charCodeAt, and all dynamic memory comes from the
// bump allocator `sbrk` below, which fails softly (returns 0) instead of trapping. AssemblyScript's
// own `abort` (failed assertions, bounds checks) is redirected to ferry's `abort` import by the
// build (`--use abort=common/ferry_abort`), so the only imports are names from the ABI.

@external("ferry", "abort")
export declare function ferry_abort(msg: usize, file: usize, line: u32, col: u32): void;
@external("ferry", "console_write")
export declare function console_write(ptr: usize, len: i32): void;
@external("ferry", "clock_ns")
export declare function clock_ns(): i64;
@external("ferry", "config_read")
export declare function config_read(ptr: usize, cap: i32): i32;
@external("ferry", "soft_pages")
export declare function soft_pages(ptr: usize, len: usize, free: i32): void;

/** Stops the VM with `msg` (a static string literal) after printing it to the console. */
export function fatal(msg: string): void {
  outStr("fatal: "); outStr(msg); outByte(10); outFlush();
  ferry_abort(changetype<usize>(msg), 0, 0, 0);
  unreachable();
}

// ---------------------------------------------------------------------------------------------
// Memory: a bump allocator over linear memory, growing it as needed.

let brk: usize = 0;

/** Allocates `n` bytes aligned to `align` (a power of two); returns 0 if memory cannot grow. */
export function sbrk(n: usize, align: usize = 16): usize {
  if (brk == 0) brk = (__heap_base + 15) & ~15;
  let p = (brk + align - 1) & ~(align - 1);
  let end = p + n;
  if (end < p || end > 0xFFFF0000) return 0;
  let have = <usize>memory.size() << 16;
  if (end > have) {
    let need = <i32>((end - have + 0xFFFF) >>> 16);
    if (memory.grow(need) < 0) return 0;
  }
  brk = end;
  return p;
}

/** Current end of the allocated heap. */
export function heapEnd(): usize {
  if (brk == 0) brk = (__heap_base + 15) & ~15;
  return brk;
}

// ---------------------------------------------------------------------------------------------
// Configuration: `key=value key=value` text from config_read.

let cfg: usize = 0;
let cfgLen: i32 = 0;

export function configLoad(): void {
  let n = config_read(0, 0);
  if (n < 0) n = 0;
  cfg = sbrk(<usize>n + 1);
  if (cfg == 0) fatal("out of memory reading the configuration");
  cfgLen = n > 0 ? config_read(cfg, n) : 0;
  if (cfgLen > n) cfgLen = n;
  store<u8>(cfg + <usize>cfgLen, 0);
}

@inline function isSpace(c: u32): bool { return c == 32 || c == 9 || c == 10 || c == 13; }

/** Offset of the value of `key` in the configuration (last occurrence wins), or -1. */
export function cfgFind(key: string): i32 {
  let found = -1;
  let i = 0;
  let klen = key.length;
  while (i < cfgLen) {
    while (i < cfgLen && isSpace(load<u8>(cfg + i))) i++;
    let start = i;
    while (i < cfgLen && !isSpace(load<u8>(cfg + i))) i++;
    if (i - start > klen && load<u8>(cfg + start + klen) == 61 /* = */) {
      let same = true;
      for (let k = 0; k < klen; k++) {
        if (<u32>load<u8>(cfg + start + k) != <u32>key.charCodeAt(k)) { same = false; break; }
      }
      if (same) found = start + klen + 1;
    }
  }
  return found;
}

/** Length of the value starting at offset `v`. */
function valueLen(v: i32): i32 {
  let i = v;
  while (i < cfgLen && !isSpace(load<u8>(cfg + i))) i++;
  return i - v;
}

/** Whether `key`'s value is exactly `word`. */
export function cfgIs(key: string, word: string, dflt: bool): bool {
  let v = cfgFind(key);
  if (v < 0) return dflt;
  let n = valueLen(v);
  if (n != word.length) return false;
  for (let k = 0; k < n; k++) if (<u32>load<u8>(cfg + v + k) != <u32>word.charCodeAt(k)) return false;
  return true;
}

let parseEnd: i32 = 0;

function parseNumber(v: i32): f64 {
  let i = v;
  let x: f64 = 0;
  let any = false;
  while (i < cfgLen) {
    let c = <u32>load<u8>(cfg + i);
    if (c >= 48 && c <= 57) { x = x * 10 + <f64>(c - 48); any = true; i++; }
    else if (c == 95) i++; // 1_000_000
    else break;
  }
  if (i < cfgLen && load<u8>(cfg + i) == 46) {
    i++;
    let scale: f64 = 0.1;
    while (i < cfgLen) {
      let c = <u32>load<u8>(cfg + i);
      if (c < 48 || c > 57) break;
      x += <f64>(c - 48) * scale; scale *= 0.1; any = true; i++;
    }
  }
  if (i < cfgLen && (load<u8>(cfg + i) | 32) == 101 /* e */) {
    let j = i + 1;
    let neg = false;
    if (j < cfgLen && (load<u8>(cfg + j) == 45 || load<u8>(cfg + j) == 43)) { neg = load<u8>(cfg + j) == 45; j++; }
    let e = 0;
    let digits = false;
    while (j < cfgLen) {
      let c = <u32>load<u8>(cfg + j);
      if (c < 48 || c > 57) break;
      e = e * 10 + <i32>(c - 48); digits = true; j++;
    }
    if (digits) { x *= Math.pow(10, neg ? -<f64>e : <f64>e); i = j; }
  }
  parseEnd = any ? i : -1;
  return x;
}

/**
 * A size or count: digits (optionally with a fraction or exponent) and an optional suffix.
 * `K` `M` `G` `T` `Ki` `Mi` `Gi` `KiB` `MiB` `GiB` are binary (×1024^n); `k`/`KB` `MB` `GB` are
 * decimal (×1000^n); `B` is 1. Falls back to `dflt` if the key is absent; aborts if malformed.
 */
export function cfgSize(key: string, dflt: f64): f64 {
  let v = cfgFind(key);
  if (v < 0) return dflt;
  let x = parseNumber(v);
  let i = parseEnd;
  if (i < 0) { badValue(key); return dflt; }
  let end = v + valueLen(v);
  let rest = end - i;
  if (rest == 0) return x;
  let c = <u32>load<u8>(cfg + i);
  let mult: f64 = 0;
  let pow = 0;
  if (c == 107) pow = 1; // k: decimal
  else if ((c | 32) == 107) pow = 1; // K
  else if ((c | 32) == 109) pow = 2;
  else if ((c | 32) == 103) pow = 3;
  else if ((c | 32) == 116) pow = 4;
  else if (c == 66 && rest == 1) return x; // B
  if (pow == 0) { badValue(key); return dflt; }
  let suffix = i + 1;
  let rem = end - suffix;
  let decimal = c == 107;
  if (rem == 0) {
    // bare letter
  } else if (rem == 1 && load<u8>(cfg + suffix) == 66 /* B */) {
    decimal = true;
  } else if ((rem == 1 && load<u8>(cfg + suffix) == 105) || (rem == 2 && load<u8>(cfg + suffix) == 105 && load<u8>(cfg + suffix + 1) == 66)) {
    decimal = false; // Ki, KiB
  } else { badValue(key); return dflt; }
  mult = Math.pow(decimal ? 1000 : 1024, <f64>pow);
  return x * mult;
}

/** A plain number (fractions allowed). */
export function cfgNum(key: string, dflt: f64): f64 {
  let v = cfgFind(key);
  if (v < 0) return dflt;
  let x = parseNumber(v);
  if (parseEnd != v + valueLen(v)) badValue(key);
  return x;
}

function badValue(key: string): void {
  outStr("config: bad value for '"); outStr(key); outStr("'\n"); outFlush();
  ferry_abort(changetype<usize>("bad configuration value"), 0, 0, 0);
  unreachable();
}

// ---------------------------------------------------------------------------------------------
// Console output: a small line buffer, flushed with console_write.

const OUT_CAP: usize = 512;
let outBuf: usize = 0;
let outLen: usize = 0;

function outEnsure(): void {
  if (outBuf == 0) {
    outBuf = sbrk(OUT_CAP);
    if (outBuf == 0) unreachable();
  }
}

export function outByte(c: u32): void {
  outEnsure();
  if (outLen == OUT_CAP) outFlush();
  store<u8>(outBuf + outLen++, <u8>c);
}

export function outStr(s: string): void {
  for (let i = 0; i < s.length; i++) outByte(<u32>s.charCodeAt(i));
}

export function outU64(n: u64): void {
  let tmp = stackDigits;
  let k = 0;
  do { store<u8>(changetype<usize>(tmp) + k++, <u8>(48 + n % 10)); n /= 10; } while (n != 0);
  while (k > 0) outByte(<u32>load<u8>(changetype<usize>(tmp) + --k));
}

/** `x` with `decimals` digits after the point (decimals ≤ 6). */
export function outF64(x: f64, decimals: i32): void {
  if (x < 0) { outByte(45); x = -x; }
  let scale = Math.pow(10, <f64>decimals);
  let v = <u64>Math.round(x * scale);
  let s = <u64>scale;
  outU64(v / s);
  if (decimals > 0) {
    outByte(46);
    let frac = v % s;
    let d = s / 10;
    while (d > 0) { outByte(<u32>(48 + (frac / d) % 10)); d /= 10; }
  }
}

export function outFlush(): void {
  if (outLen > 0) { console_write(outBuf, <i32>outLen); outLen = 0; }
}

const stackDigits = memory.data(24);
