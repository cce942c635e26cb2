// compute: a CPU-bound guest that keeps its state in registers and globals (almost no stores),
// the opposite of memstress for migration experiments: its dirty rate is ~0.
//
// Configuration:
//   kind=hash|primes|mandel   (default hash)
//     hash    a 64-bit mixing chain: x = fmix64(x + i·φ) per iteration (seeded by seed=<n>, default 1)
//     primes  counts primes by trial division of odd candidates (one iteration = one division);
//             below=<n> stops once every candidate below n is tested (default 0 = never)
//     mandel  Mandelbrot set on a size×size grid over [-2, 1]×[-1.5, 1.5] (size=<n>, default 256),
//             at most maxiter=<n> steps per point (default 1000); one iteration = one z step. At the
//             end of every frame prints "compute: mandel frame=<k> inside=<points> steps=<total>"
//             and starts the same frame again.
//   iters=<n>   halt after n iterations (default 0 = never)
// On halting prints a summary line ("compute: hash iters=<n> digest=<hex>", "compute: primes
// below=<n> found=<count> iters=<n>", or the mandel line) and returns HALTED.
// Deterministic: the same configuration gives the same lines whatever the budget split.
// progress() = iterations done.
import { cfgIs, cfgNum, configLoad, fatal, outByte, outFlush, outStr, outU64 } from "./common";

const RUNNING = 0;
const HALTED = 2;
const K_HASH = 0;
const K_PRIMES = 1;
const K_MANDEL = 2;

let kind = K_HASH;
let iters: u64 = 0;
let limit: u64 = 0;
let halted = false;
// hash
let x: u64 = 0;
// primes
let below: u64 = 0;
let cand: u64 = 3;
let div: u64 = 3;
let found: u64 = 1; // 2
// mandel
let size: u32 = 256;
let maxIter: u32 = 1000;
let px: u32 = 0;
let zr: f64 = 0, zi: f64 = 0, cr: f64 = 0, ci: f64 = 0;
let it: u32 = 0;
let inside: u64 = 0;
let steps: u64 = 0;
let frame: u64 = 0;

export function init(): void {
  configLoad();
  if (cfgIs("kind", "hash", true)) kind = K_HASH;
  else if (cfgIs("kind", "primes", false)) kind = K_PRIMES;
  else if (cfgIs("kind", "mandel", false)) kind = K_MANDEL;
  else fatal("kind must be hash, primes or mandel");
  limit = <u64>cfgNum("iters", 0);
  x = <u64>cfgNum("seed", 1);
  below = <u64>cfgNum("below", 0);
  if (below != 0 && below <= 2) found = 0;
  let s = cfgNum("size", 256);
  if (!(s >= 1 && s <= 65536)) fatal("size must be between 1 and 65536");
  size = <u32>s;
  let m = cfgNum("maxiter", 1000);
  if (!(m >= 1 && m <= 1e9)) fatal("maxiter must be between 1 and 1e9");
  maxIter = <u32>m;
  startPoint();
}

function startPoint(): void {
  let i = px % size, j = px / size;
  cr = -2.0 + 3.0 * <f64>i / <f64>size;
  ci = -1.5 + 3.0 * <f64>j / <f64>size;
  zr = 0; zi = 0; it = 0;
}

function hashRun(n: u64): void {
  let v = x;
  let i = iters;
  let end = i + n;
  while (i < end) {
    v += (i + 1) * 0x9E3779B97F4A7C15;
    v ^= v >> 33; v *= 0xFF51AFD7ED558CCD;
    v ^= v >> 33; v *= 0xC4CEB9FE1A85EC53;
    v ^= v >> 33;
    i++;
  }
  x = v;
}

/** Returns the iterations used (less than n only when `below` is reached). */
function primesRun(n: u64): u64 {
  let c = cand, d = div, f = found;
  let used: u64 = 0;
  while (used < n) {
    if (below != 0 && c >= below) break;
    used++;
    if (d * d > c) { f++; c += 2; d = 3; continue; }
    if (c % d == 0) { c += 2; d = 3; continue; }
    d += 2;
  }
  cand = c; div = d; found = f;
  return used;
}

function mandelRun(n: u64): void {
  let r = zr, im = zi, a = cr, b = ci;
  let k = it;
  let left = n;
  while (left > 0) {
    let escaped = r * r + im * im > 4.0;
    if (escaped || k >= maxIter) {
      if (!escaped) inside++;
      px++;
      if (px == size * size) {
        frame++;
        outStr("compute: mandel frame="); outU64(frame);
        outStr(" inside="); outU64(inside);
        outStr(" steps="); outU64(steps + (n - left));
        outByte(10); outFlush();
        px = 0; inside = 0; steps = 0 - (n - left);
      }
      startPoint();
      r = 0; im = 0; a = cr; b = ci; k = 0;
      continue;
    }
    let t = r * r - im * im + a;
    im = 2.0 * r * im + b;
    r = t;
    k++;
    left--;
  }
  zr = r; zi = im; it = k;
  steps += n;
}

function hex(v: u64): void {
  for (let s = 60; s >= 0; s -= 4) {
    let d = <u32>((v >> <u64>s) & 15);
    outByte(d < 10 ? 48 + d : 87 + d);
  }
}

function summary(): void {
  if (kind == K_HASH) { outStr("compute: hash iters="); outU64(iters); outStr(" digest="); hex(x); }
  else if (kind == K_PRIMES) { outStr("compute: primes below="); outU64(below != 0 ? below : cand); outStr(" found="); outU64(found); outStr(" iters="); outU64(iters); }
  else { outStr("compute: mandel stopped frame="); outU64(frame); outStr(" point="); outU64(px); outStr(" iters="); outU64(iters); }
  outByte(10); outFlush();
}

export function run(budget: i32): i32 {
  if (halted) return HALTED;
  let n: u64 = budget > 0 ? <u64>budget : 1;
  if (limit != 0 && n > limit - iters) n = limit - iters;
  let done = n;
  if (kind == K_HASH) hashRun(n);
  else if (kind == K_PRIMES) done = primesRun(n);
  else mandelRun(n);
  iters += done;
  if ((limit != 0 && iters >= limit) || (kind == K_PRIMES && below != 0 && cand >= below)) {
    halted = true;
    summary();
    return HALTED;
  }
  return RUNNING;
}

export function progress(): i64 {
  return <i64>iters;
}
