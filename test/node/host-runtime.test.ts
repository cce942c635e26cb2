import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { HOST_NODE_FLAGS, hasHostFlags } from '../../src/node/host-runtime.js';

const moduleUrl = pathToFileURL(join(import.meta.dirname, '../../src/node/host-runtime.js')).href;

/** Runs a script that relaunches itself under the host flags, prints its execArgv and exits with 7. */
async function runRelaunching(env: NodeJS.ProcessEnv = {}): Promise<{ status: number | null; lines: string[] }> {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-host-runtime-'));
  try {
    const script = join(dir, 'relaunch.mjs');
    await writeFile(script, [
      `import { relaunchWithHostFlags } from ${JSON.stringify(moduleUrl)};`,
      'const r = relaunchWithHostFlags();',
      'if (r) { console.log("parent"); process.exit(await r); }',
      'console.log(JSON.stringify(process.execArgv));',
      'process.exit(7);',
    ].join('\n'));
    const env2 = { ...process.env, ...env };
    delete env2.FERRY_HOST_RUNTIME;
    if (env.FERRY_HOST_RUNTIME !== undefined) env2.FERRY_HOST_RUNTIME = env.FERRY_HOST_RUNTIME;
    const r = spawnSync(process.execPath, [script], { env: env2, encoding: 'utf8' });
    return { status: r.status, lines: r.stdout.trim().split('\n') };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

test('hasHostFlags: every host flag must be there, with either spelling, whatever its value', () => {
  assert.equal(hasHostFlags([]), false);
  assert.equal(hasHostFlags([HOST_NODE_FLAGS[0]]), false);
  assert.equal(hasHostFlags([...HOST_NODE_FLAGS]), true);
  assert.equal(hasHostFlags(['--max_semi_space_size=8', '--initial-old-space-size=512', '--cpu-prof']), true);
});

test('relaunchWithHostFlags: the script runs again under the host flags, and its exit code is passed on', async () => {
  const { status, lines } = await runRelaunching();
  assert.equal(lines[0], 'parent');
  const argv = JSON.parse(lines[1]) as string[];
  for (const f of HOST_NODE_FLAGS) assert.ok(argv.includes(f), `${f} in ${argv.join(' ')}`);
  assert.equal(status, 7);
});

test('relaunchWithHostFlags: FERRY_HOST_RUNTIME=0 keeps node defaults (no second process)', async () => {
  const { status, lines } = await runRelaunching({ FERRY_HOST_RUNTIME: '0' });
  assert.deepEqual(lines, ['[]']);
  assert.equal(status, 7);
});
