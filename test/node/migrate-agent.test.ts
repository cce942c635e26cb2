import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect } from 'node:net';
import { HostAgent, type HostAgentInit } from '../../src/node/agent/agent.js';
import { KvClient } from '../../src/node/kv-client.js';
import type { Connection, Transport } from '../../src/core/transport/transport.js';
import { tcp } from '../../src/node/transport/tcp.js';
import { startsLikeRelay } from '../../src/node/net/relay.js';

// eslint-disable-next-line @typescript-eslint/no-explicit-any -- JSON replies of several shapes, checked field by field
type Reply = any;

async function http(url: string, method: string, body?: unknown): Promise<{ status: number; json: Reply }> {
  const res = await fetch(url, { method, headers: body === undefined ? {} : { 'content-type': 'application/json' }, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  return { status: res.status, json: text ? JSON.parse(text) : null };
}

interface Host { agent: HostAgent; url: string }

async function withHosts(fn: (a: Host, b: Host) => Promise<void>, init: { a?: Partial<HostAgentInit>; b?: Partial<HostAgentInit> } = {}): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-migrate-'));
  const a = new HostAgent({ name: 'a', dataDir: join(dir, 'a'), ...init.a });
  const b = new HostAgent({ name: 'b', dataDir: join(dir, 'b'), ...init.b });
  try {
    const [ua, ub] = [await a.listen(), await b.listen()];
    await fn({ agent: a, url: ua }, { agent: b, url: ub });
  } finally {
    await a.close();
    await b.close();
    await rm(dir, { recursive: true, force: true });
  }
}

async function clientOf(host: Host, vm: string): Promise<KvClient> {
  const ep = host.agent.summary(vm).endpoint!;
  const i = ep.lastIndexOf(':');
  const c = new KvClient(ep.slice(0, i), Number(ep.slice(i + 1)));
  await c.connect();
  return c;
}

/** Waits for the migration to end (polling the real API) and returns its final status. */
async function finished(host: Host, id: string): Promise<Reply> {
  for (;;) {
    const r = await http(`${host.url}/v1/migrations/${id}`, 'GET');
    assert.equal(r.status, 200);
    if (r.json.status !== 'running') return r.json;
    await new Promise((res) => setTimeout(res, 20));
  }
}

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
      let stop = false;
      let round = 0;
      const load = (async () => {
        while (!stop) {
          const base = 2000 + round * 50;
          await Promise.all(Array.from({ length: 50 }, (_, i) => check.set(`k${base + i}`, `v${base + i}`).then(() => check.get(`k${base + i}`, `v${base + i}`))));
          round++;
        }
      })();
      r = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'kv', to: b.url, mode });
      assert.equal(r.status, 202, JSON.stringify(r.json));
      const done = await finished(a, r.json.id);
      assert.equal(done.status, 'succeeded', JSON.stringify(done.error));
      assert.equal(done.report.verified, true);
      stop = true;
      await load;
      const more = round * 50 + 2000;
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
function gatedTcp(limit: number): { transport: Transport; stalled: Promise<void>; open(): void } {
  const inner = tcp();
  let open!: () => void;
  const gate = new Promise<void>((r) => (open = r));
  let stalledNow!: () => void;
  const stalled = new Promise<void>((r) => (stalledNow = r));
  const wrap = (c: Connection): Connection => {
    let sent = 0;
    let relay: boolean | null = null;
    let aborted!: (e: Error) => void;
    const abortedP = new Promise<never>((_, rej) => (aborted = rej));
    abortedP.catch(() => undefined);
    return {
      localAddress: c.localAddress, remoteAddress: c.remoteAddress, closed: c.closed,
      close: () => c.close(),
      abort: (e) => {
        aborted(e ?? new Error('aborted'));
        c.abort(e);
      },
      [Symbol.asyncIterator]: () => c[Symbol.asyncIterator](),
      write: async (bytes) => {
        relay ??= startsLikeRelay(bytes);
        sent += bytes.length;
        if (!relay && sent > limit) {
          stalledNow();
          await Promise.race([gate, abortedP]);
        }
        return c.write(bytes);
      },
    };
  };
  return { transport: { name: 'gated-tcp', dial: async (addr, o) => wrap(await inner.dial(addr, o)), listen: (o) => inner.listen(o) }, stalled, open };
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
      { vm: 'kv', to: b.url, mode: 'precopy', downtimeMs: -5 }, { vm: '../kv', to: b.url, mode: 'precopy' }, { vm: 'kv', to: '', mode: 'precopy' }]) {
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
