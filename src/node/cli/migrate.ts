/**
 * `ferry migrate <vm…> --to <host> --mode …`: asks each VM's host agent to migrate it live (several
 * at once, optionally as a gang), follows the migrations' event streams with progress bars, and
 * prints each report with how its pages travelled (or JSON).
 */
import { Command, Option, InvalidArgumentError as CommanderArgError } from 'commander';
import cliProgress from 'cli-progress';
import { randomBytes } from 'node:crypto';
import { FerryError } from '../../core/errors.js';
import { CODEC_NAMES, type CodecName } from '../../core/engine/codecs.js';
import type { MigrationProgress } from '../../core/engine/types.js';
import { formatReportTable, type TransferReport } from '../../core/metrics.js';
import { describeStopReason } from '../../core/policy/reasons.js';
import { MIGRATION_MODES } from '../../core/protocol/frames.js';
import { formatBytes, formatDuration, parseDuration } from '../../core/units.js';
import { MAX_MIGRATION_STREAMS } from '../agent/agent.js';
import type { MigrationJobJson } from '../agent/migrations.js';
import { findHost, stateHome } from './registry.js';
import { callAgent, findVm } from './vms.js';
import { bandwidthText, codecList, flag, gangName, intInRange, sizeText } from './args.js';

/** A request to the VMs' host agent at `base`. */
function api<T>(base: string, method: string, path: string, body?: unknown): Promise<T> {
  return callAgent<T>(base, 'the host agent', method, path, body);
}

/** `--to`: a control URL, a migration address, or the name of a host registered here. */
async function resolveTo(home: string, to: string): Promise<string> {
  if (/^https?:\/\//i.test(to)) return to;
  if (/:\d{1,5}$/.test(to)) return to;
  const h = await findHost(home, to);
  if (!h) throw new FerryError('ERR_NOT_FOUND', `no host named '${to}' is running (start one with: ferry host start --name ${to}), and '${to}' is neither a URL nor host:port`);
  return h.control;
}

/**
 * An ETA that never goes up. A fresh estimate below the last one shown replaces it; one above it
 * holds the display where it is until the estimates come down to it (estimates swing with the
 * dirty rate; the display should not). Counting down through such an estimate instead locked in
 * any dip: in a 9.5 s pre-copy whose forecasts of its end were within 3 % from the first second
 * on, one forecast 270 ms short made the countdown run out 270 ms before the migration ended.
 * Without an estimate (none yet, or none this time) it counts down from the last one shown.
 */
export class MonotonicEta {
  private last: { eta: number; at: number } | null = null;

  next(estimateMs: number | null, nowMs: number): number | null {
    const counted = this.last ? Math.max(0, this.last.eta - (nowMs - this.last.at)) : null;
    const known = estimateMs !== null && Number.isFinite(estimateMs) && estimateMs >= 0;
    const eta = known ? (this.last ? Math.min(estimateMs, this.last.eta) : estimateMs) : counted;
    if (eta === null) return null;
    this.last = { eta, at: nowMs };
    return eta;
  }
}

/** Fraction done, never going back (pre-copy rounds re-send pages; the bar should not shrink). */
export class MonotonicFraction {
  private best = 0;

  /**
   * Time elapsed against time left, where the engine forecasts it (MigrationProgress.etaMs). While
   * pre-copy has no forecast, or only a lower bound (the first pass, before anything is known of
   * the dirtying), nothing says how much follows the pass: it counts as half the work.
   */
  next(p: MigrationProgress): number {
    const total = p.pagesSent + p.pagesRemaining;
    const f = p.phase === 'complete' ? 1
      : p.etaAtLeast || (p.etaMs === null && p.phase === 'precopy') ? (total > 0 ? (0.5 * p.pagesSent) / total : 0)
        : p.etaMs !== null && p.elapsedMs + p.etaMs > 0 ? p.elapsedMs / (p.elapsedMs + p.etaMs)
          : total > 0 ? p.pagesSent / total : 0;
    this.best = Math.max(this.best, Math.min(1, f));
    return this.best;
  }
}

/** Parses a Server-Sent Events body into (event, data) pairs as they arrive. */
async function* sse(body: ReadableStream<Uint8Array>): AsyncGenerator<{ event: string; data: string }> {
  const dec = new TextDecoder();
  let buf = '';
  const reader = body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    for (let i = buf.indexOf('\n\n'); i >= 0; i = buf.indexOf('\n\n')) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      let event = 'message';
      const data: string[] = [];
      for (const line of block.split('\n')) {
        if (line.startsWith('event: ')) event = line.slice(7);
        else if (line.startsWith('data: ')) data.push(line.slice(6));
      }
      yield { event, data: data.join('\n') };
    }
  }
}

interface MigrateOpts {
  to: string;
  mode: string;
  downtime?: number;
  fixedDowntime?: number | 'auto';
  bandwidth?: string;
  codecs?: CodecName[];
  streams?: number;
  compression?: 'auto' | 'always';
  xbzrleCache?: string;
  /** false with --no-fault-channel. */
  faultChannel: boolean;
  /** --gang alone: true (a name is generated); --gang <name>: that name. */
  gang?: string | true;
  json?: boolean;
  host?: string;
  stateDir?: string;
}

async function follow(control: string, id: string, onProgress: (p: MigrationProgress) => void): Promise<MigrationJobJson> {
  const res = await fetch(`${control}/v1/migrations/${encodeURIComponent(id)}/events`).catch(() => null);
  if (res?.ok && res.body) {
    try {
      for await (const ev of sse(res.body)) {
        if (ev.event === 'progress') onProgress(JSON.parse(ev.data) as MigrationProgress);
        else if (ev.event === 'done') return JSON.parse(ev.data) as MigrationJobJson;
      }
    } catch {
      // the stream broke: ask for the outcome below
    }
  }
  for (;;) {
    const j = await api<MigrationJobJson>(control, 'GET', `/v1/migrations/${encodeURIComponent(id)}`);
    if (j.status !== 'running') return j;
    await new Promise((r) => setTimeout(r, 200));
  }
}

const finite = (_k: string, v: unknown) => (typeof v === 'number' && !Number.isFinite(v) ? null : v);

/** The transfer section of a report: how the pages travelled and what the codecs saved. */
export function formatTransfer(t: TransferReport, tcpCongestion: string | null = null): string {
  const s = t.codecStats;
  const n = (k: string) => s[k] ?? 0;
  const rows: [string, string][] = [
    ['streams', `${t.streams}${t.faultChannel ? ' + fault channel' : ''}`],
    ...(tcpCongestion ? [['tcp congestion', `${tcpCongestion} (the sending host's)`] as [string, string]] : []),
    ['codecs', t.codecs.length ? t.codecs.join(', ') : 'none (zero pages only)'],
  ];
  if (t.gang !== null) rows.push(['gang', t.gang]);
  rows.push(['page bytes → encoded', `${formatBytes(t.pageBytes)} → ${formatBytes(t.encodedBytes)} (${t.reduction.toFixed(2)}× reduction)`]);
  if (t.codecs.includes('xbzrle')) rows.push(['xbzrle', `hits ${n('page.xbzrle.hits')}, misses ${n('page.xbzrle.misses')}, overflows ${n('page.xbzrle.overflows')}`]);
  if (t.codecs.includes('dedup')) rows.push(['dedup', `refs ${n('page.dedup.refs')}, defs ${n('page.dedup.defs')}`]);
  if (t.compression) {
    const c = t.compression;
    rows.push(['compression', `${c.on ? 'on' : 'off'}, ${n('compressedBatches')} batches compressed, ${n('plainBatches')} plain, flips ${c.flips}${c.speedup === null ? '' : `, speedup ${c.speedup.toFixed(2)}×`}`]);
  }
  const w = Math.max(...rows.map(([k]) => k.length));
  return rows.map(([k, v]) => `${k.padEnd(w)}  ${v}`).join('\n') + '\n';
}

/** One row per migration: how each VM of a multi-VM call fared. */
export function formatSummary(results: readonly MigrateResult[]): string {
  const ms = (v: number | null | undefined) => (v === null || v === undefined ? '—' : formatDuration(v));
  const rows = [['vm', 'status', 'total', 'downtime', 'on the wire', 'reduction', 'verified']];
  for (const r of results) {
    const rep = r.job?.report ?? null;
    rows.push([
      r.vm, r.job?.status ?? 'not started', ms(rep?.totalMigrationTimeMs), ms(rep?.downtimeMs), rep ? formatBytes(rep.bytes.wire) : '—',
      rep?.transfer ? `${rep.transfer.reduction.toFixed(2)}×` : '—', rep ? (rep.verified === null ? '—' : rep.verified ? 'yes' : 'NO') : '—',
    ]);
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows.map((r) => r.map((c, i) => c.padEnd(widths[i])).join('  ').trimEnd()).join('\n') + '\n';
}

export interface MigrateResult {
  vm: string;
  /** The migration as the agent reports it at its end; null when it could not be started. */
  job: MigrationJobJson | null;
  /** Why it could not be started. */
  error: { code: string; message: string } | null;
}

const succeeded = (r: MigrateResult) => r.job?.status === 'succeeded' && r.job.report?.verified !== false;

/**
 * Migrates `vms` to `o.to`: finds every VM's agent first (nothing starts if one is missing), starts
 * all the migrations, follows them together, then reports each. With `--gang` they share a gang.
 */
async function migrate(vms: string[], o: MigrateOpts): Promise<number> {
  const home = stateHome(o.stateDir);
  const controls = await Promise.all(vms.map(async (vm) => (o.host ?? (await findVm(home, vm, 'give its agent with --host <control URL>')).control).replace(/\/+$/, '')));
  const to = await resolveTo(home, o.to);
  const gang = o.gang === true ? `gang-${randomBytes(4).toString('hex')}` : o.gang;
  const body = {
    to, mode: o.mode,
    ...(o.downtime !== undefined ? { downtimeMs: o.downtime } : {}),
    ...(o.fixedDowntime !== undefined ? { fixedDowntimeMs: o.fixedDowntime } : {}),
    ...(o.bandwidth !== undefined ? { bandwidth: o.bandwidth } : {}),
    ...(o.codecs !== undefined ? { codecs: o.codecs } : {}),
    ...(o.streams !== undefined ? { streams: o.streams } : {}),
    ...(o.compression !== undefined ? { compression: o.compression } : {}),
    ...(o.xbzrleCache !== undefined ? { xbzrleCache: o.xbzrleCache } : {}),
    ...(o.faultChannel === false ? { faultChannel: false } : {}),
    ...(gang !== undefined ? { gang } : {}),
  };
  // All start before any is followed, so a gang's members run together.
  const started = await Promise.all(vms.map(async (vm, i) => {
    try {
      const { id } = await api<{ id: string }>(controls[i], 'POST', '/v1/migrations', { vm, ...body });
      return { vm, id, error: null };
    } catch (e) {
      const error = { code: e instanceof FerryError ? e.code : 'ERR_INTERNAL', message: (e as Error).message };
      return { vm, id: null, error };
    }
  }));
  // Bars only on a terminal: cli-progress draws nothing elsewhere until its last frame, and that
  // frame came out with the placeholders of a bar whose payload it never took ({phase} round {round}).
  const bars = o.json || !process.stderr.isTTY ? null : new cliProgress.MultiBar({
    format: `${vms.length > 1 ? '{vm} ' : ''}{bar} {percentage}% | {phase} round {round} | sent {sent} | remaining {remaining} | dirty {dirty}/s | ETA {etaText}`,
    stream: process.stderr,
    hideCursor: true,
    clearOnComplete: false,
  }, cliProgress.Presets.shades_classic);
  const width = Math.max(...vms.map((v) => v.length));
  const results: MigrateResult[] = await Promise.all(started.map(async (s, i) => {
    if (s.id === null) return { vm: s.vm, job: null, error: s.error };
    // A lower-bound ETA (≥: the first pass before anything is known of the dirtying) counts down
    // on its own, so that the forecast that follows may be longer.
    const passEta = new MonotonicEta();
    const eta = new MonotonicEta();
    const frac = new MonotonicFraction();
    let bar: cliProgress.SingleBar | null = null;
    const job = await follow(controls[i], s.id, (p) => {
      if (!bars) return;
      const remainingBytes = p.pagesRemaining * 4096;
      const atLeast = p.etaAtLeast;
      const e = (atLeast ? passEta : eta).next(p.etaMs, p.elapsedMs);
      const payload = {
        vm: s.vm.padEnd(width), phase: p.phase, round: p.round, sent: formatBytes(p.bytesSent), remaining: formatBytes(remainingBytes),
        // A countdown that ran out before the migration did was wrong: unknown, not "0".
        dirty: formatBytes(p.dirtyRateBytesPerSec), etaText: e === null || e <= 0 ? '—' : `${atLeast ? '≥ ' : ''}${formatDuration(e)}`,
      };
      const v = Math.round(frac.next(p) * 100);
      if (!bar) bar = bars.create(100, v, payload);
      else bar.update(v, payload);
    });
    if (bar && job.status === 'succeeded') (bar as cliProgress.SingleBar).update(100);
    return { vm: s.vm, job, error: null };
  }));
  bars?.stop();

  if (o.json) {
    const json = results.map((r) => r.job ?? { vm: r.vm, status: 'failed', report: null, error: r.error });
    console.log(JSON.stringify(vms.length === 1 ? json[0] : json, finite));
  } else {
    for (const r of results) {
      const job = r.job;
      if (job?.status !== 'succeeded' || !job.report) continue;
      if (vms.length > 1) console.log('');
      console.log(`${r.vm}: ${job.from} → ${job.to} (${job.mode}) ${succeeded(r) ? 'done' : 'done, but NOT verified'}${job.stopReason ? `; ${describeStopReason(job.stopReason, job.mode)}` : ''}`);
      console.log(formatReportTable(job.report));
      if (job.report.transfer) console.log(formatTransfer(job.report.transfer, job.tcpCongestion));
    }
    if (vms.length > 1) console.log(`${gang !== undefined ? `gang ${gang}: ` : ''}${results.filter(succeeded).length} of ${vms.length} migrated\n${formatSummary(results)}`);
  }
  for (const r of results) {
    if (succeeded(r)) continue;
    const err = r.job?.error ?? r.error;
    if (err) console.error(`ferry: migration of ${r.vm} ${r.job?.status ?? 'not started'}: ${err.message} (${err.code})`);
  }
  return results.every(succeeded) ? 0 : 1;
}

export function registerMigrateCommand(program: Command): void {
  program.command('migrate')
    .description('move running VMs to another host, live; their clients keep their connections')
    .argument('<vm...>', 'names of running VMs (several migrate at once; with --gang, together)')
    .requiredOption('--to <host>', 'destination: a host name registered here, its control URL, or its migration address (host:port)')
    .addOption(new Option('--mode <mode>', 'technique').choices([...MIGRATION_MODES]).makeOptionMandatory())
    .option('--downtime <duration>', 'pre-copy downtime budget, e.g. 300ms', flag((v) => {
      const ms = parseDuration(v, 'downtime');
      if (!(ms > 0)) throw new Error('downtime must be positive');
      return ms;
    }))
    .option('--fixed-downtime <duration|auto>', "pre-copy: the downtime's fixed part (the pause, state, round trips, the destination's start) its stop condition adds to dirty pages ÷ bandwidth, e.g. 3ms, or auto: what that missed in the source host's latest migrations to the same destination (default 0; the report shows the estimate beside the downtime)", flag((v) => (v === 'auto' ? 'auto' as const : parseDuration(v, 'fixed downtime'))))
    .option('--bandwidth <rate>', "cap on each VM's migration (all its streams together), e.g. 1Gbit, 100Mbit, 50MB/s", bandwidthText)
    .option('--codecs <list>', `page codecs to offer beyond zero pages, comma-separated (${CODEC_NAMES.join(', ')}), or none (default)`, codecList)
    .option('--streams <n>', `parallel data streams per VM, 1–${MAX_MIGRATION_STREAMS} (default set by the source host: for pre-copy and hybrid one per core, at most 4, where each sends from a thread of its own (TCP on Linux), else one per four cores, as for post-copy; the destination may grant fewer)`, intInRange('--streams', 1, MAX_MIGRATION_STREAMS))
    .option('--xbzrle-cache <size>', 'XBZRLE page cache per VM, e.g. 128MiB (default 64MiB)', sizeText('--xbzrle-cache'))
    .addOption(new Option('--compression <when>', 'lz4/zstd: auto turns compression off when it slows the link (default); always never does').choices(['auto', 'always']))
    .option('--no-fault-channel', 'post-copy/hybrid: send page requests on the main connection instead of one of their own')
    .option('--gang [name]', 'migrate the VMs together, sharing one de-duplication index (implies dedup); the name defaults to a generated gang-<random>', gangName)
    .option('--host <url>', "control URL of the VMs' host agent (default: find each VM's registration)", (v: string) => {
      if (!/^https?:\/\/[^/]+/i.test(v)) throw new CommanderArgError(`--host wants a control URL like http://127.0.0.1:7000, got '${v}'`);
      return v;
    })
    .option('--state-dir <dir>', 'where hosts and VMs register (default $FERRY_HOME or ~/.ferry)')
    .option('--json', 'print the outcome as JSON (one object for one VM, an array for several) instead of progress bars and tables')
    .action(async (vms: string[], o: MigrateOpts, cmd: Command) => {
      const twice = vms.find((v, i) => vms.indexOf(v) !== i);
      if (twice !== undefined) cmd.error(`error: VM '${twice}' is named twice`, { code: 'ferry.duplicateVm' });
      process.exitCode = await migrate(vms, o);
    });
}
