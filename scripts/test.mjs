#!/usr/bin/env node
// Runs every compiled test file (dist/test/**/*.test.js) with Node's own test runner.
// Usage: node scripts/test.mjs [substring ...]   — only files whose path contains a substring.
//
// Files that compare real timings (the simulator against the real engine) run afterwards, alone,
// so the rest of the suite does not load the machine under them. The last line sums both runs.
import { readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { spawn } from 'node:child_process';

const ALONE = ['sim-engine.test.js'];

function walk(dir) {
  const out = [];
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out.push(...walk(p));
    else if (name.endsWith('.test.js')) out.push(p);
  }
  return out;
}

function run(files, concurrency) {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ['--test', `--test-concurrency=${concurrency}`, '--test-timeout=300000', '--test-reporter=tap', ...files], { stdio: ['ignore', 'pipe', 'inherit'] });
    const counts = { pass: 0, fail: 0, skipped: 0 };
    const failedFiles = [];
    let tail = '';
    child.stdout.on('data', (d) => {
      process.stdout.write(d);
      tail += d;
      const lines = tail.split('\n');
      tail = lines.pop();
      for (const line of lines) {
        const m = /^# (pass|fail|skipped) (\d+)$/.exec(line);
        if (m) counts[m[1]] = Number(m[2]);
        // A file that failed as a whole (it timed out, or its process did not exit cleanly).
        const f = /^not ok \d+ - (\S+\.test\.js)$/.exec(line);
        if (f) failedFiles.push(f[1]);
      }
    });
    child.on('close', (code) => resolve({ code: code ?? 1, counts, failedFiles }));
  });
}

const filters = process.argv.slice(2);
const files = walk('dist/test').filter((f) => filters.length === 0 || filters.some((s) => f.includes(s))).sort();
if (files.length === 0) {
  console.error('no test files found under dist/test (run npm run build first)');
  process.exit(1);
}
const alone = files.filter((f) => ALONE.some((a) => f.endsWith(a)));
const rest = files.filter((f) => !alone.includes(f));
const results = [];
if (rest.length) results.push(await run(rest, 2));
if (alone.length) results.push(await run(alone, 1));
const sum = (k) => results.reduce((n, r) => n + r.counts[k], 0);
const failedFiles = results.flatMap((r) => r.failedFiles);
console.log(`tests: ${sum('pass')} passed, ${sum('fail')} failed, ${sum('skipped')} skipped${failedFiles.length ? `; test files that failed as a whole: ${failedFiles.join(', ')}` : ''}`);
process.exit(results.some((r) => r.code !== 0) ? 1 : 0);
