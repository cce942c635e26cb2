import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { warmMigrationPaths, type WarmUpResult } from '../../src/node/engine/warm-up.js';
import { nodeEngineDeps } from '../../src/node/engine/adapters.js';
import { InstrumentCache } from '../../src/node/vm/instrument.js';
import { guestsDir } from '../../src/node/paths.js';
import { HostAgent, type WarmUpJson } from '../../src/node/agent/agent.js';
import { finished, http, withHosts, type Host } from '../helpers/agents.js';
import { ferry, withHostStarted } from '../helpers/ferry-cli.js';

test('the warm-up migrates a small VM from this process to itself: both ends run the engine, and the digest checks out', async () => {
  const deps = nodeEngineDeps();
  // Both ends hash their digest (and the destination the module it was sent): counted, each a real run of the engine.
  let digests = 0;
  const counted = { ...deps, sha256Hex: (b: Uint8Array) => { digests++; return deps.sha256Hex(b); } };
  const cache = new InstrumentCache();
  const first = await warmMigrationPaths(counted, cache, guestsDir());
  assert.equal(first.verified, true);
  assert.deepEqual(first.relay, { toHost: 6, toHome: 11 }, 'and a client relay ran, records both ways');
  assert.ok(digests >= 3, `${digests} SHA-256 digests: the source's, the destination's and the module's expected`);
  assert.ok(Number.isFinite(first.ms) && first.ms > 0);
  // Again in the same process: its VMs were stopped, nothing of the first run is in the way.
  const before = digests;
  assert.equal((await warmMigrationPaths(counted, cache, guestsDir())).verified, true);
  assert.ok(digests >= before + 3);
});

test('a host that warms up leaves nothing of it behind: no VM listed, none of its memory pooled', async () => {
  await withHosts(async (a, b) => {
    const warmed = (h: Host) => new Promise<WarmUpJson>((r) => { const w = h.agent.warmUpStatus(); if (w?.state !== 'running') r(w!); else h.agent.once('warmed', r); });
    for (const w of await Promise.all([warmed(a), warmed(b)])) assert.deepEqual(w.state === 'done' && w.verified, true);
    assert.equal((await http(`${a.url}/v1/vms`, 'POST', { name: 'kv', guest: 'kv', memory: '16MiB' })).status, 201);
    const r = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'kv', to: b.url, mode: 'precopy' });
    assert.equal(r.status, 202, JSON.stringify(r.json));
    assert.equal((await finished(a, r.json.id)).status, 'succeeded');
    const hosts = await Promise.all([a, b].map(async (h) => (await http(`${h.url}/v1/host`, 'GET')).json));
    for (const host of hosts) assert.equal(host.warmUp.state, 'done');
    // a holds kv's memory, which left; b nothing (kv runs there).
    assert.deepEqual(hosts.map((h) => h.memoryPool.memories), [1, 0]);
    assert.deepEqual(a.agent.list().map((v) => v.name), []);
    for (let i = 0; i < 200 && b.agent.list().length === 0; i++) await new Promise((res) => setTimeout(res, 10));
    assert.deepEqual(b.agent.list().map((v) => v.name), ['kv']);
  }, { a: { warmMigrations: true }, b: { warmMigrations: true } });
});

for (const gated of ['a', 'b'] as const) {
  test(`a migration waits for the warm-up of the host it ${gated === 'a' ? 'leaves' : 'goes to'}: nothing moves until it is over`, async () => {
    let open = () => {};
    const held = () => new Promise<WarmUpResult>((r) => { open = () => r({ ms: 1, verified: true }); });
    const done = () => Promise.resolve({ ms: 1, verified: true });
    await withHosts(async (a, b) => {
      try {
        assert.equal((await http(`${a.url}/v1/vms`, 'POST', { name: 'kv', guest: 'kv', memory: '16MiB' })).status, 201);
        const r = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'kv', to: b.url, mode: 'precopy' });
        assert.equal(r.status, 202);
        // Long enough for the whole migration of 16 MiB (well under a second here) had it not waited.
        await new Promise((res) => setTimeout(res, 1000));
        assert.equal((await http(`${a.url}/v1/migrations/${r.json.id}`, 'GET')).json.status, 'running');
        assert.deepEqual(b.agent.list(), []);
        open();
        assert.equal((await finished(a, r.json.id)).status, 'succeeded');
      } finally {
        open(); // closing a host waits for its warm-up
      }
    }, { a: { warmMigrations: gated === 'a' ? held : done }, b: { warmMigrations: gated === 'b' ? held : done } });
  });
}

test('a warm-up that cannot run (no memstress guest) is reported as failed and holds nothing up', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-warm-'));
  const agent = new HostAgent({ name: 'w', dataDir: join(dir, 'data'), guestsDir: join(dir, 'no-guests'), warmMigrations: true });
  try {
    const warmed = new Promise<WarmUpJson>((r) => agent.once('warmed', r));
    const url = await agent.listen();
    const w = await warmed;
    assert.equal(w.state, 'failed');
    assert.match(w.state === 'failed' ? w.error : '', /memstress\.wasm/);
    assert.deepEqual((await http(`${url}/v1/host`, 'GET')).json.warmUp, w);
  } finally {
    await agent.close();
    await rm(dir, { recursive: true, force: true });
  }
});

/** `p`, or a failure named `what` after `ms` (a hang fails here, not at the runner's timeout). */
function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => { timer = setTimeout(() => reject(new Error(`${what} took longer than ${ms} ms`)), ms); });
  return Promise.race([p, late]).finally(() => clearTimeout(timer));
}

/** A warm-up that ends only when it is abandoned: it rejects once its signal aborts, and says whether it was. */
function hanging(): { run: (signal: AbortSignal) => Promise<WarmUpResult>; aborted: () => boolean } {
  let seen: AbortSignal | null = null;
  return {
    run: (signal) => {
      seen = signal;
      return new Promise((_, reject) => {
        signal.addEventListener('abort', () => reject(new Error('stopped as asked')), { once: true });
        // Only so that a host that never asks (a failing test) can still be closed.
        setTimeout(() => reject(new Error('never told to stop')), 15_000).unref();
      });
    },
    aborted: () => seen?.aborted === true,
  };
}

test('a warm-up that outlasts its time limit is abandoned: reported as failed, and migrations go ahead', async () => {
  const stuck = hanging();
  await withHosts(async (a, b) => {
    const w = await within(new Promise<WarmUpJson>((r) => { const s = a.agent.warmUpStatus(); if (s?.state !== 'running') r(s!); else a.agent.once('warmed', r); }), 10_000, 'the warm-up past its limit');
    assert.equal(stuck.aborted(), true, 'the warm-up was told to stop');
    assert.deepEqual(w, { state: 'failed', error: 'the warm-up migration did not finish within 300 ms' });
    assert.deepEqual((await http(`${a.url}/v1/host`, 'GET')).json.warmUp, w);
    assert.equal((await http(`${a.url}/v1/vms`, 'POST', { name: 'kv', guest: 'kv', memory: '16MiB' })).status, 201);
    const r = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'kv', to: b.url, mode: 'precopy' });
    assert.equal(r.status, 202, JSON.stringify(r.json));
    assert.equal((await finished(a, r.json.id)).status, 'succeeded');
  }, { a: { warmMigrations: stuck.run, warmUpLimitMs: 300 }, b: { warmMigrations: () => Promise.resolve({ ms: 1, verified: true }) } });
});

test('closing a host stops its warm-up instead of waiting for it', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-warm-'));
  const stuck = hanging();
  const agent = new HostAgent({ name: 'w', dataDir: join(dir, 'data'), warmMigrations: stuck.run });
  try {
    const warmed = new Promise<WarmUpJson>((r) => agent.once('warmed', r));
    await agent.listen();
    assert.deepEqual(agent.warmUpStatus(), { state: 'running' });
    await within(agent.close(), 10_000, 'close() with a warm-up under way'); // the default limit is a minute
    assert.equal(stuck.aborted(), true);
    assert.deepEqual(await warmed, { state: 'failed', error: 'host w is shutting down' });
  } finally {
    await agent.close();
    await rm(dir, { recursive: true, force: true });
  }
});

test('the built-in warm-up stops when its signal aborts, at any point, with the reason given', async () => {
  const cache = new InstrumentCache();
  const before = new AbortController();
  before.abort(new Error('not now'));
  await assert.rejects(warmMigrationPaths(nodeEngineDeps(), cache, guestsDir(), before.signal), /not now/);
  // Part-way: the guest rewritten (first run) or the migration under way (the rewrite cached).
  for (const afterMs of [5, 40]) {
    const ac = new AbortController();
    const running = warmMigrationPaths(nodeEngineDeps(), cache, guestsDir(), ac.signal);
    setTimeout(() => ac.abort(new Error(`stop after ${afterMs} ms`)), afterMs);
    await assert.rejects(running, (e: Error) => ac.signal.aborted && e instanceof Error);
  }
  // Nothing of those runs is in the way of a whole one.
  assert.equal((await warmMigrationPaths(nodeEngineDeps(), cache, guestsDir())).verified, true);
});

test('a host that is not asked to warm up reports none', async () => {
  await withHosts(async (a) => {
    assert.equal((await http(`${a.url}/v1/host`, 'GET')).json.warmUp, null);
  });
});

test('ferry host start warms up unless told --no-warm-up, and says so in --help', async () => {
  const help = await ferry(['host', 'start', '--help']);
  assert.match(help.stdout, /--no-warm-up\s+skip the warm-up migration/);
  await withHostStarted('warm', [], async (host, started) => {
    assert.notEqual(host.warmUp, null);
    // Done, or still running: GET /v1/host asked at once.
    let w = host.warmUp;
    for (let i = 0; i < 500 && w.state === 'running'; i++) {
      await new Promise((r) => setTimeout(r, 20));
      w = (await http(`${started.control}/v1/host`, 'GET')).json.warmUp;
    }
    assert.deepEqual([w.state, w.verified], ['done', true]);
  });
  await withHostStarted('cold', ['--no-warm-up'], (host) => assert.equal(host.warmUp, null));
});
