/**
 * `ferry demo`: two hosts on this machine, the kv guest serving a client, a cold migration
 * (snapshot on host a, restore on host b), and a report. The live-migration demo replaces the
 * snapshot step once the migration engine exists.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FerryError } from '../../core/errors.js';
import { formatBytes, formatDuration } from '../../core/units.js';
import { HostAgent } from '../agent/agent.js';
import { KvClient } from '../kv-client.js';

export interface DemoOptions { json: boolean; keys?: number }

function endpointOf(agent: HostAgent, vm: string): { host: string; port: number } {
  const ep = agent.summary(vm).endpoint;
  if (!ep) throw new FerryError('ERR_DEMO', `VM ${vm} has no endpoint`);
  const i = ep.lastIndexOf(':');
  return { host: ep.slice(0, i), port: Number(ep.slice(i + 1)) };
}

async function load(client: KvClient, keys: number, from = 0): Promise<void> {
  const inflight: Promise<void>[] = [];
  for (let i = from; i < from + keys; i++) {
    inflight.push(client.set(`key${i}`, `value-${i}-${'x'.repeat(24)}`));
    if (inflight.length >= 256) await Promise.all(inflight.splice(0));
  }
  await Promise.all(inflight);
}

async function verify(client: KvClient, keys: number): Promise<number> {
  let missing = 0;
  const checks: Promise<void>[] = [];
  for (let i = 0; i < keys; i++) {
    checks.push(client.get(`key${i}`).then((v) => { if (v !== `value-${i}-${'x'.repeat(24)}`) missing++; }));
    if (checks.length >= 256) await Promise.all(checks.splice(0));
  }
  await Promise.all(checks);
  return missing;
}

export async function runDemo(opts: DemoOptions): Promise<number> {
  const keys = opts.keys ?? 20000;
  const dir = await mkdtemp(join(tmpdir(), 'ferry-demo-'));
  const a = new HostAgent({ name: 'a', dataDir: join(dir, 'a') });
  const b = new HostAgent({ name: 'b', dataDir: join(dir, 'b') });
  const say = (m: string) => { if (!opts.json) console.log(m); };
  try {
    say('ferry demo: two hosts (a, b) on this machine, the kv guest on a, a client, a cold migration to b');
    const t0 = performance.now();
    await a.createVm({ name: 'kv', guest: 'kv', memory: '256MiB', expose: '127.0.0.1:0' });
    const bootMs = performance.now() - t0;
    const epA = endpointOf(a, 'kv');
    say(`  booted kv on host a in ${formatDuration(bootMs)}; endpoint ${epA.host}:${epA.port}`);

    const client = new KvClient(epA.host, epA.port);
    await client.connect();
    const tLoad = performance.now();
    await load(client, keys);
    const loadMs = performance.now() - tLoad;
    say(`  client stored ${keys} keys in ${formatDuration(loadMs)} (${Math.round(keys / (loadMs / 1000))} requests/s)`);
    await client.close();

    const snap = join(dir, 'kv.snap');
    const snapStats = await a.snapshotVm('kv', snap, { stop: true });
    say(`  snapshot on a: ${formatBytes(snapStats.bytes)} (${snapStats.pagesWritten} pages, ${snapStats.zeroPagesSkipped} zero pages skipped) in ${formatDuration(snapStats.ms)}; VM stopped on a`);

    const tRestore = performance.now();
    await b.restoreVm(snap, { expose: '127.0.0.1:0' });
    const restoreMs = performance.now() - tRestore;
    const epB = endpointOf(b, 'kv');
    say(`  restored on host b in ${formatDuration(restoreMs)}; endpoint ${epB.host}:${epB.port}`);

    const client2 = new KvClient(epB.host, epB.port);
    await client2.connect();
    const missing = await verify(client2, keys);
    await client2.close();
    const downtimeMs = snapStats.ms + restoreMs;
    const report = {
      guest: 'kv', keys, bootMs, loadMs, snapshotBytes: snapStats.bytes, snapshotMs: snapStats.ms, restoreMs,
      coldMigrationDowntimeMs: downtimeMs, keysMissingAfterRestore: missing, verified: missing === 0,
    };
    if (opts.json) console.log(JSON.stringify(report));
    else {
      console.log('');
      console.log('  report');
      console.log(`    keys stored before / found after      ${keys} / ${keys - missing}`);
      console.log(`    snapshot size                         ${formatBytes(snapStats.bytes)}`);
      console.log(`    downtime (snapshot + restore)         ${formatDuration(downtimeMs)}`);
      console.log(`    verified                              ${missing === 0 ? 'yes' : `NO (${missing} keys missing)`}`);
    }
    return missing === 0 ? 0 : 1;
  } finally {
    await a.close();
    await b.close();
    await rm(dir, { recursive: true, force: true });
  }
}
