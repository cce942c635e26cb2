/** A host agent in a process of its own, as `ferry demo` and the clients bench run two. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HostProcessError, startHostProcess, startHostProcesses } from '../../src/node/host-process.js';

test('a host process answers its API; an error answer and a host gone are HostProcessErrors naming it', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-host-process-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const h = await startHostProcess('hp-a', dir);
  try {
    const info = await h.api<{ name: string }>('GET', '/v1/host');
    assert.equal(info.name, 'hp-a');
    await assert.rejects(h.api('POST', '/v1/vms', { name: 'x', guest: 'no-such-guest', memory: '64MiB' }), (e: unknown) => e instanceof HostProcessError && e.code === 'ERR_HOST_PROCESS' && /hp-a: POST \/v1\/vms answered HTTP 4\d\d/.test(e.message));
  } finally {
    await h.stop();
  }
  assert.ok(h.child.exitCode !== null || h.child.signalCode !== null, 'stop() resolves once the process has exited');
  await assert.rejects(h.api('GET', '/v1/host'), (e: unknown) => e instanceof HostProcessError && /hp-a: GET \/v1\/host failed: it exited/.test(e.message));
});

test('a host that cannot start is a HostProcessError with what it said', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-host-process-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await assert.rejects(startHostProcess('not a name!', dir), (e: unknown) => e instanceof HostProcessError && /host not a name! exited \(2\) before it listened: .*host name must be/.test(e.message));
});

test('startHostProcesses: one host that cannot start fails them all by name, and the ones that started are stopped', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-host-process-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await assert.rejects(startHostProcesses(['hp-b', 'not a name!'], dir), (e: unknown) => e instanceof HostProcessError && /host not a name! exited/.test(e.message));
  // A host of that name still running would hold the name under the state dir.
  const [again] = await startHostProcesses(['hp-b'], dir);
  try {
    assert.equal((await again.api<{ name: string }>('GET', '/v1/host')).name, 'hp-b');
  } finally {
    await again.stop();
  }
});
