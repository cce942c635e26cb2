/**
 * `ferry demo`: two host agents, each a process of its own (`ferry host start`, driven through
 * its control API, as two hosts would be), the kv guest on host a with a client endpoint, a
 * client driving load through it (pipelined SET/GET, every reply checked), a live pre-copy
 * migration a → b and a post-copy migration back b → a while the client keeps its one TCP
 * connection, and a report per migration (including the longest stall the client saw).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FerryError } from '../../core/errors.js';
import type { MigrationMode } from '../../core/protocol/frames.js';
import type { CodecName } from '../../core/engine/codecs.js';
import type { HistogramSummary, TransferReport } from '../../core/metrics.js';
import { formatBytes, formatDuration } from '../../core/units.js';
import { migrateVia, startHostProcesses, type HostProcess } from '../host-process.js';
import { KvClient } from '../kv-client.js';

export interface DemoOptions { json: boolean; keys?: number }

interface MigrationSummary {
  from: string;
  to: string;
  mode: MigrationMode;
  status: string;
  error: { code: string; message: string } | null;
  totalMigrationTimeMs: number | null;
  downtimeMs: number | null;
  clientStallMs: number;
  wireBytes: number | null;
  rounds: number | null;
  postcopyFaults: number | null;
  /** How long the vCPU waited for those faults, as the destination measured it (null without faults). */
  faultWaitMs: HistogramSummary | null;
  /** How the pages travelled (streams, codecs, what they saved). */
  transfer: string | null;
  stopReason: string | null;
  verified: boolean;
}

function describeTransfer(t: TransferReport): string {
  const how = `${t.streams} stream${t.streams > 1 ? 's' : ''}${t.faultChannel ? ' + fault channel' : ''}`;
  if (t.codecs.length === 0) return `${how}, zero pages as flags`;
  return `${how}, ${t.codecs.join('+')}: ${formatBytes(t.pageBytes)} of pages in ${formatBytes(t.encodedBytes)} (${t.reduction.toFixed(2)}×)`;
}

function parseEndpoint(vm: string, ep: string | null | undefined): { host: string; port: number } {
  if (!ep) throw new FerryError('ERR_DEMO', `VM ${vm} has no endpoint`);
  const i = ep.lastIndexOf(':');
  return { host: ep.slice(0, i), port: Number(ep.slice(i + 1)) };
}

const valueOf = (i: number, gen = 0) => `value-${i}-${gen}-${'x'.repeat(24)}`;

/** Continuous pipelined load: overwrite keys and read others back, checking every reply. */
class Load {
  readonly expected = new Map<number, string>();
  requests = 0;
  wrong: string[] = [];
  private stopped = false;
  private running: Promise<void> | null = null;
  private gen = 0;

  constructor(private readonly client: KvClient, private readonly keys: number) {}

  async preload(): Promise<void> {
    for (let i = 0; i < this.keys; i += 256) {
      await Promise.all(Array.from({ length: Math.min(256, this.keys - i) }, (_, j) => this.set(i + j, valueOf(i + j))));
    }
  }

  private async set(i: number, v: string): Promise<void> {
    this.expected.set(i, v);
    const r = await this.client.request(`SET key${i} ${v}`);
    this.requests++;
    if (r !== 'OK') this.note(`SET key${i} → '${r}'`);
  }

  private async check(i: number): Promise<void> {
    const want = this.expected.get(i);
    const r = await this.client.request(`GET key${i}`);
    this.requests++;
    if (r !== `VALUE ${want}`) this.note(`GET key${i} → '${r.slice(0, 60)}', expected '${want?.slice(0, 40)}'`);
  }

  private note(m: string): void {
    if (this.wrong.length < 20) this.wrong.push(m);
    else this.wrong.length++;
  }

  start(): void {
    this.running = (async () => {
      while (!this.stopped) {
        this.gen++;
        const batch: Promise<void>[] = [];
        for (let j = 0; j < 64; j++) {
          const i = Math.floor(Math.random() * this.keys);
          // A SET then a GET of the same key in one pipeline: the GET must see the new value.
          batch.push(this.set(i, valueOf(i, this.gen)), this.check(i));
          batch.push(this.check(Math.floor(Math.random() * this.keys)));
        }
        await Promise.all(batch);
      }
    })();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await this.running;
  }

  /** Reads every key back. */
  async verifyAll(): Promise<number> {
    const before = this.wrong.length;
    for (let i = 0; i < this.keys; i += 256) {
      await Promise.all(Array.from({ length: Math.min(256, this.keys - i) }, (_, j) => this.check(i + j)));
    }
    return this.wrong.length - before;
  }
}

export async function runDemo(opts: DemoOptions): Promise<number> {
  const keys = opts.keys ?? 20000;
  const dir = await mkdtemp(join(tmpdir(), 'ferry-demo-'));
  const say = (m: string) => { if (!opts.json) console.log(m); };
  let up: HostProcess[] = [];
  let client: KvClient | null = null;
  try {
    up = await startHostProcesses(['a', 'b'], dir);
    const hosts = { a: up[0], b: up[1] };
    say('ferry demo: two hosts (a, b), each a process of its own; the kv guest on a; a client on one TCP connection; live migration there and back');
    const t0 = performance.now();
    const created = await hosts.a.api<{ endpoint?: string | null }>('POST', '/v1/vms', { name: 'kv', guest: 'kv', memory: '256MiB', expose: '127.0.0.1:0' });
    const ep = parseEndpoint('kv', created.endpoint);
    say(`  booted kv on host a in ${formatDuration(performance.now() - t0)}; endpoint ${ep.host}:${ep.port} (it stays on a)`);

    client = new KvClient(ep.host, ep.port);
    await client.connect();
    const load = new Load(client, keys);
    const tLoad = performance.now();
    await load.preload();
    say(`  client stored ${keys} keys in ${formatDuration(performance.now() - tLoad)}; now overwriting and reading keys continuously`);
    load.start();
    await new Promise((r) => setTimeout(r, 300));

    // There plainly; back with data reduction (de-duplication, zstd) over two streams, page
    // requests on a channel of their own. (XBZRLE would add nothing: post-copy sends each page once.)
    const plan: ['a' | 'b', 'a' | 'b', MigrationMode, CodecName[], number][] = [
      ['a', 'b', 'precopy', [], 1],
      ['b', 'a', 'postcopy', ['dedup', 'zstd'], 2],
    ];
    const results: MigrationSummary[] = [];
    for (const [from, to, mode, codecs, streams] of plan) {
      say(`  migrating kv ${from} → ${to} (${mode}${codecs.length ? `, codecs ${codecs.join('+')}` : ''}, ${streams} stream${streams > 1 ? 's' : ''}) under load…`);
      client.maxStallMs = 0;
      const j = await migrateVia(hosts[from], { vm: 'kv', to: hosts[to].url, mode, codecs, streams });
      const stall = client.maxStallMs;
      const r = j.report;
      results.push({
        from, to, mode, status: j.status, error: j.error,
        totalMigrationTimeMs: r?.totalMigrationTimeMs ?? null, downtimeMs: r?.downtimeMs ?? null, clientStallMs: stall,
        wireBytes: r?.bytes.wire ?? null, rounds: r?.rounds.length ?? null, postcopyFaults: r?.postcopy.faults ?? null, faultWaitMs: r?.postcopy.vcpuWaitMs ?? null,
        transfer: r?.transfer ? describeTransfer(r.transfer) : null,
        stopReason: j.stopReason, verified: j.status === 'succeeded' && r?.verified === true,
      });
      if (j.status !== 'succeeded') {
        say(`    FAILED: ${j.error?.message} (${j.error?.code})`);
        break;
      }
      say(`    done in ${formatDuration(r?.totalMigrationTimeMs ?? 0)}; kv now runs on ${to}; the client never reconnected`);
      await new Promise((res) => setTimeout(res, 300));
    }
    await load.stop();
    const missing = await load.verifyAll();
    await client.close();
    client = null;
    const requests = load.requests;
    const wrong = load.wrong.length;
    const ok = wrong === 0 && results.length === plan.length && results.every((m) => m.verified);
    if (opts.json) {
      console.log(JSON.stringify({ guest: 'kv', keys, requests, wrongReplies: wrong, keysWrongAtEnd: missing, migrations: results, verified: ok }));
    } else {
      const ms = (v: number | null) => (v === null ? '—' : formatDuration(v));
      for (const [i, m] of results.entries()) {
        console.log('');
        console.log(`  migration ${i + 1}: ${m.from} → ${m.to}, ${m.mode}${m.stopReason && m.stopReason !== m.mode ? ` (${m.stopReason})` : ''}`);
        console.log(`    total migration time     ${ms(m.totalMigrationTimeMs)}`);
        console.log(`    downtime (VM paused)     ${ms(m.downtimeMs)}`);
        console.log(`    client-observed stall    ${formatDuration(m.clientStallMs)}`);
        console.log(`    bytes on the wire        ${m.wireBytes === null ? '—' : formatBytes(m.wireBytes)}`);
        const waits = m.faultWaitMs ? `, the vCPU waited p50 ${formatDuration(m.faultWaitMs.p50 ?? 0)}, p99 ${formatDuration(m.faultWaitMs.p99 ?? 0)}` : '';
        console.log(`    pre-copy rounds          ${m.rounds ?? '—'}${m.postcopyFaults ? `; post-copy faults ${m.postcopyFaults}${waits}` : ''}`);
        if (m.transfer) console.log(`    pages travelled          ${m.transfer}`);
        console.log(`    verified                 ${m.verified ? 'yes' : `NO${m.error ? ` (${m.error.code}: ${m.error.message})` : ''}`}`);
      }
      console.log('');
      console.log(`  client: ${requests} requests on one connection, ${wrong === 0 ? 'every reply correct' : `${wrong} WRONG OR MISSING replies`}; all ${keys} keys read back ${missing === 0 ? 'intact' : `— ${missing} wrong`}`);
      for (const w of load.wrong.slice(0, 5)) if (w) console.log(`    ${w}`);
      console.log(`  ${ok ? 'OK' : 'FAILED'}`);
    }
    return ok ? 0 : 1;
  } finally {
    await client?.close().catch(() => undefined);
    await Promise.all(up.map((h) => h.stop()));
    await rm(dir, { recursive: true, force: true });
  }
}
