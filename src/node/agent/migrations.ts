/**
 * Outgoing migrations as the control API sees them: a job per migration with its status, the
 * latest progress, the report when done, and subscribers (Server-Sent Events).
 */
import { AbortError, FerryError } from '../../core/errors.js';
import type { MigrationPhase, MigrationProgress, MigrationResult } from '../../core/engine/types.js';
import type { MigrationReport } from '../../core/metrics.js';
import type { MigrationMode } from '../../core/protocol/frames.js';

export type MigrationStatus = 'running' | 'succeeded' | 'failed' | 'cancelled';

export interface MigrationJobJson {
  id: string;
  vm: string;
  from: string;
  to: string;
  /** The destination's migration address. */
  toAddress: string;
  mode: MigrationMode;
  /** The gang named in the request (the report's `transfer.gang` is its wire id: this name plus a suffix). */
  gang: string | null;
  /** The TCP congestion control of the sending host's migration connections (null: not TCP, or unknown). */
  tcpCongestion: string | null;
  status: MigrationStatus;
  progress: MigrationProgress | null;
  report: MigrationReport | null;
  stopReason: string | null;
  error: { code: string; message: string } | null;
  startedAt: string;
  endedAt: string | null;
}

export type JobEvent = { type: 'progress'; progress: MigrationProgress } | { type: 'done'; job: MigrationJobJson };

/** Progress events reach subscribers at most this often (phase changes always). */
const PROGRESS_INTERVAL_MS = 100;

export class MigrationJob {
  readonly controller = new AbortController();
  status: MigrationStatus = 'running';
  progress: MigrationProgress | null = null;
  result: MigrationResult | null = null;
  error: { code: string; message: string } | null = null;
  readonly startedAt = new Date();
  endedAt: Date | null = null;
  private readonly subscribers = new Set<(e: JobEvent) => void>();
  private lastSent = 0;
  private lastPhase: MigrationPhase | null = null;
  private pendingTimer: ReturnType<typeof setTimeout> | null = null;
  /** Settles when the job has ended (never rejects). */
  readonly done: Promise<void>;
  private resolveDone!: () => void;

  constructor(readonly id: string, readonly vm: string, readonly from: string, readonly to: string, readonly toAddress: string, readonly mode: MigrationMode, readonly gang: string | null = null, readonly tcpCongestion: string | null = null) {
    this.done = new Promise((r) => (this.resolveDone = r));
  }

  onProgress(p: MigrationProgress): void {
    this.progress = p;
    const now = performance.now();
    if (p.phase !== this.lastPhase || now - this.lastSent >= PROGRESS_INTERVAL_MS) {
      this.emitProgress();
    } else if (!this.pendingTimer) {
      this.pendingTimer = setTimeout(() => this.emitProgress(), PROGRESS_INTERVAL_MS - (now - this.lastSent));
      this.pendingTimer.unref();
    }
  }

  private emitProgress(): void {
    if (this.pendingTimer) clearTimeout(this.pendingTimer);
    this.pendingTimer = null;
    const p = this.progress;
    if (!p || this.status !== 'running') return;
    this.lastSent = performance.now();
    this.lastPhase = p.phase;
    for (const s of this.subscribers) s({ type: 'progress', progress: p });
  }

  succeed(result: MigrationResult): void {
    this.result = result;
    this.finish('succeeded');
  }

  fail(e: unknown): void {
    const cancelled = this.controller.signal.aborted;
    // A cancellation surfaces as whatever it cut short (a capped write, an aborted connection):
    // it is reported as what it is, with what it interrupted.
    if (cancelled && !(e instanceof AbortError)) e = new AbortError(`migration cancelled (it ended: ${e instanceof Error ? e.message : String(e)})`, { cause: e });
    this.error = {
      code: e instanceof FerryError ? e.code : 'ERR_INTERNAL',
      message: e instanceof Error ? e.message : String(e),
    };
    this.finish(cancelled ? 'cancelled' : 'failed');
  }

  private finish(status: MigrationStatus): void {
    if (this.status !== 'running') return;
    if (this.pendingTimer) clearTimeout(this.pendingTimer);
    this.pendingTimer = null;
    this.status = status;
    this.endedAt = new Date();
    const json = this.json();
    for (const s of [...this.subscribers]) s({ type: 'done', job: json });
    this.subscribers.clear();
    this.resolveDone();
  }

  /** Calls `fn` with every later event; returns the unsubscribe function. */
  subscribe(fn: (e: JobEvent) => void): () => void {
    this.subscribers.add(fn);
    return () => this.subscribers.delete(fn);
  }

  json(): MigrationJobJson {
    return {
      id: this.id, vm: this.vm, from: this.from, to: this.to, toAddress: this.toAddress, mode: this.mode, gang: this.gang, tcpCongestion: this.tcpCongestion, status: this.status,
      progress: this.progress, report: this.result?.report ?? null, stopReason: this.result?.stopReason ?? null, error: this.error,
      startedAt: this.startedAt.toISOString(), endedAt: this.endedAt?.toISOString() ?? null,
    };
  }
}
