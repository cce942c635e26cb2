/**
 * Incoming chunks of a connection, consumed by one async iteration at a time. Shared by the
 * transports so they agree on end/error semantics; `onConsume` lets the producer apply
 * backpressure (a memory pipe wakes its writer, TCP resumes its socket).
 */
import { BugIndicatingError } from '../errors.js';

export class ChunkQueue implements AsyncIterable<Uint8Array> {
  private chunks: Uint8Array[] = [];
  private head = 0;
  private queued = 0;
  private ended = false;
  private failure: Error | undefined;
  private waiting: { resolve(r: IteratorResult<Uint8Array>): void; reject(e: Error): void } | undefined;

  /** Called after a chunk has been taken (and after fail()), with the bytes still queued. */
  onConsume: ((queuedBytes: number) => void) | undefined;

  /** Bytes pushed and not yet taken by the reader. */
  get bytes(): number {
    return this.queued;
  }

  /** True once end() or fail() was called. */
  get finished(): boolean {
    return this.ended || this.failure !== undefined;
  }

  push(chunk: Uint8Array): void {
    if (this.finished) return; // late data after end/fail is dropped, like a closed socket's
    if (chunk.length === 0) return;
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = undefined;
      w.resolve({ done: false, value: chunk });
      this.onConsume?.(this.queued);
      return;
    }
    this.chunks.push(chunk);
    this.queued += chunk.length;
  }

  /** No more chunks: the reader gets what is queued, then the end. */
  end(): void {
    if (this.finished) return;
    this.ended = true;
    if (this.waiting && this.queued === 0) {
      const w = this.waiting;
      this.waiting = undefined;
      w.resolve({ done: true, value: undefined });
    }
  }

  /** Drops what is queued; the reader's next (or pending) step throws `err`. */
  fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    this.chunks = [];
    this.head = 0;
    this.queued = 0;
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = undefined;
      w.reject(err);
    }
    this.onConsume?.(0);
  }

  next(): Promise<IteratorResult<Uint8Array>> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.waiting) return Promise.reject(new BugIndicatingError('a connection is being read by two iterations at once'));
    if (this.head < this.chunks.length) {
      const value = this.chunks[this.head];
      this.chunks[this.head++] = EMPTY;
      if (this.head > 1024 && this.head * 2 > this.chunks.length) {
        this.chunks = this.chunks.slice(this.head);
        this.head = 0;
      }
      this.queued -= value.length;
      this.onConsume?.(this.queued);
      return Promise.resolve({ done: false, value });
    }
    if (this.ended) return Promise.resolve({ done: true, value: undefined });
    return new Promise((resolve, reject) => {
      this.waiting = { resolve, reject };
    });
  }

  /** Takes every queued chunk at once (a reader that switches to being handed bytes directly). */
  takeAll(): Uint8Array[] {
    const out = this.chunks.slice(this.head);
    this.chunks = [];
    this.head = 0;
    this.queued = 0;
    return out;
  }

  [Symbol.asyncIterator](): AsyncIterator<Uint8Array> {
    return {
      next: () => this.next(),
      // Leaving a for-await loop early leaves the queue as it is: iteration can resume later.
      return: () => Promise.resolve({ done: true, value: undefined }),
    };
  }
}

const EMPTY = new Uint8Array(0);
