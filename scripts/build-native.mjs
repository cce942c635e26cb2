#!/usr/bin/env node
// Builds ferry's native page hashing (native/page-hash.c) into build/native/page-hash.so with the
// machine's C compiler. It needs xxhash.h (Debian's libxxhash-dev, which scripts/setup.sh
// installs). Without a compiler or the header it says so and exits 0: page hashes then come from
// @node-rs/xxhash's XXH3 — the same values, several times slower (src/node/vm/page-hash.ts).
// The library runs on any CPU of its architecture: on x86-64 the hashing loop is compiled for
// SSE2, AVX2 and AVX-512 and the library picks the best the CPU has when first called; elsewhere
// once, for the architecture's baseline (see native/page-hash.c).
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
const common = ['-O3', '-fPIC', '-Wall', '-Wextra'];
// Each variant an object of its own (xxHash picks its vector code from the compiler's flags),
// then the dispatcher; one shared library of them all.
const x86 = process.arch === 'x64';
const units = x86
  ? [
    { name: 'sse2', flags: ['-DFERRY_VARIANT=ferry_hash_pages_sse2'] },
    { name: 'avx2', flags: ['-DFERRY_VARIANT=ferry_hash_pages_avx2', '-mavx2'] },
    { name: 'avx512', flags: ['-DFERRY_VARIANT=ferry_hash_pages_avx512', '-mavx512f'] },
    { name: 'dispatch', flags: ['-DFERRY_DISPATCH_X86'] },
  ]
  : [{ name: 'base', flags: ['-DFERRY_VARIANT=ferry_hash_pages_base'] }, { name: 'dispatch', flags: [] }];
const objects = [];
let failed = null;
for (const u of units) {
  const obj = `${tmp}.${u.name}.o`;
  objects.push(obj);
  const r = spawnSync(cc, [...common, ...u.flags, '-c', '-o', obj, src], { encoding: 'utf8' });
  if (r.error || r.status !== 0) {
    failed = r;
    break;
  }
}
if (!failed) {
  const r = spawnSync(cc, ['-shared', '-o', tmp, ...objects], { encoding: 'utf8' });
  if (r.error || r.status !== 0) failed = r;
}
for (const o of objects) rmSync(o, { force: true });
if (failed) {
  rmSync(tmp, { force: true });
  const why = failed.error ? `${cc}: ${failed.error.message}` : (failed.stderr.trim().split('\n').find((l) => l.includes('error')) ?? `${cc} exited ${failed.status}`);
  console.warn(`native     page-hash.so NOT built (${why}); page hashing falls back to @node-rs/xxhash (same hashes, slower). bash scripts/setup.sh installs what it needs.`);
  process.exit(0);
}
renameSync(tmp, out);
console.log(`native     built build/native/page-hash.so in ${((performance.now() - t0) / 1000).toFixed(1)} s (${cc}; ${x86 ? 'SSE2, AVX2 and AVX-512, chosen at run time' : 'baseline'})`);
