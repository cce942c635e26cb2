/**
 * The destination side of a live migration. It admits (or refuses) the VM, fills guest memory as
 * pages arrive, checks the memory digest, and starts the VM — at once with every page present
 * (pre-copy), or with absent pages that fault in on demand (post-copy, hybrid).
 */
import { Bitmap } from '../bitmap.js';
import { FerryError, ProtocolError } from '../errors.js';
import { Histogram, type HistogramSummary } from '../metrics.js';
import { PAGE_SIZE } from '../pages.js';
import { Encoding, PROTOCOL_VERSION, type MigrationMode, type PagesFrame } from '../protocol/frames.js';
import { FramedConnection } from '../transport/framed.js';
import type { Connection } from '../transport/transport.js';
import { Inbox, MemoryDigest, MigrationError, RemoteMigrationError, fromWireBitmap } from './common.js';
import type { DestinationFactory, DestinationVm, EngineDeps } from './types.js';

export interface DestinationOutcome {
  vmName: string;
  mode: MigrationMode;
  /**
   * Digest of memory as at the pause equalled the source's; null when the source sent no digest
   * at switchover (ferry's source checks after the start, against the digest in COMPLETE).
   */
  verified: boolean | null;
  pagesReceived: number;
  /** Post-copy: faults the vCPU took, and how long it waited for each (measured here, where the vCPU blocks). */
  faults: number;
  faultLatencyMs: HistogramSummary;
  /** Destination clock: switchover frame received → VM running. */
  startMs: number;
}

export function serveDestination(conn: Connection, factory: DestinationFactory, deps: EngineDeps): Promise<DestinationOutcome> {
  return new DestinationSession(conn, factory, deps).run();
}

class DestinationSession {
  private readonly framed: FramedConnection;
  private readonly inbox: Inbox;
  private vm: DestinationVm | null = null;
  private started = false;
  private maxPages = 0;
  private received = new Bitmap(0);
  private pagesReceived = 0;
  private absent: Bitmap | null = null;
  private missing = 0;
  private digest: MemoryDigest | null = null;
  private readonly faultAt = new Map<number, number>();
  private readonly latency = new Histogram();
  private faults = 0;
  private allArrived: (() => void) | null = null;
  private pageError: Error | null = null;

  constructor(conn: Connection, private readonly factory: DestinationFactory, private readonly deps: EngineDeps) {
    this.framed = new FramedConnection(conn);
    this.inbox = new Inbox(this.framed);
  }

  /** Applies a PAGES frame (called in arrival order, before any later frame is looked at). */
  private onPages(f: PagesFrame): void {
    const vm = this.vm;
    if (!vm || this.pageError) return;
    try {
      for (const pg of f.pages) {
        if (pg.index >= this.maxPages) throw new ProtocolError('ERR_PROTOCOL_MALFORMED', `page ${pg.index} is beyond the VM's ${this.maxPages} pages`);
        if (this.started) {
          // Post-copy: only absent pages are installed; a page already here stays as the guest left it.
          if (!this.absent!.get(pg.index)) continue;
          this.install(vm, pg.index, pg.encoding, pg.data);
          this.digest!.set(pg.index, this.hashOf(vm, pg.index));
          this.absent!.clear(pg.index);
          vm.markPresent(pg.index);
          const t = this.faultAt.get(pg.index);
          if (t !== undefined) {
            this.latency.record(this.deps.clock.now() - t);
            this.faultAt.delete(pg.index);
          }
          if (--this.missing === 0) this.allArrived?.();
        } else {
          // Before the start the last copy of a page wins; hash it now so the digest costs
          // nothing during the downtime.
          vm.ensurePages(pg.index + 1);
          this.install(vm, pg.index, pg.encoding, pg.data);
          this.received.set(pg.index);
          this.preHashes[pg.index] = pg.encoding === Encoding.ZERO ? this.zeroHash() : this.hashOf(vm, pg.index);
        }
        this.pagesReceived++;
      }
    } catch (e) {
      this.pageError = e as Error;
      this.inbox.fail(this.pageError);
    }
  }

  private install(vm: DestinationVm, page: number, encoding: number, data: Uint8Array): void {
    if (encoding === Encoding.ZERO) vm.zeroPage(page);
    else if (encoding === Encoding.RAW && data.length === PAGE_SIZE) vm.writePage(page, data, 0);
    else throw new ProtocolError('ERR_PROTOCOL_UNKNOWN_ENCODING', `page ${page}: encoding ${encoding} with ${data.length} bytes was not agreed`);
  }

  private scratch = new Uint8Array(PAGE_SIZE);
  /** Hashes of pages as installed before the start, by page (valid where `received` is set). */
  private preHashes = new BigUint64Array(0);
  private zeroHashValue: bigint | null = null;
  private zeroHash(): bigint {
    return (this.zeroHashValue ??= this.deps.hashPage(new Uint8Array(PAGE_SIZE), 0));
  }
  private hashOf(vm: DestinationVm, page: number): bigint {
    vm.readPage(page, this.scratch, 0);
    return this.deps.hashPage(this.scratch, 0);
  }

  async run(): Promise<DestinationOutcome> {
    try {
      return await this.serve();
    } catch (e) {
      if (!this.started) {
        if (!(e instanceof RemoteMigrationError)) {
          const code = e instanceof FerryError && /^ERR_[A-Z0-9_]+$/.test(e.code) ? e.code : 'ERR_MIGRATION_DESTINATION';
          await this.framed.send({ type: 'ERROR', code, message: (e as Error).message.slice(0, 1000) }).catch(() => undefined);
        }
        await this.vm?.discard().catch(() => undefined);
      }
      this.framed.abort(e instanceof Error ? e : undefined);
      throw e;
    }
  }

  private async serve(): Promise<DestinationOutcome> {
    const hello = await this.inbox.next('HELLO');
    const mode = hello.offer.modes[0];
    let admission: Awaited<ReturnType<DestinationFactory['admit']>>;
    try {
      if (hello.pageSize !== PAGE_SIZE) throw new MigrationError('ERR_MIGRATION_PAGE_SIZE', `page size ${hello.pageSize} is not supported (ferry uses ${PAGE_SIZE})`);
      admission = await this.factory.admit(hello, mode);
    } catch (e) {
      const code = e instanceof FerryError && /^ERR_[A-Z0-9_]+$/.test(e.code) ? e.code : 'ERR_ADMISSION';
      await this.framed.send({ type: 'HELLO_ACK', accepted: false, code, message: (e as Error).message.slice(0, 1000) });
      await this.framed.close().catch(() => undefined);
      throw e;
    }
    await this.framed.send({ type: 'HELLO_ACK', accepted: true, version: PROTOCOL_VERSION, mode, streams: 1, codecs: [] });

    const module = new Uint8Array(hello.moduleBytes);
    for (let got = 0; got < hello.moduleBytes;) {
      const m = await this.inbox.next('MODULE');
      if (m.offset !== got || m.totalBytes !== hello.moduleBytes) throw new ProtocolError('ERR_PROTOCOL_SEQUENCE', `module chunk at ${m.offset}, expected ${got}`);
      module.set(m.chunk, got);
      got += m.chunk.length;
    }
    if (this.deps.sha256Hex(module) !== hello.moduleSha256) throw new MigrationError('ERR_MIGRATION_MODULE_HASH', 'the guest module received does not match the hash in HELLO');

    this.maxPages = Math.floor(hello.memoryBytes / PAGE_SIZE);
    this.received = new Bitmap(this.maxPages);
    this.preHashes = new BigUint64Array(this.maxPages);
    const vm = await admission.create(module);
    this.vm = vm;
    // The source pauses only after this ACK, so VM set-up is never part of the downtime.
    await vm.warm();
    await this.framed.send({ type: 'ACK', acked: 'MODULE', value: hello.moduleBytes });
    vm.ensurePages(Math.ceil(hello.guestBytes / PAGE_SIZE));
    this.inbox.on('PAGES', (f) => this.onPages(f));
    this.inbox.on('ROUND_END', (f) => {
      void this.framed.send({ type: 'ACK', acked: 'ROUND_END', value: f.round }).catch(() => undefined);
    });

    const state = await this.inbox.next('STATE');
    const sw = await this.inbox.next('SWITCHOVER');
    if (this.pageError) throw this.pageError;
    const swAt = this.deps.clock.now();
    const pages = Math.ceil(state.guestBytes / PAGE_SIZE);
    if (pages > this.maxPages) throw new ProtocolError('ERR_PROTOCOL_MALFORMED', `state claims ${pages} pages, more than the VM's ${this.maxPages}`);
    vm.ensurePages(pages);
    const soft = fromWireBitmap(state.soft, pages);
    const stale = fromWireBitmap(sw.stale, pages);
    const absent = new Bitmap(this.maxPages);
    for (let p = 0; p < pages; p++) if (!soft.get(p) && (!this.received.get(p) || stale.get(p))) absent.set(p);
    const missing = absent.count();
    if (missing !== sw.pagesRemaining) {
      throw new MigrationError('ERR_MIGRATION_MISSING_PAGES', `the source says ${sw.pagesRemaining} pages remain, but ${missing} are missing here`);
    }
    const digest = new MemoryDigest(pages);
    for (let p = 0; p < pages; p++) {
      if (soft.get(p) || absent.get(p)) continue;
      digest.set(p, this.received.get(p) ? this.preHashes[p] : this.hashOf(vm, p));
    }
    this.preHashes = new BigUint64Array(0);
    this.digest = digest;
    const want = sw.digest?.hex ?? null;

    if (missing === 0) {
      // Pre-copy (or hybrid that converged): check before running anything.
      const hex = digest.hex((b) => this.deps.sha256Hex(b));
      if (want !== null && hex !== want) throw new MigrationError('ERR_MIGRATION_VERIFY', `memory digest mismatch at switchover: source ${want.slice(0, 16)}…, here ${hex.slice(0, 16)}…`);
      await vm.start({ guestBytes: state.guestBytes, globals: state.globals, devices: state.devices }, null);
      this.started = true;
      const startMs = this.deps.clock.now() - swAt;
      await this.framed.send({ type: 'RESUMED', pagesMissing: 0 });
      await this.framed.send({ type: 'COMPLETE', digest: { algorithm: 'sha256', hex } });
      await this.inbox.ack('COMPLETE', 0);
      await this.framed.close().catch(() => undefined);
      return this.outcome(hello.vmName, mode, want === null ? null : hex === want, startMs);
    }

    // Post-copy: run now, fetch absent pages on demand while the source pushes the rest.
    this.absent = absent;
    this.missing = missing;
    let requestId = 0;
    vm.onFault((page) => {
      if (!this.absent?.get(page) || this.faultAt.has(page)) return;
      this.faults++;
      this.faultAt.set(page, this.deps.clock.now());
      void this.framed.send({ type: 'PAGE_REQUEST', id: ++requestId, pages: [page] }).catch(() => undefined);
    });
    const arrived = new Promise<void>((r) => (this.allArrived = r));
    await vm.start({ guestBytes: state.guestBytes, globals: state.globals, devices: state.devices }, absent);
    this.started = true;
    const startMs = this.deps.clock.now() - swAt;
    await this.framed.send({ type: 'RESUMED', pagesMissing: missing });
    await Promise.race([arrived, this.inbox.done.then(() => { throw this.inbox.error ?? new MigrationError('ERR_MIGRATION_PEER_CLOSED', 'source went away during post-copy'); })]);
    if (this.pageError) throw this.pageError;
    await vm.allPresent();
    const hex = digest.hex((b) => this.deps.sha256Hex(b));
    await this.framed.send({ type: 'COMPLETE', digest: { algorithm: 'sha256', hex } });
    await this.inbox.ack('COMPLETE', 0);
    await this.framed.close().catch(() => undefined);
    if (want !== null && hex !== want) throw new MigrationError('ERR_MIGRATION_VERIFY', `memory digest mismatch after post-copy: source ${want.slice(0, 16)}…, here ${hex.slice(0, 16)}…`);
    return this.outcome(hello.vmName, mode, want === null ? null : true, startMs);
  }

  private outcome(vmName: string, mode: MigrationMode, verified: boolean | null, startMs: number): DestinationOutcome {
    return { vmName, mode, verified, pagesReceived: this.pagesReceived, faults: this.faults, faultLatencyMs: this.latency.summary(), startMs };
  }
}
