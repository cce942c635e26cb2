#!/usr/bin/env node
// ferry's command line. The TypeScript is compiled to dist/ by `npm run build`.
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const entry = new URL('../dist/src/node/cli/main.js', import.meta.url);
if (!existsSync(fileURLToPath(entry))) {
  console.error('ferry: not built yet — run `npm run build` (or `bash scripts/setup.sh`) first');
  process.exit(1);
}
// Commands that host VMs run under the host's heap settings (src/node/host-runtime.ts); the
// demo's hosts are `ferry host start` processes.
if (process.argv[2] === 'host') {
  const { relaunchWithHostFlags } = await import(new URL('../dist/src/node/host-runtime.js', import.meta.url).href);
  const relaunched = relaunchWithHostFlags();
  if (relaunched) process.exit(await relaunched);
}
const { main } = await import(entry.href);
await main(process.argv);
