#!/usr/bin/env node
// Builds ferry's native page hashing (native/page-hash.c) into build/native/page-hash.so with the
// machine's C compiler, for this machine's CPU (-march=native: the library is built where it
// runs, by `npm run build`). It needs xxhash.h (Debian's libxxhash-dev, which scripts/setup.sh
// installs). Without a compiler or the header it says so and exits 0: page hashes then come from
// @node-rs/xxhash's XXH3 — the same values, several times slower (src/node/vm/page-hash.ts).
// Rebuilt only when the library is older than its source or this script (or with --force).
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, renameSync, rmSync, statSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const src = join(root, 'native/page-hash.c');
const out = join(root, 'build/native/page-hash.so');
const self = fileURLToPath(import.meta.url);
const force = process.argv.includes('--force');

const fresh = existsSync(out) && [src, self].every((f) => statSync(f).mtimeMs <= statSync(out).mtimeMs);
if (fresh && !force) {
  console.log('native     page-hash.so up to date');
  process.exit(0);
}
const cc = process.env.CC || 'cc';
mkdirSync(dirname(out), { recursive: true });
const tmp = `${out}.${process.pid}.tmp`;
const t0 = performance.now();
const r = spawnSync(cc, ['-O3', '-march=native', '-shared', '-fPIC', '-Wall', '-Wextra', '-o', tmp, src], { encoding: 'utf8' });
if (r.error || r.status !== 0) {
  rmSync(tmp, { force: true });
  const why = r.error ? `${cc}: ${r.error.message}` : (r.stderr.trim().split('\n').find((l) => l.includes('error')) ?? `${cc} exited ${r.status}`);
  console.warn(`native     page-hash.so NOT built (${why}); page hashing falls back to @node-rs/xxhash (same hashes, slower). bash scripts/setup.sh installs what it needs.`);
  process.exit(0);
}
renameSync(tmp, out);
console.log(`native     built build/native/page-hash.so in ${((performance.now() - t0) / 1000).toFixed(1)} s (${cc}, -march=native)`);
