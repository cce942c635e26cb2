import { InvalidArgumentError } from './errors.js';

/** Set bits in a 32-bit word. */
export function popcount32(w: number): number {
  w = w - ((w >>> 1) & 0x55555555);
  w = (w & 0x33333333) + ((w >>> 2) & 0x33333333);
  return (((w + (w >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}

/** A fixed-size bitmap over page numbers (one bit per page). */
export class Bitmap {
  readonly size: number;
  readonly words: Uint32Array;

  constructor(size: number, words?: Uint32Array) {
    if (!Number.isInteger(size) || size < 0) throw new InvalidArgumentError(`bitmap size ${size} is not a non-negative integer`);
    this.size = size;
    const n = Math.ceil(size / 32);
    if (words && words.length !== n) throw new InvalidArgumentError(`bitmap of ${size} bits needs ${n} words, got ${words.length}`);
    this.words = words ?? new Uint32Array(n);
  }

  get(i: number): boolean {
    return (this.words[i >>> 5] & (1 << (i & 31))) !== 0;
  }

  set(i: number): void {
    this.words[i >>> 5] |= 1 << (i & 31);
  }

  clear(i: number): void {
    this.words[i >>> 5] &= ~(1 << (i & 31));
  }

  setRange(from: number, toExclusive: number): void {
    for (let i = from; i < toExclusive; i++) this.set(i);
  }

  clearAll(): void {
    this.words.fill(0);
  }

  setAll(): void {
    this.words.fill(0xffffffff);
    const tail = this.size & 31;
    if (tail) this.words[this.words.length - 1] = (1 << tail) - 1;
  }

  count(): number {
    let c = 0;
    for (const w of this.words) c += popcount32(w);
    return c;
  }

  /** Bitwise OR of `other` into this bitmap (same size). */
  or(other: Bitmap): void {
    if (other.size !== this.size) throw new InvalidArgumentError(`bitmap sizes differ: ${this.size} vs ${other.size}`);
    for (let i = 0; i < this.words.length; i++) this.words[i] |= other.words[i];
  }

  /** Keeps only the pages also set in `other` (a shorter `other` counts as clear past its end). */
  and(other: Bitmap): void {
    const w = this.words;
    const o = other.words;
    const m = Math.min(w.length, o.length);
    for (let i = 0; i < m; i++) w[i] &= o[i];
    w.fill(0, m);
  }

  /** Clears every page set in `other` (of any size: pages past either's end are left as they are). */
  andNot(other: Bitmap): void {
    const w = this.words;
    const o = other.words;
    const m = Math.min(w.length, o.length);
    for (let i = 0; i < m; i++) w[i] &= ~o[i];
  }

  /** Set page numbers in ascending order. */
  *[Symbol.iterator](): IterableIterator<number> {
    const words = this.words;
    for (let wi = 0; wi < words.length; wi++) {
      let w = words[wi];
      while (w !== 0) {
        const bit = 31 - Math.clz32(w & -w);
        yield (wi << 5) + bit;
        w &= w - 1;
      }
    }
  }

  /** Runs of consecutive set bits in ascending order, as [first, count] (one step per run, 32 bits a step over full words). */
  *runs(): IterableIterator<[number, number]> {
    const words = this.words;
    let first = -1;
    let count = 0;
    for (let wi = 0; wi < words.length; wi++) {
      let w = words[wi];
      if (w === 0) continue;
      const base = wi << 5;
      if (w === 0xffffffff) {
        if (first >= 0 && first + count === base) count += 32;
        else {
          if (first >= 0) yield [first, count];
          first = base;
          count = 32;
        }
        continue;
      }
      while (w !== 0) {
        const bit = 31 - Math.clz32(w & -w);
        const p = base + bit;
        if (first >= 0 && first + count === p) count++;
        else {
          if (first >= 0) yield [first, count];
          first = p;
          count = 1;
        }
        w &= w - 1;
      }
    }
    if (first >= 0) yield [first, count];
  }

  clone(): Bitmap {
    return new Bitmap(this.size, this.words.slice());
  }

  /**
   * The pages among the first `bits` set in every bitmap of `all` and in none of `none` (no `all`:
   * every page), as a bitmap of `size` bits; a shorter operand counts as clear past its end. Set
   * algebra for the switchover's page sets, 32 pages a step: each operand one in-place and / andNot.
   *
   * No closures: it runs once per migration inside the downtime, and a closure made there per
   * migration (as `fromWords(…, (i) => a[i] & ~b[i])` was) is new code to V8 each time. Every
   * migration it got hot within its 2,048 calls, so V8 compiled it with TurboFan on a background
   * thread (0.4-0.7 ms of CPU each; three of them at every stop-and-copy here), taking a core the
   * paused VM's pages needed on a two-core machine. This function is compiled once per process.
   */
  static select(size: number, bits: number, all: readonly Bitmap[], none: readonly Bitmap[] = []): Bitmap {
    const b = new Bitmap(size);
    const n = Math.min(bits, size);
    const out = b.words;
    const nw = (n + 31) >>> 5;
    out.fill(0xffffffff, 0, nw);
    for (const a of all) b.and(a);
    for (const x of none) b.andNot(x);
    if (n & 31) out[nw - 1] &= (1 << (n & 31)) - 1;
    return b;
  }
}
