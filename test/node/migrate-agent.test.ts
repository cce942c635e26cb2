import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect } from 'node:net';
import { spawnSync } from 'node:child_process';
import { HostAgent } from '../../src/node/agent/agent.js';
import { guestsDir } from '../../src/node/paths.js';
import { KvClient } from '../../src/node/kv-client.js';
import { tcp, tcpCongestionOf } from '../../src/node/transport/tcp.js';
import { availableCongestionControls, systemCongestionControl } from '../../src/node/transport/congestion.js';
import type { Connection } from '../../src/core/transport/transport.js';
import { leaveWhenDone } from '../helpers/leave-when-done.js';
import { clientOf, finished, gatedTcp, http, withHosts, type Host, type Reply } from '../helpers/agents.js';
import { FramedConnection } from '../../src/core/transport/framed.js';
import { FerryError } from '../../src/core/errors.js';

leaveWhenDone();

/** Counts replies that are not the one expected: every request is answered exactly once, in order. */
class Checker {
  wrong: string[] = [];
  constructor(private readonly c: KvClient) {}
  async set(k: string, v: string): Promise<void> {
    const r = await this.c.request(`SET ${k} ${v}`);
    if (r !== 'OK') this.wrong.push(`SET ${k} → ${r}`);
  }
  async get(k: string, want: string): Promise<void> {
    const r = await this.c.request(`GET ${k}`);
    if (r !== `VALUE ${want}`) this.wrong.push(`GET ${k} → ${r}, want ${want}`);
  }
}

for (const mode of ['precopy', 'postcopy', 'hybrid'] as const) {
  test(`${mode}: the kv VM moves a → b over the HTTP API; its client keeps its connection and every key`, async () => {
    await withHosts(async (a, b) => {
      let r = await http(`${a.url}/v1/vms`, 'POST', { name: 'kv', guest: 'kv', memory: '64MiB', expose: '127.0.0.1:0' });
      assert.equal(r.status, 201);
      const client = await clientOf(a, 'kv');
      const check = new Checker(client);
      await Promise.all(Array.from({ length: 2000 }, (_, i) => check.set(`k${i}`, `v${i}`)));
      // Load keeps running through the migration: requests in flight at the switchover are answered once.
      const load = keepWriting(check);
      r = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'kv', to: b.url, mode });
      assert.equal(r.status, 202, JSON.stringify(r.json));
      const done = await finished(a, r.json.id);
      assert.equal(done.status, 'succeeded', JSON.stringify(done.error));
      assert.equal(done.report.verified, true);
      // The default data streams, each past the first sent from a thread of a's.
      const senders = (await http(`${a.url}/v1/host`, 'GET')).json.sendThreads as { defaultStreams: Record<string, number>; streamsSent: number } | null;
      if (senders) {
        assert.equal(done.report.transfer.streams, senders.defaultStreams[mode]);
        assert.equal(senders.streamsSent, senders.defaultStreams[mode] - 1);
      }
      const more = (await load.stop()) * 50 + 2000;
      await Promise.all(Array.from({ length: more }, (_, i) => check.get(`k${i}`, `v${i}`)));
      assert.equal(await client.request('COUNT'), `COUNT ${more}`);
      assert.deepEqual(check.wrong, []);
      assert.deepEqual((await http(`${a.url}/v1/vms`, 'GET')).json, []);
      const onB = (await http(`${b.url}/v1/vms`, 'GET')).json;
      assert.deepEqual(onB.map((v: Reply) => v.name), ['kv']);
      assert.equal(onB[0].endpointHost, 'a');
      await client.close();
    });
  });
}

test('there and back: pre-copy a → b, post-copy b → a; the endpoint on a serves the local VM again', async () => {
  await withHosts(async (a, b) => {
    await a.agent.createVm({ name: 'kv', guest: 'kv', memory: '64MiB', expose: '127.0.0.1:0' });
    const endpoint = a.agent.summary('kv').endpoint;
    const client = await clientOf(a, 'kv');
    const check = new Checker(client);
    await Promise.all(Array.from({ length: 500 }, (_, i) => check.set(`k${i}`, `v${i}`)));
    for (const [from, to, mode] of [[a, b, 'precopy'], [b, a, 'postcopy']] as const) {
      const r = await http(`${from.url}/v1/migrations`, 'POST', { vm: 'kv', to: to.url, mode });
      assert.equal(r.status, 202, JSON.stringify(r.json));
      const pending = Promise.all(Array.from({ length: 200 }, (_, i) => check.get(`k${i}`, `v${i}`)));
      const done = await finished(from, r.json.id);
      assert.equal(done.status, 'succeeded', JSON.stringify(done.error));
      assert.equal(done.report.verified, true);
      await pending;
      await Promise.all(Array.from({ length: 500 }, (_, i) => check.get(`k${i}`, `v${i}`)));
    }
    assert.deepEqual(check.wrong, []);
    assert.deepEqual(b.agent.list(), []);
    const home = a.agent.summary('kv');
    assert.equal(home.endpoint, endpoint, 'the endpoint never moved');
    assert.equal(home.endpointHost, null, 'served locally again');
    assert.deepEqual(a.agent.awayList(), []);
    await check.set('after', 'home');
    await check.get('after', 'home');
    assert.deepEqual(check.wrong, []);
    await client.close();
  });
});

/**
 * A TCP transport whose migration streams (not relays) stop sending after `limit` bytes until
 * `open()`: a migration that is certainly still in pre-copy, without relying on timing.
 */
/** Sets and reads back 50 new keys (k2000, k2001, …) a round until stopped; `stop` resolves with the rounds done. */
function keepWriting(check: Checker): { stop(): Promise<number> } {
  let stopped = false;
  let round = 0;
  const running = (async () => {
    while (!stopped) {
      const base = 2000 + round * 50;
      await Promise.all(Array.from({ length: 50 }, (_, i) => check.set(`k${base + i}`, `v${base + i}`).then(() => check.get(`k${base + i}`, `v${base + i}`))));
      round++;
    }
  })();
  return { stop: async () => { stopped = true; await running; return round; } };
}


test('cancel before switchover: the migration ends cancelled, the VM keeps serving on a', async () => {
  const gated = gatedTcp(200_000);
  await withHosts(async (a, b) => {
    await a.agent.createVm({ name: 'kv', guest: 'kv', memory: '64MiB', expose: '127.0.0.1:0' });
    const client = await clientOf(a, 'kv');
    const check = new Checker(client);
    // Non-zero pages so pre-copy has more than the gate lets through.
    await Promise.all(Array.from({ length: 3000 }, (_, i) => check.set(`k${i}`, `v${i}-${'p'.repeat(100)}`)));
    const r = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'kv', to: b.url, mode: 'precopy' });
    assert.equal(r.status, 202);
    await gated.stalled;
    const c = await http(`${a.url}/v1/migrations/${r.json.id}`, 'DELETE');
    assert.equal(c.status, 202);
    // The link moves again only once the cancellation is signalled (the engine notices it at its
    // next step; a write stuck on a stalled link would not return by itself).
    gated.open();
    const done = await finished(a, r.json.id);
    assert.equal(done.status, 'cancelled');
    assert.equal(done.error.code, 'ERR_ABORTED');
    assert.equal(done.report, null);
    await Promise.all(Array.from({ length: 3000 }, (_, i) => check.get(`k${i}`, `v${i}-${'p'.repeat(100)}`)));
    assert.deepEqual(check.wrong, []);
    assert.deepEqual(a.agent.list().map((v) => [v.name, v.stats.state]), [['kv', 'running']]);
    assert.deepEqual(b.agent.list(), []);
    // b learns of the cancellation from the stream (CANCEL, then the close) and releases its reservation.
    let reserved = -1;
    for (let i = 0; i < 500 && reserved !== 0; i++) {
      reserved = (await http(`${b.url}/v1/host`, 'GET')).json.reservedBytes;
      if (reserved !== 0) await new Promise((res) => setTimeout(res, 10));
    }
    assert.equal(reserved, 0, 'b released its reservation');
    await client.close();
  }, { a: { transport: gated.transport } });
});

for (const [what, setup, code] of [
  ['name clash', async (b: Host) => void (await b.agent.createVm({ name: 'kv', guest: 'kv', memory: '16MiB' })), 'ERR_VM_EXISTS'],
  ['no capacity', async () => undefined, 'ERR_NO_CAPACITY'],
] as const) {
  test(`refused admission (${what}): the VM stays on a, serving, and the error is named`, async () => {
    await withHosts(async (a, b) => {
      await setup(b);
      await a.agent.createVm({ name: 'kv', guest: 'kv', memory: '64MiB', expose: '127.0.0.1:0' });
      const client = await clientOf(a, 'kv');
      const check = new Checker(client);
      await Promise.all(Array.from({ length: 300 }, (_, i) => check.set(`k${i}`, `v${i}`)));
      const r = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'kv', to: b.url, mode: 'hybrid' });
      assert.equal(r.status, 202);
      const done = await finished(a, r.json.id);
      assert.equal(done.status, 'failed');
      assert.equal(done.error.code, code, done.error.message);
      await Promise.all(Array.from({ length: 300 }, (_, i) => check.get(`k${i}`, `v${i}`)));
      assert.deepEqual(check.wrong, []);
      assert.deepEqual(a.agent.list().map((v) => v.name), ['kv']);
      assert.deepEqual(a.agent.awayList(), []);
      await client.close();
    }, { b: { capacityBytes: 32 << 20 } });
  });
}

test('migrations API: bodies are validated and errors named', async () => {
  await withHosts(async (a, b) => {
    await a.agent.createVm({ name: 'kv', guest: 'kv', memory: '16MiB' });
    const post = (body: unknown) => http(`${a.url}/v1/migrations`, 'POST', body);
    for (const body of [{}, { vm: 'kv', to: b.url }, { vm: 'kv', to: b.url, mode: 'teleport' }, { vm: 'kv', to: b.url, mode: 'precopy', extra: 1 },
      { vm: 'kv', to: b.url, mode: 'precopy', downtimeMs: -5 }, { vm: 'kv', to: b.url, mode: 'precopy', fixedDowntimeMs: -1 }, { vm: 'kv', to: b.url, mode: 'precopy', fixedDowntimeMs: '3ms' },
      { vm: '../kv', to: b.url, mode: 'precopy' }, { vm: 'kv', to: '', mode: 'precopy' }]) {
      const r = await post(body);
      assert.equal(r.status, 400, JSON.stringify(body));
      assert.equal(r.json.error.code, 'ERR_INVALID_BODY', JSON.stringify(body));
    }
    let r = await post({ vm: 'kv', to: b.url, mode: 'precopy', bandwidth: 'fast' });
    assert.equal(r.status, 400);
    assert.equal(r.json.error.code, 'ERR_INVALID_ARGUMENT');
    r = await post({ vm: 'kv', to: 'nowhere', mode: 'precopy' });
    assert.equal(r.status, 400);
    assert.equal(r.json.error.code, 'ERR_INVALID_ARGUMENT');
    r = await post({ vm: 'ghost', to: b.url, mode: 'precopy' });
    assert.equal(r.status, 404);
    assert.equal(r.json.error.code, 'ERR_NOT_FOUND');
    r = await post({ vm: 'kv', to: a.url, mode: 'precopy' });
    assert.equal(r.json.error.code, 'ERR_MIGRATION_SELF');
    r = await http(`${a.url}/v1/migrations/m99`, 'GET');
    assert.equal(r.status, 404);
    r = await http(`${a.url}/v1/migrations/m99`, 'DELETE');
    assert.equal(r.status, 404);
    const host = (await http(`${a.url}/v1/host`, 'GET')).json;
    assert.equal(host.migration, a.agent.migrationAddress);
    assert.match(host.migration, /^127\.0\.0\.1:\d+$/);
  });
});

test('migration to a migration address, capped at 2 Gbit/s: events stream progress and end with the report (SSE)', async () => {
  await withHosts(async (a, b) => {
    await a.agent.createVm({ name: 'kv', guest: 'kv', memory: '16MiB' });
    const r = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'kv', to: b.agent.migrationAddress, mode: 'precopy', bandwidth: '2Gbit' });
    assert.equal(r.status, 202, JSON.stringify(r.json));
    const res = await fetch(`${a.url}/v1/migrations/${r.json.id}/events`);
    assert.equal(res.headers.get('content-type'), 'text/event-stream');
    const text = await res.text();
    const events = text.split('\n\n').filter(Boolean).map((block) => {
      const ev = /^event: (.*)$/m.exec(block)![1];
      return { ev, data: JSON.parse(/^data: (.*)$/m.exec(block)![1]) };
    });
    const last = events[events.length - 1];
    assert.equal(last.ev, 'done');
    assert.equal(last.data.status, 'succeeded');
    assert.equal(last.data.report.verified, true);
    assert.ok(events.slice(0, -1).every((e) => e.ev === 'progress' && typeof e.data.bytesSent === 'number'));
    // The source reports done once it has sent its final ACK; the destination lists the VM once it
    // has read it — a moment later.
    for (let i = 0; i < 500 && b.agent.list().length === 0; i++) await new Promise((r) => setTimeout(r, 10));
    assert.deepEqual(b.agent.list().map((v) => v.name), ['kv']);
  });
});

test('a VM away from its home moves only back home; when its host goes away, the home drops its clients', async () => {
  await withHosts(async (a, b) => {
    const dir = await mkdtemp(join(tmpdir(), 'ferry-migrate-c-'));
    const c = new HostAgent({ name: 'c', dataDir: dir });
    try {
      const uc = await c.listen();
      await a.agent.createVm({ name: 'kv', guest: 'kv', memory: '32MiB', expose: '127.0.0.1:0' });
      const client = await clientOf(a, 'kv');
      await client.set('x', '1');
      let r = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'kv', to: b.url, mode: 'precopy' });
      assert.equal((await finished(a, r.json.id)).status, 'succeeded');
      r = await http(`${b.url}/v1/migrations`, 'POST', { vm: 'kv', to: uc, mode: 'precopy' });
      assert.equal(r.status, 422);
      assert.equal(r.json.error.code, 'ERR_MIGRATION_ENDPOINT');
      r = await http(`${a.url}/v1/vms`, 'POST', { name: 'kv', guest: 'kv', memory: '16MiB' });
      assert.equal(r.status, 409, 'the name is still taken on its home');
      assert.equal(await client.get('x'), '1');
      const ep = a.agent.awayList()[0].endpoint!;
      const raw = connect({ host: ep.slice(0, ep.lastIndexOf(':')), port: Number(ep.slice(ep.lastIndexOf(':') + 1)) });
      raw.on('error', () => undefined);
      const rawClosed = new Promise<void>((res) => raw.on('close', () => res()));
      await new Promise<void>((res) => raw.once('connect', () => res()));
      await b.agent.stopVm('kv');
      // The relay ends, so the home closes the endpoint and its clients' connections.
      await rawClosed;
      assert.deepEqual(a.agent.awayList(), []);
      await client.close();
    } finally {
      await c.close();
      await rm(dir, { recursive: true, force: true });
    }
  });
});

// ------------------------------------------------------------------ parallel streams, codecs, gangs

/** What a destination agent reported about incoming connections while `fn` ran. */
function watchIncoming(agent: HostAgent): { arrived: string[]; errors: Error[] } {
  const seen = { arrived: [] as string[], errors: [] as Error[] };
  agent.on('migration-in', (o: { vmName: string }) => seen.arrived.push(o.vmName));
  agent.on('migration-in-error', (e: Error) => seen.errors.push(e));
  return seen;
}

/** Waits until the destination lists `names` (it does so once it has read the final ACK). */
async function listed(host: Host, names: string[]): Promise<void> {
  for (let i = 0; i < 500 && host.agent.list().length < names.length; i++) await new Promise((r) => setTimeout(r, 10));
  assert.deepEqual(host.agent.list().map((v) => v.name), names);
}

test('precopy with codecs xbzrle, dedup, zstd over 3 streams: the kv VM moves, its client keeps its connection, b gains one VM', async () => {
  await withHosts(async (a, b) => {
    const incoming = watchIncoming(b.agent);
    await a.agent.createVm({ name: 'kv', guest: 'kv', memory: '32MiB', expose: '127.0.0.1:0' });
    const client = await clientOf(a, 'kv');
    const check = new Checker(client);
    await Promise.all(Array.from({ length: 2000 }, (_, i) => check.set(`k${i}`, `v${i}-${'x'.repeat(40)}`)));
    const load = keepWriting(check);
    const r = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'kv', to: b.url, mode: 'precopy', codecs: ['xbzrle', 'dedup', 'zstd'], streams: 3, xbzrleCache: '8MiB' });
    assert.equal(r.status, 202, JSON.stringify(r.json));
    const done = await finished(a, r.json.id);
    const rounds = await load.stop();
    assert.equal(done.status, 'succeeded', JSON.stringify(done.error));
    assert.equal(done.report.verified, true);
    const t = done.report.transfer;
    assert.equal(t.streams, 3);
    assert.deepEqual(t.codecs, ['xbzrle', 'dedup', 'zstd']);
    assert.equal(t.faultChannel, false, 'pre-copy opens no fault channel');
    assert.equal(t.gang, null);
    assert.equal(done.gang, null);
    for (let i = 0; i < 2000; i += 7) await check.get(`k${i}`, `v${i}-${'x'.repeat(40)}`);
    assert.equal(await client.request('COUNT'), `COUNT ${2000 + rounds * 50}`);
    assert.deepEqual(check.wrong, []);
    // Two JOIN connections reached b besides the HELLO: one VM, one arrival, no errors.
    await listed(b, ['kv']);
    assert.deepEqual(incoming.arrived, ['kv']);
    assert.deepEqual(incoming.errors, []);
    assert.deepEqual(a.agent.list(), []);
    await client.close();
  });
});

test('postcopy between hosts: page requests go between the hosts\' fault threads, and GET /v1/host says where and at which priority', async () => {
  await withHosts(async (a, b) => {
    type Info = { port: number | null; priority: { asked: string; destination: string; source: string } };
    const before = (await http(`${b.url}/v1/host`, 'GET')).json.faultThreads as Info;
    assert.deepEqual(before, { port: null, priority: { asked: 'nice', destination: 'default', source: 'default' } }, 'no thread before the first post-copy arrival');
    await a.agent.createVm({ name: 'ms', guest: 'memstress', memory: '16MiB', config: 'mem=12MiB wss=12MiB pattern=uniform rate=20000000' });
    const r = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'ms', to: b.agent.migrationAddress, mode: 'postcopy' });
    assert.equal(r.status, 202, JSON.stringify(r.json));
    const done = await finished(a, r.json.id);
    assert.equal(done.status, 'succeeded', JSON.stringify(done.error));
    assert.equal(done.report.verified, true);
    assert.equal(done.report.transfer.faultChannel, true);
    const info = (await http(`${b.url}/v1/host`, 'GET')).json.faultThreads as Info;
    assert.ok(typeof info.port === 'number' && info.port > 0, JSON.stringify(info));
    // b's thread that answers requests started; b sent no post-copy migration, a did.
    assert.ok(['realtime', 'nice', 'default'].includes(info.priority.destination), JSON.stringify(info));
    assert.equal(info.priority.source, 'default');
    const sent = (await http(`${a.url}/v1/host`, 'GET')).json.faultThreads as Info;
    assert.equal(sent.priority.source, info.priority.destination, 'both hosts run on this machine: both threads got the same');
    assert.equal(sent.priority.destination, 'default');
    await listed(b, ['ms']);
    assert.equal(b.agent.summary('ms').stats.state, 'running');
  });
});

test('postcopy over 2 streams, capped at 2 Gbit/s in total: page requests have a fault channel of their own', async () => {
  await withHosts(async (a, b) => {
    const incoming = watchIncoming(b.agent);
    await a.agent.createVm({ name: 'ms', guest: 'memstress', memory: '16MiB', config: 'mem=8MiB wss=2MiB text=0.5 rate=4000000' });
    const r = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'ms', to: b.agent.migrationAddress, mode: 'postcopy', streams: 2, codecs: ['lz4'], bandwidth: '2Gbit' });
    assert.equal(r.status, 202, JSON.stringify(r.json));
    const done = await finished(a, r.json.id);
    assert.equal(done.status, 'succeeded', JSON.stringify(done.error));
    assert.equal(done.report.verified, true);
    assert.equal(done.report.transfer.streams, 2);
    assert.equal(done.report.transfer.faultChannel, true);
    assert.deepEqual(done.report.transfer.codecs, ['lz4']);
    await listed(b, ['ms']);
    assert.equal(b.agent.summary('ms').stats.state, 'running');
    assert.deepEqual(incoming.arrived, ['ms']);
    assert.deepEqual(incoming.errors, []);
  });
});

test('post-copy: the arriving VM is listed on the destination as soon as it runs there; it cannot move on or be snapshot until every page arrived', async () => {
  await withHosts(async (a, b) => {
    await a.agent.createVm({ name: 'ms', guest: 'memstress', memory: '48MiB', config: 'mem=32MiB rate=1000000' });
    // 32 MiB at 100 Mbit/s: the post-copy push takes about 3 s, while the VM already runs on b.
    const r = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'ms', to: b.agent.migrationAddress, mode: 'postcopy', bandwidth: '100Mbit' });
    assert.equal(r.status, 202, JSON.stringify(r.json));
    let seenWhileArriving = false;
    for (let i = 0; i < 1000; i++) {
      const job = a.agent.migration(r.json.id);
      if (job.status !== 'running') break;
      if (b.agent.list().some((v) => v.name === 'ms')) {
        seenWhileArriving = true;
        await assert.rejects(b.agent.startMigration({ vm: 'ms', to: a.agent.migrationAddress!, mode: 'precopy' }), (e: unknown) => e instanceof FerryError && /still arriving/.test(e.message));
        await assert.rejects(b.agent.snapshotVm('ms', join(tmpdir(), 'never.snap')), (e: unknown) => e instanceof FerryError && /still arriving/.test(e.message));
        break;
      }
      await new Promise((res) => setTimeout(res, 10));
    }
    const done = await finished(a, r.json.id);
    assert.equal(done.status, 'succeeded', JSON.stringify(done.error));
    assert.ok(seenWhileArriving, 'b listed the VM while its post-copy was still running');
    assert.equal(b.agent.summary('ms').stats.state, 'running');
    // No client link tells b what it runs: the module is a built-in guest's, and named so.
    assert.equal(b.agent.summary('ms').guest, 'memstress');
  });
});

test('a VM of a module from a file arrives listed by the file\'s name (HELLO carries it), not by its module\'s hash', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-guest-'));
  try {
    // The built-in memstress under another name: by its hash alone the destination would call it memstress.
    const file = join(dir, 'my-stress.wasm');
    await copyFile(join(guestsDir(), 'memstress.wasm'), file);
    await withHosts(async (a, b) => {
      const made = await a.agent.createVm({ name: 'mine', guest: file, memory: '16MiB', config: 'mem=4MiB rate=100000' });
      assert.equal(made.guest, 'my-stress.wasm');
      const r = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'mine', to: b.agent.migrationAddress, mode: 'precopy' });
      assert.equal(r.status, 202, JSON.stringify(r.json));
      const done = await finished(a, r.json.id);
      assert.equal(done.status, 'succeeded', JSON.stringify(done.error));
      assert.equal(b.agent.summary('mine').guest, 'my-stress.wasm');
      assert.equal(b.agent.list().find((v) => v.name === 'mine')?.guest, 'my-stress.wasm');
    });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('postcopy with faultChannel false: page requests share the control connection', async () => {
  await withHosts(async (a, b) => {
    await a.agent.createVm({ name: 'ms', guest: 'memstress', memory: '16MiB', config: 'mem=4MiB rate=4000000' });
    const r = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'ms', to: b.url, mode: 'postcopy', faultChannel: false, streams: 1 });
    assert.equal(r.status, 202, JSON.stringify(r.json));
    const done = await finished(a, r.json.id);
    assert.equal(done.status, 'succeeded', JSON.stringify(done.error));
    assert.equal(done.report.transfer.streams, 1);
    assert.equal(done.report.transfer.faultChannel, false);
  });
});

test('gang: three VMs migrating at once under one gang name share one de-duplication index; pages common to them cross once', async () => {
  await withHosts(async (a, b) => {
    const incoming = watchIncoming(b.agent);
    const names = ['g1', 'g2', 'g3'];
    // Half of each region is the same content in every VM (dup pages); writes keep it so.
    for (const [i, name] of names.entries()) {
      await a.agent.createVm({ name, guest: 'memstress', memory: '16MiB', config: `mem=8MiB wss=1MiB dup=0.5 wcontent=keep rate=1000000 seed=${i + 1}` });
    }
    const posted = await Promise.all(names.map((vm) => http(`${a.url}/v1/migrations`, 'POST', { vm, to: b.url, mode: 'precopy', streams: 2, gang: 'pack' })));
    for (const r of posted) assert.equal(r.status, 202, JSON.stringify(r.json));
    const jobs = await Promise.all(posted.map((r) => finished(a, r.json.id)));
    for (const j of jobs) {
      assert.equal(j.status, 'succeeded', JSON.stringify(j.error));
      assert.equal(j.report.verified, true);
      assert.equal(j.gang, 'pack');
      assert.deepEqual(j.report.transfer.codecs, ['dedup'], 'a gang implies dedup');
    }
    const wire = jobs.map((j) => j.report.transfer.gang as string);
    assert.match(wire[0], /^pack\.[0-9a-f]{12}$/);
    assert.deepEqual(new Set(wire).size, 1, 'one gang object for the three');
    // 1024 dup pages per VM: defined by whichever VM sent one first, a reference for the others.
    const refs = jobs.reduce((n, j) => n + (j.report.transfer.codecStats['page.dedup.refs'] ?? 0), 0);
    assert.ok(refs >= 1024, `pages common to the VMs went as references: ${refs}`);
    await listed(b, names);
    assert.deepEqual([...incoming.arrived].sort(), names);
    assert.deepEqual(incoming.errors, []);
    // The next gang of that name is a new one (the first ended with its last migration).
    await a.agent.createVm({ name: 'g4', guest: 'memstress', memory: '16MiB', config: 'mem=2MiB rate=1000000' });
    const r = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'g4', to: b.url, mode: 'precopy', gang: 'pack' });
    const j = await finished(a, r.json.id);
    assert.equal(j.status, 'succeeded', JSON.stringify(j.error));
    assert.notEqual(j.report.transfer.gang, wire[0]);
  });
});

test('cancel under a bandwidth cap: reported as a cancellation (ERR_ABORTED), not as the capped write it cut short', async () => {
  await withHosts(async (a, b) => {
    await a.agent.createVm({ name: 'ms', guest: 'memstress', memory: '64MiB', config: 'mem=33554432 rate=1' });
    // 32 MiB of random pages at 20 Mbit/s: some 13 s, cancelled a few hundred KiB in.
    const r = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'ms', to: b.url, mode: 'precopy', bandwidth: '20Mbit' });
    assert.equal(r.status, 202);
    let sent = 0;
    for (let i = 0; i < 1000 && sent < 256 * 1024; i++) {
      sent = (await http(`${a.url}/v1/migrations/${r.json.id}`, 'GET')).json.progress?.bytesSent ?? 0;
      if (sent < 256 * 1024) await new Promise((res) => setTimeout(res, 10));
    }
    assert.ok(sent >= 256 * 1024, `the migration sent ${sent} bytes`);
    assert.equal((await http(`${a.url}/v1/migrations/${r.json.id}`, 'DELETE')).status, 202);
    const done = await finished(a, r.json.id);
    assert.equal(done.status, 'cancelled');
    assert.equal(done.error.code, 'ERR_ABORTED', done.error.message);
    assert.match(done.error.message, /^migration cancelled/);
    assert.deepEqual(a.agent.list().map((v) => [v.name, v.stats.state]), [['ms', 'running']]);
    assert.deepEqual(b.agent.list(), []);
  });
});

test('tcpCongestion: the connections a host accepts for a migration, and its fault thread\'s listener, run its algorithm; GET /v1/host says which', async (t) => {
  const system = systemCongestionControl();
  const other = (availableCongestionControls() ?? []).find((x) => x !== system);
  if (!system || !other) return t.skip('needs Linux with two congestion control algorithms');
  await withHosts(async (a, b) => {
    assert.equal((await http(`${a.url}/v1/host`, 'GET')).json.tcpCongestion, other);
    await a.agent.createVm({ name: 'ms', guest: 'memstress', memory: '64MiB', config: 'mem=33554432 rate=1' });
    // Slow enough to look at its connections while it runs: 32 MiB at 40 Mbit/s, over 2 streams.
    const r = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'ms', to: b.url, mode: 'precopy', bandwidth: '40Mbit', streams: 2 });
    assert.equal(r.status, 202);
    // eslint-disable-next-line @typescript-eslint/no-explicit-any -- the agents' connection sets, read to see their sockets
    const conns = (h: Host) => [...(h.agent as any).openConns] as Connection[];
    for (let i = 0; i < 500 && conns(b).length < 2; i++) await new Promise((res) => setTimeout(res, 10));
    // b's are the sockets it accepted; a's, dialled by the same transport code, are under the cap's shaping here.
    assert.ok(conns(b).length >= 2, `b has ${conns(b).length} connections`);
    assert.deepEqual(conns(b).map(tcpCongestionOf), conns(b).map(() => other));
    assert.equal((await http(`${a.url}/v1/migrations/${r.json.id}`, 'DELETE')).status, 202);
    assert.equal((await finished(a, r.json.id)).status, 'cancelled');
    // Post-copy's fault channel: b's fault thread listens with the same algorithm (its sockets are
    // made in the thread; iproute2's ss shows a listener's algorithm where it is installed).
    await a.agent.createVm({ name: 'pc', guest: 'memstress', memory: '16MiB', config: 'mem=8MiB wss=8MiB pattern=uniform rate=20000000' });
    const p = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'pc', to: b.agent.migrationAddress, mode: 'postcopy' });
    const done = await finished(a, p.json.id);
    assert.equal(done.status, 'succeeded', JSON.stringify(done.error));
    assert.equal(done.report.transfer.faultChannel, true);
    assert.equal(done.tcpCongestion, other, 'the job says which algorithm its connections ran');
    const port = (await http(`${b.url}/v1/host`, 'GET')).json.faultThreads.port as number;
    const ss = spawnSync('ss', ['-tlni', `sport = :${port}`], { encoding: 'utf8' });
    if (ss.error) t.diagnostic('ss is not installed: the fault thread\'s listener was not looked at');
    else assert.match(ss.stdout, new RegExp(`LISTEN[^\\n]*:${port}\\b[^\\n]*\\n\\s+${other}\\b`), ss.stdout);
  }, { a: { tcpCongestion: other }, b: { tcpCongestion: other } });
  // And a host left to the system's: its migration connections are the system's.
  await withHosts(async (a) => {
    assert.equal((await http(`${a.url}/v1/host`, 'GET')).json.tcpCongestion, system);
  });
  assert.throws(() => new HostAgent({ name: 'x', dataDir: '/nonexistent', tcpCongestion: 'no-such-cc' }), /not available on this machine/);
});

test('cancel a migration over 3 streams before switchover: every connection ends, the VM keeps serving on a, b holds nothing', async () => {
  const gated = gatedTcp(200_000);
  await withHosts(async (a, b) => {
    const incoming = watchIncoming(b.agent);
    await a.agent.createVm({ name: 'kv', guest: 'kv', memory: '32MiB', expose: '127.0.0.1:0' });
    const client = await clientOf(a, 'kv');
    const check = new Checker(client);
    await Promise.all(Array.from({ length: 3000 }, (_, i) => check.set(`k${i}`, `v${i}-${'p'.repeat(100)}`)));
    const r = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'kv', to: b.url, mode: 'precopy', streams: 3, codecs: ['dedup'] });
    assert.equal(r.status, 202);
    await gated.stalled;
    assert.equal((await http(`${a.url}/v1/migrations/${r.json.id}`, 'DELETE')).status, 202);
    gated.open();
    const done = await finished(a, r.json.id);
    assert.equal(done.status, 'cancelled');
    assert.equal(done.error.code, 'ERR_ABORTED', done.error.message);
    await Promise.all(Array.from({ length: 3000 }, (_, i) => check.get(`k${i}`, `v${i}-${'p'.repeat(100)}`)));
    assert.deepEqual(check.wrong, []);
    assert.deepEqual(a.agent.list().map((v) => [v.name, v.stats.state]), [['kv', 'running']]);
    // The migration's connections (the first and the two it joined) all ended and were let go.
    // eslint-disable-next-line @typescript-eslint/no-explicit-any -- the agent's connection set, read to check nothing leaks
    const open = () => (a.agent as any).openConns.size as number;
    for (let i = 0; i < 500 && open() > 0; i++) await new Promise((res) => setTimeout(res, 10));
    assert.equal(open(), 0);
    let reserved = -1;
    for (let i = 0; i < 500 && reserved !== 0; i++) {
      reserved = (await http(`${b.url}/v1/host`, 'GET')).json.reservedBytes;
      if (reserved !== 0) await new Promise((res) => setTimeout(res, 10));
    }
    assert.equal(reserved, 0, 'b released its reservation');
    assert.deepEqual(b.agent.list(), []);
    assert.deepEqual(incoming.arrived, []);
    await client.close();
  }, { a: { transport: gated.transport } });
});

test('the destination goes away in the middle of pre-copy over the default streams (sent from threads): the migration fails by name, the VM runs on on a', async () => {
  await withHosts(async (a, b) => {
    // 24 MiB of random memory through 100 Mbit/s: the first pass takes some 2 s.
    await a.agent.createVm({ name: 'ms', guest: 'memstress', memory: '32MiB', config: 'mem=24MiB rate=100000' });
    const r = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'ms', to: b.url, mode: 'precopy', bandwidth: '100Mbit' });
    assert.equal(r.status, 202, JSON.stringify(r.json));
    for (let i = 0; i < 1000; i++) {
      const j = (await http(`${a.url}/v1/migrations/${r.json.id}`, 'GET')).json;
      if ((j.progress?.bytesSent ?? 0) > 2 << 20) break;
      await new Promise((res) => setTimeout(res, 10));
    }
    const senders = (await http(`${a.url}/v1/host`, 'GET')).json.sendThreads as { defaultStreams: Record<string, number>; threads: number; streamsSent: number } | null;
    await b.agent.close();
    const done = await finished(a, r.json.id);
    assert.equal(done.status, 'failed');
    assert.match(done.error.code, /^ERR_/, JSON.stringify(done.error));
    assert.equal(done.report, null);
    assert.deepEqual(a.agent.list().map((v) => [v.name, v.stats.state]), [['ms', 'running']]);
    const before = a.agent.summary('ms').stats.progress;
    for (let i = 0; i < 200 && a.agent.summary('ms').stats.progress === before; i++) await new Promise((res) => setTimeout(res, 10));
    assert.ok(a.agent.summary('ms').stats.progress > before, 'the guest runs on on a');
    if (senders && senders.defaultStreams.precopy > 1) {
      assert.equal(senders.streamsSent, senders.defaultStreams.precopy - 1, 'the data streams were sent from threads');
      // Their threads went back to a's pool; none was lost with the connection.
      let threads = -1;
      for (let i = 0; i < 200 && threads !== senders.defaultStreams.precopy - 1; i++) {
        threads = (await http(`${a.url}/v1/host`, 'GET')).json.sendThreads.threads;
        if (threads !== senders.defaultStreams.precopy - 1) await new Promise((res) => setTimeout(res, 10));
      }
      assert.equal(threads, senders.defaultStreams.precopy - 1);
    }
    // eslint-disable-next-line @typescript-eslint/no-explicit-any -- the agent's connection set, read to check nothing leaks
    const open = () => (a.agent as any).openConns.size as number;
    for (let i = 0; i < 500 && open() > 0; i++) await new Promise((res) => setTimeout(res, 10));
    assert.equal(open(), 0, 'every connection of the failed migration ended');
  });
});

test('a JOIN naming no migration is refused by name and adds nothing to the destination', async () => {
  await withHosts(async (_a, b) => {
    const incoming = watchIncoming(b.agent);
    const conn = new FramedConnection(await tcp().dial(b.agent.migrationAddress!));
    await conn.send({ type: 'JOIN', token: '0'.repeat(32), stream: 1, role: 'data' });
    const reply = await conn.next();
    assert.equal(reply?.type, 'ERROR');
    assert.equal(reply.type === 'ERROR' && reply.code, 'ERR_MIGRATION_UNKNOWN_SESSION');
    conn.abort();
    for (let i = 0; i < 200 && incoming.errors.length === 0; i++) await new Promise((r) => setTimeout(r, 10));
    assert.equal((incoming.errors[0] as FerryError | undefined)?.code, 'ERR_MIGRATION_UNKNOWN_SESSION');
    assert.deepEqual(incoming.arrived, []);
    assert.deepEqual(b.agent.list(), []);
    assert.equal((await http(`${b.url}/v1/host`, 'GET')).json.reservedBytes, 0);
  });
});

test('migrations API: bad codecs, streams, compression, gang or faultChannel get a named 400 and start nothing', async () => {
  await withHosts(async (a, b) => {
    await a.agent.createVm({ name: 'kv', guest: 'kv', memory: '16MiB' });
    const post = (extra: Record<string, unknown>) => http(`${a.url}/v1/migrations`, 'POST', { vm: 'kv', to: b.url, mode: 'precopy', ...extra });
    let r = await post({ codecs: ['zstd', 'brotli'] });
    assert.equal(r.status, 400);
    assert.equal(r.json.error.code, 'ERR_INVALID_ARGUMENT');
    assert.match(r.json.error.message, /unknown codec 'brotli' \(known: xbzrle, dedup, lz4, zstd\)/);
    for (const xbzrleCache of ['lots', '1KiB']) {
      r = await post({ codecs: ['xbzrle'], xbzrleCache });
      assert.equal(r.status, 400, xbzrleCache);
      assert.equal(r.json.error.code, 'ERR_INVALID_ARGUMENT', xbzrleCache);
    }
    for (const extra of [{ codecs: 'zstd' }, { codecs: [1] }, { streams: 0 }, { streams: 65 }, { streams: 1.5 }, { streams: '2' },
      { compression: 'sometimes' }, { gang: '' }, { gang: 'two words' }, { gang: 'g'.repeat(65) }, { faultChannel: 'yes' }]) {
      r = await post(extra);
      assert.equal(r.status, 400, JSON.stringify(extra));
      assert.equal(r.json.error.code, 'ERR_INVALID_BODY', JSON.stringify(extra));
    }
    assert.deepEqual((await http(`${a.url}/v1/migrations`, 'GET')).json, []);
    assert.deepEqual(a.agent.list().map((v) => [v.name, v.stats.state, v.migration]), [['kv', 'running', null]]);
    // The same checks hold for callers of the agent itself.
    await assert.rejects(a.agent.startMigration({ vm: 'kv', to: b.url, mode: 'precopy', streams: 100 }), { code: 'ERR_INVALID_ARGUMENT' });
    await assert.rejects(a.agent.startMigration({ vm: 'kv', to: b.url, mode: 'precopy', gang: 'a b' }), { code: 'ERR_INVALID_ARGUMENT' });
  });
});

test('a destination URL that is no agent: the migration is refused by name, the VM keeps running and nothing is left started', async () => {
  // One server, three wrong answers: not JSON, JSON without a migration address, a 404 with one.
  const { createServer } = await import('node:http');
  const server = createServer((req, res) => {
    if (req.url === '/text/v1/host') res.end('<html>hello</html>');
    else if (req.url === '/json/v1/host') res.end(JSON.stringify({ name: 'x' }));
    else res.writeHead(404).end(JSON.stringify({ migration: '127.0.0.1:1' }));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const port = (server.address() as import('node:net').AddressInfo).port;
  // A port nobody listens on: what the server had, closed again.
  const closed = await new Promise<number>((r) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const p = (s.address() as import('node:net').AddressInfo).port;
      s.close(() => r(p));
    });
  });
  try {
    await withHosts(async (a) => {
      await a.agent.createVm({ name: 'kv', guest: 'kv', memory: '16MiB' });
      for (const [to, why] of [
        [`http://127.0.0.1:${port}/text`, /did not report a migration address \(HTTP 200\)/],
        [`http://127.0.0.1:${port}/json/`, /did not report a migration address \(HTTP 200\)/],
        [`http://127.0.0.1:${port}/missing`, /did not report a migration address \(HTTP 404\)/],
        [`http://127.0.0.1:${closed}`, /cannot reach destination agent at http:\/\/127\.0\.0\.1:\d+: .*ECONNREFUSED/],
      ] as const) {
        await assert.rejects(a.agent.startMigration({ vm: 'kv', to, mode: 'precopy' }), (e: unknown) => e instanceof FerryError && e.code === 'ERR_DESTINATION_UNREACHABLE' && why.test(e.message), to);
      }
      const r = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'kv', to: `http://127.0.0.1:${port}/text`, mode: 'precopy' });
      assert.equal(r.json.error.code, 'ERR_DESTINATION_UNREACHABLE');
      assert.deepEqual((await http(`${a.url}/v1/migrations`, 'GET')).json, []);
      assert.deepEqual(a.agent.list().map((v) => [v.name, v.stats.state, v.migration]), [['kv', 'running', null]]);
    });
  } finally {
    server.close();
  }
});

test('fixedDowntimeMs auto: a host adds to eq. (2) what it missed in its last migration to the same destination', async () => {
  await withHosts(async (a, b) => {
    await a.agent.createVm({ name: 'kv', guest: 'kv', memory: '64MiB' });
    const move = async (from: Host, to: Host, fixedDowntimeMs?: number | 'auto') => {
      const r = await http(`${from.url}/v1/migrations`, 'POST', { vm: 'kv', to: to.url, mode: 'precopy', ...(fixedDowntimeMs !== undefined ? { fixedDowntimeMs } : {}) });
      assert.equal(r.status, 202, JSON.stringify(r.json));
      const done = await finished(from, r.json.id);
      assert.equal(done.status, 'succeeded', JSON.stringify(done.error));
      return done.report;
    };
    const first = await move(a, b, 'auto');
    assert.equal(first.fixedDowntimeMs, 0, 'nothing learnt yet');
    assert.ok(first.downtimeMs > first.estimatedDowntimeMs, `downtime ${first.downtimeMs}, estimated ${first.estimatedDowntimeMs}`);
    const back = await move(b, a, 1.5);
    assert.equal(back.fixedDowntimeMs, 1.5, 'a fixed part given is used as given');
    const again = await move(a, b, 'auto');
    assert.ok(Math.abs(again.fixedDowntimeMs - (first.downtimeMs - first.estimatedDowntimeMs)) < 1e-9, `fixed ${again.fixedDowntimeMs}: the first migration missed ${first.downtimeMs - first.estimatedDowntimeMs}`);
    assert.ok(again.estimatedDowntimeMs >= again.fixedDowntimeMs);
    // The host shows what auto would use next, and from how many migrations.
    const learnt = (await http(`${a.url}/v1/host`, 'GET')).json.fixedDowntime;
    const bAddress = (await http(`${b.url}/v1/host`, 'GET')).json.migration;
    assert.deepEqual(Object.keys(learnt), [bAddress]);
    assert.equal(learnt[bAddress].migrations, 2);
    const bad = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'kv', to: a.url, mode: 'precopy', fixedDowntimeMs: 'soon' });
    assert.equal(bad.status, 400);
    assert.equal(bad.json.error.code, 'ERR_INVALID_BODY');
  });
});
