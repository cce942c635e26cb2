/**
 * What a client of a migrating VM sees: the kv guest under a pipelined load from one client on one
 * TCP connection, moved live between two host agents that run as processes of their own (`ferry
 * host start`, as on two hosts), there by pre-copy and back by post-copy with data reduction, the
 * way the demo does. Each migration reports the longest time the client went without a reply
 * (client-observed downtime: the endpoint holding input, the switchover, the relay, the guest's
 * first quanta on the destination with pages still missing) beside the downtime the engine
 * measured (VM paused → running), median of the runs.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { median, settle, type BenchContext, type BenchSuite } from './harness.js';
import { KvClient } from '../src/node/kv-client.js';
import { migrateVia, startHostProcesses, type HostProcess } from '../src/node/host-process.js';

const KEYS = 20000;
/** How long the load runs with no migration for its own longest gap between replies, ms. */
const QUIET_WINDOW_MS = 300;

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
    let hosts: HostProcess[] = [];
    let client: KvClient | null = null;
    try {
      hosts = await startHostProcesses(['a', 'b'], dir);
      const [a, b] = hosts;
      const vm = await a.api<{ endpoint: string }>('POST', '/v1/vms', { name: 'kv', guest: 'kv', memory: '256MiB', expose: '127.0.0.1:0' });
      const at = vm.endpoint.lastIndexOf(':');
      client = new KvClient(vm.endpoint.slice(0, at), Number(vm.endpoint.slice(at + 1)));
      await client.connect();
      for (let i = 0; i < KEYS; i += 256) await Promise.all(Array.from({ length: Math.min(256, KEYS - i) }, (_, j) => client!.request(`SET key${i + j} v0`)));
      const load = keepLoading(client);
      const plan = [
        { label: 'precopy', from: a, to: b, body: { mode: 'precopy' } },
        { label: 'postcopy', from: b, to: a, body: { mode: 'postcopy', codecs: ['dedup', 'zstd'], streams: 2 } },
      ];
      const seen = new Map(plan.map((p) => [p.label, { stalls: [] as number[], downtimes: [] as number[] }]));
      // The load's own longest gap between replies with no migration, over about as long as a
      // migration's window below (its TMT and the 200 ms catch-up): what a stall is measured against.
      const quiet: number[] = [];
      for (let r = 0; r < reps; r++) {
        await settle(300);
        client.maxStallMs = 0;
        await new Promise((res) => setTimeout(res, QUIET_WINDOW_MS));
        quiet.push(client.maxStallMs);
        for (const p of plan) {
          await settle(300);
          client.maxStallMs = 0;
          const job = await migrateVia(p.from, { vm: 'kv', to: p.to.url, ...p.body });
          if (job.status !== 'succeeded') throw new Error(`${p.label} migration ${job.status}: ${job.error?.message ?? ''}`);
          await new Promise((res) => setTimeout(res, 200)); // the client catches up
          const s = seen.get(p.label)!;
          s.stalls.push(client.maxStallMs);
          s.downtimes.push(job.report?.downtimeMs ?? NaN);
          ctx.log(`${p.label} run ${r}: client stall ${client.maxStallMs.toFixed(1)} ms, downtime ${job.report?.downtimeMs?.toFixed(1)} ms, TMT ${job.report?.totalMigrationTimeMs?.toFixed(0)} ms`);
        }
      }
      await load.stop();
      ctx.report({ metric: 'kv-256MiB.no-migration.client-stall', value: median(quiet), unit: 'ms', note: `the same load's longest gap between replies in ${QUIET_WINDOW_MS} ms with no migration (runs ${quiet.map((x) => x.toFixed(1)).join(', ')} ms); informational` });
      for (const p of plan) {
        const s = seen.get(p.label)!;
        const how = p.label === 'precopy' ? 'a → b, pre-copy' : 'b → a (home), post-copy with dedup and zstd over 2 streams';
        ctx.report({ metric: `kv-256MiB.${p.label}.client-stall`, value: median(s.stalls), unit: 'ms', note: `${how}; ${KEYS} keys, 192 requests in flight on one connection; runs ${s.stalls.map((x) => x.toFixed(0)).join(', ')} ms` });
        ctx.report({ metric: `kv-256MiB.${p.label}.downtime`, value: median(s.downtimes), unit: 'ms', note: `the same migrations' downtime (VM paused → running): ${s.downtimes.map((x) => x.toFixed(1)).join(', ')} ms` });
      }
    } finally {
      await client?.close().catch(() => undefined);
      await Promise.all(hosts.map((h) => h.stop()));
      await rm(dir, { recursive: true, force: true });
    }
  },
};
export default suite;
