/**
 * `ferry migrate <vm> --to <host> --mode …`: asks the VM's host agent to migrate it live, follows
 * the migration's event stream with a progress bar, and prints the report (or one JSON object).
 */
import { Command, Option, InvalidArgumentError as CommanderArgError } from 'commander';
import cliProgress from 'cli-progress';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { FerryError } from '../../core/errors.js';
import type { MigrationProgress } from '../../core/engine/types.js';
import { formatReportTable } from '../../core/metrics.js';
import { MIGRATION_MODES } from '../../core/protocol/frames.js';
import { formatBytes, formatDuration, parseDuration } from '../../core/units.js';
import type { MigrationJobJson } from '../agent/migrations.js';
import { findHost, listHosts, stateHome } from './host.js';
import { bandwidthText, flag } from './args.js';

interface ApiError { error?: { code: string; message: string } }

async function api<T>(base: string, method: string, path: string, body?: unknown): Promise<T> {
  const res = await fetch(`${base}${path}`, {
    method,
    headers: body === undefined ? {} : { 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  }).catch((e: Error) => {
    throw new FerryError('ERR_CONTROL_UNREACHABLE', `cannot reach the host agent at ${base}: ${e.message}`, { cause: e });
  });
  const data = (await res.json().catch(() => ({}))) as T & ApiError;
  if (!res.ok) throw new FerryError(data.error?.code ?? 'ERR_CONTROL', data.error?.message ?? `HTTP ${res.status} from ${base}${path}`);
  return data;
}

/** `--to`: a control URL, a migration address, or the name of a host registered here. */
async function resolveTo(home: string, to: string): Promise<string> {
  if (/^https?:\/\//i.test(to)) return to;
  if (/:\d{1,5}$/.test(to)) return to;
  const h = await findHost(home, to);
  if (!h) throw new FerryError('ERR_NOT_FOUND', `no host named '${to}' is running (start one with: ferry host start --name ${to}), and '${to}' is neither a URL nor host:port`);
  return h.control;
}

/** The control URL of the agent running `vm`: its `vm run` registration, else the host that lists it. */
async function findVmHost(home: string, vm: string): Promise<string> {
  try {
    const reg = JSON.parse(await readFile(join(home, 'vms', `${vm}.json`), 'utf8')) as { pid: number; control: string };
    process.kill(reg.pid, 0);
    return reg.control;
  } catch {
    // not a `vm run` VM, or its process is gone
  }
  for (const h of await listHosts(home)) {
    const res = await fetch(`${h.control}/v1/vms/${encodeURIComponent(vm)}`).catch(() => null);
    if (res?.ok) return h.control;
  }
  throw new FerryError('ERR_NOT_FOUND', `no running host agent has a VM named '${vm}' (give its agent with --host <control URL>)`);
}

/**
 * An ETA that only counts down: a fresh estimate may lower it, never raise it above the last one
 * minus the time since (estimates swing with the dirty rate; the display should not).
 */
export class MonotonicEta {
  private last: { eta: number; at: number } | null = null;

  next(estimateMs: number | null, nowMs: number): number | null {
    if (estimateMs === null || !Number.isFinite(estimateMs) || estimateMs < 0) return this.last ? Math.max(0, this.last.eta - (nowMs - this.last.at)) : null;
    const eta = this.last ? Math.min(estimateMs, Math.max(0, this.last.eta - (nowMs - this.last.at))) : estimateMs;
    this.last = { eta, at: nowMs };
    return eta;
  }
}

/** Fraction done, never going back (pre-copy rounds re-send pages; the bar should not shrink). */
export class MonotonicFraction {
  private best = 0;

  next(p: MigrationProgress): number {
    const total = p.pagesSent + p.pagesRemaining;
    const f = p.phase === 'complete' ? 1 : total > 0 ? p.pagesSent / total : 0;
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

interface MigrateOpts { to: string; mode: string; downtime?: number; bandwidth?: string; json?: boolean; host?: string; stateDir?: string }

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

async function migrate(vm: string, o: MigrateOpts): Promise<number> {
  const home = stateHome(o.stateDir);
  const control = (o.host ?? (await findVmHost(home, vm))).replace(/\/+$/, '');
  const to = await resolveTo(home, o.to);
  const { id } = await api<{ id: string }>(control, 'POST', '/v1/migrations', {
    vm, to, mode: o.mode,
    ...(o.downtime !== undefined ? { downtimeMs: o.downtime } : {}),
    ...(o.bandwidth !== undefined ? { bandwidth: o.bandwidth } : {}),
  });
  const bar = o.json ? null : new cliProgress.SingleBar({
    format: '{bar} {percentage}% | {phase} round {round} | sent {sent} | remaining {remaining} | dirty {dirty}/s | ETA {etaText}',
    stream: process.stderr,
    hideCursor: true,
    clearOnComplete: false,
  }, cliProgress.Presets.shades_classic);
  const eta = new MonotonicEta();
  const frac = new MonotonicFraction();
  let started = false;
  const job = await follow(control, id, (p) => {
    if (!bar) return;
    const remainingBytes = p.pagesRemaining * 4096;
    const e = eta.next(p.bandwidthBytesPerSec > 0 ? (remainingBytes / p.bandwidthBytesPerSec) * 1000 : null, p.elapsedMs);
    const payload = {
      phase: p.phase, round: p.round, sent: formatBytes(p.bytesSent), remaining: formatBytes(remainingBytes),
      dirty: formatBytes(p.dirtyRateBytesPerSec), etaText: e === null ? '—' : formatDuration(e),
    };
    const v = Math.round(frac.next(p) * 100);
    if (!started) {
      bar.start(100, v, payload);
      started = true;
    } else bar.update(v, payload);
  });
  if (bar && started) {
    if (job.status === 'succeeded') bar.update(100);
    bar.stop();
  }
  const ok = job.status === 'succeeded' && job.report?.verified !== false;
  if (o.json) {
    console.log(JSON.stringify(job, (_k, v: unknown) => (typeof v === 'number' && !Number.isFinite(v) ? null : v)));
  } else if (job.status === 'succeeded' && job.report) {
    console.log(`${vm}: ${job.from} → ${job.to} (${job.mode}) ${ok ? 'done' : 'done, but NOT verified'}${job.stopReason ? `; ${job.stopReason}` : ''}`);
    console.log(formatReportTable(job.report));
  }
  if (!ok && job.error) console.error(`ferry: migration of ${vm} ${job.status}: ${job.error.message} (${job.error.code})`);
  return ok ? 0 : 1;
}

export function registerMigrateCommand(program: Command): void {
  program.command('migrate')
    .description('move a running VM to another host, live; its clients keep their connections')
    .argument('<vm>', 'name of a running VM')
    .requiredOption('--to <host>', 'destination: a host name registered here, its control URL, or its migration address (host:port)')
    .addOption(new Option('--mode <mode>', 'technique').choices([...MIGRATION_MODES]).makeOptionMandatory())
    .option('--downtime <duration>', 'pre-copy downtime budget, e.g. 300ms', flag((v) => {
      const ms = parseDuration(v, 'downtime');
      if (!(ms > 0)) throw new Error('downtime must be positive');
      return ms;
    }))
    .option('--bandwidth <rate>', 'cap the migration stream, e.g. 1Gbit, 100Mbit, 50MB/s', bandwidthText)
    .option('--host <url>', "control URL of the VM's host agent (default: find the VM's registration)", (v: string) => {
      if (!/^https?:\/\/[^/]+/i.test(v)) throw new CommanderArgError(`--host wants a control URL like http://127.0.0.1:7000, got '${v}'`);
      return v;
    })
    .option('--state-dir <dir>', 'where hosts and VMs register (default $FERRY_HOME or ~/.ferry)')
    .option('--json', 'print one JSON object (status, report) instead of the progress bar and table')
    .action(async (vm: string, o: MigrateOpts) => {
      process.exitCode = await migrate(vm, o);
    });
}
