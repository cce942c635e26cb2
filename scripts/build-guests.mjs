#!/usr/bin/env node
// Builds every guest in guests/ into build/guests/<name>.wasm:
//   guests/as/<name>.ts  (AssemblyScript; common.ts is a shared library, not a guest)
//   guests/c/<name>.c    (C against wasi-libc, Debian clang)
// A guest is rebuilt only when an output is older than one of its sources (or with --force).
// After building, each module's imports are checked against the guest ABI (docs/guest-abi.md).
// Usage: node scripts/build-guests.mjs [--force] [name ...]
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const asDir = join(root, 'guests/as');
const cDir = join(root, 'guests/c');
const outDir = join(root, 'build/guests');
const self = fileURLToPath(import.meta.url);

const args = process.argv.slice(2);
const force = args.includes('--force');
const only = args.filter((a) => !a.startsWith('--'));

const AS_LIBS = new Set(['common']); // shared AssemblyScript files, not guests
const AS_FLAGS = ['--runtime', 'stub', '-O3', '--use', 'abort=common/ferry_abort'];
const C_FLAGS = ['--target=wasm32-wasi', '-O2', '-mexec-model=reactor', '-Wall', '-Wextra',
  '-Wl,--export=run', '-Wl,--export=progress', '-Wl,--strip-debug'];

function list(dir, ext) {
  if (!existsSync(dir)) return [];
  return readdirSync(dir).filter((f) => f.endsWith(ext)).sort().map((f) => join(dir, f));
}
const mtime = (p) => statSync(p).mtimeMs;
const rel = (p) => relative(root, p);

const guests = [];
const asFiles = list(asDir, '.ts');
for (const f of asFiles) {
  const name = f.slice(asDir.length + 1, -3);
  if (AS_LIBS.has(name)) continue;
  guests.push({ name, kind: 'as', main: f, sources: [f, ...asFiles.filter((g) => AS_LIBS.has(g.slice(asDir.length + 1, -3))), self] });
}
const cHeaders = list(cDir, '.h');
for (const f of list(cDir, '.c')) {
  guests.push({ name: f.slice(cDir.length + 1, -2), kind: 'c', main: f, sources: [f, ...cHeaders, self] });
}

// The ABI's import lists, from the compiled src/core/abi.ts (scripts/build.mjs runs tsc first).
let abi = null;
try {
  abi = await import(new URL('../dist/src/core/abi.js', import.meta.url).href);
} catch {
  console.warn('build-guests: dist/src/core/abi.js not found (run tsc first); skipping the import check');
}

function checkImports(name, file) {
  if (!abi) return [];
  const mod = new WebAssembly.Module(readFileSync(file));
  const bad = [];
  for (const imp of WebAssembly.Module.imports(mod)) {
    const table = imp.module === abi.FERRY_IMPORT_MODULE ? abi.FERRY_IMPORTS : imp.module === abi.WASI_IMPORT_MODULE ? abi.WASI_IMPORTS : null;
    if (!table || !(imp.name in table) || imp.kind !== 'function') bad.push(`${imp.module}.${imp.name}`);
  }
  const exp = new Set(WebAssembly.Module.exports(mod).map((e) => e.name));
  if (!exp.has('memory') || !exp.has('run')) bad.push('(missing export memory or run)');
  if (bad.length) throw new Error(`guest ${name}: imports outside the guest ABI: ${bad.join(', ')}`);
  return WebAssembly.Module.imports(mod).map((i) => i.name);
}

let asc = null;
async function buildAs(g, out) {
  asc ??= (await import('assemblyscript/asc')).default;
  const stdout = asc.createMemoryStream();
  const stderr = asc.createMemoryStream();
  const { error } = await asc.main([relative(asDir, g.main), '--baseDir', asDir, ...AS_FLAGS, '-o', out], { stdout, stderr });
  if (error) throw new Error(`guest ${g.name}: asc failed: ${error.message}\n${stderr.toString()}`);
}

let clangChecked = false;
function buildC(g, out) {
  if (!clangChecked) {
    for (const tool of ['clang', 'wasm-ld']) {
      const r = spawnSync(tool, ['--version'], { encoding: 'utf8' });
      if (r.error || r.status !== 0) {
        throw new Error(`guest ${g.name}: '${tool}' not found — C guests need Debian's clang, lld, wasi-libc and libclang-rt-dev-wasm32: run scripts/setup.sh`);
      }
    }
    clangChecked = true;
  }
  const r = spawnSync('clang', [...C_FLAGS, '-o', out, g.main], { encoding: 'utf8' });
  if (r.status !== 0) {
    const hint = /wasi|stdio\.h|crt1|libc\.a|builtins/i.test(r.stderr) ? '\n(wasi-libc or libclang-rt-dev-wasm32 missing? run scripts/setup.sh)' : '';
    throw new Error(`guest ${g.name}: clang failed:\n${r.stderr}${hint}`);
  }
}

mkdirSync(outDir, { recursive: true });
let failed = 0;
for (const g of guests) {
  if (only.length && !only.includes(g.name)) continue;
  const out = join(outDir, `${g.name}.wasm`);
  const fresh = !force && existsSync(out) && g.sources.every((s) => mtime(s) <= mtime(out));
  if (fresh) {
    console.log(`guest ${g.name.padEnd(10)} up to date      ${rel(out)}`);
    continue;
  }
  const t0 = performance.now();
  try {
    if (g.kind === 'as') await buildAs(g, out);
    else buildC(g, out);
    const imports = checkImports(g.name, out);
    const kib = (statSync(out).size / 1024).toFixed(1);
    console.log(`guest ${g.name.padEnd(10)} built (${g.kind}) ${rel(out)} ${kib} KiB in ${((performance.now() - t0) / 1000).toFixed(1)} s; imports: ${imports.join(' ') || 'none'}`);
  } catch (e) {
    failed++;
    console.error(`build-guests: ${e.message}`);
    try { if (existsSync(out)) (await import('node:fs')).rmSync(out); } catch { /* ignore */ }
  }
}
if (failed) {
  console.error(`build-guests: ${failed} guest(s) failed`);
  process.exit(1);
}
