/**
 * A minimal in-process host for testing built guests without the ferry runtime: the guest's own
 * (exported) memory, JS versions of the ABI's imports, and a loop calling `run(budget)`. No
 * rewriting, no worker, no dirty log: it checks what a guest does, not how ferry runs it.
 *
 * Only names in the ABI (src/core/abi.ts) are provided; instantiating a guest that imports
 * anything else fails, so these tests also check the guests' import lists.
 */
import { readFileSync } from 'node:fs';
import { randomFillSync } from 'node:crypto';
import { FERRY_IMPORTS, NetRecord, RunStatus, WASI_IMPORTS } from '../../src/core/abi.js';
import { NetRing, isValidRingSize, ringLayout } from '../../src/core/net-ring.js';

export class GuestAbort extends Error {}
export class GuestExit extends Error {
  constructor(readonly code: number) { super(`guest exited with ${code}`); }
}

const EBADF = 8;
const MAX_PAYLOAD = 65536;

export interface BareHostOptions {
  /** The configuration string (config_read, and argv[0] for WASI guests). */
  config?: string;
}

export class BareHost {
  readonly memory: WebAssembly.Memory;
  readonly exports: Record<string, unknown>;
  /** Everything the guest wrote to the console. */
  console = '';
  /** Guest clock in ns; virtual: only `advanceClock` moves it. */
  clockNs = 0n;
  /** Set once the guest called proc_exit. */
  exitCode: number | null = null;
  /** Statuses returned by run(), in order (only the last few hundred). */
  readonly statuses: number[] = [];
  private net: { base: number; size: number } | null = null;
  private readonly pending: { conn: number; type: number; payload: Uint8Array }[] = [];
  private readonly rxByConn = new Map<number, Buffer[]>();
  readonly closedByGuest = new Set<number>();

  private constructor(module: WebAssembly.Module, private readonly config: string) {
    const imports: Record<string, Record<string, unknown>> = {};
    const ferry = this.ferryImports();
    const wasi = this.wasiImports();
    for (const imp of WebAssembly.Module.imports(module)) {
      const table = imp.module === 'ferry' ? ferry : imp.module === 'wasi_snapshot_preview1' ? wasi : null;
      const known = imp.module === 'ferry' ? imp.name in FERRY_IMPORTS : imp.module === 'wasi_snapshot_preview1' ? imp.name in WASI_IMPORTS : false;
      if (!table || !known || !(imp.name in table)) throw new Error(`guest imports ${imp.module}.${imp.name}, which the ABI does not provide`);
      (imports[imp.module] ??= {})[imp.name] = table[imp.name];
    }
    const instance = new WebAssembly.Instance(module, imports as WebAssembly.Imports);
    this.exports = instance.exports as Record<string, unknown>;
    if (!(this.exports.memory instanceof WebAssembly.Memory)) throw new Error('guest does not export its memory');
    if (typeof this.exports.run !== 'function') throw new Error('guest does not export run');
    this.memory = this.exports.memory;
  }

  /** Instantiates a guest (a path or bytes) and runs its init (cold boot). */
  static boot(wasm: string | Uint8Array, options: BareHostOptions = {}): BareHost {
    const bytes = typeof wasm === 'string' ? readFileSync(wasm) : wasm;
    const host = new BareHost(new WebAssembly.Module(bytes as Uint8Array<ArrayBuffer>), options.config ?? '');
    const init = (host.exports.init ?? host.exports._initialize) as (() => void) | undefined;
    init?.();
    return host;
  }

  static imports(wasm: string): { module: string; name: string }[] {
    return WebAssembly.Module.imports(new WebAssembly.Module(readFileSync(wasm))).map(({ module, name }) => ({ module, name }));
  }

  bytes(): Uint8Array { return new Uint8Array(this.memory.buffer); }
  private view(): DataView { return new DataView(this.memory.buffer); }

  advanceClock(ns: number | bigint): void { this.clockNs += BigInt(ns); }

  /** One quantum: feeds pending rx records, calls run(budget), collects tx records. */
  run(budget: number): number {
    if (this.exitCode !== null) return RunStatus.HALTED;
    this.feed();
    let status: number;
    try {
      status = (this.exports.run as (b: number) => number)(budget);
    } catch (e) {
      if (e instanceof GuestExit) status = RunStatus.HALTED;
      else throw e;
    }
    this.collect();
    this.statuses.push(status);
    if (this.statuses.length > 512) this.statuses.splice(0, 256);
    return status;
  }

  /** Runs quanta until the guest is idle with nothing pending, halts, or `maxQuanta` pass; returns the last status. */
  runUntilIdle(budget: number, maxQuanta = 1_000_000): number {
    let status: number = RunStatus.RUNNING;
    for (let i = 0; i < maxQuanta; i++) {
      status = this.run(budget);
      if (status === RunStatus.HALTED) return status;
      if (status === RunStatus.IDLE && this.pending.length === 0) return status;
    }
    return status;
  }

  progress(): bigint {
    const p = this.exports.progress as (() => bigint) | undefined;
    return p ? p() : 0n;
  }

  // --- network: the host side of the rings ---

  get netAttached(): boolean { return this.net !== null; }

  open(conn: number): void { this.pending.push({ conn, type: NetRecord.OPEN, payload: new Uint8Array(0) }); }
  close(conn: number): void { this.pending.push({ conn, type: NetRecord.CLOSE, payload: new Uint8Array(0) }); }
  /** Queues data for `conn`, cut into records of at most `chunk` bytes. */
  send(conn: number, data: string | Uint8Array, chunk = MAX_PAYLOAD): void {
    const bytes = typeof data === 'string' ? Buffer.from(data) : data;
    for (let i = 0; i < bytes.length; i += chunk) this.pending.push({ conn, type: NetRecord.DATA, payload: bytes.subarray(i, Math.min(bytes.length, i + chunk)) });
  }
  get pendingRecords(): number { return this.pending.length; }

  /** Everything the guest sent to `conn` so far (and forgets it). */
  take(conn: number): string {
    return this.takeBytes(conn).toString('utf8');
  }

  takeBytes(conn: number): Buffer {
    const parts = this.rxByConn.get(conn) ?? [];
    this.rxByConn.delete(conn);
    return Buffer.concat(parts);
  }

  private rings(): { rx: NetRing; tx: NetRing } | null {
    if (!this.net) return null;
    const { rx, tx } = ringLayout(this.net.base, this.net.size);
    const b = this.bytes();
    return { rx: new NetRing(b, rx, this.net.size), tx: new NetRing(b, tx, this.net.size) };
  }

  private feed(): void {
    const r = this.rings();
    if (!r) return;
    let n = 0;
    while (n < this.pending.length && r.rx.push(this.pending[n])) n++;
    this.pending.splice(0, n);
  }

  private collect(): void {
    const r = this.rings();
    if (!r) return;
    for (let rec = r.tx.pop(); rec; rec = r.tx.pop()) {
      if (rec.type === NetRecord.DATA) {
        const list = this.rxByConn.get(rec.conn) ?? [];
        list.push(Buffer.from(rec.payload));
        this.rxByConn.set(rec.conn, list);
      } else if (rec.type === NetRecord.CLOSE) this.closedByGuest.add(rec.conn);
    }
  }

  // --- imports ---

  private readAsString(ptr: number): string {
    if (ptr === 0) return '';
    const len = this.view().getUint32(ptr - 4, true);
    return Buffer.from(this.memory.buffer, ptr, len).toString('utf16le');
  }

  private ferryImports(): Record<string, unknown> {
    return {
      console_write: (ptr: number, len: number) => { this.console += Buffer.from(this.memory.buffer, ptr, len).toString('utf8'); },
      clock_ns: () => this.clockNs,
      random_fill: (ptr: number, len: number) => { randomFillSync(this.bytes(), ptr, len); },
      config_read: (ptr: number, cap: number) => {
        const c = Buffer.from(this.config);
        this.bytes().set(c.subarray(0, Math.max(0, Math.min(cap, c.length))), ptr);
        return c.length;
      },
      net_init: (base: number, size: number) => {
        if (this.net || !isValidRingSize(size) || base < 0 || base % 4 !== 0 || ringLayout(base, size).end > this.memory.buffer.byteLength) return -1;
        this.net = { base, size };
        const r = this.rings()!;
        r.rx.reset();
        r.tx.reset();
        return 0;
      },
      net_notify: () => {},
      block_size: () => 0n,
      block_read: () => -1,
      block_write: () => -1,
      soft_pages: () => {},
      abort: (msg: number, file: number, line: number, col: number) => {
        throw new GuestAbort(`guest abort: ${this.readAsString(msg)} at ${this.readAsString(file)}:${line}:${col}`);
      },
    };
  }

  private wasiImports(): Record<string, unknown> {
    const argv = Buffer.from(this.config + '\0');
    return {
      fd_write: (fd: number, iovs: number, n: number, written: number) => {
        if (fd !== 1 && fd !== 2) return EBADF;
        const v = this.view();
        let total = 0;
        for (let i = 0; i < n; i++) {
          const p = v.getUint32(iovs + 8 * i, true);
          const l = v.getUint32(iovs + 8 * i + 4, true);
          this.console += Buffer.from(this.memory.buffer, p, l).toString('utf8');
          total += l;
        }
        v.setUint32(written, total, true);
        return 0;
      },
      fd_close: () => EBADF,
      fd_seek: () => EBADF,
      fd_fdstat_get: (fd: number, buf: number) => {
        if (fd > 2) return EBADF;
        const v = this.view();
        v.setUint8(buf, 2); // character device
        v.setUint16(buf + 2, 0, true);
        v.setBigUint64(buf + 8, 0xffffffffn, true);
        v.setBigUint64(buf + 16, 0n, true);
        return 0;
      },
      proc_exit: (code: number) => { this.exitCode = code; throw new GuestExit(code); },
      clock_time_get: (_id: number, _precision: bigint, out: number) => { this.view().setBigUint64(out, this.clockNs, true); return 0; },
      random_get: (ptr: number, len: number) => { randomFillSync(this.bytes(), ptr, len); return 0; },
      args_sizes_get: (argc: number, size: number) => { this.view().setUint32(argc, 1, true); this.view().setUint32(size, argv.length, true); return 0; },
      args_get: (argvPtr: number, buf: number) => { this.bytes().set(argv, buf); this.view().setUint32(argvPtr, buf, true); return 0; },
      environ_sizes_get: (count: number, size: number) => { this.view().setUint32(count, 0, true); this.view().setUint32(size, 0, true); return 0; },
      environ_get: () => 0,
    };
  }
}

/** Indices of the 4 KiB pages that differ between two memory images (compared over the shorter). */
export function changedPages(before: Uint8Array, after: Uint8Array): number[] {
  const out: number[] = [];
  const n = Math.min(before.length, after.length);
  const a = Buffer.from(before.buffer, before.byteOffset, n);
  const b = Buffer.from(after.buffer, after.byteOffset, n);
  for (let off = 0; off < n; off += 4096) {
    const end = Math.min(n, off + 4096);
    if (a.compare(b, off, end, off, end) !== 0) out.push(off / 4096);
  }
  return out;
}
