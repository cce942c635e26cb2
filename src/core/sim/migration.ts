/**
 * One live migration in the simulated world. The decisions are the engine's own policy objects —
 * {@link PrecopyStopPolicy}, {@link HybridSwitchPolicy}, {@link AutoConverge},
 * {@link PostcopyScheduler} — fed the statistics the engine would measure; this file only moves
 * virtual time, bytes and pages around them, and records the events a {@link MigrationReportBuilder}
 * turns into the same {@link MigrationReport} the engine produces.
 */
import type { Bitmap } from '../bitmap.js';
import type { VirtualClock } from '../clock.js';
import { InvalidArgumentError } from '../errors.js';
import { MigrationReportBuilder, type MigrationReport } from '../metrics.js';
import { HybridSwitchPolicy, type HybridOptions } from '../policy/hybrid.js';
import { PostcopyPageState, PostcopyScheduler } from '../policy/postcopy.js';
import { AutoConverge, PrecopyStopPolicy, type AutoConvergeOptions, type PrecopyRoundStats, type PrecopyStopOptions } from '../policy/precopy.js';
import type { Channel } from './network.js';
import type { DirtyModel, DirtySet, PageCost } from './workload.js';

export type Technique = 'precopy' | 'postcopy' | 'hybrid';

export interface SimVm {
  name: string;
  memoryBytes: number;
  pageSize: number;
  dirty: DirtyModel;
  /** Wire bytes and source CPU per page (content mix × codec). */
  cost: PageCost;
  /** CPU/device state sent while paused, bytes. */
  stateBytes: number;
  /** Application work per second at full speed (for the degradation metric). Default 1000. */
  workPerSec?: number;
}

export interface SimMigrationOptions extends PrecopyStopOptions, Pick<HybridOptions, 'maxPrecopyRounds' | 'maxDirtyToBandwidth'> {
  /** QEMU-style auto-converge (the engine's AutoConverge). Default off. */
  autoConverge?: boolean | AutoConvergeOptions;
  /** Post-copy pre-paging (Hines' bubbling). Default true. */
  prepaging?: boolean;
  /** Post-copy pages per batch. Default 32. */
  postcopyBatchPages?: number;
  /** Fixed cost of resuming at the destination (VM creation, worker start), ms, inside the downtime. Default 0. */
  resumeMs?: number;
  /** Fixed set-up before the first page moves (connection, handshake, module transfer), ms. Default 0. */
  setupMs?: number;
}

export interface SimMigrationInit {
  vm: SimVm;
  technique: Technique;
  channel: Channel;
  /** Link speed the downtime estimate for the state transfer uses before anything was measured. */
  nominalBandwidthBytesPerSec: number;
  options?: SimMigrationOptions;
}

export interface SimMigrationResult {
  vm: string;
  technique: Technique;
  /** Why pre-copy stopped or hybrid switched (`postcopy` for plain post-copy). */
  stopReason: string;
  report: MigrationReport;
}

/** Starts a migration at the clock's current time; `onDone` runs at its completion. */
export function startMigration(clock: VirtualClock, init: SimMigrationInit, onDone: (r: SimMigrationResult) => void): void {
  new SimMigration(clock, init, onDone).start();
}

class SimMigration {
  private readonly vm: SimVm;
  private readonly o: SimMigrationOptions;
  private readonly report: MigrationReportBuilder;
  private readonly ch: Channel;
  private readonly workRate: number;
  private readonly wirePerPage: number;
  /** Source guest: run up to this time, at this speed. */
  private guestAt = 0;
  private speed = 1;
  private work = 0;
  private pagesSentTotal = 0;
  private bytesSentTotal = 0;
  private stopReason = '';
  private readonly precopy: PrecopyStopPolicy | null = null;
  private readonly hybrid: HybridSwitchPolicy | null = null;
  private readonly ac: AutoConverge | null = null;
  /** The fixed part the stop policy adds to eq. (2): the option, and the state over the nominal bandwidth. */
  private readonly fixedDowntimeMs: number;

  constructor(private readonly clock: VirtualClock, private readonly init: SimMigrationInit, private readonly onDone: (r: SimMigrationResult) => void) {
    this.vm = init.vm;
    this.o = init.options ?? {};
    this.ch = init.channel;
    this.workRate = this.vm.workPerSec ?? 1000;
    this.wirePerPage = this.vm.cost.wireBytesPerPage;
    if (!(this.vm.memoryBytes > 0 && this.vm.pageSize > 0)) throw new InvalidArgumentError(`VM ${this.vm.name}: memory and page size must be positive`);
    this.report = new MigrationReportBuilder({ technique: init.technique, memoryBytes: this.vm.memoryBytes, pageSize: this.vm.pageSize });
    this.fixedDowntimeMs = (this.o.fixedDowntimeMs ?? 0) + (this.vm.stateBytes / init.nominalBandwidthBytesPerSec) * 1000;
    const stopOpts: PrecopyStopOptions = { ...this.o, fixedDowntimeMs: this.fixedDowntimeMs };
    if (init.technique === 'precopy') this.precopy = new PrecopyStopPolicy(stopOpts);
    if (init.technique === 'hybrid') this.hybrid = new HybridSwitchPolicy({ ...stopOpts, maxPrecopyRounds: this.o.maxPrecopyRounds, maxDirtyToBandwidth: this.o.maxDirtyToBandwidth });
    if (this.o.autoConverge && init.technique !== 'postcopy') this.ac = new AutoConverge(this.o.autoConverge === true ? {} : this.o.autoConverge);
  }

  start(): void {
    const t0 = this.clock.now();
    this.guestAt = t0;
    // One second of work at full speed before the migration: the degradation baseline.
    this.report.add({ type: 'progress', t: t0 - 1000, work: 0 });
    this.work = this.workRate;
    this.report.add({ type: 'progress', t: t0, work: this.work });
    this.report.add({ type: 'start', t: t0 });
    const setup = this.o.setupMs ?? 0;
    const go = () => {
      const t = this.clock.now();
      this.advanceSource(t);
      this.vm.dirty.harvest(); // start the dirty log: earlier writes do not count
      if (this.init.technique === 'postcopy') {
        this.stopReason = 'postcopy';
        this.enterPostcopy(t, null, Math.round(this.vm.memoryBytes / this.vm.pageSize), true);
      } else this.round(0, this.vm.memoryBytes / this.vm.pageSize);
    };
    if (setup > 0) this.clock.after(setup, go);
    else go();
  }

  /** Runs the source guest up to `t`. */
  private advanceSource(t: number): void {
    const dt = t - this.guestAt;
    if (dt > 0) {
      this.vm.dirty.run(dt, this.speed);
      this.work += (this.workRate * this.speed * dt) / 1000;
    }
    this.guestAt = t;
  }

  /**
   * A pre-copy round as the engine runs it: send the pages; once the sender's buffer has taken the
   * last of them, harvest the dirty log; the round ends when the ROUND_END marker (behind the data)
   * is acknowledged, one latency after the data arrived; the log is harvested again (what the
   * guest wrote meanwhile) and the policy decides on both.
   */
  private round(i: number, pages: number): void {
    const started = this.clock.now();
    this.report.add({ type: 'round-start', t: started, round: i });
    const bytes = pages * this.wirePerPage;
    let set: DirtySet = { pages: 0, bitmap: null };
    const harvest = (t: number) => {
      this.advanceSource(t);
      set = this.vm.dirty.harvest();
      this.pagesSentTotal += pages;
      this.bytesSentTotal += bytes;
      this.report.add({ type: 'pages', t, kind: i === 0 ? 'first' : 'resent', pages, bytes });
    };
    const ended = (t: number) => {
      set = this.lateDirty(t, set);
      this.report.add({ type: 'round-end', t, round: i, dirtyPages: set.pages });
      const elapsed = t - started;
      const stats: PrecopyRoundStats = {
        round: i,
        pagesSentRound: pages,
        pagesSentTotal: this.pagesSentTotal,
        bytesSentTotal: this.bytesSentTotal,
        memoryBytes: this.vm.memoryBytes,
        dirtyPages: set.pages,
        bandwidthBytesPerSec: elapsed > 0 ? (bytes / elapsed) * 1000 : this.init.nominalBandwidthBytesPerSec,
        dirtyRateBytesPerSec: elapsed > 0 ? ((set.pages * this.vm.pageSize) / elapsed) * 1000 : 0,
        pageBytes: this.wirePerPage,
      };
      if (this.ac) {
        const before = this.ac.throttle;
        const th = this.ac.onRound(set.pages * this.vm.pageSize, bytes);
        if (th !== before) {
          this.advanceSource(t);
          this.speed = 1 - th;
          this.report.add({ type: 'throttle', t, fraction: th });
        }
      }
      if (this.precopy) {
        const d = this.precopy.decide(stats);
        if (!d.stop) return this.round(i + 1, set.pages);
        this.stopReason = d.reason;
        return this.stopAndCopy(t, set, d.estimatedDowntimeMs);
      }
      const h = this.hybrid!.decide(stats);
      this.stopReason = h.reason;
      if (h.action === 'continue-precopy') return this.round(i + 1, set.pages);
      if (h.action === 'stop-and-copy') return this.stopAndCopy(t, set, h.precopy.estimatedDowntimeMs);
      const all = this.lateDirty(t, set);
      this.enterPostcopy(t, all.bitmap, all.pages, false);
    };
    const lat = this.ch.latencyMs;
    this.ch.send(bytes, (t) => (lat > 0 ? this.clock.schedule(t + lat, () => ended(t + lat)) : ended(t)), undefined, harvest);
  }

  /** The harvested set plus what the guest dirtied between that harvest and `t` (the round ends, or it pauses, at `t`). */
  private lateDirty(t: number, set: DirtySet): DirtySet {
    this.advanceSource(t);
    const late = this.vm.dirty.harvest();
    if (late.pages === 0) return set;
    if (set.bitmap && late.bitmap) {
      const bm = set.bitmap.clone();
      bm.or(late.bitmap);
      return { pages: bm.count(), bitmap: bm };
    }
    return { pages: set.pages + late.pages, bitmap: null };
  }

  private stopAndCopy(t: number, harvested: DirtySet, estimatedDowntimeMs: number): void {
    this.report.add({ type: 'stop-decision', t, estimatedDowntimeMs, fixedDowntimeMs: this.fixedDowntimeMs });
    const set = this.lateDirty(t, harvested);
    this.report.add({ type: 'paused', t });
    this.speed = 0;
    const bytes = set.pages * this.wirePerPage;
    this.ch.send(bytes + this.vm.stateBytes, (ta) => {
      this.report.add({ type: 'pages', t: ta, kind: 'resent', pages: set.pages, bytes });
      this.report.add({ type: 'state', t: ta, bytes: this.vm.stateBytes });
      this.finish(ta + (this.o.resumeMs ?? 0), true);
    }, (td) => this.report.add({ type: 'switchover-sent', t: td }));
  }

  private finish(t: number, resumed: boolean): void {
    if (resumed) this.report.add({ type: 'resumed', t });
    this.report.add({ type: 'source-released', t });
    this.report.add({ type: 'complete', t });
    this.report.add({ type: 'progress', t, work: this.work });
    const done = () => this.onDone({ vm: this.vm.name, technique: this.init.technique, stopReason: this.stopReason, report: this.report.build() });
    if (t > this.clock.now()) this.clock.schedule(t, done);
    else done();
  }

  /**
   * Pause, send the state, resume at the destination, then move the `missing` pages by the engine's
   * post-copy scheduler: demand faults first, bubbling pre-paging, active push.
   */
  private enterPostcopy(t: number, missing: Bitmap | null, missingCount: number, allMissing: boolean): void {
    this.advanceSource(t);
    this.report.add({ type: 'paused', t });
    this.speed = 0;
    const n = this.vm.dirty.granular ? this.vm.dirty.pageCount : Math.round(this.vm.memoryBytes / this.vm.pageSize);
    const sched = new PostcopyScheduler(n, { prepaging: this.o.prepaging === false ? 'none' : 'bubbling' });
    if (!allMissing) {
      if (missing) {
        for (let p = 0; p < n; p++) if (!missing.get(p)) sched.markPresent(p);
      } else {
        // The fluid world has no page identities: spread the missing count evenly over memory.
        const k = Math.min(n, Math.round(missingCount));
        const keep = new Uint8Array(n);
        for (let j = 0; j < k; j++) keep[Math.floor((j * n) / k)] = 1;
        for (let p = 0; p < n; p++) if (!keep[p]) sched.markPresent(p);
      }
    }
    this.ch.send(this.vm.stateBytes, (ts) => {
      this.report.add({ type: 'state', t: ts, bytes: this.vm.stateBytes });
      const tr = ts + (this.o.resumeMs ?? 0);
      const go = () => new PostcopyPhase(this, sched, tr).begin();
      if (tr > this.clock.now()) this.clock.schedule(tr, go);
      else go();
    }, (td) => this.report.add({ type: 'switchover-sent', t: td }));
  }

  /** @internal for PostcopyPhase */
  get ctx() {
    return { clock: this.clock, ch: this.ch, vm: this.vm, report: this.report, o: this.o, wirePerPage: this.wirePerPage, workRate: this.workRate };
  }

  /** @internal */
  addWork(w: number): void {
    this.work += w;
  }

  /** @internal */
  done(t: number): void {
    this.finish(t, false);
  }
}

/** The destination side of post-copy: a vCPU touching pages, faults, and batches from the source. */
class PostcopyPhase {
  private vcpuAt: number;
  private blockedOn = -1;
  private faultAt = 0;
  private inChannel = 0;
  private finished = false;
  private readonly batch: number;
  private readonly lat: number;

  constructor(private readonly m: SimMigration, private readonly sched: PostcopyScheduler, private readonly resumedAt: number) {
    this.vcpuAt = resumedAt;
    this.batch = m.ctx.o.postcopyBatchPages ?? 32;
    this.lat = m.ctx.ch.latencyMs;
  }

  begin(): void {
    this.m.ctx.report.add({ type: 'resumed', t: this.resumedAt });
    if (this.sched.complete) return this.complete(this.resumedAt);
    this.catchUp(this.resumedAt);
    this.pump();
  }

  /** Sends the next batch if the channel holds none of ours. */
  private pump(): void {
    if (this.finished || this.inChannel > 0) return;
    const { ch, wirePerPage, report } = this.m.ctx;
    const f0 = this.sched.emitted.faulted;
    const pages = this.sched.next(this.batch);
    if (pages.length === 0) return; // nothing eligible now: a fault arriving later pumps again
    const faulted = this.sched.emitted.faulted - f0;
    this.inChannel++;
    ch.send(
      pages.length * wirePerPage,
      (t) => this.delivered(t, pages, faulted),
      (t) => {
        this.inChannel--;
        const now = t;
        if (faulted) report.add({ type: 'pages', t: now, kind: 'faulted', pages: faulted, bytes: faulted * wirePerPage });
        if (pages.length - faulted) report.add({ type: 'pages', t: now, kind: 'pushed', pages: pages.length - faulted, bytes: (pages.length - faulted) * wirePerPage });
        this.catchUp(now);
        this.pump();
      },
    );
  }

  private delivered(t: number, pages: number[], _faulted: number): void {
    if (this.finished) return;
    this.catchUp(t);
    for (const p of pages) this.sched.onSent(p);
    if (this.blockedOn >= 0 && this.sched.states[this.blockedOn] === PostcopyPageState.PRESENT) {
      this.m.ctx.report.add({ type: 'fault', t, page: this.blockedOn, latencyMs: t - this.faultAt });
      this.blockedOn = -1;
      this.vcpuAt = t;
    }
    if (this.sched.complete) return this.complete(t);
    this.pump();
  }

  /** Runs the destination vCPU up to `t` with the pages present now (presence changes only at deliveries). */
  private catchUp(t: number): void {
    if (this.blockedOn >= 0 || t <= this.vcpuAt) return;
    const states = this.sched.states;
    let hit = -1;
    const ran = this.m.ctx.vm.dirty.touch(t - this.vcpuAt, 1, (p) => {
      const s = states[p];
      if (s === PostcopyPageState.PRESENT || s === PostcopyPageState.SOFT) return true;
      hit = p;
      return false;
    });
    this.m.addWork((this.m.ctx.workRate * Math.min(ran, t - this.vcpuAt)) / 1000);
    if (hit < 0) {
      this.vcpuAt = t;
      return;
    }
    this.vcpuAt = Math.min(t, this.vcpuAt + ran);
    this.blockedOn = hit;
    this.faultAt = this.vcpuAt;
    if (states[hit] !== PostcopyPageState.MISSING) return; // already requested or on its way
    const { clock } = this.m.ctx;
    const arrives = this.faultAt + this.lat;
    const page = hit;
    const request = () => {
      if (this.finished) return;
      this.sched.onFault(page);
      this.pump();
    };
    if (arrives > clock.now()) clock.schedule(arrives, request);
    else request();
  }

  private complete(t: number): void {
    this.catchUp(t);
    this.finished = true;
    this.m.done(t);
  }
}
