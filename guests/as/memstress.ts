// memstress: the knob-turning memory workload for migration experiments (see docs/guest-abi.md).
//
// Configuration (`--config 'key=value ...'`; sizes take K/M/G/KiB/MiB/GiB = ×1024^n, kB/KB/MB/GB = ×1000^n):
//   mem=<bytes>        memory region the guest owns; default: wss, or 64 MiB if neither is given
//   wss=<bytes>        writable working set = the first `wss` bytes of the region; default: mem
//   rate=<bytes/s>     write rate; 0 (default) = as fast as possible. Paced with clock_ns as a
//                      token bucket (burst: 100 ms of writes); run() returns IDLE when ahead.
//   pattern=uniform|hotcold|zipf|sequential    (default uniform)
//     uniform     every write-size-aligned slot of the working set equally likely
//     hotcold     the hot set is the first `hot`×wss bytes of the working set; a write goes there
//                 with probability `hotp`, else uniformly into the rest
//     zipf        whole 4 KiB pages of the working set (at least one) ranked by address (page 0
//                 hottest); the page of rank k is chosen with probability ∝ 1/k^zipf (exact: a Vose
//                 alias table built in init, 8 bytes per page, kept outside the region), then a
//                 uniform slot inside it. A partial last page of the working set is not written.
//     sequential  slot after slot from the start of the working set, wrapping at its end
//   hot=<fraction>     hot share of the working set (default 0.1)
//   hotp=<probability> probability that a write hits the hot set (default 0.9)
//   zipf=<exponent>    Zipf exponent s (default 0.99)
//   write=1|2|4|8      bytes per write (aligned to their size; default 8)
//   seed=<n>           PRNG seed (default 1): same seed + same budget sequence (rate=0) = same memory
//   writes=<n>         halt after n writes (default 0 = never)
//   report=<seconds>   print "memstress: <n> writes/s ..." every so many seconds (default 0 = never)
//
// Content of the region after init (so codecs are measured on memory that resembles real memory).
// Every whole 4 KiB page of the region is of one class; the fractions are of the whole pages, each
// in [0, 1], summing to at most 1 (a count is floor(fraction × pages)):
//   zero=<fraction>    pages left all-zero (default 0)
//   text=<fraction>    text-like pages: words from a small built-in vocabulary, numbers, spaces and
//                      newlines (printable ASCII, ~4.3 bits/byte; a 4 KiB page compresses ~3× with
//                      zstd, ~1.9× with lz4); their content depends on seed
//   dup=<fraction>     pages duplicated ACROSS VMs: random-looking content that depends only on
//                      dupseed and the page's index in the region, never on seed, and distinct from
//                      page to page. Which pages are dup depends only on dupseed, the dup fraction
//                      and the number of pages, so VMs with the same mem, dup and dupseed and any
//                      seeds hold the same bytes at the same places in those pages.
//   dupseed=<n>        seed of the dup pages (default 1)
//   repeat=<fraction>  pages duplicated WITHIN the VM: each a copy of one of 4 random-looking
//                      template contents (seed-dependent), assigned round-robin
//   the rest           random pages (depend on seed): word i of the region is (i × 0x9E3779B97F4A7C15)
//                      xor a seed-derived constant (incompressible); a partial last page is random too.
// The classes are interleaved over the region: the dup pages are the first in a pseudo-random
// permutation of the page indices keyed by dupseed, the zero, text and repeat pages (in that order)
// the first of the remaining pages in a permutation keyed by seed.
//   wcontent=random|keep   what writes store (default random)
//     random      the pattern's value (a PRNG word, or a counter for sequential), whatever the page
//     keep        writes keep their page's class: a write into a zero, dup or repeat page stores the
//                 bytes already there (the page is dirtied, its content does not change); a write
//                 into a text page stores text (a word-sized piece of a 2 KiB text table); random
//                 pages get the pattern's value. Costs a class lookup per write (a byte per page,
//                 kept outside the region); with no zero/text/dup/repeat pages it is the same as random.
//
// One budget unit is one write. The write loops are specialised per pattern, write size and
// wcontent: xorshift64, a multiply-shift range reduction, one store. init prints the region's
// place and content: "memstress: region <base> mem=<bytes> wss=<bytes> pattern=<p> write=<w>
// seed=<s> zero=<pages> text=<pages> dup=<pages> repeat=<pages> random=<pages>" (whole pages; for
// hotcold, "pattern=hotcold hotbytes=<bytes>").
// progress() = writes done.
import { cfgIs, cfgNum, cfgSize, clock_ns, configLoad, fatal, outByte, outF64, outFlush, outStr, outU64, sbrk, soft_pages } from "./common";

const RUNNING = 0;
const IDLE = 1;
const HALTED = 2;

const P_UNIFORM = 0;
const P_HOTCOLD = 1;
const P_ZIPF = 2;
const P_SEQUENTIAL = 3;

// Page classes (a byte per page in classTab; repeat pages add their template index << 3).
const C_RANDOM: u32 = 0;
const C_ZERO: u32 = 1;
const C_TEXT: u32 = 2;
const C_DUP: u32 = 3;
const C_REPEAT: u32 = 4;
const REPEAT_TEMPLATES: u32 = 4;
const PAGE: usize = 4096;
const GOLDEN: u64 = 0x9E3779B97F4A7C15;

// Marker types that pick a write loop's store at compile time (see put).
type Plain = i32;
type Keep = f64;

let base: usize = 0;
let memBytes: usize = 0;
let wssBytes: usize = 0;
let wbytes: u32 = 8;
let pattern: i32 = P_UNIFORM;
let seed: u64 = 1;
let s: u64 = 1; // xorshift64 state
let nSlots: u64 = 0; // wss / wbytes
let hotSlots: u64 = 0;
let coldSlots: u64 = 0;
let hotThresh: u64 = 0; // hot iff (x & 0xffffffff) < hotThresh (0 … 2^32)
let zipfTab: usize = 0; // u64 per page: low 32 = 20-bit keep threshold, high 32 = alias page
let zipfPages: u64 = 0;
let slotsPerPage: u64 = 0;
let seqPos: u64 = 0;
let writes: u64 = 0;
let limit: u64 = 0;
let rate: f64 = 0; // writes per second
let burst: f64 = 0;
let credit: f64 = 0;
let lastNs: i64 = -1;
let reportNs: i64 = 0;
let reportAt: i64 = -1;
let reportWrites: u64 = 0;
let classTab: usize = 0; // u8 per page of the region (a partial last page too); 0 if every page is random
let keep = false; // wcontent=keep (and classTab != 0)
const textTab = memory.data(2048, 8); // text for wcontent=keep writes into text pages

export function init(): void {
  configLoad();
  let memDefault: f64 = 64 * 1024 * 1024;
  let wssCfg = cfgSize("wss", -1);
  let mem = cfgSize("mem", wssCfg >= 0 ? wssCfg : memDefault);
  let wss = wssCfg >= 0 ? wssCfg : mem;
  if (!(mem >= 1) || mem > 4292870144.0) fatal("mem must be between 1 byte and 4 GiB less 2 MiB");
  if (wss > mem) fatal("wss must not exceed mem");
  let w = cfgNum("write", 8);
  if (w != 1 && w != 2 && w != 4 && w != 8) fatal("write must be 1, 2, 4 or 8");
  wbytes = <u32>w;
  memBytes = <usize>mem;
  wssBytes = <usize>wss;
  wssBytes -= wssBytes % wbytes;
  if (wssBytes == 0) fatal("wss is smaller than one write");
  nSlots = <u64>(wssBytes / wbytes);
  seed = <u64>cfgNum("seed", 1);
  // splitmix64 of the seed, never 0
  let z = seed + 0x9E3779B97F4A7C15;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
  s = (z ^ (z >> 31)) | 1;
  limit = <u64>cfgNum("writes", 0);
  let r = cfgSize("rate", 0);
  rate = r / <f64>wbytes;
  burst = Math.max(rate * 0.1, 1);
  reportNs = <i64>(cfgNum("report", 0) * 1e9);

  if (cfgIs("pattern", "uniform", true)) pattern = P_UNIFORM;
  else if (cfgIs("pattern", "hotcold", false)) pattern = P_HOTCOLD;
  else if (cfgIs("pattern", "zipf", false)) pattern = P_ZIPF;
  else if (cfgIs("pattern", "sequential", false)) pattern = P_SEQUENTIAL;
  else fatal("pattern must be uniform, hotcold, zipf or sequential");

  if (pattern == P_HOTCOLD) {
    let hot = cfgNum("hot", 0.1);
    let hotp = cfgNum("hotp", 0.9);
    if (!(hot >= 0 && hot <= 1)) fatal("hot must be a fraction between 0 and 1");
    if (!(hotp >= 0 && hotp <= 1)) fatal("hotp must be a probability between 0 and 1");
    hotSlots = <u64>(hot * <f64>nSlots);
    coldSlots = nSlots - hotSlots;
    hotThresh = <u64>(hotp * 4294967296.0);
    if (hotSlots == 0) { hotThresh = 0; }
    if (coldSlots == 0) { hotThresh = 0x100000000; }
  }

  let fz = cfgNum("zero", 0), ft = cfgNum("text", 0), fd = cfgNum("dup", 0), fr = cfgNum("repeat", 0);
  if (!(fz >= 0 && fz <= 1)) fatal("zero must be a fraction between 0 and 1");
  if (!(ft >= 0 && ft <= 1)) fatal("text must be a fraction between 0 and 1");
  if (!(fd >= 0 && fd <= 1)) fatal("dup must be a fraction between 0 and 1");
  if (!(fr >= 0 && fr <= 1)) fatal("repeat must be a fraction between 0 and 1");
  // (the tolerance absorbs decimal parsing: 0.1 + 0.2 + 0.3 + 0.4 is 1.0000000000000002)
  if (fz + ft + fd + fr > 1 + 1e-9) fatal("zero + text + dup + repeat must not exceed 1");
  let dupseed = <u64>cfgNum("dupseed", 1);
  if (cfgIs("wcontent", "random", true)) keep = false;
  else if (cfgIs("wcontent", "keep", false)) keep = true;
  else fatal("wcontent must be random or keep");
  let pages = memBytes / PAGE;
  let nDup = pageCount(fd, pages, pages);
  let nZero = pageCount(fz, pages, pages - nDup);
  let nText = pageCount(ft, pages, pages - nDup - nZero);
  let nRepeat = pageCount(fr, pages, pages - nDup - nZero - nText);
  if (nDup + nZero + nText + nRepeat == 0) keep = false;
  else {
    // Before the region, like the zipf table, so VMs that differ only in seeds share the layout.
    classTab = sbrk((memBytes + PAGE - 1) / PAGE, PAGE);
    if (classTab == 0) fatal("out of memory for the page class table");
    assignClasses(pages, nDup, nZero, nText, nRepeat, dupseed);
  }

  let zipfTmp: usize = 0;
  let zipfTmpLen: usize = 0;
  if (pattern == P_ZIPF) {
    let ex = cfgNum("zipf", 0.99);
    if (!(ex >= 0 && ex <= 100)) fatal("zipf exponent must be between 0 and 100");
    zipfPages = <u64>(wssBytes >>> 12);
    if (zipfPages == 0) zipfPages = 1;
    slotsPerPage = <u64>(min<usize>(wssBytes, 4096) / wbytes);
    zipfTab = sbrk(<usize>zipfPages * 8, 8);
    if (zipfTab == 0) fatal("out of memory for the zipf table");
    // Region first would put the temporaries outside it; we build the table before growing the
    // region, then hand the temporaries back with soft_pages.
    zipfTmpLen = <usize>zipfPages * 16;
    zipfTmp = sbrk(zipfTmpLen, 4096);
    if (zipfTmp == 0) fatal("out of memory building the zipf table");
    buildAlias(ex, zipfTmp);
  }

  base = sbrk(memBytes, 4096);
  if (base == 0) fatal("cannot grow memory to hold mem bytes");
  if (zipfTmp != 0) soft_pages(zipfTmp, zipfTmpLen, 1);
  fillRegion(pages, dupseed);
  if (keep) fillText(textTab, 2048, mix64(seed ^ 0x7E47));
  else if (classTab != 0) soft_pages(classTab, (memBytes + PAGE - 1) / PAGE, 1); // not read again

  outStr("memstress: region "); outU64(base);
  outStr(" mem="); outU64(memBytes);
  outStr(" wss="); outU64(wssBytes);
  outStr(" pattern=");
  if (pattern == P_UNIFORM) outStr("uniform");
  else if (pattern == P_HOTCOLD) { outStr("hotcold hotbytes="); outU64(hotSlots * wbytes); }
  else if (pattern == P_ZIPF) outStr("zipf");
  else outStr("sequential");
  outStr(" write="); outU64(wbytes);
  outStr(" seed="); outU64(seed);
  outStr(" zero="); outU64(nZero);
  outStr(" text="); outU64(nText);
  outStr(" dup="); outU64(nDup);
  outStr(" repeat="); outU64(nRepeat);
  outStr(" random="); outU64(pages - nDup - nZero - nText - nRepeat);
  outByte(10); outFlush();
}

// --- page content ------------------------------------------------------------------------------

/** floor(fraction × pages), the nearest integer when within 1e-6 of one (decimal parsing), at most `left`. */
function pageCount(fraction: f64, pages: usize, left: usize): usize {
  let n = <usize>Math.floor(fraction * <f64>pages + 1e-6);
  return n < left ? n : left;
}

/** splitmix64's finaliser. */
@inline function mix64(z: u64): u64 {
  z += GOLDEN;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
  return z ^ (z >> 31);
}

/**
 * A bijection of [0, n) keyed by `key`: rounds of xor-key, multiply by an odd constant and
 * xor-shift on the `bits`-bit integers (2^bits ≥ n, each step invertible), walking the cycle until
 * the value falls below n.
 */
function permute(x: u64, n: u64, bits: u64, key: u64): u64 {
  let mask = (<u64>1 << bits) - 1;
  let half = (bits + 1) >> 1;
  do {
    for (let r: u64 = 0; r < 4; r++) {
      x = ((x ^ mix64(key + r)) * GOLDEN) & mask;
      x ^= x >> half;
    }
  } while (x >= n);
  return x;
}

/** Fills classTab: dup pages by dupseed alone, then zero, text and repeat pages by seed. */
function assignClasses(pages: usize, nDup: usize, nZero: usize, nText: usize, nRepeat: usize, dupseed: u64): void {
  let n = <u64>pages;
  let bits: u64 = 0;
  while ((<u64>1 << bits) < n) bits++;
  memory.fill(classTab, 0, (memBytes + PAGE - 1) / PAGE); // C_RANDOM
  let dupKey = mix64(dupseed ^ 0xD0D0D0D0);
  for (let p: u64 = 0; p < n && nDup > 0; p++) {
    if (permute(p, n, bits, dupKey) < <u64>nDup) store<u8>(classTab + <usize>p, <u8>C_DUP);
  }
  let seedKey = mix64(seed ^ 0x5EED5EED);
  let want = nZero + nText + nRepeat;
  let k: usize = 0;
  for (let i: u64 = 0; i < n && k < want; i++) {
    let p = <usize>permute(i, n, bits, seedKey);
    if (<u32>load<u8>(classTab + p) == C_DUP) continue;
    let c = k < nZero ? C_ZERO : k < nZero + nText ? C_TEXT : C_REPEAT | ((<u32>(k - nZero - nText) % REPEAT_TEMPLATES) << 3);
    store<u8>(classTab + p, <u8>c);
    k++;
  }
}

/** Writes every page of the region according to its class (all random when there is no classTab). */
function fillRegion(pages: usize, dupseed: u64): void {
  let mix = s * 0xD6E8FEB86659FD93;
  let dupKey = mix64(dupseed ^ 0xD0D0D0D1);
  let textKey = mix64(seed ^ 0x7E47);
  let repeatKey = mix64(seed ^ 0x4E9E47);
  for (let p: usize = 0; p < pages; p++) {
    let at = base + p * PAGE;
    let c = classTab != 0 ? <u32>load<u8>(classTab + p) : C_RANDOM;
    let kind = c & 7;
    if (kind == C_RANDOM) fillRandom(at, p * (PAGE >>> 3), PAGE >>> 3, mix);
    else if (kind == C_ZERO) memory.fill(at, 0, PAGE);
    else if (kind == C_TEXT) fillText(at, PAGE, mix64(textKey + <u64>p));
    else if (kind == C_DUP) fillHashed(at, mix64(dupKey + <u64>p));
    else fillHashed(at, mix64(repeatKey + <u64>(c >> 3)));
  }
  // a partial last page: random
  let words = memBytes >>> 3;
  let from = pages * (PAGE >>> 3);
  fillRandom(base + (from << 3), from, words - from, mix);
  for (let i: usize = words << 3; i < memBytes; i++) store<u8>(base + i, <u8>(i * 131));
}

/** Random pages: word i of the region is (i × golden) ^ mix (what memstress always wrote). */
function fillRandom(at: usize, first: usize, n: usize, mix: u64): void {
  for (let j: usize = 0; j < n; j++) store<u64>(at + (j << 3), (<u64>(first + j) * GOLDEN) ^ mix);
}

/** A page of random-looking words, a function of `key` alone. */
function fillHashed(at: usize, key: u64): void {
  for (let j: usize = 0; j < PAGE >>> 3; j++) store<u64>(at + (j << 3), mix64(key + <u64>j * GOLDEN));
}

// The text vocabulary: 64 words, one space between two.
const VOCAB = "the and that with from this have which there would their about other people should because through before between another memory page cache request response error value session server client guest host migration dirty round copy stop index user name time state world number system network record update delete insert select table thread process kernel buffer socket message health status config version public private";

const vocabOff = memory.data(4 * 256); // u32 per word: offset in VOCAB << 8 | length
let vocabWords: u32 = 0;

function vocabInit(): void {
  if (vocabWords != 0) return;
  let i = 0, n = VOCAB.length;
  while (i < n && vocabWords < 256) {
    let start = i;
    while (i < n && VOCAB.charCodeAt(i) != 32) i++;
    store<u32>(vocabOff + (vocabWords++ << 2), (<u32>start << 8) | <u32>(i - start));
    i++;
  }
}

/**
 * `len` bytes of text at `at`, a function of `key` alone: words drawn uniformly from VOCAB, one in
 * thirty-two a number below 100000, each followed by a space or (one in sixteen) a newline.
 */
function fillText(at: usize, len: usize, key: u64): void {
  vocabInit();
  let x = key | 1;
  let i: usize = 0;
  while (i < len) {
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    if ((x & 31) == 0) {
      let v = (x >> 20) % 100000;
      let d: u64 = 10000;
      while (d > 1 && v < d) d /= 10;
      while (d > 0 && i < len) { store<u8>(at + i++, <u8>(48 + (v / d) % 10)); d /= 10; }
    } else {
      let e = load<u32>(vocabOff + <usize>((((x >> 32) * <u64>vocabWords) >> 32) << 2));
      let off = <i32>(e >> 8), wl = <i32>(e & 255);
      for (let k = 0; k < wl && i < len; k++) store<u8>(at + i++, <u8>VOCAB.charCodeAt(off + k));
    }
    if (i < len) store<u8>(at + i++, ((x >> 4) & 15) == 0 ? 10 : 32);
  }
}

/** Vose's alias method over zipfPages pages, weight of page i ∝ 1/(i+1)^ex. `tmp`: 16 bytes per page. */
function buildAlias(ex: f64, tmp: usize): void {
  let n = <usize>zipfPages;
  let prob = tmp; // f64 per page
  let small = tmp + n * 8; // u32 stack
  let large = small + n * 4; // u32 stack
  let sum: f64 = 0;
  for (let i: usize = 0; i < n; i++) {
    let wgt = Math.pow(<f64>(i + 1), -ex);
    store<f64>(prob + i * 8, wgt);
    sum += wgt;
  }
  let ns: usize = 0, nl: usize = 0;
  for (let i: usize = 0; i < n; i++) {
    let p = load<f64>(prob + i * 8) * <f64>n / sum;
    store<f64>(prob + i * 8, p);
    if (p < 1) store<u32>(small + 4 * ns++, <u32>i);
    else store<u32>(large + 4 * nl++, <u32>i);
  }
  while (ns > 0 && nl > 0) {
    let l = load<u32>(small + 4 * --ns);
    let g = load<u32>(large + 4 * (nl - 1));
    let pl = load<f64>(prob + <usize>l * 8);
    store<u64>(zipfTab + <usize>l * 8, (<u64>g << 32) | <u64>(pl * 1048576.0));
    let pg = load<f64>(prob + <usize>g * 8) + pl - 1;
    store<f64>(prob + <usize>g * 8, pg);
    if (pg < 1) { nl--; store<u32>(small + 4 * ns++, g); }
  }
  while (nl > 0) { let g = load<u32>(large + 4 * --nl); store<u64>(zipfTab + <usize>g * 8, (<u64>g << 32) | 0x100000); }
  while (ns > 0) { let l = load<u32>(small + 4 * --ns); store<u64>(zipfTab + <usize>l * 8, (<u64>l << 32) | 0x100000); }
}

// --- the write loops: one per pattern, write size and wcontent ---------------------------------

@inline function shiftOf<T>(): u64 { return sizeof<T>() == 8 ? 3 : sizeof<T>() == 4 ? 2 : sizeof<T>() == 2 ? 1 : 0; }

/** One write of `v` at `addr`: a plain store, or (Keep) a store that keeps the page's class. */
@inline function put<T, K>(addr: usize, v: u64): void {
  if (isFloat<K>()) {
    let c = <u32>load<u8>(classTab + ((addr - base) >>> 12));
    if (c == C_RANDOM) store<T>(addr, <T>v);
    else if (c == C_TEXT) store<T>(addr, <T>load<u64>(textTab + <usize>(((v * GOLDEN) >> 56) << 3)));
    else store<T>(addr, load<T>(addr));
  } else {
    store<T>(addr, <T>v);
  }
}

function uniform<T, K>(n: i32): void {
  let x = s;
  let b = <u64>base;
  let ns = nSlots;
  for (let i = 0; i < n; i++) {
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    let idx = ((x >> 32) * ns) >> 32;
    put<T, K>(<usize>(b + (idx << shiftOf<T>())), x);
  }
  s = x;
}

function hotcold<T, K>(n: i32): void {
  let x = s;
  let b = <u64>base;
  let hs = hotSlots, cs = coldSlots, th = hotThresh;
  for (let i = 0; i < n; i++) {
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    let hot = (x & 0xFFFFFFFF) < th;
    let span = select<u64>(hs, cs, hot);
    let off = select<u64>(0, hs, hot);
    let idx = off + (((x >> 32) * span) >> 32);
    put<T, K>(<usize>(b + (idx << shiftOf<T>())), x);
  }
  s = x;
}

function zipf<T, K>(n: i32): void {
  let x = s;
  let b = <u64>base;
  let tab = zipfTab;
  let np = zipfPages, spp = slotsPerPage;
  for (let i = 0; i < n; i++) {
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    let k = ((x >> 32) * np) >> 32;
    let e = load<u64>(tab + <usize>(k << 3));
    let page = select<u64>(k, e >> 32, ((x >> 12) & 0xFFFFF) < (e & 0xFFFFFFFF));
    let slot = ((x & 0xFFF) * spp) >> 12;
    put<T, K>(<usize>(b + (page << 12) + (slot << shiftOf<T>())), x);
  }
  s = x;
}

function sequential<T, K>(n: i32): void {
  let b = <u64>base;
  let pos = seqPos;
  let ns = nSlots;
  let v = writes;
  for (let i = 0; i < n; i++) {
    put<T, K>(<usize>(b + (pos << shiftOf<T>())), v + <u64>i + 1);
    pos++;
    if (pos == ns) pos = 0;
  }
  seqPos = pos;
}

function writeN(n: i32): void {
  if (keep) writeWith<Keep>(n); else writeWith<Plain>(n);
}

function writeWith<K>(n: i32): void {
  let w = wbytes;
  if (pattern == P_UNIFORM) {
    if (w == 8) uniform<u64, K>(n); else if (w == 4) uniform<u32, K>(n); else if (w == 2) uniform<u16, K>(n); else uniform<u8, K>(n);
  } else if (pattern == P_HOTCOLD) {
    if (w == 8) hotcold<u64, K>(n); else if (w == 4) hotcold<u32, K>(n); else if (w == 2) hotcold<u16, K>(n); else hotcold<u8, K>(n);
  } else if (pattern == P_ZIPF) {
    if (w == 8) zipf<u64, K>(n); else if (w == 4) zipf<u32, K>(n); else if (w == 2) zipf<u16, K>(n); else zipf<u8, K>(n);
  } else {
    if (w == 8) sequential<u64, K>(n); else if (w == 4) sequential<u32, K>(n); else if (w == 2) sequential<u16, K>(n); else sequential<u8, K>(n);
  }
}

export function run(budget: i32): i32 {
  if (limit != 0 && writes >= limit) return HALTED;
  let n: i64 = budget > 0 ? budget : 1;
  let status = RUNNING;
  let now: i64 = 0;
  if (rate > 0 || reportNs > 0) now = clock_ns();
  if (rate > 0) {
    if (lastNs < 0) lastNs = now;
    credit += <f64>(now - lastNs) * 1e-9 * rate;
    lastNs = now;
    if (credit > burst) credit = burst;
    if (credit < 1) return IDLE;
    if (<f64>n > credit) { n = <i64>credit; status = IDLE; }
    credit -= <f64>n;
  }
  if (limit != 0 && <u64>n > limit - writes) n = <i64>(limit - writes);
  if (reportNs > 0 && reportAt < 0) { reportAt = now; reportWrites = writes; }
  writeN(<i32>n);
  writes += <u64>n;
  if (reportNs > 0) {
    if (now - reportAt >= reportNs) {
      let wps = <f64>(writes - reportWrites) * 1e9 / <f64>(now - reportAt);
      outStr("memstress: "); outU64(<u64>wps); outStr(" writes/s ");
      outF64(wps * <f64>wbytes / 1e6, 1); outStr(" MB/s total "); outU64(writes); outByte(10); outFlush();
      reportAt = now; reportWrites = writes;
    }
  }
  if (limit != 0 && writes >= limit) return HALTED;
  return status;
}

export function progress(): i64 {
  return <i64>writes;
}
