#!/usr/bin/env node
// npm run bench [-- --json] [--filter <name>] [--quick] [--list]
// Runs dist/bench/*.bench.js suites; prints one readable line per figure, or one JSON object per
// line with --json: {"bench","metric","value","unit","target","met","note"}.
import { readdirSync, existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';

const argv = process.argv.slice(2);
const json = argv.includes('--json');
const quick = argv.includes('--quick');
const list = argv.includes('--list');
const filters = [];
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === '--filter') {
    if (!argv[i + 1]) { console.error('--filter needs a name'); process.exit(2); }
    filters.push(argv[++i]);
  } else if (argv[i].startsWith('--filter=')) filters.push(argv[i].slice(9));
  else if (!['--json', '--quick', '--list'].includes(argv[i])) { console.error(`unknown option ${argv[i]} (use --json, --filter <name>, --quick, --list)`); process.exit(2); }
}
const dir = 'dist/bench';
if (!existsSync(dir)) { console.error('dist/bench missing: run npm run build'); process.exit(1); }
// The benchmarks' hosts (the migration source runs in this process) have a host's heap settings,
// as `ferry host start` does (src/node/host-runtime.ts).
const { relaunchWithHostFlags } = await import(pathToFileURL(resolve('dist/src/node/host-runtime.js')).href);
const relaunched = relaunchWithHostFlags();
if (relaunched) process.exit(await relaunched);
const { meetsTarget } = await import(pathToFileURL(resolve(dir, 'harness.js')).href);
const files = readdirSync(dir).filter((f) => f.endsWith('.bench.js')).sort();
const suites = [];
for (const f of files) suites.push((await import(pathToFileURL(resolve(join(dir, f))).href)).default);
const chosen = suites.filter((s) => filters.length === 0 || filters.some((x) => s.name.includes(x)));
if (list) { for (const s of suites) console.log(`${s.name.padEnd(24)} ${s.description}`); process.exit(0); }
if (chosen.length === 0) { console.error(`no suite matches ${filters.join(', ')}; suites: ${suites.map((s) => s.name).join(', ')}`); process.exit(2); }
let missed = 0;
for (const suite of chosen) {
  if (!json) console.log(`# ${suite.name} — ${suite.description}`);
  const ctx = {
    quick,
    log: (m) => { if (!json) console.log(`  … ${m}`); },
    report: (r) => {
      const met = meetsTarget(r.value, r.target);
      if (met === false) missed++;
      if (json) console.log(JSON.stringify({ bench: suite.name, metric: r.metric, value: r.value, unit: r.unit, target: r.target ?? null, met: met ?? null, note: r.note ?? null }));
      else {
        const v = Math.abs(r.value) >= 100 ? r.value.toFixed(0) : Math.abs(r.value) >= 1 ? r.value.toFixed(2) : r.value.toPrecision(3);
        const t = r.target ? `  target ${r.target} ${met ? 'met' : 'MISSED'}` : '';
        console.log(`${suite.name}  ${r.metric.padEnd(40)} ${v.padStart(10)} ${r.unit}${t}${r.note ? `  (${r.note})` : ''}`);
      }
    },
  };
  await suite.run(ctx);
}
if (!json && missed) console.log(`# ${missed} target(s) missed`);
process.exit(0);
