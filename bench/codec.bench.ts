/**
 * Page codec benchmarks (issue: data reduction). Throughput and ratio of every codec on every
 * corpus, zero-page detection speed, XBZRLE at 1 / 10 / 50 % of bytes changed, and the adaptive
 * pipeline with lz4/zstd on ~1 MiB batches. Ratio = raw bytes / bytes on the wire (higher is better).
 */
import { median, type BenchContext, type BenchSuite } from './harness.js';
import {
  CompressionController, adaptiveEncoder, chain, dedup, encodeBatch, decodeBatch, isZeroJs, packBatch, pageHash, xbzrle, zero, zeroScanner,
  type BlobCodec, type PageCodec,
} from '../src/core/codec/index.js';
import { PAGE_SIZE } from '../src/core/pages.js';
import { lz4, zstd } from '../src/node/codec/index.js';
import { CORPUS_NAMES, concat, corpus, mutate, rng, type CorpusName } from '../test/helpers/page-corpus.js';

/** Untimed passes before timed ones (JIT warm-up; fresh halves touch their caches for the first time). */
const WARMUP = 3;

/** Runs `fn` (which processes `bytes` bytes) repeatedly for ≥ minMs, `reps` times; median bytes/s. */
function rate(fn: () => void, bytes: number, minMs: number, reps: number): number {
  fn(); // warm-up
  const rates: number[] = [];
  for (let r = 0; r < reps; r++) {
    let n = 0;
    const t0 = performance.now();
    let t = t0;
    do { fn(); n++; t = performance.now(); } while (t - t0 < minMs);
    rates.push((n * bytes) / ((t - t0) / 1000));
  }
  return median(rates);
}

function zeroDetection(ctx: BenchContext, minMs: number, reps: number): void {
  const pages = ctx.quick ? 1024 : 4096; // 4 / 16 MiB of zero pages: every check scans the whole page
  const memory = new WebAssembly.Memory({ initial: (pages * PAGE_SIZE) / 65536, maximum: 65536, shared: true });
  const inMem = new Uint8Array(memory.buffer);
  const plain = new Uint8Array(pages * PAGE_SIZE);
  const guest = zeroScanner({ memory });
  const scratch = zeroScanner();
  const bytes = pages * PAGE_SIZE;
  const each = (f: (p: Uint8Array) => boolean, buf: Uint8Array) => () => {
    for (let k = 0; k < pages; k++) if (!f(buf.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE))) throw new Error('not zero');
  };
  const out = new Uint8Array(pages);
  const gb = (x: number) => x / 1e9;
  ctx.report({ metric: 'zero.detect.in-place', value: gb(rate(each(guest.isZero, inMem), bytes, minMs, reps)), unit: 'GB/s', target: '>= 10', note: 'Wasm SIMD over the guest memory, per page' });
  ctx.report({ metric: 'zero.detect.batch-copy', value: gb(rate(() => scratch.zeroMap(plain, out), bytes, minMs, reps)), unit: 'GB/s', target: '>= 10', note: 'zeroMap: 1 MiB copies into scratch Wasm memory, then SIMD' });
  ctx.report({ metric: 'zero.detect.page-copy', value: gb(rate(each(scratch.isZero, plain), bytes, minMs, reps)), unit: 'GB/s', note: 'per page: copy into scratch, then SIMD' });
  ctx.report({ metric: 'zero.detect.js', value: gb(rate(each(isZeroJs, plain), bytes, minMs, reps)), unit: 'GB/s', note: 'JS Int32 OR-scan fallback' });
}

/**
 * Encode + decode throughput (MB/s of raw pages) and ratio for a page codec on a corpus. Each
 * timed pass gets fresh halves (state — caches, indices — is part of what is measured); with
 * `secondRound` the halves first see the corpus once (untimed) and the timed pass sends it again
 * with that fraction of bytes re-dirtied.
 */
function pageCodecFigures(ctx: BenchContext, label: string, codec: PageCodec, name: CorpusName, count: number, iters: number, secondRound: number | null): void {
  const r = rng(5 + CORPUS_NAMES.indexOf(name)); // different re-dirtied places per corpus
  const first = corpus(name, count, 3).pages;
  const firstBatch = concat(first);
  const pages = secondRound === null ? first : first.map((p) => mutate(p, secondRound, r));
  const batch = concat(pages);
  const indices = pages.map((_, i) => i);
  const encMs: number[] = [];
  const decMs: number[] = [];
  let wire = 0;
  for (let k = -WARMUP; k < iters; k++) {
    const enc = codec.createEncoder();
    const dec = codec.createDecoder();
    const dest = new Uint8Array(batch.length);
    if (secondRound !== null) decodeBatch(dec, encodeBatch(enc, indices, firstBatch), dest);
    let t0 = performance.now();
    const encoded = encodeBatch(enc, indices, batch);
    if (k >= 0) encMs.push(performance.now() - t0);
    t0 = performance.now();
    decodeBatch(dec, encoded, dest);
    if (k >= 0) decMs.push(performance.now() - t0);
    wire = encoded.bytes.length + encoded.count * 9;
  }
  const what = secondRound === null ? name : `${name}-redirtied-${secondRound * 100}%`;
  ctx.report({ metric: `${label}.${what}.encode`, value: batch.length / 1e3 / median(encMs), unit: 'MB/s' });
  ctx.report({ metric: `${label}.${what}.decode`, value: batch.length / 1e3 / median(decMs), unit: 'MB/s' });
  ctx.report({ metric: `${label}.${what}.ratio`, value: batch.length / wire, unit: '×', note: `${count} pages, 9 B/page framing counted` });
}

function blobFigures(ctx: BenchContext, label: string, codec: BlobCodec, name: CorpusName, minMs: number, reps: number): void {
  const pages = 255; // one ~1 MiB packed batch
  const b = corpus(name, pages, 9).pages;
  const packed = packBatch({ count: pages, indices: new Uint32Array(pages).map((_, i) => i), codecIds: new Uint8Array(pages), offsets: new Uint32Array(pages + 1).map((_, i) => i * PAGE_SIZE), bytes: concat(b) });
  let blob: Uint8Array | null = null;
  const c = rate(() => { blob = codec.compress(packed); }, packed.length, minMs, reps);
  const out = blob as Uint8Array | null;
  ctx.report({ metric: `${label}.${name}.compress`, value: c / 1e6, unit: 'MB/s', note: '1 MiB batch' });
  if (out) {
    ctx.report({ metric: `${label}.${name}.decompress`, value: rate(() => codec.decompress(out), packed.length, minMs, reps) / 1e6, unit: 'MB/s' });
    ctx.report({ metric: `${label}.${name}.ratio`, value: packed.length / out.length, unit: '×' });
  } else ctx.report({ metric: `${label}.${name}.ratio`, value: 1, unit: '×', note: 'incompressible: sent plain' });
}

function xbzrleLevels(ctx: BenchContext, count: number, minMs: number, reps: number): void {
  const codec = xbzrle({ cacheBytes: count * PAGE_SIZE });
  for (const fraction of [0.01, 0.1, 0.5]) {
    for (const clustered of [true, false]) {
      const r = rng(77);
      const base = corpus('text', count, 4).pages;
      const next = base.map((p) => mutate(p, fraction, r, clustered));
      const enc = codec.createEncoder();
      base.forEach((p, i) => enc.encode(i, p));
      // Alternate base → next → base …: every encode is a hit against the other version.
      let flip = false;
      let wire = 0;
      let hits = 0;
      const encRate = rate(() => {
        const src = flip ? base : next;
        wire = 0;
        hits = 0;
        for (let i = 0; i < count; i++) {
          const e = enc.encode(i, src[i]);
          wire += e ? e.bytes.length : PAGE_SIZE;
          if (e) hits++;
        }
        flip = !flip;
      }, count * PAGE_SIZE, minMs, reps);
      const deltas = next.map((p, i) => {
        const e = codec.createEncoder();
        e.encode(i, base[i]);
        return e.encode(i, p);
      });
      const dec = codec.createDecoder();
      const dest = base.map((p) => p.slice());
      const decRate = rate(() => {
        for (let i = 0; i < count; i++) {
          const d = deltas[i];
          if (d) { dest[i].set(base[i]); dec.decode(i, d.codecId, d.bytes, dest[i]); }
        }
      }, count * PAGE_SIZE, minMs, reps);
      const label = `xbzrle.changed-${fraction * 100}%-${clustered ? 'runs' : 'scattered'}`;
      ctx.report({ metric: `${label}.encode`, value: encRate / 1e6, unit: 'MB/s', note: `${hits}/${count} pages as deltas` });
      ctx.report({ metric: `${label}.decode`, value: decRate / 1e6, unit: 'MB/s' });
      ctx.report({ metric: `${label}.ratio`, value: (count * PAGE_SIZE) / wire, unit: '×' });
    }
  }
}

function adaptiveFigures(ctx: BenchContext, count: number, iters: number): void {
  for (const make of [lz4, zstd]) {
    for (const name of ['mixed', 'text', 'random'] as const) {
      const pages = corpus(name, count, 12).pages;
      const batch = concat(pages);
      const indices = pages.map((_, i) => i);
      let wire = 0;
      const ms: number[] = [];
      const controller = new CompressionController({ alpha: 1 });
      for (let k = -WARMUP; k < iters; k++) {
        const codec = chain([zero(), xbzrle({ cacheBytes: 2 << 20 }), dedup({ indexInit: { capacityBytes: 2 << 20 } })]);
        const enc = adaptiveEncoder({ pageCodec: codec, compressor: make(), controller });
        const t0 = performance.now();
        wire = enc.encodeBatch(indices, batch).reduce((n, p) => n + p.bytes.length, 0);
        if (k >= 0) ms.push(performance.now() - t0);
      }
      const label = `adaptive+${make.name}.${name}`;
      ctx.report({ metric: `${label}.encode`, value: batch.length / 1e3 / median(ms), unit: 'MB/s', note: 'zero+xbzrle+dedup, then low-entropy pages compressed as one blob' });
      ctx.report({ metric: `${label}.ratio`, value: batch.length / wire, unit: '×' });
      if (name !== 'mixed') continue;
      // What the controller decides with these measured compressor figures on three links.
      for (const [link, linkRate] of [['1GbE', 125e6], ['10GbE', 1.25e9], ['loopback', 3.2e9]] as const) {
        const c = new CompressionController({ alpha: 1, intervalMs: 0 });
        const a = controller.assess();
        c.recordCompress(1e6, a.ratio * 1e6, 1e3 / a.compressRate * 1e6);
        c.recordLink(linkRate, 1000);
        const d = c.evaluate(0);
        ctx.report({ metric: `${label}.speedup@${link}`, value: d.speedup, unit: '×', note: `compression ${d.enabled ? 'on' : 'off'}: min(${(a.compressRate / 1e6).toFixed(0)} MB/s, link/${a.ratio.toFixed(2)}) vs ${linkRate / 1e6} MB/s` });
      }
    }
  }
}

const suite: BenchSuite = {
  name: 'codec',
  description: 'Page codecs: zero detection, xbzrle, dedup, lz4/zstd batches, MECOM adaptive',
  async run(ctx) {
    const minMs = ctx.quick ? 60 : 250;
    const reps = ctx.quick ? 3 : 5;
    const count = ctx.quick ? 128 : 256;
    zeroDetection(ctx, minMs, reps);
    const hashBytes = count * PAGE_SIZE;
    const hp = corpus('random', count, 1).pages;
    ctx.report({ metric: 'dedup.pageHash', value: rate(() => { for (const p of hp) pageHash(p); }, hashBytes, minMs, reps) / 1e9, unit: 'GB/s', note: 'fast 53-bit hash; candidates confirmed by full compare' });
    xbzrleLevels(ctx, count, minMs, reps);
    const codecs: [string, () => PageCodec, number | null][] = [
      ['zero', () => zero(), null],
      ['dedup', () => dedup({ indexInit: { capacityBytes: 2 << 20 }, storeInit: { capacityBytes: 2 << 20 } }), null],
      ['xbzrle', () => xbzrle({ cacheBytes: 2 << 20 }), 0.02],
      ['chain', () => chain([zero(), xbzrle({ cacheBytes: 2 << 20 }), dedup({ indexInit: { capacityBytes: 2 << 20 }, storeInit: { capacityBytes: 2 << 20 } })]), null],
    ];
    for (const [label, make, second] of codecs) {
      for (const name of CORPUS_NAMES) pageCodecFigures(ctx, label, make(), name, count, ctx.quick ? 5 : 15, second);
    }
    for (const [label, c] of [['lz4', lz4()], ['zstd-1', zstd()], ['zstd-3', zstd({ level: 3 })]] as const) {
      for (const name of CORPUS_NAMES) blobFigures(ctx, label, c, name, minMs, reps);
    }
    adaptiveFigures(ctx, count, ctx.quick ? 5 : 15);
  },
};
export default suite;
