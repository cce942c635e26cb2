/**
 * The source side of a live migration: pre-copy (Clark et al.), post-copy (Hines et al.) and
 * hybrid, over one framed connection. The decisions — when to stop pre-copy, when to switch to
 * post-copy, how hard to throttle, which page next — are the shared policies in core/policy; this
 * file is the mechanism around them.
 */
import { Bitmap } from '../bitmap.js';
import { AbortError, FerryError } from '../errors.js';
import { MigrationReportBuilder, type MigrationEvent } from '../metrics.js';
import { PAGE_SIZE } from '../pages.js';
import { AutoConverge, PrecopyStopPolicy, type PrecopyRoundStats } from '../policy/precopy.js';
import { HybridSwitchPolicy } from '../policy/hybrid.js';
import { PostcopyScheduler } from '../policy/postcopy.js';
import { PROTOCOL_VERSION } from '../protocol/frames.js';
import { PagesFrameBuilder } from '../protocol/encode.js';
import { FramedConnection } from '../transport/framed.js';
import type { Connection } from '../transport/transport.js';
import { Inbox, MemoryDigest, MigrationError, RemoteMigrationError, toWireBitmap } from './common.js';
import type { EngineDeps, MigrationOptions, MigrationPhase, MigrationProgress, MigrationResult, SourceVm } from './types.js';

const MODULE_CHUNK = 1 << 20;

type Ownership = 'source' | 'in-doubt' | 'destination';

class SourceSession {
  private readonly framed: FramedConnection;
  private readonly inbox: Inbox;
  private readonly builder: MigrationReportBuilder;
  private readonly t0: number;
  private bytesSent = 0;
  private pagesSent = 0;
  private round = 0;
  private phase: MigrationPhase = 'handshake';
  private pagesRemaining = 0;
  private dirtyRate = 0;
  private bandwidth = 0;
  private paused = false;
  private logging = false;
  private owner: Ownership = 'source';
  private readonly batchPages: number;
  private readonly maxPages: number;
  private stopReason = '';

  constructor(conn: Connection, private readonly vm: SourceVm, private readonly deps: EngineDeps, private readonly opts: MigrationOptions) {
    this.framed = new FramedConnection(conn);
    this.inbox = new Inbox(this.framed);
    this.builder = new MigrationReportBuilder({ technique: opts.mode, memoryBytes: vm.memoryBytes });
    this.t0 = deps.clock.now();
    this.batchPages = Math.max(1, Math.min(opts.batchPages ?? 256, 4096));
    this.maxPages = Math.ceil(vm.memoryBytes / PAGE_SIZE);
  }

  private now(): number {
    return this.deps.clock.now() - this.t0;
  }

  private event(e: MigrationEvent): void {
    this.builder.add(e);
  }

  private report(): void {
    const p: MigrationProgress = {
      phase: this.phase, mode: this.opts.mode, round: this.round, bytesSent: this.bytesSent, pagesSent: this.pagesSent,
      pagesRemaining: this.pagesRemaining, dirtyRateBytesPerSec: this.dirtyRate, bandwidthBytesPerSec: this.bandwidth, elapsedMs: this.now(),
    };
    this.opts.onProgress?.(p);
  }

  private checkAbort(): void {
    const s = this.opts.signal;
    if (s?.aborted && this.owner === 'source') throw new AbortError('migration cancelled', { cause: s.reason });
  }

  // ------------------------------------------------------------------ sending pages

  /** Sends `pages` in PAGES frames, each page copied once, straight into its frame; zero pages travel as a flag. */
  private async sendPages(pages: Iterable<number>, seq: number, demand: boolean): Promise<number> {
    let frame = new PagesFrameBuilder(this.batchPages, PAGE_SIZE);
    let sent = 0;
    const flush = async () => {
      if (frame.count === 0) return;
      const n = frame.count;
      const bytes = frame.finish(seq, demand);
      frame = new PagesFrameBuilder(this.batchPages, PAGE_SIZE);
      await this.framed.sendEncoded(bytes);
      this.bytesSent += bytes.length;
      this.pagesSent += n;
      sent += n;
      this.report();
    };
    for (const p of pages) {
      this.checkAbort();
      if (this.vm.isZeroPage(p)) frame.addZero(p);
      else this.vm.readPage(p, frame.addRaw(p), 0);
      if (frame.full) await flush();
    }
    await flush();
    return sent;
  }

  // ------------------------------------------------------------------ phases

  private async handshake(): Promise<void> {
    const offer = { modes: [this.opts.mode], maxStreams: 1, codecs: [] };
    await this.framed.send({
      type: 'HELLO', minVersion: PROTOCOL_VERSION, maxVersion: PROTOCOL_VERSION, vmName: this.vm.name,
      memoryBytes: this.vm.memoryBytes, guestBytes: this.vm.guestPages() * PAGE_SIZE, pageSize: PAGE_SIZE,
      moduleSha256: this.vm.moduleSha256, moduleBytes: this.vm.module.length, config: this.vm.config, offer,
    });
    const ack = await this.inbox.next('HELLO_ACK');
    if (!ack.accepted) throw new RemoteMigrationError(ack.code, `destination refused the migration: ${ack.message}`);
    if (ack.mode !== this.opts.mode) throw new MigrationError('ERR_MIGRATION_MODE', `destination chose ${ack.mode}, ${this.opts.mode} was asked for`);
    for (let off = 0; off < this.vm.module.length; off += MODULE_CHUNK) {
      const chunk = this.vm.module.subarray(off, Math.min(this.vm.module.length, off + MODULE_CHUNK));
      await this.framed.send({ type: 'MODULE', totalBytes: this.vm.module.length, offset: off, chunk });
      this.bytesSent += chunk.length + 16;
    }
    // The destination acknowledges once its VM is ready to start (thread loaded): only then may
    // we pause, so the destination's set-up is not part of the downtime.
    await this.inbox.ack('MODULE', this.vm.module.length);
  }

  /** Pre-copy rounds. Returns the pages still to send and whether to finish by post-copy. */
  private async precopy(): Promise<{ dirty: Bitmap; sentEver: Bitmap; postcopy: boolean }> {
    this.phase = 'precopy';
    // Unset options keep the policies' own defaults (PRECOPY_DEFAULTS, the hybrid policy's).
    const stopOpts = { downtimeBudgetMs: this.opts.downtimeMs, maxRounds: this.opts.maxRounds, maxSentRatio: this.opts.maxSentRatio };
    const stopPolicy = new PrecopyStopPolicy(stopOpts);
    const hybrid = this.opts.mode === 'hybrid' ? new HybridSwitchPolicy({ ...stopOpts, maxPrecopyRounds: this.opts.hybridRounds }) : null;
    const converge = this.opts.autoConverge ? new AutoConverge() : null;

    await this.vm.startDirtyLog();
    this.logging = true;
    const soft = await this.vm.softPages();
    let toSend = new Bitmap(this.maxPages);
    const pages = this.vm.guestPages();
    for (let p = 0; p < pages; p++) if (!soft.get(p)) toSend.set(p);
    const sentEver = new Bitmap(this.maxPages);

    for (this.round = 0; ; this.round++) {
      this.checkAbort();
      const rs = this.deps.clock.now();
      const b0 = this.bytesSent;
      this.pagesRemaining = toSend.count();
      this.event({ type: 'round-start', t: this.now(), round: this.round });
      const n = await this.sendPages(toSend, this.round, false);
      sentEver.or(toSend);
      this.event({ type: 'pages', t: this.now(), kind: this.round === 0 ? 'first' : 'resent', pages: n, bytes: this.bytesSent - b0 });
      const dirty = await this.vm.harvestDirty();
      const dirtyPages = dirty.count();
      await this.framed.send({ type: 'ROUND_END', round: this.round, pages: n, dirty: dirtyPages });
      await this.inbox.ack('ROUND_END', this.round);
      const ms = Math.max(1e-3, this.deps.clock.now() - rs);
      this.bandwidth = ((this.bytesSent - b0) / ms) * 1000;
      this.dirtyRate = ((dirtyPages * PAGE_SIZE) / ms) * 1000;
      this.pagesRemaining = dirtyPages;
      this.event({ type: 'round-end', t: this.now(), round: this.round, dirtyPages });
      this.event({ type: 'progress', t: this.now(), work: this.vm.progress() });
      this.report();

      const stats: PrecopyRoundStats = {
        round: this.round, pagesSentRound: n, pagesSentTotal: this.pagesSent, bytesSentTotal: this.bytesSent,
        memoryBytes: this.vm.guestPages() * PAGE_SIZE, dirtyPages, bandwidthBytesPerSec: this.bandwidth, dirtyRateBytesPerSec: this.dirtyRate,
      };
      if (hybrid) {
        const d = hybrid.decide(stats);
        if (d.action !== 'continue-precopy') {
          this.stopReason = d.reason;
          return { dirty, sentEver, postcopy: d.action === 'switch-to-postcopy' };
        }
      } else {
        const d = stopPolicy.decide(stats);
        if (d.stop) {
          this.stopReason = d.reason;
          return { dirty, sentEver, postcopy: false };
        }
      }
      if (converge) {
        const f = converge.onRound(dirtyPages * PAGE_SIZE, this.bytesSent - b0);
        this.vm.throttle(f);
        this.event({ type: 'throttle', t: this.now(), fraction: f });
      }
      toSend = dirty;
    }
  }

  private async pause(): Promise<void> {
    this.event({ type: 'progress', t: this.now(), work: this.vm.progress() });
    this.event({ type: 'paused', t: this.now() });
    await this.vm.pause();
    this.paused = true;
    this.vm.throttle(0);
  }

  /**
   * Digest of the paused source memory (soft pages excluded). It is computed while the
   * destination is already starting, not during the downtime: source memory cannot change until
   * release, and the destination reports its own digest in COMPLETE.
   */
  private async digestOfPausedMemory(soft: Bitmap): Promise<string> {
    const pages = this.vm.guestPages();
    const digest = new MemoryDigest(pages);
    const scratch = new Uint8Array(PAGE_SIZE);
    for (let p = 0; p < pages; p++) {
      if (soft.get(p)) continue;
      this.vm.readPage(p, scratch, 0);
      digest.set(p, this.deps.hashPage(scratch, 0));
      if ((p & 8191) === 8191) await this.deps.yieldToIo(); // let frames in
    }
    return digest.hex((b) => this.deps.sha256Hex(b));
  }

  /** STATE + SWITCHOVER; from here the outcome is in doubt until RESUMED or ERROR. Returns the source digest. */
  private async switchover(remaining: Bitmap, stale: Bitmap, soft: Bitmap): Promise<string> {
    const pages = this.vm.guestPages();
    const state = await this.vm.exportState();
    const stateBytes = JSON.stringify(state.devices).length + state.globals.length * 9 + 16;
    await this.framed.send({ type: 'STATE', guestBytes: state.guestBytes, globals: state.globals, devices: state.devices, soft: toWireBitmap(soft, pages) });
    this.bytesSent += stateBytes;
    this.event({ type: 'state', t: this.now(), bytes: stateBytes });
    this.checkAbort();
    this.owner = 'in-doubt';
    await this.framed.send({ type: 'SWITCHOVER', pagesRemaining: remaining.count(), digest: null, stale: toWireBitmap(stale, pages) });
    const digest = this.digestOfPausedMemory(soft);
    digest.catch(() => undefined);
    try {
      await this.inbox.next('RESUMED');
    } catch (e) {
      // The destination says it did not start the VM: ours again. A lost connection stays in doubt.
      if (e instanceof RemoteMigrationError) this.owner = 'source';
      throw e;
    }
    this.owner = 'destination';
    this.event({ type: 'resumed', t: this.now() });
    return digest;
  }

  /** Post-copy tail: push every remaining page, serving page requests first. */
  private async postcopyPush(remaining: Bitmap, soft: Bitmap): Promise<void> {
    this.phase = 'postcopy';
    const pages = this.vm.guestPages();
    const sched = new PostcopyScheduler(pages, { prepaging: this.opts.prepaging === false ? 'none' : 'bubbling' });
    for (let p = 0; p < pages; p++) {
      if (soft.get(p)) sched.markSoft(p);
      else if (!remaining.get(p)) sched.markPresent(p);
    }
    // page → [request id, when the request arrived]; the source can only see its own service
    // time — the vCPU's real fault latency is measured by the destination.
    const requested = new Map<number, [number, number]>();
    this.inbox.on('PAGE_REQUEST', (f) => {
      const t = this.now();
      for (const p of f.pages) if (p < pages && sched.onFault(p)) requested.set(p, [f.id, t]);
    });
    let pushedPages = 0;
    let demandPages = 0;
    let pushedBytes = 0;
    let demandBytes = 0;
    while (!sched.complete) {
      if (this.inbox.error) throw this.inbox.error;
      const demandFirst = sched.pendingFaults > 0;
      const batch = sched.next(demandFirst ? Math.min(sched.pendingFaults, 64) : 16);
      if (batch.length === 0) break;
      const demand = batch.filter((p) => requested.has(p));
      const push = batch.filter((p) => !requested.has(p));
      if (demand.length) {
        const b0 = this.bytesSent;
        demandPages += await this.sendPages(demand, requested.get(demand[0])![0], true);
        demandBytes += this.bytesSent - b0;
        const t = this.now();
        for (const p of demand) {
          this.event({ type: 'fault', t, page: p, latencyMs: t - requested.get(p)![1] });
          requested.delete(p);
        }
      }
      if (push.length) {
        const b0 = this.bytesSent;
        pushedPages += await this.sendPages(push.sort((a, b) => a - b), 0, false);
        pushedBytes += this.bytesSent - b0;
      }
      for (const p of batch) sched.onSent(p);
      this.pagesRemaining = sched.remaining;
      // Writes that do not block never reach the event loop; give incoming page requests a turn.
      if (sched.pendingFaults === 0) await this.deps.yieldToIo();
    }
    this.event({ type: 'pages', t: this.now(), kind: 'pushed', pages: pushedPages, bytes: pushedBytes });
    this.event({ type: 'pages', t: this.now(), kind: 'faulted', pages: demandPages, bytes: demandBytes });
    await this.framed.send({ type: 'PUSH_DONE', pagesSent: pushedPages + demandPages });
  }

  private async finish(sourceDigest: string): Promise<boolean> {
    this.phase = 'complete';
    const complete = await this.inbox.next('COMPLETE');
    const ok = complete.digest?.hex === sourceDigest;
    this.event({ type: 'verified', t: this.now(), ok });
    await this.framed.send({ type: 'ACK', acked: 'COMPLETE', value: 0 });
    await this.framed.close().catch(() => undefined);
    this.event({ type: 'complete', t: this.now() });
    await this.vm.release();
    this.event({ type: 'source-released', t: this.now() });
    if (!ok) throw new MigrationError('ERR_MIGRATION_VERIFY', `memory digest mismatch: source ${sourceDigest.slice(0, 16)}…, destination ${complete.digest?.hex.slice(0, 16) ?? 'none'}…`);
    return ok;
  }

  async run(): Promise<MigrationResult> {
    // Application degradation compares the guest's work rate during the migration with a short
    // baseline measured just before it.
    const baselineMs = this.opts.baselineMs ?? 200;
    if (baselineMs > 0) {
      this.event({ type: 'progress', t: -baselineMs, work: this.vm.progress() });
      await this.deps.clock.sleep(baselineMs, this.opts.signal);
    }
    this.event({ type: 'start', t: 0 });
    this.event({ type: 'progress', t: 0, work: this.vm.progress() });
    const onAbort = () => {
      if (this.owner !== 'source') return;
      // The session may be blocked in a write behind backpressure: abort the connection so it
      // unblocks now (the destination sees the reset and discards, as for a CANCEL).
      const err = new AbortError('migration cancelled', { cause: this.opts.signal?.reason });
      this.inbox.fail(err);
      this.framed.abort(err);
    };
    this.opts.signal?.addEventListener('abort', onAbort, { once: true });
    try {
      this.checkAbort();
      await this.handshake();
      let digest: string;
      if (this.opts.mode === 'postcopy') {
        this.stopReason = 'postcopy';
        await this.pause();
        const soft = await this.vm.softPages();
        const remaining = new Bitmap(this.maxPages);
        const pages = this.vm.guestPages();
        for (let p = 0; p < pages; p++) if (!soft.get(p)) remaining.set(p);
        this.pagesRemaining = remaining.count();
        digest = await this.switchover(remaining, new Bitmap(this.maxPages), soft);
        await this.postcopyPush(remaining, soft);
      } else {
        const { dirty, sentEver, postcopy } = await this.precopy();
        this.phase = 'stop-and-copy';
        await this.pause();
        const last = await this.vm.harvestDirty();
        last.or(dirty);
        // Dirty logging stays on: a paused VM writes nothing, and switching variants now would
        // only add to the downtime. It is switched off if the VM resumes here after a failure.
        const soft = await this.vm.softPages();
        const pages = this.vm.guestPages();
        if (!postcopy) {
          // Stop-and-copy: the last dirty pages, then state. Soft pages are never sent.
          const final = new Bitmap(this.maxPages);
          for (const p of last) if (p < pages && !soft.get(p)) final.set(p);
          for (let p = 0; p < pages; p++) if (!sentEver.get(p) && !soft.get(p)) final.set(p);
          this.round++;
          const b0 = this.bytesSent;
          const n = await this.sendPages(final, this.round, false);
          this.event({ type: 'pages', t: this.now(), kind: 'resent', pages: n, bytes: this.bytesSent - b0 });
          // No waiting for this round's ACK: the stream is ordered, STATE and SWITCHOVER follow.
          await this.framed.send({ type: 'ROUND_END', round: this.round, pages: n, dirty: 0 });
          digest = await this.switchover(new Bitmap(this.maxPages), new Bitmap(this.maxPages), soft);
        } else {
          // Hybrid switching to post-copy: what the destination has is current except `stale`.
          const stale = new Bitmap(this.maxPages);
          for (const p of last) if (p < pages && sentEver.get(p) && !soft.get(p)) stale.set(p);
          const remaining = stale.clone();
          for (let p = 0; p < pages; p++) if (!sentEver.get(p) && !soft.get(p)) remaining.set(p);
          this.pagesRemaining = remaining.count();
          digest = await this.switchover(remaining, stale, soft);
          await this.postcopyPush(remaining, soft);
        }
      }
      await this.finish(digest);
      const report = this.builder.build();
      return { report, stopReason: this.stopReason };
    } catch (e) {
      await this.fail(e);
      throw e;
    } finally {
      this.opts.signal?.removeEventListener('abort', onAbort);
    }
  }

  /** Before the switchover the VM is ours: resume it and tell the peer. Afterwards, report only. */
  private async fail(e: unknown): Promise<void> {
    this.phase = 'failed';
    if (this.owner === 'source') {
      const msg = e instanceof Error ? e.message : String(e);
      const frame = e instanceof AbortError
        ? { type: 'CANCEL' as const, reason: msg.slice(0, 1000) }
        : { type: 'ERROR' as const, code: e instanceof FerryError && /^ERR_[A-Z0-9_]+$/.test(e.code) && !(e instanceof RemoteMigrationError) ? e.code : 'ERR_MIGRATION_ABORTED', message: msg.slice(0, 1000) };
      await this.framed.send(frame).catch(() => undefined);
      this.vm.throttle(0);
      if (this.logging) await this.vm.stopDirtyLog().catch(() => undefined);
      if (this.paused) await this.vm.resume();
    }
    this.framed.abort(e instanceof Error ? e : undefined);
  }
}

/**
 * Migrates `vm` over `conn` to a destination running {@link serveDestination}. Resolves with the
 * report once the destination holds every page and the memory digest matched; rejects with a
 * named error otherwise — before the switchover the VM is running on the source again.
 */
export function migrateSource(conn: Connection, vm: SourceVm, deps: EngineDeps, opts: MigrationOptions): Promise<MigrationResult> {
  return new SourceSession(conn, vm, deps, opts).run();
}
