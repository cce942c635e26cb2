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
// One budget unit is one write. The write loops are specialised per pattern and write size:
// xorshift64, a multiply-shift range reduction, one store. The whole region is filled with a
// pseudo-random pattern in init (so none of it is zero pages) and init prints the region's
// place: "memstress: region <base> mem=<bytes> wss=<bytes> pattern=<p> write=<w> seed=<s>".
// progress() = writes done.
import { cfgIs, cfgNum, cfgSize, clock_ns, configLoad, fatal, outByte, outF64, outFlush, outStr, outU64, sbrk, soft_pages } from "./common";

const RUNNING = 0;
const IDLE = 1;
const HALTED = 2;

const P_UNIFORM = 0;
const P_HOTCOLD = 1;
const P_ZIPF = 2;
const P_SEQUENTIAL = 3;

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
  // Fill the region with a pseudo-random pattern so it is not zero pages.
  let words = memBytes >>> 3;
  let mix = s * 0xD6E8FEB86659FD93;
  for (let i: usize = 0; i < words; i++) {
    store<u64>(base + (i << 3), (<u64>i * 0x9E3779B97F4A7C15) ^ mix);
  }
  for (let i: usize = words << 3; i < memBytes; i++) store<u8>(base + i, <u8>(i * 131));

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
  outByte(10); outFlush();
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

// --- the write loops: one per pattern and write size -------------------------------------------

@inline function shiftOf<T>(): u64 { return sizeof<T>() == 8 ? 3 : sizeof<T>() == 4 ? 2 : sizeof<T>() == 2 ? 1 : 0; }

function uniform<T>(n: i32): void {
  let x = s;
  let b = <u64>base;
  let ns = nSlots;
  for (let i = 0; i < n; i++) {
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    let idx = ((x >> 32) * ns) >> 32;
    store<T>(<usize>(b + (idx << shiftOf<T>())), <T>x);
  }
  s = x;
}

function hotcold<T>(n: i32): void {
  let x = s;
  let b = <u64>base;
  let hs = hotSlots, cs = coldSlots, th = hotThresh;
  for (let i = 0; i < n; i++) {
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    let hot = (x & 0xFFFFFFFF) < th;
    let span = select<u64>(hs, cs, hot);
    let off = select<u64>(0, hs, hot);
    let idx = off + (((x >> 32) * span) >> 32);
    store<T>(<usize>(b + (idx << shiftOf<T>())), <T>x);
  }
  s = x;
}

function zipf<T>(n: i32): void {
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
    store<T>(<usize>(b + (page << 12) + (slot << shiftOf<T>())), <T>x);
  }
  s = x;
}

function sequential<T>(n: i32): void {
  let b = <u64>base;
  let pos = seqPos;
  let ns = nSlots;
  let v = writes;
  for (let i = 0; i < n; i++) {
    store<T>(<usize>(b + (pos << shiftOf<T>())), <T>(v + <u64>i + 1));
    pos++;
    if (pos == ns) pos = 0;
  }
  seqPos = pos;
}

function writeN(n: i32): void {
  let w = wbytes;
  if (pattern == P_UNIFORM) {
    if (w == 8) uniform<u64>(n); else if (w == 4) uniform<u32>(n); else if (w == 2) uniform<u16>(n); else uniform<u8>(n);
  } else if (pattern == P_HOTCOLD) {
    if (w == 8) hotcold<u64>(n); else if (w == 4) hotcold<u32>(n); else if (w == 2) hotcold<u16>(n); else hotcold<u8>(n);
  } else if (pattern == P_ZIPF) {
    if (w == 8) zipf<u64>(n); else if (w == 4) zipf<u32>(n); else if (w == 2) zipf<u16>(n); else zipf<u8>(n);
  } else {
    if (w == 8) sequential<u64>(n); else if (w == 4) sequential<u32>(n); else if (w == 2) sequential<u16>(n); else sequential<u8>(n);
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
