/**
 * Snapshot files: cold migration, and the baseline every live technique is compared with.
 *
 * Layout (all integers little-endian):
 *
 *   "FERRYSNP"                     8-byte magic
 *   u32 format version             SNAPSHOT_VERSION
 *   u32 header length, header      UTF-8 JSON: SnapshotHeader (VM state, module hash and length)
 *   module bytes                   the original (uninstrumented) guest module
 *   page batches                   u32 n (1–256), n × u32 guest page index (ascending), n × 4096 bytes
 *   u32 0                          end of pages
 *   32 bytes                       SHA-256 of everything before it
 *
 * Zero pages are not written. A restore reads the file once, applying pages into a fresh VM that
 * has not started; only if the trailer matches is the VM booted, so a truncated or altered file
 * changes nothing.
 */
import { createHash } from 'node:crypto';
import { open, rename, unlink } from 'node:fs/promises';
import { z } from 'zod';
import { InvalidArgumentError, SnapshotError } from '../../core/errors.js';
import { MAX_CONN_ID, isConnId } from '../../core/net-ring.js';
import { PAGE_SIZE } from '../../core/pages.js';
import { Vm, type BootOptions, type VmInit, type VmState } from './vm.js';

export const SNAPSHOT_MAGIC = 'FERRYSNP';
export const SNAPSHOT_VERSION = 1;
const BATCH = 256;
const MAX_HEADER = 16 << 20;
const MAX_MODULE = 256 << 20;

export interface SnapshotHeader {
  state: VmState;
  moduleBytes: number;
  createdAt: string;
  /**
   * The first client connection id a restored VM's endpoint may hand out. The guest may still hold
   * records (or state) of connections with lower ids from before the snapshot — a client's CLOSE
   * already in its rx ring, say — which must not be taken for a new client's. Absent: 1.
   */
  netConnsFrom?: number;
}

const headerSchema = z.object({
  state: z.object({
    version: z.literal(1),
    name: z.string().min(1).max(64),
    moduleHash: z.string().regex(/^[0-9a-f]{64}$/),
    memoryBytes: z.number().int().positive(),
    guestBytes: z.number().int().nonnegative(),
    config: z.string().max(1 << 16),
    globals: z.array(z.string().max(24)).max(1 << 16),
    devices: z.unknown(),
  }),
  moduleBytes: z.number().int().positive().max(MAX_MODULE),
  createdAt: z.string().max(64),
  netConnsFrom: z.number().int().min(1).max(MAX_CONN_ID).optional(),
});

export interface SnapshotStats {
  path: string;
  bytes: number;
  pagesWritten: number;
  zeroPagesSkipped: number;
  ms: number;
}

function isZero(words: BigUint64Array, start: number): boolean {
  for (let i = start, end = start + PAGE_SIZE / 8; i < end; i++) if (words[i] !== 0n) return false;
  return true;
}

/**
 * Writes a paused VM to `path` (atomically: a temporary file renamed into place). `netConnsFrom`:
 * the next client connection id of the VM's endpoint, for the restore (SnapshotHeader).
 */
export async function writeSnapshot(vm: Vm, path: string, opts: { netConnsFrom?: number } = {}): Promise<SnapshotStats> {
  const from = opts.netConnsFrom;
  if (from !== undefined && !isConnId(from)) throw new InvalidArgumentError(`netConnsFrom must be a connection id in 1..${MAX_CONN_ID}, got ${from}`);
  const t0 = performance.now();
  const state = await vm.exportState();
  const module = vm.module;
  const header: SnapshotHeader = {
    state, moduleBytes: module.length, createdAt: new Date().toISOString(),
    ...(from !== undefined ? { netConnsFrom: from } : {}),
  };
  const tmp = `${path}.tmp-${process.pid}-${Date.now()}`;
  // Named for the file asked for, not the temporary one beside it (which the user never named).
  const cannotWrite = (e: NodeJS.ErrnoException) => new SnapshotError('ERR_SNAPSHOT_WRITE', `cannot write snapshot ${path}: ${e.code === 'ENOENT' ? 'its directory does not exist' : (e.code ?? e.message)}`, { cause: e });
  const fh = await open(tmp, 'w').catch((e: NodeJS.ErrnoException) => {
    throw cannotWrite(e);
  });
  const hash = createHash('sha256');
  let bytes = 0;
  const put = async (b: Uint8Array) => {
    hash.update(b);
    bytes += b.length;
    await fh.write(b);
  };
  try {
    const headerBytes = new TextEncoder().encode(JSON.stringify(header));
    const pre = Buffer.alloc(16);
    pre.write(SNAPSHOT_MAGIC, 0, 'latin1');
    pre.writeUInt32LE(SNAPSHOT_VERSION, 8);
    pre.writeUInt32LE(headerBytes.length, 12);
    await put(pre);
    await put(headerBytes);
    await put(module);

    const guest = vm.guestView();
    const words = new BigUint64Array(guest.buffer, guest.byteOffset, guest.byteLength / 8);
    const pages = guest.byteLength / PAGE_SIZE;
    const batch = Buffer.alloc(4 + BATCH * 4 + BATCH * PAGE_SIZE);
    let n = 0;
    let written = 0;
    let zero = 0;
    const flush = async () => {
      if (n === 0) return;
      batch.writeUInt32LE(n, 0);
      // Indices were written at their final place; move the data up behind the n indices.
      const out = Buffer.concat([batch.subarray(0, 4 + n * 4), batch.subarray(4 + BATCH * 4, 4 + BATCH * 4 + n * PAGE_SIZE)]);
      await put(out);
      n = 0;
    };
    for (let p = 0; p < pages; p++) {
      if (isZero(words, p * (PAGE_SIZE / 8))) { zero++; continue; }
      batch.writeUInt32LE(p, 4 + n * 4);
      batch.set(guest.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE), 4 + BATCH * 4 + n * PAGE_SIZE);
      n++;
      written++;
      if (n === BATCH) await flush();
    }
    await flush();
    await put(Buffer.alloc(4));
    const digest = hash.digest();
    await fh.write(digest);
    bytes += digest.length;
    await fh.sync();
    await fh.close();
    await rename(tmp, path);
    return { path, bytes, pagesWritten: written, zeroPagesSkipped: zero, ms: performance.now() - t0 };
  } catch (e) {
    await fh.close().catch(() => undefined);
    await unlink(tmp).catch(() => undefined);
    throw (e as NodeJS.ErrnoException).syscall ? cannotWrite(e as NodeJS.ErrnoException) : e;
  }
}

/** Buffered exact reads from a file, hashing what it hands out. */
class Reader {
  private buf = Buffer.alloc(0);
  private pos = 0;
  private filePos = 0;
  private eof = false;
  readonly hash = createHash('sha256');
  constructor(private readonly fh: import('node:fs/promises').FileHandle, private readonly size: number) {}

  /** Bytes not yet handed out (the trailer must be exactly what remains at the end). */
  get remaining(): number { return this.size - this.filePos + (this.buf.length - this.pos); }

  async take(n: number, what: string, hashed = true): Promise<Buffer> {
    if (n > this.remaining) throw new SnapshotError('ERR_SNAPSHOT_TRUNCATED', `snapshot is truncated: it ends inside the ${what}`);
    while (this.buf.length - this.pos < n && !this.eof) {
      const chunk = Buffer.alloc(Math.max(1 << 20, n));
      const { bytesRead } = await this.fh.read(chunk, 0, chunk.length, this.filePos);
      if (bytesRead === 0) this.eof = true;
      this.filePos += bytesRead;
      this.buf = Buffer.concat([this.buf.subarray(this.pos), chunk.subarray(0, bytesRead)]);
      this.pos = 0;
    }
    if (this.buf.length - this.pos < n) throw new SnapshotError('ERR_SNAPSHOT_TRUNCATED', `snapshot is truncated: it ends inside the ${what}`);
    const out = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    if (hashed) this.hash.update(out);
    return out;
  }
}

export interface RestoreOptions extends BootOptions {
  cache: VmInit['cache'];
  /** Overrides the VM name stored in the snapshot. */
  name?: string;
  block?: VmInit['block'];
  quantumMs?: number;
  fixedBudget?: number;
  /** Parse and verify, but do not start the VM (it is returned created, with memory filled). */
  noStart?: boolean;
  /** The host's memory pool: the VM is created at the snapshot's size, so memory of that shape fits. */
  pool?: VmInit['pool'];
  /**
   * Called with the VM's name and memory size once the snapshot is verified and before any
   * memory is taken for it; throwing refuses the restore (a host's admission), with nothing made.
   */
  admit?: (name: string, memoryBytes: number) => void;
}

export interface Restored {
  vm: Vm;
  module: Uint8Array;
  header: SnapshotHeader;
  pages: number;
}

/** The disk a saved VM had (same path: a restore on the same machine, or a copied disk file). */
function diskOf(devices: unknown): VmInit['block'] | undefined {
  const b = (devices as { block?: { path?: unknown; sizeBytes?: unknown } | null } | null)?.block;
  return b && typeof b.path === 'string' && typeof b.sizeBytes === 'number' ? { path: b.path, sizeBytes: b.sizeBytes } : undefined;
}

/** Restores a snapshot into a new VM and (unless `noStart`) continues it. */
export async function restoreSnapshot(path: string, opts: RestoreOptions): Promise<Restored> {
  const fh = await open(path, 'r').catch((e: NodeJS.ErrnoException) => {
    throw new SnapshotError('ERR_SNAPSHOT_OPEN', `cannot open snapshot ${path}: ${e.code ?? e.message}`, { cause: e });
  });
  try {
    const size = (await fh.stat()).size;
    const r = new Reader(fh, size);
    const pre = await r.take(16, 'file header');
    if (pre.toString('latin1', 0, 8) !== SNAPSHOT_MAGIC) throw new SnapshotError('ERR_SNAPSHOT_NOT_A_SNAPSHOT', `${path} is not a ferry snapshot`);
    const version = pre.readUInt32LE(8);
    if (version !== SNAPSHOT_VERSION) throw new SnapshotError('ERR_SNAPSHOT_VERSION', `snapshot format version ${version} is not supported (this ferry reads version ${SNAPSHOT_VERSION})`);
    const hlen = pre.readUInt32LE(12);
    if (hlen > MAX_HEADER) throw new SnapshotError('ERR_SNAPSHOT_CORRUPT', `snapshot header claims ${hlen} bytes (limit ${MAX_HEADER})`);
    let header: SnapshotHeader;
    try {
      header = headerSchema.parse(JSON.parse((await r.take(hlen, 'header')).toString('utf8'))) as SnapshotHeader;
    } catch (e) {
      if (e instanceof SnapshotError) throw e;
      throw new SnapshotError('ERR_SNAPSHOT_CORRUPT', `snapshot header is malformed: ${(e as Error).message.slice(0, 200)}`, { cause: e });
    }
    const module = new Uint8Array(await r.take(header.moduleBytes, 'guest module'));
    const moduleHash = createHash('sha256').update(module).digest('hex');
    if (moduleHash !== header.state.moduleHash) throw new SnapshotError('ERR_SNAPSHOT_MODULE', 'the guest module inside the snapshot does not match the hash its state was saved with');

    const st = header.state;
    opts.admit?.(opts.name ?? st.name, st.memoryBytes);
    const block = opts.block ?? diskOf(st.devices);
    const vm = Vm.create({
      name: opts.name ?? st.name,
      module,
      memoryBytes: st.memoryBytes,
      config: st.config,
      cache: opts.cache,
      ...(block ? { block } : {}),
      ...(opts.quantumMs ? { quantumMs: opts.quantumMs } : {}),
      ...(opts.fixedBudget ? { fixedBudget: opts.fixedBudget } : {}),
      ...(opts.pool ? { pool: opts.pool } : {}),
    }, st.guestBytes);
    const guest = vm.guestView();
    const maxPage = st.guestBytes / PAGE_SIZE;
    let pages = 0;
    let last = -1;
    for (;;) {
      const n = (await r.take(4, 'page batch')).readUInt32LE(0);
      if (n === 0) break;
      if (n > BATCH) throw new SnapshotError('ERR_SNAPSHOT_CORRUPT', `page batch of ${n} pages (limit ${BATCH})`);
      const idx = await r.take(n * 4, 'page batch');
      const indices: number[] = [];
      for (let i = 0; i < n; i++) {
        const p = idx.readUInt32LE(i * 4);
        if (p >= maxPage || p <= last) throw new SnapshotError('ERR_SNAPSHOT_CORRUPT', `page index ${p} is out of order or outside the guest's ${maxPage} pages`);
        indices.push(p);
        last = p;
      }
      const body = await r.take(n * PAGE_SIZE, 'page data');
      for (let i = 0; i < n; i++) guest.set(body.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE), indices[i] * PAGE_SIZE);
      pages += n;
    }
    const expected = r.hash.digest();
    const trailer = await r.take(32, 'checksum', false);
    if (r.remaining !== 0) throw new SnapshotError('ERR_SNAPSHOT_CORRUPT', `snapshot has ${r.remaining} unexpected bytes after its checksum`);
    if (!expected.equals(trailer)) throw new SnapshotError('ERR_SNAPSHOT_CORRUPT', 'snapshot checksum does not match: the file was altered or damaged');
    if (!opts.noStart) await vm.bootFromState(st, opts);
    return { vm, module, header, pages };
  } finally {
    await fh.close();
  }
}
