import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HostAgent } from '../../src/node/agent/agent.js';
import { KvClient } from '../../src/node/kv-client.js';

async function withAgent(fn: (agent: HostAgent, url: string, dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-agent-'));
  const agent = new HostAgent({ name: 'h', dataDir: dir });
  const url = await agent.listen();
  try {
    await fn(agent, url, dir);
  } finally {
    await agent.close();
    await rm(dir, { recursive: true, force: true });
  }
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any -- JSON replies of several shapes, checked field by field
type Reply = any;

async function http(url: string, method: string, body?: unknown): Promise<{ status: number; json: Reply }> {
  const res = await fetch(url, { method, headers: body === undefined ? {} : { 'content-type': 'application/json' }, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  return { status: res.status, json: text ? JSON.parse(text) : null };
}

test('kv guest on the real runtime serves clients through its endpoint, across pause/resume', async () => {
  await withAgent(async (agent) => {
    await agent.createVm({ name: 'kv', guest: 'kv', memory: '128MiB', expose: '127.0.0.1:0' });
    const ep = agent.summary('kv').endpoint!;
    const [host, port] = [ep.slice(0, ep.lastIndexOf(':')), Number(ep.slice(ep.lastIndexOf(':') + 1))];
    const clients = await Promise.all([0, 1, 2].map(async () => { const c = new KvClient(host, port); await c.connect(); return c; }));
    await Promise.all(clients.map((c, i) => Promise.all(Array.from({ length: 300 }, (_, j) => c.set(`k${i}-${j}`, `v${i * j} with spaces`)))));
    // Requests sent while the VM is paused are held, not lost, and answered once it resumes.
    await agent.pauseVm('kv');
    const during = clients[0].get('k2-7');
    await new Promise((r) => setTimeout(r, 30));
    await agent.resumeVm('kv');
    assert.equal(await during, `v${2 * 7} with spaces`);
    assert.equal(await clients[1].get('k0-299'), `v0 with spaces`);
    assert.equal(await clients[1].get('nope'), null);
    assert.equal(await clients[2].request('DEL k1-1'), 'DELETED');
    assert.equal(await clients[2].request('COUNT'), 'COUNT 899');
    assert.match(await clients[2].request('FROB x'), /^ERR /);
    for (const c of clients) await c.close();
    assert.ok(agent.summary('kv').stats.progress >= 904, 'progress counts requests served');
  });
});

test('the C guest runs on the real runtime, prints through WASI fd_write, and halts', async () => {
  await withAgent(async (agent) => {
    const lines: string[] = [];
    agent.on('console', (_vm: string, line: string) => lines.push(line));
    const halted = new Promise<number>((r) => agent.on('halt', (_vm: string, code: number) => r(code)));
    await agent.createVm({ name: 'wf', guest: 'wordfreq', memory: '32MiB', config: 'words=20000 top=5' });
    assert.equal(await halted, 0);
    await new Promise((r) => setTimeout(r, 20));
    assert.ok(lines.length >= 5, `console lines: ${JSON.stringify(lines)}`);
  });
});

test('control API validates bodies and names its errors', async () => {
  await withAgent(async (agent, url) => {
    let r = await http(`${url}/v1/vms`, 'POST', { name: 'x', guest: 'kv' });
    assert.equal(r.status, 400);
    assert.equal(r.json.error.code, 'ERR_INVALID_BODY');
    assert.match(r.json.error.message, /^memory: required: a size such as 256MiB, or a byte count$/);
    r = await http(`${url}/v1/vms`, 'POST', { name: 'x', guest: 'kv', memory: true });
    assert.equal(r.status, 400);
    assert.match(r.json.error.message, /^memory: must be a size such as 256MiB .*, or a positive integer byte count$/);
    r = await http(`${url}/v1/vms`, 'POST', { name: 'x', guest: 'kv', memory: '12 parsecs' });
    assert.equal(r.status, 400);
    assert.equal(r.json.error.code, 'ERR_INVALID_ARGUMENT');
    r = await http(`${url}/v1/vms`, 'POST', { name: 'x', guest: 'no-such-guest', memory: '16MiB' });
    assert.equal(r.status, 404);
    r = await http(`${url}/v1/vms`, 'POST', { name: 'x', guest: 'kv', memory: '64MiB', bogus: 1 });
    assert.equal(r.status, 400);
    r = await http(`${url}/v1/vms/ghost/pause`, 'POST');
    assert.equal(r.status, 404);
    assert.equal(r.json.error.code, 'ERR_NOT_FOUND');
    const bad = await fetch(`${url}/v1/vms`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"name":' });
    assert.equal(bad.status, 400);
    assert.equal(((await bad.json()) as Reply).error.code, 'ERR_INVALID_BODY', 'the framework\'s own code (FST_…) stays inside');
    const form = await fetch(`${url}/v1/vms`, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: 'name=x' });
    assert.equal(form.status, 415);
    assert.deepEqual(((await form.json()) as Reply).error, { code: 'ERR_INVALID_BODY', message: 'the body must be JSON (content-type: application/json), not application/x-www-form-urlencoded' });
    // A missing field is "required", whatever zod would have said of a value it never got.
    r = await http(`${url}/v1/vms`, 'POST', { name: 'x', memory: '16MiB' });
    assert.equal(r.json.error.message, 'guest: required (expected string)');
    r = await http(`${url}/v1/migrations`, 'POST', { vm: 'x', to: 'b' });
    assert.equal(r.json.error.message, 'mode: required (expected one of "precopy"|"postcopy"|"hybrid")');
    r = await http(`${url}/v1/migrations`, 'POST', { vm: 'x', to: 'b', mode: 'sideways' });
    assert.match(r.json.error.message, /^mode: Invalid option: expected one of/, 'a wrong value is not called missing');
    // More memory than a VM can have is said so, before whether this host has room for it.
    r = await http(`${url}/v1/vms`, 'POST', { name: 'x', guest: 'kv', memory: '64GiB' });
    assert.equal(r.status, 400);
    assert.deepEqual(r.json.error, { code: 'ERR_INVALID_ARGUMENT', message: 'memory size 64.0 GiB is more than a VM can have: at most 4094 MiB (WebAssembly\'s 4 GiB less ferry\'s 2 MiB)' });
    r = await http(`${url}/v1/nowhere`, 'GET');
    assert.equal(r.status, 404);
    assert.equal(r.json.error.code, 'ERR_NOT_FOUND');
    assert.match(r.json.error.message, /^no such endpoint: GET \/v1\/nowhere/);
    assert.deepEqual((await http(`${url}/v1/vms`, 'GET')).json, [], 'nothing was created by bad requests');

    r = await http(`${url}/v1/vms`, 'POST', { name: 'm', guest: 'memstress', memory: '32MiB', config: 'mem=4MiB' });
    assert.equal(r.status, 201);
    assert.equal(r.json.name, 'm');
    r = await http(`${url}/v1/vms`, 'POST', { name: 'm', guest: 'memstress', memory: '32MiB' });
    assert.equal(r.status, 409, 'duplicate names are refused');
    assert.equal((await http(`${url}/v1/vms/m/pause`, 'POST')).json.stats.state, 'paused');
    r = await http(`${url}/v1/vms/m/snapshot`, 'POST', { out: 'relative.snap' });
    assert.equal(r.status, 400);
    assert.equal((await http(`${url}/v1/vms/m/resume`, 'POST')).json.stats.state, 'running');
    assert.equal((await http(`${url}/v1/vms/m`, 'DELETE')).status, 204);
    assert.equal((await http(`${url}/v1/vms/m`, 'GET')).status, 404);
    assert.equal(agent.list().length, 0);
  });
});

test('a VM with a disk snapshots on one host and restores, disk re-attached, on another', async () => {
  await withAgent(async (a, _url, dir) => {
    const b = new HostAgent({ name: 'b', dataDir: join(dir, 'b') });
    try {
      await a.createVm({ name: 'm', guest: 'memstress', memory: '32MiB', config: 'mem=4MiB seed=3', disk: join(dir, 'm.img'), diskSize: '1MiB' });
      await new Promise((r) => setTimeout(r, 50));
      const snap = join(dir, 'm.snap');
      const s = await a.snapshotVm('m', snap, { stop: true });
      assert.ok(s.pagesWritten > 1000, 'a 4 MiB random region is mostly non-zero pages');
      assert.equal(a.list().length, 0);
      await b.restoreVm(snap, { paused: true });
      assert.equal(b.summary('m').stats.state, 'paused');
      await b.resumeVm('m');
      const p0 = b.summary('m').stats.progress;
      await new Promise((r) => setTimeout(r, 50));
      assert.ok(b.summary('m').stats.progress > p0, 'the restored VM keeps working');
    } finally {
      await b.close();
    }
  });
});
