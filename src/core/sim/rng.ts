/**
 * Seeded randomness for the simulator: the same scenario and seed give the same run, event for
 * event. SplitMix64-style mixing on 32-bit halves (fast, good enough for workload sampling).
 */
export class Rng {
  private s: number;

  constructor(seed = 1) {
    this.s = (seed >>> 0) ^ 0x9e3779b9;
  }

  /** Uniform in [0, 1). */
  next(): number {
    let z = (this.s = (this.s + 0x9e3779b9) | 0);
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
    z ^= z >>> 16;
    return (z >>> 0) / 4294967296;
  }

  /** Integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }

  /** Poisson(mean): Knuth below 30, a rounded normal above (the counts here are large and only their spread matters). */
  poisson(mean: number): number {
    if (!(mean > 0)) return 0;
    if (mean < 30) {
      const l = Math.exp(-mean);
      let k = 0;
      let p = this.next();
      while (p > l) {
        k++;
        p *= this.next();
      }
      return k;
    }
    const u = Math.max(1e-12, this.next());
    const g = Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * this.next());
    return Math.max(0, Math.round(mean + Math.sqrt(mean) * g));
  }
}

/** A stateless hash of (page, salt) to [0, 1): fixes which pages of a trace interval fall in a fraction of it. */
export function pageHash01(page: number, salt: number): number {
  let h = Math.imul(page ^ 0x27d4eb2d, 0x165667b1) ^ Math.imul(salt + 0x3c6ef372, 0x9e3779b1);
  h = Math.imul(h ^ (h >>> 15), 0x85ebca6b);
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
  h ^= h >>> 16;
  return (h >>> 0) / 4294967296;
}
