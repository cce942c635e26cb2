import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { KvClient } from '../../src/node/kv-client.js';
import { Command, CommanderError } from 'commander';
import { MonotonicEta, MonotonicFraction, formatTransfer } from '../../src/node/cli/migrate.js';
import { buildProgram } from '../../src/node/cli/main.js';
import { systemCongestionControl } from '../../src/node/transport/congestion.js';
import { ferry, ferryStarted, type StartedFerry } from '../helpers/ferry-cli.js';


interface Started { control: string; migration: string; name: string }

/** `ferry host start … --json` as a child process; resolves with its "started" event. */
function hostProcess(args: string[]): Promise<StartedFerry<Started>> {
  return ferryStarted(['host', 'start', '--json', ...args]);
}

/** Stops host processes (each must exit 0 on SIGTERM) and removes their directory. */
async function stopHosts(dir: string, ...hosts: { proc: ChildProcess; exit: Promise<number> }[]): Promise<void> {
  for (const h of hosts) h.proc.kill('SIGTERM');
  for (const h of hosts) assert.equal(await h.exit, 0);
  await rm(dir, { recursive: true, force: true });
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
    // The vm commands find a VM on a host agent as they find one in a process of its own.
    const listed = await ferry(['vm', 'list', '--json', ...state]);
    assert.equal(listed.code, 0, listed.stderr);
    assert.deepEqual(listed.stdout.trim().split('\n').map((l) => (({ name, host }) => [name, host])(JSON.parse(l) as { name: string; host: string })), [['kv', 'a']]);
    const paused = await ferry(['vm', 'pause', 'kv', ...state]);
    assert.equal(paused.code, 0, paused.stderr);
    assert.match((await ferry(['vm', 'list', ...state])).stdout, /^kv\s+host a\s+paused\s/m);
    assert.equal((await ferry(['vm', 'resume', 'kv', ...state])).code, 0);
    assert.match((await ferry(['vm', 'list', ...state])).stdout, /^kv\s+host a\s+running\s/m);
    const client = new KvClient(ep.slice(0, ep.lastIndexOf(':')), Number(ep.slice(ep.lastIndexOf(':') + 1)));
    await client.connect();
    await Promise.all(Array.from({ length: 1000 }, (_, i) => client.set(`k${i}`, `v${i}`)));

    // --host given, --to a control URL.
    const out = await ferry(['migrate', 'kv', '--to', b.started.control, '--mode', 'precopy', '--downtime', '300ms', '--fixed-downtime', '250ms', '--json', '--host', a.started.control, ...state]);
    assert.equal(out.code, 0, out.stderr);
    const job = JSON.parse(out.stdout);
    assert.equal(job.status, 'succeeded');
    assert.equal(job.report.verified, true);
    // The fixed part reached the stop policy: its estimate holds it.
    assert.ok(job.report.estimatedDowntimeMs >= 250 && job.report.estimatedDowntimeMs <= 300, `estimated ${job.report.estimatedDowntimeMs}`);
    assert.equal(job.report.technique.length > 0, true);
    for (let i = 0; i < 1000; i += 97) assert.equal(await client.get(`k${i}`), `v${i}`);

    // Found by its host's registration, --to a host name; the table instead of JSON.
    const back = await ferry(['migrate', 'kv', '--to', 'a', '--mode', 'postcopy', ...state]);
    assert.equal(back.code, 0, back.stderr);
    assert.match(back.stdout, /total migration time/);
    assert.match(back.stdout, /verified\s+yes/);
    // The sending host's TCP congestion control, the system's here (see --tcp-congestion).
    assert.match(back.stdout, new RegExp(`^tcp congestion\\s+${systemCongestionControl()} \\(the sending host's\\)$`, 'm'));
    // Not a terminal: no progress bar, least of all one with its placeholders unfilled.
    assert.doesNotMatch(back.stderr, /\{\w+\}|█/);
    for (let i = 0; i < 1000; i += 89) assert.equal(await client.get(`k${i}`), `v${i}`);
    await client.close();

    const nothing = await ferry(['migrate', 'ghost', '--to', 'b', '--mode', 'precopy', ...state]);
    assert.equal(nothing.code, 1);
    assert.match(nothing.stderr, /ERR_NOT_FOUND/);
  } finally {
    await stopHosts(dir, a, b);
  }
});

test('ferry migrate and host start refuse bad flags with exit 2; --help works for each', async () => {
  for (const args of [
    ['migrate', 'kv', '--to', 'b'],
    ['migrate', 'kv', '--to', 'b', '--mode', 'teleport'],
    ['migrate', 'kv', '--to', 'b', '--mode', 'precopy', '--downtime', 'soon'],
    ['migrate', 'kv', '--to', 'b', '--mode', 'precopy', '--fixed-downtime', '-2ms'],
    ['migrate', 'kv', '--to', 'b', '--mode', 'precopy', '--bandwidth', 'fast'],
    ['migrate', 'kv', '--to', 'b', '--mode', 'precopy', '--host', 'a'],
    ['migrate', '--to', 'b', '--mode', 'precopy'],
    ['migrate', 'kv', '--to', 'b', '--mode', 'precopy', '--codecs', 'brotli'],
    ['host', 'start'],
    ['host', 'start', '--name', 'a', '--listen', 'nowhere'],
    ['host', 'start', '--name', '../a'],
    ['host', 'start', '--name', 'a', '--memory-pool', 'bogus'],
    ['host', 'start', '--name', 'a', '--tcp-congestion', 'no-such-cc'],
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
  const help = await ferry(['migrate', '--help']);
  for (const flag of ['--to', '--mode', '--downtime', '--fixed-downtime', '--bandwidth', '--codecs', '--streams', '--compression', '--xbzrle-cache', '--no-fault-channel', '--gang', '--json']) assert.match(help.stdout, new RegExp(flag));
  assert.match(help.stdout, /<vm\.\.\.>/);
});

/** Parses a command line in this process, as `ferry` would: the exit code main() would set, and what was written to stderr. */
async function parse(args: string[]): Promise<{ code: number; stderr: string }> {
  const program = buildProgram();
  let stderr = '';
  const quiet = (c: Command) => {
    c.configureOutput({ writeErr: (t) => void (stderr += t), writeOut: () => undefined });
    c.commands.forEach(quiet);
  };
  quiet(program);
  try {
    await program.parseAsync(['node', 'ferry', ...args]);
    return { code: 0, stderr };
  } catch (e) {
    if (e instanceof CommanderError) return { code: e.exitCode === 0 ? 0 : 2, stderr };
    throw e;
  }
}

test('ferry migrate refuses bad --codecs, --streams, --compression, --gang and a VM named twice (exit 2, named)', async () => {
  for (const [args, why] of [
    [['--codecs', 'brotli'], /unknown codec 'brotli' \(known: xbzrle, dedup, lz4, zstd\)/],
    [['--codecs', 'zstd,'], /names separated by commas/],
    [['--codecs', ''], /names separated by commas/],
    [['--streams', '0'], /--streams must be an integer from 1 to 64/],
    [['--streams', '65'], /--streams must be an integer from 1 to 64/],
    [['--streams', 'many'], /--streams must be an integer from 1 to 64/],
    [['--streams', '2.5'], /--streams must be an integer from 1 to 64/],
    [['--compression', 'sometimes'], /Allowed choices are auto, always/],
    [['--xbzrle-cache', 'lots'], /xbzrle-cache/],
    [['--gang', 'a b'], /gang name 'a b' must be 1–64 printable ASCII/],
    [['--gang', 'g'.repeat(65)], /must be 1–64 printable ASCII/],
    [['kv'], /VM 'kv' is named twice/],
  ] as const) {
    const r = await parse(['migrate', 'kv', '--to', 'b', '--mode', 'precopy', ...args]);
    assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, why, args.join(' '));
  }
});

test('the progress bar ETA never goes up and its fraction never goes back', () => {
  const eta = new MonotonicEta();
  assert.equal(eta.next(null, 0), null);
  assert.equal(eta.next(1000, 0), 1000);
  assert.equal(eta.next(5000, 100), 1000, 'a higher estimate holds it: it never goes up');
  assert.equal(eta.next(950, 200), 950, 'then estimates below it lead again');
  assert.equal(eta.next(800, 300), 800);
  assert.equal(eta.next(null, 400), 700, 'without an estimate it counts down');
  assert.equal(eta.next(10_000, 10_000), 700, 'held, not counted through');
  assert.equal(eta.next(null, 10_500), 200);
  assert.equal(eta.next(null, 11_000), 0);
  const p = (pagesSent: number, pagesRemaining: number, o: { round?: number; elapsedMs?: number; etaMs?: number | null; etaAtLeast?: boolean; phase?: 'precopy' | 'complete' } = {}) => ({
    phase: o.phase ?? 'precopy' as const, mode: 'precopy' as const, round: o.round ?? 0, bytesSent: 0, pagesSent, pagesRemaining,
    dirtyRateBytesPerSec: 0, bandwidthBytesPerSec: 0, elapsedMs: o.elapsedMs ?? 0, etaMs: o.etaMs ?? null, etaAtLeast: o.etaAtLeast ?? false,
  });
  // While the ETA is only a lower bound, the pass counts as half the work: what follows is not known yet.
  let f = new MonotonicFraction();
  assert.equal(f.next(p(50, 50, { etaMs: 100, etaAtLeast: true })), 0.25);
  assert.equal(f.next(p(60, 200, { etaAtLeast: true })), 0.25);
  // Then time elapsed against the forecast of time left: the rounds to come count.
  assert.equal(f.next(p(300, 100, { round: 1, elapsedMs: 3000, etaMs: 1000 })), 0.75);
  assert.equal(f.next(p(400, 0, { round: 2, elapsedMs: 3500, etaMs: 1500 })), 0.75, 'never back');
  assert.equal(f.next(p(0, 0, { phase: 'complete' })), 1);
  // A first pass with a forecast already (its dirtying sampled) is time against time too; without
  // any yet (no rate measured), half the work again.
  f = new MonotonicFraction();
  assert.equal(f.next(p(50, 50)), 0.25);
  assert.equal(f.next(p(60, 40, { elapsedMs: 100, etaMs: 200 })), 1 / 3);
});

test('ferry migrate m1 m2 m3 --gang: three VMs migrate together; then several at once without a gang; one failure makes the exit code 1', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-mcli-gang-'));
  const state = ['--state-dir', join(dir, 'state')];
  const a = await hostProcess(['--name', 'a', '--listen', '127.0.0.1:0', '--data-dir', join(dir, 'a'), ...state]);
  const b = await hostProcess(['--name', 'b', '--listen', '127.0.0.1:0', '--data-dir', join(dir, 'b'), ...state]);
  const vmsOn = async (control: string) => ((await (await fetch(`${control}/v1/vms`)).json()) as { name: string }[]).map((v) => v.name).sort();
  try {
    const names = ['m1', 'm2', 'm3'];
    for (const [i, name] of names.entries()) {
      const boot = await ferry(['host', 'boot', 'a', 'memstress', '--name', name, '--memory', '16MiB', '--config', `mem=4MiB wss=1MiB dup=0.5 wcontent=keep rate=1000000 seed=${i + 1}`, ...state]);
      assert.equal(boot.code, 0, boot.stderr);
    }

    const gang = await ferry(['migrate', ...names, '--to', 'b', '--mode', 'precopy', '--gang', '--codecs', 'xbzrle', '--streams', '2', '--json', ...state]);
    assert.equal(gang.code, 0, gang.stderr);
    const jobs = JSON.parse(gang.stdout) as { vm: string; status: string; gang: string; report: { verified: boolean; transfer: { gang: string; streams: number; codecs: string[] } } }[];
    assert.deepEqual(jobs.map((j) => [j.vm, j.status, j.report.verified]), names.map((n) => [n, 'succeeded', true]));
    assert.match(jobs[0].gang, /^gang-[0-9a-f]{8}$/);
    for (const j of jobs) {
      assert.equal(j.gang, jobs[0].gang, 'one gang for the three');
      assert.equal(j.report.transfer.gang, jobs[0].report.transfer.gang);
      assert.ok(j.report.transfer.gang.startsWith(`${jobs[0].gang}.`));
      assert.equal(j.report.transfer.streams, 2);
      assert.deepEqual(j.report.transfer.codecs, ['xbzrle', 'dedup']);
    }
    assert.deepEqual(await vmsOn(b.started.control), names);

    // Two back at once, no gang: a table per VM with its transfer section, then a summary.
    const back = await ferry(['migrate', 'm1', 'm2', '--to', 'a', '--mode', 'postcopy', '--codecs', 'zstd', '--streams', '2', '--compression', 'always', ...state]);
    assert.equal(back.code, 0, back.stderr);
    assert.match(back.stdout, /^m1: b → a \(postcopy\) done/m);
    assert.match(back.stdout, /^m2: b → a \(postcopy\) done/m);
    assert.equal(back.stdout.match(/^streams\s+2 \+ fault channel$/gm)?.length, 2);
    assert.equal(back.stdout.match(/^codecs\s+zstd$/gm)?.length, 2);
    assert.match(back.stdout, /^compression\s+on, \d+ batches compressed/m);
    assert.match(back.stdout, /2 of 2 migrated/);
    assert.match(back.stdout, /^m1\s+succeeded\s+/m);
    assert.deepEqual(await vmsOn(a.started.control), ['m1', 'm2']);

    // A name clash on b fails m1's migration; m2 still moves; the exit code says one failed.
    assert.equal((await ferry(['host', 'boot', 'b', 'memstress', '--name', 'm1', '--memory', '8MiB', '--config', 'mem=1MiB', ...state])).code, 0);
    const clash = await ferry(['migrate', 'm1', 'm2', '--to', 'b', '--mode', 'precopy', '--no-fault-channel', '--json', '--host', a.started.control, ...state]);
    assert.equal(clash.code, 1, clash.stderr);
    const out = JSON.parse(clash.stdout) as { vm: string; status: string; error: { code: string } | null }[];
    assert.deepEqual(out.map((j) => [j.vm, j.status, j.error?.code ?? null]), [['m1', 'failed', 'ERR_VM_EXISTS'], ['m2', 'succeeded', null]]);
    assert.match(clash.stderr, /migration of m1 failed: .*\(ERR_VM_EXISTS\)/);
    assert.deepEqual(await vmsOn(a.started.control), ['m1']);

    // A VM no agent has: nothing starts.
    const ghost = await ferry(['migrate', 'm1', 'ghost', '--to', 'b', '--mode', 'precopy', ...state]);
    assert.equal(ghost.code, 1);
    assert.match(ghost.stderr, /'ghost'.*ERR_NOT_FOUND/);
    assert.deepEqual(await vmsOn(a.started.control), ['m1']);
  } finally {
    await stopHosts(dir, a, b);
  }
});

test('the transfer section shows streams, fault channel, codecs, reduction and the codec counters', () => {
  const text = formatTransfer({
    streams: 3, faultChannel: true, codecs: ['xbzrle', 'dedup', 'zstd'], gang: 'pack.0123456789ab', pageBytes: 64 << 20, encodedBytes: 16 << 20, reduction: 4,
    codecStats: { 'page.xbzrle.hits': 10, 'page.xbzrle.misses': 5, 'page.xbzrle.overflows': 1, 'page.dedup.refs': 700, 'page.dedup.defs': 30, compressedBatches: 12, plainBatches: 3 },
    compression: { on: true, flips: 2, speedup: 1.5 },
  }, 'cubic');
  assert.match(text, /^streams\s+3 \+ fault channel$/m);
  assert.match(text, /^tcp congestion\s+cubic \(the sending host's\)$/m);
  assert.match(text, /^codecs\s+xbzrle, dedup, zstd$/m);
  assert.match(text, /^gang\s+pack\.0123456789ab$/m);
  assert.match(text, /^page bytes → encoded\s+64\.0 MiB → 16\.0 MiB \(4\.00× reduction\)$/m);
  assert.match(text, /^xbzrle\s+hits 10, misses 5, overflows 1$/m);
  assert.match(text, /^dedup\s+refs 700, defs 30$/m);
  assert.match(text, /^compression\s+on, 12 batches compressed, 3 plain, flips 2, speedup 1\.50×$/m);
  const plain = formatTransfer({ streams: 1, faultChannel: false, codecs: [], gang: null, pageBytes: 4096, encodedBytes: 4096, reduction: 1, codecStats: {}, compression: null });
  assert.match(plain, /^streams\s+1$/m);
  assert.match(plain, /^codecs\s+none \(zero pages only\)$/m);
  assert.doesNotMatch(plain, /gang|xbzrle|dedup|compression|tcp congestion/);
});
