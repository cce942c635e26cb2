/**
 * The guest side of the simulated world: how a VM dirties and touches its memory over virtual
 * time, and what its pages look like to a codec. These are world models, not policies — the
 * migration decisions they feed are the engine's own (src/core/policy).
 *
 * A {@link DirtyModel} is advanced explicitly (`run`) by the migration that owns the VM; the
 * dirty log is harvested (`harvest`, get-and-clear) exactly where the engine would harvest it.
 */
import { Bitmap } from '../bitmap.js';
import { InvalidArgumentError } from '../errors.js';
import { PAGE_SIZE } from '../pages.js';
import { pageHash01, Rng } from './rng.js';
import type { Trace } from './trace-format.js';

/** Pages written since the last harvest. */
export interface DirtySet {
  /** Count of distinct pages (fractional in the fluid constant-rate world). */
  pages: number;
  /** The pages themselves, or null in the fluid world. */
  bitmap: Bitmap | null;
}

export interface DirtyModel {
  /** Pages of guest memory. */
  readonly pageCount: number;
  /** False for the fluid constant-rate world (no page identities, fractional counts). */
  readonly granular: boolean;
  /** The guest runs `ms` of virtual time at `speed` (1 = full speed; 1 − throttle). */
  run(ms: number, speed: number): void;
  /** Get-and-clear of the dirty log. */
  harvest(): DirtySet;
  /**
   * Post-copy, at the destination: the guest runs for up to `ms` at `speed`, touching (reading or
   * writing) pages in time order. `visit(page)` returns false when the page is missing — the vCPU
   * blocks there. Returns the ms actually run (up to and including the blocking touch).
   */
  touch(ms: number, speed: number, visit: (page: number) => boolean): number;
}

// ---------------------------------------------------------------------------------------------
// The constant-rate world of eq. (1)–(6)

/**
 * Every dirtying hits a fresh page at a constant byte rate, never capped at memory size, counted in
 * fractional pages — the world in which the survey's closed forms are exact. Touches (post-copy)
 * are uniform over memory at `touchPagesPerSec`.
 */
export class ConstantRateDirty implements DirtyModel {
  readonly granular = false;
  private bytes = 0;
  /** Guest time (ms) already elapsed towards the next touch. */
  carry = 0;
  private readonly rng: Rng;

  constructor(readonly pageCount: number, readonly dirtyBytesPerSec: number, readonly options: { pageSize?: number; touchPagesPerSec?: number; seed?: number } = {}) {
    if (!(dirtyBytesPerSec >= 0)) throw new InvalidArgumentError(`dirty rate ${dirtyBytesPerSec} B/s must be ≥ 0`);
    this.rng = new Rng(options.seed ?? 1);
  }

  run(ms: number, speed: number): void {
    this.bytes += (this.dirtyBytesPerSec * ms * speed) / 1000;
  }

  harvest(): DirtySet {
    const pages = this.bytes / (this.options.pageSize ?? PAGE_SIZE);
    this.bytes = 0;
    return { pages, bitmap: null };
  }

  touch(ms: number, speed: number, visit: (page: number) => boolean): number {
    const rate = this.options.touchPagesPerSec ?? this.dirtyBytesPerSec / (this.options.pageSize ?? PAGE_SIZE);
    return touchAtRate(ms, speed, rate, this, () => this.rng.int(this.pageCount), visit);
  }
}

/** Touches evenly spaced at `rate` per second of guest time; stops at the first missing page. */
function touchAtRate(ms: number, speed: number, rate: number, holder: { carry: number }, pick: () => number, visit: (page: number) => boolean): number {
  const r = rate * speed;
  if (!(r > 0) || !(ms > 0)) return Math.max(0, ms);
  const gap = 1000 / r;
  // `carry` is the guest time (ms) already elapsed towards the next touch.
  let t = gap - holder.carry;
  while (t <= ms) {
    if (!visit(pick())) {
      holder.carry = 0;
      return t;
    }
    t += gap;
  }
  holder.carry = ms - (t - gap);
  return ms;
}

// ---------------------------------------------------------------------------------------------
// Page-granular Poisson writes over a page-popularity distribution

/** Which pages writes and reads land on. */
export interface PageDistribution {
  /** A page drawn with the distribution's probabilities. */
  sample(rng: Rng): number;
  /** Probability of page `p` (for the dense path); pages outside the support have 0. */
  weight(p: number): number;
  /** Pages with non-zero weight are among 0 .. support − 1. */
  readonly support: number;
}

export function uniformPages(pages: number): PageDistribution {
  if (!(pages >= 1)) throw new InvalidArgumentError(`a uniform working set needs ≥ 1 page (got ${pages})`);
  const w = 1 / pages;
  return { support: pages, sample: (rng) => rng.int(pages), weight: (p) => (p < pages ? w : 0) };
}

/** A hot set of `hotPages` taking `hotFraction` of accesses, inside a writable working set of `wssPages` (hot pages first). */
export function hotColdPages(wssPages: number, hotPages: number, hotFraction: number): PageDistribution {
  if (!(hotPages >= 1 && hotPages <= wssPages && hotFraction >= 0 && hotFraction <= 1)) throw new InvalidArgumentError(`hot/cold needs 1 ≤ hot (${hotPages}) ≤ wss (${wssPages}) and 0 ≤ hotFraction (${hotFraction}) ≤ 1`);
  const cold = wssPages - hotPages;
  const wh = hotFraction / hotPages;
  const wc = cold > 0 ? (1 - hotFraction) / cold : 0;
  const hf = cold > 0 ? hotFraction : 1;
  return {
    support: wssPages,
    sample: (rng) => (rng.next() < hf ? rng.int(hotPages) : hotPages + rng.int(cold)),
    weight: (p) => (p < hotPages ? wh : p < wssPages ? wc : 0),
  };
}

/**
 * Zipf(s) over `pages` pages: the page of rank k (= page number k) has probability ∝ 1/(k+1)^s.
 * Sampling in O(1) by Vose's alias method (the guest memstress uses the same).
 */
export function zipfPages(pages: number, exponent: number): PageDistribution {
  if (!(pages >= 1 && exponent >= 0)) throw new InvalidArgumentError(`zipf needs ≥ 1 page and exponent ≥ 0`);
  const pmf = new Float64Array(pages);
  let sum = 0;
  for (let k = 0; k < pages; k++) sum += pmf[k] = Math.pow(k + 1, -exponent);
  for (let k = 0; k < pages; k++) pmf[k] /= sum;
  const prob = new Float64Array(pages);
  const alias = new Int32Array(pages);
  const small = new Int32Array(pages);
  const large = new Int32Array(pages);
  let ns = 0;
  let nl = 0;
  for (let k = 0; k < pages; k++) {
    prob[k] = pmf[k] * pages;
    if (prob[k] < 1) small[ns++] = k;
    else large[nl++] = k;
  }
  while (ns > 0 && nl > 0) {
    const l = small[--ns];
    const g = large[--nl];
    alias[l] = g;
    prob[g] = prob[g] + prob[l] - 1;
    if (prob[g] < 1) small[ns++] = g;
    else large[nl++] = g;
  }
  while (nl > 0) prob[large[--nl]] = 1;
  while (ns > 0) prob[small[--ns]] = 1;
  return {
    support: pages,
    sample: (rng) => {
      const k = rng.int(pages);
      return rng.next() < prob[k] ? k : alias[k];
    },
    weight: (p) => (p < pages ? pmf[p] : 0),
  };
}

export interface PoissonDirtyInit {
  pageCount: number;
  /** Page writes per second (before distinct-page collapsing). */
  writePagesPerSec: number;
  writes: PageDistribution;
  /** Page reads per second (they matter for post-copy faults only). Default 0. */
  readPagesPerSec?: number;
  /** Where reads land. Default: like writes. */
  reads?: PageDistribution;
  seed?: number;
}

/**
 * Each page is written by its own Poisson process, with rates in the proportions of a
 * {@link PageDistribution} (Zipf, hot/cold, uniform). Sampling cost follows the write count; when
 * an interval holds more writes than twice the working set, each page is drawn once as a
 * Bernoulli(1 − e^(−n·w_p)) instead — the same distribution of the dirty set, in O(pages).
 */
export class PoissonDirty implements DirtyModel {
  readonly granular = true;
  readonly pageCount: number;
  private dirty: Bitmap;
  private readonly rng: Rng;
  /** Guest time (ms) already elapsed towards the next touch. */
  carry = 0;

  constructor(readonly init: PoissonDirtyInit) {
    this.pageCount = init.pageCount;
    if (init.writes.support > init.pageCount) throw new InvalidArgumentError(`working set of ${init.writes.support} pages exceeds the VM's ${init.pageCount}`);
    this.dirty = new Bitmap(init.pageCount);
    this.rng = new Rng(init.seed ?? 1);
  }

  run(ms: number, speed: number): void {
    const n = this.rng.poisson((this.init.writePagesPerSec * ms * speed) / 1000);
    if (n === 0) return;
    const d = this.init.writes;
    if (n <= 2 * d.support) {
      for (let i = 0; i < n; i++) this.dirty.set(d.sample(this.rng));
      return;
    }
    for (let p = 0; p < d.support; p++) {
      if (this.rng.next() < 1 - Math.exp(-n * d.weight(p))) this.dirty.set(p);
    }
  }

  harvest(): DirtySet {
    const bm = this.dirty;
    this.dirty = new Bitmap(this.pageCount);
    return { pages: bm.count(), bitmap: bm };
  }

  touch(ms: number, speed: number, visit: (page: number) => boolean): number {
    const w = this.init.writePagesPerSec;
    const r = this.init.readPagesPerSec ?? 0;
    const reads = this.init.reads ?? this.init.writes;
    const pWrite = w + r > 0 ? w / (w + r) : 1;
    return touchAtRate(ms, speed, w + r, this, () => (this.rng.next() < pWrite ? this.init.writes : reads).sample(this.rng), visit);
  }
}

// ---------------------------------------------------------------------------------------------
// Replay of a recorded trace

/**
 * Replays a dirty trace recorded from a real VM (src/node/vm/trace.ts). Guest time runs through the
 * trace's intervals (looping at the end); an interval partly covered contributes the pages whose
 * hash falls in the covered fraction of it, so splitting time differently never changes which
 * pages are dirtied overall. Post-copy touches are the trace's writes in that same hash order
 * (reads are not recorded). A throttled guest (`speed` < 1) moves through the trace more slowly.
 */
export class TraceReplayDirty implements DirtyModel {
  readonly granular = true;
  readonly pageCount: number;
  private dirty: Bitmap;
  private readonly starts: Float64Array;
  private readonly durs: Float64Array;
  private readonly span: number;
  /** Guest time into the trace, ms (counts loops). */
  private pos = 0;

  constructor(readonly trace: Trace, options: { pageCount?: number; offsetMs?: number } = {}) {
    const iv = trace.intervals;
    if (iv.length === 0) throw new InvalidArgumentError('cannot replay a trace without intervals');
    this.pageCount = options.pageCount ?? Math.max(...iv.map((i) => i.guestPages));
    this.dirty = new Bitmap(this.pageCount);
    const t0 = iv[0].startMs;
    this.starts = Float64Array.from(iv, (i) => i.startMs - t0);
    this.durs = Float64Array.from(iv, (i) => Math.max(1e-6, i.endMs - i.startMs));
    this.span = iv[iv.length - 1].endMs - t0;
    if (!(this.span > 0)) throw new InvalidArgumentError('trace spans no time');
    this.pos = options.offsetMs ?? 0;
  }

  /** Mean distinct pages per ms over the trace (for reports and sanity checks). */
  get meanDirtyPagesPerMs(): number {
    let n = 0;
    for (const i of this.trace.intervals) n += i.dirty.count();
    return n / this.span;
  }

  /** Walks guest time [pos, pos + ms); `each(interval, loop, fromFrac, toFrac, t)` per overlapped interval, in order; stops when it returns false. */
  private walk(ms: number, each: (k: number, loop: number, a: number, b: number, tAt: number) => boolean): void {
    let t = this.pos;
    const end = this.pos + ms;
    while (t < end) {
      const loop = Math.floor(t / this.span);
      const local = t - loop * this.span;
      // Find the interval holding `local` (binary search on starts).
      let lo = 0;
      let hi = this.starts.length - 1;
      while (lo < hi) {
        const mid = (lo + hi + 1) >>> 1;
        if (this.starts[mid] <= local) lo = mid;
        else hi = mid - 1;
      }
      const k = lo;
      const s = this.starts[k];
      const d = this.durs[k];
      const ivEnd = k + 1 < this.starts.length ? this.starts[k + 1] : this.span;
      if (local >= s + d) {
        // A gap between records: no writes recorded there.
        t = loop * this.span + ivEnd + (ivEnd <= local ? this.span : 0);
        continue;
      }
      const a = (local - s) / d;
      const stopLocal = Math.min(s + d, local + (end - t));
      const b = (stopLocal - s) / d;
      if (!each(k, loop, a, b, t)) return;
      t += stopLocal - local;
      if (stopLocal >= s + d) t = loop * this.span + ivEnd;
    }
  }

  run(ms: number, speed: number): void {
    const g = ms * speed;
    if (!(g > 0)) return;
    this.walk(g, (k, loop, a, b) => {
      const bm = this.trace.intervals[k].dirty;
      if (a <= 0 && b >= 1) {
        const w = this.dirty.words;
        const src = bm.words;
        const n = Math.min(w.length, src.length);
        for (let i = 0; i < n; i++) w[i] |= src[i];
      } else {
        const salt = k + loop * 7919;
        for (const p of bm) {
          if (p >= this.pageCount) break;
          const h = pageHash01(p, salt);
          if (h >= a && h < b) this.dirty.set(p);
        }
      }
      return true;
    });
    this.pos += g;
  }

  harvest(): DirtySet {
    const bm = this.dirty;
    this.dirty = new Bitmap(this.pageCount);
    return { pages: bm.count(), bitmap: bm };
  }

  touch(ms: number, speed: number, visit: (page: number) => boolean): number {
    const g = ms * speed;
    if (!(g > 0) || !(speed > 0)) return Math.max(0, ms);
    let ran = g;
    this.walk(g, (k, loop, a, b, tAt) => {
      const salt = k + loop * 7919;
      const hits: { p: number; h: number }[] = [];
      for (const p of this.trace.intervals[k].dirty) {
        if (p >= this.pageCount) break;
        const h = pageHash01(p, salt);
        if (h >= a && h < b) hits.push({ p, h });
      }
      hits.sort((x, y) => x.h - y.h);
      for (const x of hits) {
        if (!visit(x.p)) {
          ran = tAt - this.pos + (x.h - a) * this.durs[k];
          return false;
        }
      }
      return true;
    });
    // Resume after the blocking touch next time (its page will be present then).
    this.pos += ran + 1e-9;
    return ran / speed;
  }
}

// ---------------------------------------------------------------------------------------------
// Page contents as a codec sees them

export interface ContentClass {
  /** Share of pages, 0..1. */
  fraction: number;
  /** Wire bytes / raw bytes after the codec. */
  ratio: number;
  /** Source CPU per page, ns (encode); the destination's decode is not modelled. */
  cpuNsPerPage: number;
}

export type ContentClassName = 'zero' | 'text' | 'random' | 'duplicate';

/** Defaults per class: zero pages cost a scan and a tag; text compresses ~3× at LZ4-like speed; random does not compress; duplicates cost a hash and a reference. */
export const CONTENT_DEFAULTS: Record<ContentClassName, Omit<ContentClass, 'fraction'>> = {
  zero: { ratio: 16 / 4096, cpuNsPerPage: 300 },
  text: { ratio: 0.35, cpuNsPerPage: 8000 },
  random: { ratio: 1.01, cpuNsPerPage: 4000 },
  duplicate: { ratio: 24 / 4096, cpuNsPerPage: 1200 },
};

/** What one page costs on average: wire bytes and source CPU seconds. */
export interface PageCost {
  wireBytesPerPage: number;
  cpuSecPerPage: number;
}

/** Expected per-page cost of a content mix through a codec; with `codec: 'none'` every page is raw and free. */
export function pageCost(mix: Partial<Record<ContentClassName, Partial<ContentClass>>> | null, codec: 'none' | 'compress', pageSize = PAGE_SIZE): PageCost {
  if (codec === 'none' || !mix) return { wireBytesPerPage: pageSize, cpuSecPerPage: 0 };
  let f = 0;
  let wire = 0;
  let cpu = 0;
  for (const name of Object.keys(CONTENT_DEFAULTS) as ContentClassName[]) {
    const c = { ...CONTENT_DEFAULTS[name], fraction: 0, ...mix[name] };
    if (!(c.fraction >= 0 && c.ratio > 0 && c.cpuNsPerPage >= 0)) throw new InvalidArgumentError(`content class ${name}: fraction ≥ 0, ratio > 0 and cpu ≥ 0 needed`);
    f += c.fraction;
    wire += c.fraction * c.ratio * pageSize;
    cpu += c.fraction * c.cpuNsPerPage * 1e-9;
  }
  if (!(Math.abs(f - 1) < 1e-6)) throw new InvalidArgumentError(`content fractions sum to ${f}, not 1`);
  return { wireBytesPerPage: wire, cpuSecPerPage: cpu };
}
