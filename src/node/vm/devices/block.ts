/**
 * The block device: a sparse disk file accessed synchronously from the vCPU worker. The file is
 * created (and ftruncate'd to the disk size, so it is sparse) when missing and never truncated when
 * present; bytes past the end of a shorter existing file read as zeros. Every 4 KiB disk block a
 * write touches is recorded in the write bitmap (storage migration sends those blocks).
 */
import { closeSync, fstatSync, ftruncateSync, openSync, readSync, writeSync } from 'node:fs';
import { Bitmap } from '../../../core/bitmap.js';
import { FerryError } from '../../../core/errors.js';

export const BLOCK_SIZE = 4096;
/** Largest single host I/O (reads and writes are split into chunks of this size). */
const IO_CHUNK = 1 << 20;

export class BlockDeviceError extends FerryError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_BLOCK_DEVICE', message, options);
  }
}

export class BlockDevice {
  private fd: number | null;
  readonly written: Bitmap;

  constructor(readonly path: string, readonly sizeBytes: number, written?: Bitmap) {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 0) throw new BlockDeviceError(`disk size ${sizeBytes} is not a non-negative integer`);
    let fd: number;
    try {
      try {
        fd = openSync(path, 'wx+');
        ftruncateSync(fd, sizeBytes);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
        fd = openSync(path, 'r+');
        if (!fstatSync(fd).isFile()) {
          closeSync(fd);
          throw new BlockDeviceError(`disk ${path} is not a regular file`);
        }
      }
    } catch (e) {
      if (e instanceof BlockDeviceError) throw e;
      throw new BlockDeviceError(`cannot open disk ${path}: ${(e as Error).message}`, { cause: e });
    }
    this.fd = fd;
    this.written = written ?? new Bitmap(Math.ceil(sizeBytes / BLOCK_SIZE));
  }

  /** True when `[offset, offset+len)` lies inside the disk. */
  inRange(offset: bigint, len: number): boolean {
    return this.fd !== null && offset >= 0n && len >= 0 && offset + BigInt(len) <= BigInt(this.sizeBytes);
  }

  /** Reads `len` bytes at `offset`, passing each chunk (zero-filled past EOF) to `sink(chunkOffset, bytes)`. */
  read(offset: number, len: number, sink: (at: number, bytes: Uint8Array) => void): void {
    const fd = this.openFd();
    for (let done = 0; done < len;) {
      const n = Math.min(IO_CHUNK, len - done);
      const buf = new Uint8Array(n);
      let got = 0;
      while (got < n) {
        const r = readSync(fd, buf, got, n - got, offset + done + got);
        if (r === 0) break; // EOF of a shorter file: the rest stays zero
        got += r;
      }
      sink(done, buf);
      done += n;
    }
  }

  /** Writes `len` bytes at `offset`, pulling each chunk from `source(chunkOffset, chunkLen)`. */
  write(offset: number, len: number, source: (at: number, n: number) => Uint8Array): void {
    const fd = this.openFd();
    for (let done = 0; done < len;) {
      const n = Math.min(IO_CHUNK, len - done);
      const buf = source(done, n);
      let put = 0;
      while (put < n) put += writeSync(fd, buf, put, n - put, offset + done + put);
      done += n;
    }
    if (len > 0) {
      const first = Math.floor(offset / BLOCK_SIZE);
      const last = Math.floor((offset + len - 1) / BLOCK_SIZE);
      for (let b = first; b <= last; b++) this.written.set(b);
    }
  }

  close(): void {
    if (this.fd !== null) {
      closeSync(this.fd);
      this.fd = null;
    }
  }

  private openFd(): number {
    if (this.fd === null) throw new BlockDeviceError(`disk ${this.path} is closed`);
    return this.fd;
  }
}
