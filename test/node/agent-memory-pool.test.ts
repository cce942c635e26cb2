/**
 * The host agent's guest memory pool: VMs that leave a host (stopped, migrated away, an arrival
 * that failed) give their memory back, and VMs created or arriving later with the same memory
 * shape take it. Real agents in one process, real TCP on 127.0.0.1, stats read from GET /v1/host.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DEFAULT_MEMORY_POOL_BYTES, HostAgent, type HostMemoryPoolJson } from '../../src/node/agent/agent.js';
import { InvalidArgumentError } from '../../src/core/errors.js';
import { pageHashBackend, pageHashIsa } from '../../src/node/vm/page-hash.js';
import { KvClient } from '../../src/node/kv-client.js';
import { leaveWhenDone } from '../helpers/leave-when-done.js';
import { restoreSnapshot } from '../../src/node/vm/snapshot.js';
import { InstrumentCache } from '../../src/node/vm/instrument.js';
import { clientOf, finished, gatedTcp, http, withHosts, type Host, type Reply } from '../helpers/agents.js';
import { ferry, withHostStarted } from '../helpers/ferry-cli.js';

leaveWhenDone();

/** The pool as the host info endpoint reports it. */
async function pool(host: Host): Promise<HostMemoryPoolJson> {
  const r = await http(`${host.url}/v1/host`, 'GET');
  assert.equal(r.status, 200);
  return r.json.memoryPool as HostMemoryPoolJson;
}

/** Polls the host info until `ok` holds (at most 500 looks), then returns the pool. */
async function poolWhen(host: Host, ok: (p: HostMemoryPoolJson) => boolean): Promise<HostMemoryPoolJson> {
  let p = await pool(host);
  for (let i = 0; i < 500 && !ok(p); i++) {
    await new Promise((r) => setTimeout(r, 10));
    p = await pool(host);
  }
  return p;
}


async function migrate(from: Host, to: Host, mode: string): Promise<Reply> {
  const r = await http(`${from.url}/v1/migrations`, 'POST', { vm: 'kv', to: to.url, mode });
  assert.equal(r.status, 202, JSON.stringify(r.json));
  return finished(from, r.json.id);
}

/**
 * The destination's VM once it is listed (the source may report success a moment before the
 * destination has read the last frame).
 */
async function arrived(host: Host, name: string): Promise<ReturnType<HostAgent['vm']>> {
  for (let i = 0; i < 500 && !host.agent.list().some((v) => v.name === name); i++) await new Promise((r) => setTimeout(r, 10));
  return host.agent.vm(name);
}

async function keysAreThere(c: KvClient, n: number): Promise<void> {
  const got = await Promise.all(Array.from({ length: n }, (_, i) => c.get(`k${i}`)));
  assert.deepEqual(got, Array.from({ length: n }, (_, i) => `v${i}`));
}

for (const back of ['precopy', 'postcopy'] as const) {
  test(`kv moves a → b (pre-copy) and back (${back}): the way back takes the memory a kept, verifies, and every key is there`, async () => {
    await withHosts(async (a, b) => {
      await a.agent.createVm({ name: 'kv', guest: 'kv', memory: '64MiB', expose: '127.0.0.1:0' });
      const client = await clientOf(a, 'kv');
      await Promise.all(Array.from({ length: 500 }, (_, i) => client.set(`k${i}`, `v${i}`)));
      assert.deepEqual(await pool(a), { capacityBytes: DEFAULT_MEMORY_POOL_BYTES, hits: 0, misses: 1, memories: 0, bytes: 0 });

      let done = await migrate(a, b, 'precopy');
      assert.equal(done.status, 'succeeded', JSON.stringify(done.error));
      assert.equal(done.report.verified, true);
      // The VM left a: its memory waits there. b had nothing to give the arrival.
      const kept = await pool(a);
      assert.equal(kept.memories, 1);
      assert.ok(kept.bytes > 64 << 10, `a keeps the VM's memory (${kept.bytes} bytes)`);
      assert.deepEqual(await pool(b), { capacityBytes: DEFAULT_MEMORY_POOL_BYTES, hits: 0, misses: 1, memories: 0, bytes: 0 });
      assert.equal((await arrived(b, 'kv')).memoryBacked, false);
      // Its vCPU thread was b's spare, started before the migration; b starts the next one.
      const threads = (await http(`${b.url}/v1/host`, 'GET')).json.vcpuThreads as { spares: number; started: number; taken: number };
      assert.equal(threads.spares, 1);
      assert.equal(threads.taken, 1, 'the arrival took the spare thread');
      await keysAreThere(client, 500);

      done = await migrate(b, a, back);
      assert.equal(done.status, 'succeeded', JSON.stringify(done.error));
      assert.equal(done.report.verified, true);
      const after = await pool(a);
      assert.equal(after.hits, 1, 'the arrival on a took the memory a kept');
      assert.equal(after.memories, 0);
      assert.equal((await arrived(a, 'kv')).memoryBacked, true);
      assert.equal((await pool(b)).memories, 1, 'b keeps the memory of the VM that left it');
      await keysAreThere(client, 500);
      await client.set('after', 'home');
      assert.equal(await client.get('after'), 'home');
      await client.close();
    });
  });
}

/** Resolves with the console lines of VM `name` once it halts. */
function runToHalt(agent: HostAgent, name: string): Promise<{ code: number; lines: string[] }> {
  const lines: string[] = [];
  const onConsole = (vm: string, line: string) => {
    if (vm === name) lines.push(line);
  };
  agent.on('console', onConsole);
  return new Promise((resolve) => {
    const onHalt = (vm: string, code: number) => {
      if (vm !== name) return;
      agent.off('console', onConsole);
      agent.off('halt', onHalt);
      resolve({ code, lines });
    };
    agent.on('halt', onHalt);
  });
}

test('a VM deleted through the API gives its memory to the pool; the next VM of that shape takes it and runs as one in fresh memory does', async () => {
  // compute keeps the memory size it declares, so a new VM of it has the shape the old one left.
  const spec = { guest: 'compute', memory: '16MiB', config: 'kind=hash iters=200000 seed=7' };
  await withHosts(async (a) => {
    const fresh = runToHalt(a.agent, 'one');
    let r = await http(`${a.url}/v1/vms`, 'POST', { name: 'one', ...spec });
    assert.equal(r.status, 201, JSON.stringify(r.json));
    assert.equal(a.agent.vm('one').memoryBacked, false);
    const first = await fresh;
    assert.equal(first.code, 0);
    assert.match(first.lines.join('\n'), /compute: hash iters=200000 digest=[0-9a-f]+/);
    assert.equal((await http(`${a.url}/v1/vms/one`, 'DELETE')).status, 204);
    const kept = await pool(a);
    assert.deepEqual(kept, { capacityBytes: DEFAULT_MEMORY_POOL_BYTES, hits: 0, misses: 1, memories: 1, bytes: (2 << 20) + (64 << 10) });

    const pooled = runToHalt(a.agent, 'two');
    r = await http(`${a.url}/v1/vms`, 'POST', { name: 'two', ...spec });
    assert.equal(r.status, 201, JSON.stringify(r.json));
    assert.deepEqual(await pool(a), { ...kept, hits: 1, memories: 0, bytes: 0 });
    assert.equal(a.agent.vm('two').memoryBacked, true);
    assert.deepEqual(await pooled, first, 'the same run, the same output');

    // Memory serves only its exact shape: a VM with another ceiling does not take it.
    assert.equal((await http(`${a.url}/v1/vms/two`, 'DELETE')).status, 204);
    assert.equal((await pool(a)).memories, 1);
    r = await http(`${a.url}/v1/vms`, 'POST', { name: 'three', ...spec, memory: '32MiB' });
    assert.equal(r.status, 201, JSON.stringify(r.json));
    assert.deepEqual(await pool(a), { ...kept, hits: 1, misses: 2, memories: 1 });
    assert.equal(a.agent.vm('three').memoryBacked, false);
  });
});

test('snapshot --stop: the memory goes to the pool after the snapshot is written, and the restore takes it back with every key', async () => {
  await withHosts(async (a) => {
    await a.agent.createVm({ name: 'kv', guest: 'kv', memory: '64MiB', expose: '127.0.0.1:0' });
    const client = await clientOf(a, 'kv');
    await Promise.all(Array.from({ length: 300 }, (_, i) => client.set(`k${i}`, `v${i}`)));
    await client.close();
    const out = join(a.agent.dataDir, 'kv.snap');
    const r = await http(`${a.url}/v1/vms/kv/snapshot`, 'POST', { out, stop: true });
    assert.equal(r.status, 200, JSON.stringify(r.json));
    assert.deepEqual(a.agent.list(), []);
    assert.equal((await pool(a)).memories, 1);
    // The snapshot says where the endpoint's connection ids stood (one client so far), so the
    // restore's endpoint never hands a new client an id the guest may still hold records of.
    const { vm: peek, header } = await restoreSnapshot(out, { cache: new InstrumentCache(), noStart: true });
    await peek.stop();
    assert.equal(header.netConnsFrom, 2);
    await a.agent.restoreVm(out, { expose: '127.0.0.1:0' });
    // The restore is created at the snapshot's size: the memory the VM gave back fits it.
    assert.equal((await pool(a)).hits, 1);
    assert.equal(a.agent.vm('kv').memoryBacked, true);
    const again = await clientOf(a, 'kv');
    await keysAreThere(again, 300);
    await again.close();
  });
});

test('memoryPoolBytes 0: nothing is ever pooled, whether VMs stop or migrate away', async () => {
  await withHosts(async (a, b) => {
    await a.agent.createVm({ name: 'kv', guest: 'kv', memory: '16MiB' });
    await a.agent.stopVm('kv');
    await a.agent.createVm({ name: 'kv', guest: 'kv', memory: '16MiB' });
    assert.equal(a.agent.vm('kv').memoryBacked, false);
    const done = await migrate(a, b, 'precopy');
    assert.equal(done.status, 'succeeded', JSON.stringify(done.error));
    assert.equal(done.report.verified, true);
    // Requests still count as misses: the VMs took fresh memory.
    assert.deepEqual(await pool(a), { capacityBytes: 0, hits: 0, misses: 2, memories: 0, bytes: 0 });
    // b pools (its default): the same VM leaving b fills a pool that is on.
    await arrived(b, 'kv');
    await b.agent.stopVm('kv');
    assert.equal((await pool(b)).memories, 1);
  }, { a: { memoryPoolBytes: 0 } });
});

test('the pool capacity defaults to 512 MiB; one that is not a whole number of bytes ≥ 0 is refused by name', () => {
  const dir = join(tmpdir(), 'ferry-pool-none');
  assert.equal(new HostAgent({ name: 'x', dataDir: dir }).memoryPool().capacityBytes, 512 << 20);
  assert.equal(new HostAgent({ name: 'x', dataDir: dir, memoryPoolBytes: 1 << 30 }).memoryPool().capacityBytes, 1 << 30);
  for (const bad of [-1, 1.5, Number.NaN]) {
    assert.throws(() => new HostAgent({ name: 'x', dataDir: dir, memoryPoolBytes: bad }), (e: unknown) => e instanceof InvalidArgumentError && /memory pool capacity/.test(e.message), String(bad));
  }
});

test('a migration the destination refuses leaves the VM running at the source, its memory not pooled', async () => {
  await withHosts(async (a, b) => {
    await a.agent.createVm({ name: 'kv', guest: 'kv', memory: '64MiB', expose: '127.0.0.1:0' });
    const client = await clientOf(a, 'kv');
    await Promise.all(Array.from({ length: 300 }, (_, i) => client.set(`k${i}`, `v${i}`)));
    const done = await migrate(a, b, 'hybrid');
    assert.equal(done.status, 'failed');
    assert.equal(done.error.code, 'ERR_NO_CAPACITY');
    assert.equal((await pool(a)).memories, 0);
    assert.equal(a.agent.summary('kv').stats.state, 'running');
    await keysAreThere(client, 300);
    await client.close();
  }, { b: { capacityBytes: 32 << 20 } });
});


test('a migration cancelled in pre-copy: the destination pools the VM it discards, the source keeps its VM; the next try takes the pooled memory', async () => {
  const gated = gatedTcp(200_000);
  await withHosts(async (a, b) => {
    await a.agent.createVm({ name: 'kv', guest: 'kv', memory: '64MiB', expose: '127.0.0.1:0' });
    const client = await clientOf(a, 'kv');
    // Non-zero pages so pre-copy has more than the gate lets through.
    await Promise.all(Array.from({ length: 3000 }, (_, i) => client.set(`k${i}`, `v${i}`.padEnd(100, 'p'))));
    const r = await http(`${a.url}/v1/migrations`, 'POST', { vm: 'kv', to: b.url, mode: 'precopy' });
    assert.equal(r.status, 202);
    await gated.stalled;
    assert.equal((await http(`${a.url}/v1/migrations/${r.json.id}`, 'DELETE')).status, 202);
    gated.open();
    const cancelled = await finished(a, r.json.id);
    assert.equal(cancelled.status, 'cancelled');
    // b learns of the cancellation from the stream; then it discards the VM it was filling.
    const discarded = await poolWhen(b, (p) => p.memories > 0);
    assert.equal(discarded.memories, 1, 'b pooled the memory of the VM it discarded');
    assert.equal(discarded.misses, 1);
    assert.deepEqual(b.agent.list(), []);
    assert.equal((await pool(a)).memories, 0, 'the VM stays on a with its memory');
    assert.equal(a.agent.summary('kv').stats.state, 'running');
    const got = await Promise.all(Array.from({ length: 3000 }, (_, i) => client.get(`k${i}`)));
    assert.deepEqual(got, Array.from({ length: 3000 }, (_, i) => `v${i}`.padEnd(100, 'p')));

    const done = await migrate(a, b, 'precopy');
    assert.equal(done.status, 'succeeded', JSON.stringify(done.error));
    assert.equal(done.report.verified, true);
    assert.equal((await pool(b)).hits, 1);
    assert.equal((await arrived(b, 'kv')).memoryBacked, true);
    assert.equal(await client.get('k2999'), 'v2999'.padEnd(100, 'p'));
    await client.close();
  }, { a: { transport: gated.transport } });
});

test('ferry host start --memory-pool: a size (0: off) reaches the agent; a bad one is refused by name with exit 2', async () => {
  for (const bad of ['bogus', '-5MiB', '12parsecs']) {
    const r = await ferry(['host', 'start', '--name', 'a', '--memory-pool', bad]);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, new RegExp(`invalid memory pool size '${bad}'`));
  }
  const help = await ferry(['host', 'start', '--help']);
  assert.match(help.stdout, /--memory-pool <size>[\s\S]*0 turns it off[\s\S]*default: 512 MiB/);

  for (const [flag, bytes] of [['64MiB', 64 << 20], ['0', 0]] as const) {
    await withHostStarted<{ control: string; memoryPoolBytes: number; pageHash: string; pageHashIsa: string | null }>(`p${bytes}`, ['--memory-pool', flag], (host, started) => {
      assert.equal(started.memoryPoolBytes, bytes);
      assert.equal(started.pageHash, pageHashBackend(), 'the started line says how this host hashes pages');
      assert.equal(started.pageHashIsa, pageHashIsa(), 'and with which instructions');
      assert.deepEqual(host.memoryPool, { capacityBytes: bytes, hits: 0, misses: 0, memories: 0, bytes: 0 });
    });
  }
});

test('ferry host start --spare-vcpu-threads: a count reaches the agent (GET /v1/host); a bad one is refused by name with exit 2', async () => {
  for (const bad of ['x', '-1', '17', '1.5']) {
    const r = await ferry(['host', 'start', '--name', 'a', '--spare-vcpu-threads', bad]);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /spare vCPU threads must be an integer from 0 to 16/);
  }
  const help = await ferry(['host', 'start', '--help']);
  assert.match(help.stdout, /--spare-vcpu-threads <n>[\s\S]*default: 1/);
  for (const n of [0, 2]) {
    await withHostStarted(`s${n}`, ['--spare-vcpu-threads', String(n)], (host) => {
      assert.deepEqual(host.vcpuThreads, { spares: n, started: n, taken: 0, postcopyNice: 0 });
    });
  }
});

test('pooled memory yields to admitted VMs: the pool keeps only what reservations leave of the host capacity', async () => {
  const spec = { guest: 'compute', config: 'kind=hash iters=1000 seed=7' };
  await withHosts(async (a) => {
    assert.equal((await http(`${a.url}/v1/vms`, 'POST', { name: 'one', ...spec, memory: '16MiB' })).status, 201);
    assert.equal((await http(`${a.url}/v1/vms/one`, 'DELETE')).status, 204);
    const kept = await pool(a);
    assert.equal(kept.memories, 1);
    // 33 of 34 MiB reserved: the 2 MiB the pool holds no longer fit beside it.
    assert.equal((await http(`${a.url}/v1/vms`, 'POST', { name: 'big', ...spec, memory: '33MiB' })).status, 201);
    assert.deepEqual(await pool(a), { ...kept, misses: kept.misses + 1, memories: 0, bytes: 0 });
    // Room again: what leaves is pooled again.
    assert.equal((await http(`${a.url}/v1/vms/big`, 'DELETE')).status, 204);
    assert.equal((await pool(a)).memories, 1);
  }, { a: { capacityBytes: 34 << 20 } });
});

test('a restore the host has no room for is refused by name before any memory is taken, and changes nothing', async () => {
  await withHosts(async (a, b) => {
    await a.agent.createVm({ name: 'kv', guest: 'kv', memory: '64MiB' });
    const out = join(a.agent.dataDir, 'kv.snap');
    assert.equal((await http(`${a.url}/v1/vms/kv/snapshot`, 'POST', { out })).status, 200);
    const before = await pool(b);
    await assert.rejects(b.agent.restoreVm(out), (e: unknown) => (e as { code?: string }).code === 'ERR_NO_CAPACITY');
    assert.deepEqual(b.agent.list(), []);
    assert.deepEqual(await pool(b), before, 'no memory was asked of the pool');
    // A name already taken is refused the same way, before memory too.
    await assert.rejects(a.agent.restoreVm(out), (e: unknown) => e instanceof Error && /already exists/.test(e.message));
    assert.deepEqual(a.agent.list().map((v) => v.name), ['kv']);
  }, { b: { capacityBytes: 32 << 20 } });
});
