import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { KvClient } from '../../src/node/kv-client.js';
import { ferry, ferryStarted, type StartedFerry } from '../helpers/ferry-cli.js';


/** Starts a foreground `ferry vm run|restore … --json` and resolves with its "started" event. */
function foreground(args: string[]): Promise<StartedFerry<{ endpoint: string | null; name: string }>> {
  return ferryStarted(args);
}

async function kv(endpoint: string): Promise<KvClient> {
  const i = endpoint.lastIndexOf(':');
  const c = new KvClient(endpoint.slice(0, i), Number(endpoint.slice(i + 1)));
  await c.connect();
  return c;
}

test('ferry vm run → list → snapshot --stop → restore elsewhere → stop, keeping the data', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-cli-'));
  const state = ['--state-dir', join(dir, 'state')];
  try {
    const a = await foreground(['vm', 'run', 'kv', '--name', 'store', '--memory', '64MiB', '--expose', '127.0.0.1:0', '--json', ...state]);
    const c1 = await kv(a.started.endpoint!);
    await c1.set('greeting', 'hello from the first process');
    await c1.close();

    const list = await ferry(['vm', 'list', '--json', ...state]);
    assert.equal(list.code, 0);
    assert.equal(JSON.parse(list.stdout.trim()).name, 'store');

    const snapFile = join(dir, 'store.snap');
    const snap = await ferry(['vm', 'snapshot', 'store', '--out', snapFile, '--stop', ...state]);
    assert.equal(snap.code, 0, snap.stderr);
    assert.match(snap.stdout, /snapshot of store: .*store\.snap/);
    assert.equal(await a.exit, 0, 'the first process ends when its VM is stopped');

    const b = await foreground(['vm', 'restore', snapFile, '--expose', '127.0.0.1:0', '--json', ...state]);
    const c2 = await kv(b.started.endpoint!);
    assert.equal(await c2.get('greeting'), 'hello from the first process');
    await c2.close();
    const stop = await ferry(['vm', 'stop', 'store', ...state]);
    assert.equal(stop.code, 0, stop.stderr);
    assert.equal(await b.exit, 0);
    const gone = await ferry(['vm', 'snapshot', 'store', '--out', snapFile, ...state]);
    assert.equal(gone.code, 1);
    assert.match(gone.stderr, /no running VM named 'store'.*ERR_NOT_FOUND/);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('every command has --help, and bad input gets a clear error and exit code', async () => {
  for (const cmd of [[], ['vm'], ['vm', 'run'], ['vm', 'restore'], ['vm', 'snapshot'], ['vm', 'list'], ['vm', 'stop'], ['demo']]) {
    const r = await ferry([...cmd, '--help']);
    assert.equal(r.code, 0, `${cmd.join(' ')} --help`);
    assert.match(r.stdout, /Usage: ferry/);
  }
  const help = await ferry(['vm', 'run', '--help']);
  for (const flag of ['--memory', '--expose', '--config', '--disk', '--budget']) assert.match(help.stdout, new RegExp(flag));

  let r = await ferry(['vm', 'run', 'kv', '--memory', 'lots']);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /invalid memory size 'lots'/);
  r = await ferry(['vm', 'run', 'kv', '--expose', 'nowhere']);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /invalid address 'nowhere'/);
  r = await ferry(['vm', 'frobnicate']);
  assert.equal(r.code, 2);
  r = await ferry(['vm', 'run', '/no/such/guest.wasm', '--state-dir', join(tmpdir(), 'ferry-cli-none')]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /neither a built-in guest .* nor an existing file/);
  r = await ferry(['vm', 'restore', '/no/such.snap', '--state-dir', join(tmpdir(), 'ferry-cli-none')]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /ERR_SNAPSHOT_OPEN/);
});

test('ferry host start --json whose reader went away keeps running, and stops cleanly when told (exit 0, its registration gone)', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-epipe-'));
  try {
    const h = await ferryStarted<{ control: string }>(['host', 'start', '--json', '--name', 'e', '--data-dir', join(dir, 'e'), '--state-dir', join(dir, 'state')]);
    h.proc.stdout!.destroy(); // `| head -1`: the next event it prints meets a closed pipe
    const r = await fetch(`${h.started.control}/v1/host`);
    assert.equal(r.status, 200, 'the host serves on');
    h.proc.kill('SIGTERM'); // it prints 'stopped' on the way out
    assert.equal(await h.exit, 0);
    const list = await ferry(['host', 'list', '--state-dir', join(dir, 'state')]);
    assert.doesNotMatch(list.stdout, /\be\b/, list.stdout);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
