import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { KvClient } from '../../src/node/kv-client.js';
import { MonotonicEta, MonotonicFraction } from '../../src/node/cli/migrate.js';
import { ferry, ferryBin } from '../helpers/ferry-cli.js';

const bin = ferryBin;

interface Started { control: string; migration: string; name: string }

/** `ferry host start … --json` as a child process; resolves with its "started" event. */
function hostProcess(args: string[]): Promise<{ proc: ChildProcess; started: Started; exit: Promise<number> }> {
  const proc = spawn(process.execPath, [bin, 'host', 'start', '--json', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (d) => (stderr += d));
  const exit = new Promise<number>((r) => proc.on('exit', (code) => r(code ?? -1)));
  return new Promise((resolve, reject) => {
    const rl = createInterface({ input: proc.stdout! });
    rl.on('line', (line) => {
      const ev = JSON.parse(line) as Started & { event: string };
      if (ev.event === 'started') resolve({ proc, started: ev, exit });
    });
    void exit.then((code) => reject(new Error(`ferry host start exited with ${code} before starting: ${stderr}`)));
  });
}

test('ferry host start ×2, ferry host boot kv on a, ferry migrate --json → b and back by host name; the client keeps its data', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-mcli-'));
  const state = ['--state-dir', join(dir, 'state')];
  const a = await hostProcess(['--name', 'a', '--listen', '127.0.0.1:0', '--data-dir', join(dir, 'a'), ...state]);
  const b = await hostProcess(['--name', 'b', '--listen', '127.0.0.1:0', '--data-dir', join(dir, 'b'), ...state]);
  try {
    assert.match(a.started.control, /^http:\/\/127\.0\.0\.1:\d+$/);
    assert.match(a.started.migration, /^127\.0\.0\.1:\d+$/);
    const reg = JSON.parse(await readFile(join(dir, 'state', 'hosts', 'a.json'), 'utf8'));
    assert.equal(reg.control, a.started.control);

    const again = await ferry(['host', 'start', '--name', 'a', ...state]);
    assert.equal(again.code, 1);
    assert.match(again.stderr, /ERR_HOST_EXISTS/);

    const boot = await ferry(['host', 'boot', 'a', 'kv', '--memory', '64MiB', '--expose', '127.0.0.1:0', '--json', ...state]);
    assert.equal(boot.code, 0, boot.stderr);
    const ep = (JSON.parse(boot.stdout) as { endpoint: string }).endpoint;
    const client = new KvClient(ep.slice(0, ep.lastIndexOf(':')), Number(ep.slice(ep.lastIndexOf(':') + 1)));
    await client.connect();
    await Promise.all(Array.from({ length: 1000 }, (_, i) => client.set(`k${i}`, `v${i}`)));

    // --host given, --to a control URL.
    const out = await ferry(['migrate', 'kv', '--to', b.started.control, '--mode', 'precopy', '--downtime', '300ms', '--json', '--host', a.started.control, ...state]);
    assert.equal(out.code, 0, out.stderr);
    const job = JSON.parse(out.stdout);
    assert.equal(job.status, 'succeeded');
    assert.equal(job.report.verified, true);
    assert.equal(job.report.technique.length > 0, true);
    for (let i = 0; i < 1000; i += 97) assert.equal(await client.get(`k${i}`), `v${i}`);

    // Found by its host's registration, --to a host name; the table instead of JSON.
    const back = await ferry(['migrate', 'kv', '--to', 'a', '--mode', 'postcopy', ...state]);
    assert.equal(back.code, 0, back.stderr);
    assert.match(back.stdout, /total migration time/);
    assert.match(back.stdout, /verified\s+yes/);
    for (let i = 0; i < 1000; i += 89) assert.equal(await client.get(`k${i}`), `v${i}`);
    await client.close();

    const nothing = await ferry(['migrate', 'ghost', '--to', 'b', '--mode', 'precopy', ...state]);
    assert.equal(nothing.code, 1);
    assert.match(nothing.stderr, /ERR_NOT_FOUND/);
  } finally {
    a.proc.kill('SIGTERM');
    b.proc.kill('SIGTERM');
    assert.equal(await a.exit, 0);
    assert.equal(await b.exit, 0);
    await rm(dir, { recursive: true, force: true });
  }
});

test('ferry migrate and host start refuse bad flags with exit 2; --help works for each', async () => {
  for (const args of [
    ['migrate', 'kv', '--to', 'b'],
    ['migrate', 'kv', '--to', 'b', '--mode', 'teleport'],
    ['migrate', 'kv', '--to', 'b', '--mode', 'precopy', '--downtime', 'soon'],
    ['migrate', 'kv', '--to', 'b', '--mode', 'precopy', '--bandwidth', 'fast'],
    ['migrate', 'kv', '--to', 'b', '--mode', 'precopy', '--host', 'a'],
    ['migrate', '--to', 'b', '--mode', 'precopy'],
    ['host', 'start'],
    ['host', 'start', '--name', 'a', '--listen', 'nowhere'],
    ['host', 'start', '--name', '../a'],
    ['host', 'boot', 'a'],
    ['host', 'boot', 'a', 'kv', '--memory', 'lots'],
  ]) {
    const r = await ferry(args);
    assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, /error/, args.join(' '));
  }
  for (const args of [['migrate', '--help'], ['host', '--help'], ['host', 'start', '--help'], ['host', 'boot', '--help'], ['host', 'list', '--help']]) {
    const r = await ferry(args);
    assert.equal(r.code, 0, args.join(' '));
    assert.match(r.stdout, /Usage: ferry/);
  }
});

test('the progress bar ETA never goes up and its fraction never goes back', () => {
  const eta = new MonotonicEta();
  assert.equal(eta.next(null, 0), null);
  assert.equal(eta.next(1000, 0), 1000);
  assert.equal(eta.next(5000, 100), 900, 'a higher estimate is clamped to the countdown');
  assert.equal(eta.next(200, 200), 200);
  assert.equal(eta.next(null, 300), 100);
  assert.equal(eta.next(10_000, 10_000), 0);
  const f = new MonotonicFraction();
  const p = (pagesSent: number, pagesRemaining: number, phase: 'precopy' | 'complete' = 'precopy') => ({ phase, mode: 'precopy' as const, round: 0, bytesSent: 0, pagesSent, pagesRemaining, dirtyRateBytesPerSec: 0, bandwidthBytesPerSec: 0, elapsedMs: 0 });
  assert.equal(f.next(p(50, 50)), 0.5);
  assert.equal(f.next(p(60, 200)), 0.5);
  assert.equal(f.next(p(0, 0, 'complete')), 1);
});
