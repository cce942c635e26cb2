/**
 * A host's pool of guest memories that are ready to use: shared WebAssembly.Memory objects, all
 * zero, whose pages the kernel (and the hypervisor under it) already backs.
 *
 * Why: the first write to each 4 KiB page of fresh memory costs a page fault. On this machine kind
 * that is 115–1000 ms for 256 MiB (the hypervisor backs fresh memory lazily), against 20–30 ms to
 * zero memory that is already backed. A migration destination that takes its guest memory from the
 * pool starts receiving pages at once, at memory speed — as a QEMU destination started with
 * `-incoming` and `-mem-prealloc` ahead of the migration does. Memories come into the pool two
 * ways: a VM that leaves the host (stopped, or migrated away) gives its memory back, and `warm()`
 * faults in fresh ones ahead of time.
 *
 * A memory is zeroed before anyone can take it again, so a VM never sees another VM's bytes:
 * memory from the pool is indistinguishable from fresh memory, except in speed. A memory serves
 * only a request of exactly its shape (current and maximum size): a Wasm memory cannot shrink,
 * and the guest sees its current size.
 *
 * The pool holds at most `capacityBytes`; memory given back beyond that is left to the garbage
 * collector. No global state: each host (agent) owns its pool.
 */
import { InvalidArgumentError } from '../../core/errors.js';
import { WASM_PAGE_SIZE } from '../../core/pages.js';

/** A memory's shape in 64 KiB Wasm pages: its current size and its maximum. */
export interface MemoryShape {
  initial: number;
  maximum: number;
}

interface Entry {
  memory: WebAssembly.Memory;
  maximum: number;
  /** Bytes from here on are still to be zeroed (or faulted in, for a fresh one); done at byteLength. */
  next: number;
  /** Fresh from the allocator, so already zero: touching one byte per 4 KiB page faults it in. */
  fresh: boolean;
}

export interface MemoryPoolStats {
  /** Memories handed out from the pool. */
  hits: number;
  /** Requests the pool had nothing of that shape for. */
  misses: number;
  /** Memories in the pool (ready or being zeroed). */
  memories: number;
  /** Bytes the pool holds. */
  bytes: number;
}

const SLICE = 8 << 20;

export class GuestMemoryPool {
  private readonly entries: Entry[] = [];
  private hits = 0;
  private misses = 0;
  private working = false;

  /**
   * @param capacityBytes the most the pool holds (0 turns it off).
   * @param yieldFn how background zeroing lets the event loop run between 8 MiB slices.
   */
  constructor(readonly capacityBytes: number, private readonly yieldFn: () => Promise<void> = () => new Promise((r) => setImmediate(r))) {
    if (!Number.isSafeInteger(capacityBytes) || capacityBytes < 0) throw new InvalidArgumentError(`memory pool capacity must be a whole number of bytes ≥ 0, not ${capacityBytes}`);
  }

  /** Bytes the pool holds. */
  get bytes(): number {
    let n = 0;
    for (const e of this.entries) n += e.memory.buffer.byteLength;
    return n;
  }

  stats(): MemoryPoolStats {
    return { hits: this.hits, misses: this.misses, memories: this.entries.length, bytes: this.bytes };
  }

  /**
   * A zeroed, backed memory of exactly `shape`, or null. One still being zeroed is finished now
   * (a few ms per 100 MiB), which is still far quicker than faulting fresh memory in.
   */
  take(shape: MemoryShape): WebAssembly.Memory | null {
    let best = -1;
    for (let i = 0; i < this.entries.length; i++) {
      const e = this.entries[i];
      if (!fits(e, shape)) continue;
      if (best < 0 || e.next > this.entries[best].next) best = i;
      if (e.next >= e.memory.buffer.byteLength) break;
    }
    if (best < 0) {
      this.misses++;
      return null;
    }
    const [e] = this.entries.splice(best, 1);
    finish(e, Infinity);
    this.hits++;
    return e.memory;
  }

  /**
   * Takes back a memory nobody uses any more (its VM's vCPU thread has exited; nothing reads or
   * writes it after this). It is zeroed in the background before it can be taken again. Dropped
   * when the pool is full. `maximum` is the memory's maximum in Wasm pages (JS cannot read it).
   */
  give(memory: WebAssembly.Memory, maximum: number): void {
    if (this.entries.some((e) => e.memory === memory)) return;
    if (this.bytes + memory.buffer.byteLength > this.capacityBytes) return;
    this.entries.push({ memory, maximum, next: 0, fresh: false });
    void this.work();
  }

  /**
   * Adds fresh memories of `shape`, faulted in ahead of their use (in the background, a slice at a
   * time), until `count` of that shape are in the pool or it is full. Resolves when they are ready.
   */
  async warm(shape: MemoryShape, count = 1): Promise<void> {
    const bytes = shape.initial * WASM_PAGE_SIZE;
    let have = this.entries.filter((e) => fits(e, shape)).length;
    for (; have < count && this.bytes + bytes <= this.capacityBytes; have++) {
      this.entries.push({ memory: new WebAssembly.Memory({ ...shape, shared: true }), maximum: shape.maximum, next: 0, fresh: true });
    }
    await this.work();
  }

  /**
   * Lets go of memories, the oldest first, until the pool holds at most `maxBytes`: a host makes
   * room for the VMs it admits (pooled memory is a cache; a VM's reservation comes first).
   * Returns the bytes let go.
   */
  trim(maxBytes: number): number {
    let dropped = 0;
    let held = this.bytes;
    while (held > maxBytes && this.entries.length > 0) {
      const [e] = this.entries.splice(0, 1);
      held -= e.memory.buffer.byteLength;
      dropped += e.memory.buffer.byteLength;
    }
    return dropped;
  }

  /** Zeroes (and so faults in) every entry not yet done, a slice at a time. */
  private async work(): Promise<void> {
    if (this.working) {
      while (this.working) await this.yieldFn();
      return;
    }
    this.working = true;
    try {
      for (;;) {
        const e = this.entries.find((x) => x.next < x.memory.buffer.byteLength);
        if (!e) return;
        finish(e, SLICE);
        await this.yieldFn();
      }
    } finally {
      this.working = false;
    }
  }
}

/** `e` serves a request of `shape`: the same maximum and the same current size. */
function fits(e: Entry, shape: MemoryShape): boolean {
  return e.maximum === shape.maximum && e.memory.buffer.byteLength === shape.initial * WASM_PAGE_SIZE;
}

/** Zeroes up to `max` more bytes of `e` (writing zeros also faults the pages in). */
function finish(e: Entry, max: number): void {
  const end = Math.min(e.memory.buffer.byteLength, e.next + max);
  if (end <= e.next) return;
  if (e.fresh) {
    const u8 = new Uint8Array(e.memory.buffer);
    for (let at = e.next; at < end; at += 4096) u8[at] = 0;
  } else {
    // Whole words: a byte fill of shared memory runs at ~3 GB/s here, a Float64Array fill at ~14.
    new Float64Array(e.memory.buffer).fill(0, e.next / 8, end / 8);
  }
  e.next = end;
}
