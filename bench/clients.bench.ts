/**
 * What a client of a migrating VM sees: the kv guest under a pipelined load from one client on one
 * TCP connection, moved live between two host agents that run as processes of their own (`ferry
 * host start`, as on two hosts), there by pre-copy and back by post-copy with data reduction, the
 * way the demo does. Each migration reports the longest time the client went without a reply
 * (client-observed downtime: the endpoint holding input, the switchover, the relay, the guest's
 * first quanta on the destination with pages still missing) beside the downtime the engine
 * measured (VM paused → running), median of the runs.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { median, type BenchContext, type BenchSuite } from './harness.js';
import { KvClient } from '../src/node/kv-client.js';

const FERRY = fileURLToPath(new URL('../../bin/ferry.js', import.meta.url));
const KEYS = 20000;

interface Host { child: ChildProcess; url: string }

/** `ferry host start` in a process of its own; resolves with its control URL once it listens. */
function startHost(name: string, stateDir: string): Promise<Host> {
  const child = spawn(process.execPath, [FERRY, 'host', 'start', '--name', name, '--json', '--state-dir', stateDir], { stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    child.once('exit', (code) => reject(new Error(`host ${name} exited (${code})`)));
    createInterface({ input: child.stdout! }).on('line', (line) => {
      const e = JSON.parse(line) as { event?: string; control?: string };
      if (e.event === 'started' && e.control) resolve({ child, url: e.control });
    });
  });
}

async function api<T>(url: string, method: 'GET' | 'POST', body?: unknown): Promise<T> {
  const res = await fetch(url, { method, ...(body === undefined ? {} : { headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) }) });
  const json = (await res.json()) as T & { error?: { message: string } };
  if (!res.ok) throw new Error(`${method} ${url}: HTTP ${res.status} ${json.error?.message ?? ''}`);
  return json;
}

interface Job { id: string; status: string; error?: { message: string }; report?: { downtimeMs: number | null; totalMigrationTimeMs: number | null } }

/** Overwrites and reads keys continuously, 192 requests in flight, until stopped. */
function keepLoading(client: KvClient): { stop: () => Promise<void> } {
  let stopped = false;
  let gen = 0;
  const running = (async () => {
    while (!stopped) {
      gen++;
      const batch: Promise<string>[] = [];
      for (let j = 0; j < 64; j++) {
        const i = Math.floor(Math.random() * KEYS);
        batch.push(client.request(`SET key${i} v${gen}`), client.request(`GET key${i}`), client.request(`GET key${Math.floor(Math.random() * KEYS)}`));
      }
      await Promise.all(batch);
    }
  })();
  running.catch(() => undefined); // a failure surfaces in stop(); the client closing at the end rejects what is in flight
  return { stop: async () => { stopped = true; await running; } };
}

const suite: BenchSuite = {
  name: 'clients',
  description: 'the longest stall a kv client sees across live migrations between two host processes, beside the downtime',
  async run(ctx: BenchContext) {
    const reps = ctx.quick ? 1 : 5;
    const dir = await mkdtemp(join(tmpdir(), 'ferry-bench-clients-'));
    const hosts: Host[] = [];
    let client: KvClient | null = null;
    try {
      hosts.push(...(await Promise.all([startHost('a', dir), startHost('b', dir)])));
      const [a, b] = hosts;
      const vm = await api<{ endpoint: string }>(`${a.url}/v1/vms`, 'POST', { name: 'kv', guest: 'kv', memory: '256MiB', expose: '127.0.0.1:0' });
      const at = vm.endpoint.lastIndexOf(':');
      client = new KvClient(vm.endpoint.slice(0, at), Number(vm.endpoint.slice(at + 1)));
      await client.connect();
      for (let i = 0; i < KEYS; i += 256) await Promise.all(Array.from({ length: Math.min(256, KEYS - i) }, (_, j) => client!.request(`SET key${i + j} v0`)));
      const load = keepLoading(client);
      const plan = [
        { label: 'precopy', from: a, to: b, body: { mode: 'precopy' } },
        { label: 'postcopy', from: b, to: a, body: { mode: 'postcopy', codecs: ['xbzrle', 'dedup', 'zstd'], streams: 2 } },
      ];
      const seen = new Map(plan.map((p) => [p.label, { stalls: [] as number[], downtimes: [] as number[] }]));
      for (let r = 0; r < reps; r++) {
        for (const p of plan) {
          await new Promise((res) => setTimeout(res, 300));
          client.maxStallMs = 0;
          const { id } = await api<{ id: string }>(`${p.from.url}/v1/migrations`, 'POST', { vm: 'kv', to: p.to.url, ...p.body });
          let job: Job;
          do {
            await new Promise((res) => setTimeout(res, 20));
            job = await api<Job>(`${p.from.url}/v1/migrations/${id}`, 'GET');
          } while (job.status === 'running');
          if (job.status !== 'succeeded') throw new Error(`${p.label} migration ${job.status}: ${job.error?.message ?? ''}`);
          await new Promise((res) => setTimeout(res, 200)); // the client catches up
          const s = seen.get(p.label)!;
          s.stalls.push(client.maxStallMs);
          s.downtimes.push(job.report?.downtimeMs ?? NaN);
          ctx.log(`${p.label} run ${r}: client stall ${client.maxStallMs.toFixed(1)} ms, downtime ${job.report?.downtimeMs?.toFixed(1)} ms, TMT ${job.report?.totalMigrationTimeMs?.toFixed(0)} ms`);
        }
      }
      await load.stop();
      for (const p of plan) {
        const s = seen.get(p.label)!;
        const how = p.label === 'precopy' ? 'a → b, pre-copy' : 'b → a (home), post-copy with xbzrle, dedup, zstd over 2 streams';
        ctx.report({ metric: `kv-256MiB.${p.label}.client-stall`, value: median(s.stalls), unit: 'ms', note: `${how}; ${KEYS} keys, 192 requests in flight on one connection; runs ${s.stalls.map((x) => x.toFixed(0)).join(', ')} ms` });
        ctx.report({ metric: `kv-256MiB.${p.label}.downtime`, value: median(s.downtimes), unit: 'ms', note: `the same migrations' downtime (VM paused → running): ${s.downtimes.map((x) => x.toFixed(1)).join(', ')} ms` });
      }
    } finally {
      await client?.close().catch(() => undefined);
      for (const h of hosts) h.child.kill();
      await rm(dir, { recursive: true, force: true });
    }
  },
};
export default suite;
