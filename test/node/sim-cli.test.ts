import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const run = promisify(execFile);
const bin = fileURLToPath(new URL('../../../bin/ferry.js', import.meta.url));

test('ferry vm trace records a guest, and ferry sim run replays the trace: table, JSON and SVG charts', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-sim-cli-'));
  try {
    const env = { ...process.env, FERRY_HOME: dir };
    const trace = join(dir, 'ms.trace');
    const t = await run(process.execPath, [bin, 'vm', 'trace', 'memstress', '--config', 'mem=4MiB wss=1MiB pattern=hotcold rate=2000000', '--memory', '16MiB', '--interval', '50ms', '--duration', '500ms', '--warmup', '50ms', '--out', trace, '--json'], { env });
    const summary = JSON.parse(t.stdout.trim()) as { intervals: number; bytes: number };
    assert.ok(summary.intervals >= 5);
    const scenario = join(dir, 's.yaml');
    await writeFile(scenario, [
      'name: cli',
      'workloads: { recorded: { kind: trace, file: ms.trace } }',
      'hosts: [{name: a, nic: 1Gbit}, {name: b, nic: 1Gbit}]',
      'vms: [{name: v, host: a, memory: 8MiB, workload: recorded}]',
      'migrations: [{vm: v, to: b, technique: precopy, options: {downtime: 5ms}}]',
      'sweeps: [{name: bw, memory: 8MiB, workloads: [recorded], bandwidth: [100Mbit, 1Gbit]}]',
    ].join('\n'));
    const out = join(dir, 'r.json');
    const svg = join(dir, 'svg');
    const r = await run(process.execPath, [bin, 'sim', 'run', scenario, '--out', out, '--svg-dir', svg], { env });
    assert.match(r.stdout, /scenario cli: 1 migration/);
    assert.match(r.stdout, /sweep bw: 6 runs/);
    const json = JSON.parse(await readFile(out, 'utf8')) as { migrations: { report: { rounds: unknown[] } }[] };
    assert.ok(json.migrations[0].report.rounds.length >= 1);
    const files = await readdir(svg);
    assert.ok(files.some((f) => f.includes('tmt-vs-bandwidth')) && files.some((f) => f === 'cli-rounds.svg'), files.join(' '));
    // A bad scenario is a named error and exit code 1.
    await writeFile(scenario, 'name: bad\nvms: [{name: v, host: nowhere, memory: 1MiB, workload: {kind: constant, dirtyRate: 1MB/s}}]\n');
    await assert.rejects(run(process.execPath, [bin, 'sim', 'run', scenario], { env }), (e: { code: number; stderr: string }) => e.code === 1 && /vms\.0\.host: unknown host 'nowhere'.*ERR_SCENARIO/s.test(e.stderr));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
