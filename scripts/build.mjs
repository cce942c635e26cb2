#!/usr/bin/env node
// Builds everything the CLI, the tests and the benchmarks need: the TypeScript, the native page
// hashing, then the guests.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';

function run(cmd, args) {
  const r = spawnSync(cmd, args, { stdio: 'inherit' });
  if (r.status !== 0) process.exit(r.status ?? 1);
}

run(process.execPath, ['node_modules/typescript/bin/tsc', '-p', 'tsconfig.json']);
run(process.execPath, ['scripts/build-native.mjs']);
if (existsSync('scripts/build-guests.mjs')) run(process.execPath, ['scripts/build-guests.mjs']);
