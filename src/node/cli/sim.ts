/**
 * `ferry sim run` (the simulator) and `ferry vm trace` (dirty-trace recording).
 */
import { Command } from 'commander';
import { existsSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { FerryError } from '../../core/errors.js';
import { formatScenarioTable } from '../../core/sim/world.js';
import { formatBytes, formatDuration } from '../../core/units.js';
import { guestsDir } from '../paths.js';
import { stateHome } from './registry.js';
import { runScenarioFile, resultsJson } from '../sim/run.js';
import { InstrumentCache } from '../vm/instrument.js';
import { recordTrace } from '../vm/trace.js';
import { Vm } from '../vm/vm.js';
import { durationMs, sizeBytes } from './args.js';

const durationArg = durationMs;
const sizeArg = sizeBytes;

function registeredPid(home: string, name: string): number | null {
  const file = join(home, 'vms', `${name}.json`);
  if (!existsSync(file)) return null;
  try {
    const pid = (JSON.parse(readFileSync(file, 'utf8')) as { pid: number }).pid;
    process.kill(pid, 0);
    return pid;
  } catch {
    return null;
  }
}

function guestModule(guest: string): { bytes: Uint8Array; label: string } {
  const builtin = join(guestsDir(), `${guest}.wasm`);
  const path = /[/\\]|\.wasm$/.test(guest) ? resolve(guest) : builtin;
  try {
    return { bytes: new Uint8Array(readFileSync(path)), label: guest };
  } catch (e) {
    throw new FerryError('ERR_NOT_FOUND', `no guest '${guest}' (not a built-in guest in ${guestsDir()} nor a readable .wasm file)`, { cause: e });
  }
}

export function registerSimCommands(program: Command): void {
  const sim = program.command('sim').description('simulate migrations at data-centre scale (discrete-event, the engine\'s own policies)');
  sim.command('run')
    .description('run a scenario file (YAML or JSON): print a table, write results and charts')
    .argument('<scenario>', 'scenario file (see docs/simulator.md)')
    .option('--out <file>', 'write the results as JSON')
    .option('--svg-dir <dir>', 'draw SVG charts into this directory')
    .option('--details', 'print every migration report in full')
    .option('--json', 'print the results JSON instead of the table')
    .action(async (file: string, o: { out?: string; svgDir?: string; details?: boolean; json?: boolean }) => {
      const r = await runScenarioFile(file, { out: o.out, svgDir: o.svgDir });
      if (o.json) return void process.stdout.write(resultsJson(r.result));
      process.stdout.write(formatScenarioTable(r.result, { details: !!o.details }));
      console.log(`\n${r.result.events} events in ${formatDuration(r.wallMs)} wall${o.out ? `; results in ${o.out}` : ''}${r.charts.length ? `; ${r.charts.length} chart(s) in ${o.svgDir}` : ''}`);
    });

  const vm = program.commands.find((c) => c.name() === 'vm') ?? program.command('vm').description('run, inspect, snapshot and restore VMs on this machine');
  vm.command('trace')
    .description('record a guest\'s page-level dirty pattern over time, for `ferry sim` to replay (docs/trace-format.md)')
    .argument('<guest>', 'a built-in guest (memstress, kv, …) or a .wasm path, run here for the recording')
    .requiredOption('--out <file>', 'trace file to write')
    .option('--interval <duration>', 'harvest interval', durationArg('interval'), 100)
    .option('--duration <duration>', 'how long to record', durationArg('duration'), 10_000)
    .option('--warmup <duration>', 'run this long before recording', durationArg('warmup'), 500)
    .option('--memory <size>', 'guest RAM ceiling', sizeArg('memory size'), 256 * 1024 * 1024)
    .option('--config <text>', "configuration string for the guest, e.g. 'mem=64MiB pattern=zipf'", '')
    .option('--name <name>', 'VM name recorded in the trace')
    .option('--state-dir <dir>', 'where VMs register and ferry keeps caches (default $FERRY_HOME or ~/.ferry)')
    .option('--json', 'print the summary as JSON')
    .action(async (guest: string, o: { out: string; interval: number; duration: number; warmup: number; memory: number; config: string; name?: string; stateDir?: string; json?: boolean }) => {
      const home = stateHome(o.stateDir);
      const pid = registeredPid(home, guest);
      if (pid !== null) {
        throw new FerryError('ERR_UNSUPPORTED', `'${guest}' is a VM running in process ${pid}; tracing it needs a dirty-log route on its host agent, which does not exist yet. Run the guest under the recorder instead: ferry vm trace <guest> --config '…' --memory … --out ${o.out}`);
      }
      const { bytes, label } = guestModule(guest);
      const name = o.name ?? label.replace(/^.*\//, '').replace(/\.wasm$/, '');
      const v = Vm.create({ name, module: bytes, memoryBytes: o.memory, config: o.config, cache: new InstrumentCache({ dir: join(home, 'cache') }) });
      const ac = new AbortController();
      const stop = () => ac.abort();
      process.once('SIGINT', stop);
      try {
        await v.bootCold();
        await new Promise((r) => setTimeout(r, o.warmup));
        const s = await recordTrace(v, { out: resolve(o.out), intervalMs: o.interval, durationMs: o.duration, signal: ac.signal, guest: label });
        if (o.json) console.log(JSON.stringify(s));
        else console.log(`trace of ${name}: ${s.file}, ${s.intervals} intervals over ${formatDuration(s.durationMs)}, ${formatBytes(s.bytes)}, ${(s.dirtyPages / Math.max(1, s.intervals)).toFixed(0)} dirty pages per interval on average, harvest ${formatDuration(s.meanHarvestMs)} mean`);
      } finally {
        process.removeListener('SIGINT', stop);
        await v.stop().catch(() => undefined);
      }
    });
}
