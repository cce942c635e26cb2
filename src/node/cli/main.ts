/**
 * The `ferry` command line.
 *
 * `ferry vm run` and `ferry vm restore` run a VM in the foreground inside a host agent of their own
 * and register its control API under $FERRY_HOME/vms/<name>.json, which is how `ferry vm snapshot`,
 * `list`, `pause`, `resume` and `stop` find it from another terminal; they find VMs on host agents
 * (`ferry host start`) too (vms.ts).
 */
import { Command, CommanderError } from 'commander';
import { rm } from 'node:fs/promises';
import { resolve } from 'node:path';
import { FerryError } from '../../core/errors.js';
import { formatBytes, formatDuration } from '../../core/units.js';
import { HostAgent, type VmSummary } from '../agent/agent.js';
import { addressText, positiveInt, sizeText } from './args.js';
import { register, stateHome } from './registry.js';
import { runDemo } from './demo.js';
import { registerHostCommands } from './host.js';
import { registerMigrateCommand } from './migrate.js';
import { registerSimCommands } from './sim.js';
import { callVm, findVm, listVms } from './vms.js';

const sizeArg = sizeText;
const intArg = positiveInt;
const addrArg = addressText;

/** One VM of `ferry vm list`: on `host` (a host agent), or in a `vm run` process of its own (null). */
function printSummary(s: VmSummary, host: string | null, json: boolean): void {
  if (json) return void console.log(JSON.stringify({ ...s, host }));
  console.log(`${s.name.padEnd(16)} ${(host === null ? '(own process)' : `host ${host}`).padEnd(16)} ${s.stats.state.padEnd(8)} ${s.guest.padEnd(12)} ${formatBytes(s.guestBytes).padStart(10)} / ${formatBytes(s.memoryBytes).padEnd(10)} ${s.endpoint ?? '-'}`);
}

interface ForegroundOpts { name?: string; expose?: string; json?: boolean; stateDir?: string; quiet?: boolean }

/** Runs one VM in this process until it halts, traps or is stopped; returns the exit code. */
async function foreground(start: (agent: HostAgent) => Promise<VmSummary>, opts: ForegroundOpts): Promise<number> {
  const home = stateHome(opts.stateDir);
  const agent = new HostAgent({ name: 'local', dataDir: home });
  let vmName = '';
  const done = new Promise<number>((res) => {
    agent.on('console', (_vm: string, line: string) => {
      if (opts.json) console.log(JSON.stringify({ event: 'console', line }));
      else console.log(line);
    });
    agent.on('halt', (_vm: string, code: number) => res(code === 0 ? 0 : 1));
    agent.on('trap', (_vm: string, err: Error) => {
      console.error(`ferry: ${err.message}`);
      res(1);
    });
    agent.on('vm-error', (_vm: string, err: Error) => {
      console.error(`ferry: ${err.message}`);
      res(1);
    });
    const stop = () => res(130);
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  });
  const summary = await start(agent);
  vmName = summary.name;
  const control = await agent.listen('127.0.0.1', 0);
  const regFile = await register(home, 'vms', { name: vmName, pid: process.pid, control });
  const stoppedViaApi = new Promise<number>((res) => {
    const timer = setInterval(() => {
      // A VM that migrated away is still served from here (its clients' endpoint stays on this
      // host), so only a VM that is gone from both lists ends the foreground process.
      if (!agent.list().some((v) => v.name === vmName) && !agent.awayList().some((v) => v.name === vmName)) res(0);
    }, 100);
    timer.unref();
  });
  if (opts.json) console.log(JSON.stringify({ event: 'started', ...summary, control }));
  else if (!opts.quiet) {
    console.error(`ferry: VM ${vmName} running (${summary.guest}, up to ${formatBytes(summary.memoryBytes)})${summary.endpoint ? `, endpoint ${summary.endpoint}` : ''}; control ${control}`);
  }
  const code = await Promise.race([done, stoppedViaApi]);
  await rm(regFile, { force: true });
  await agent.close();
  return code;
}

export function buildProgram(): Command {
  const program = new Command('ferry')
    .description('Live migration of running WebAssembly micro-VMs between hosts')
    .showHelpAfterError()
    .exitOverride();

  const vm = program.command('vm').description('run, inspect, snapshot and restore VMs on this machine');

  vm.command('run')
    .description('boot a guest and run it in the foreground (Ctrl-C stops it)')
    .argument('<guest>', 'a built-in guest (kv, memstress, compute, wordfreq) or a path to a .wasm module')
    .option('--name <name>', 'VM name (default: the guest name)')
    .option('--memory <size>', 'guest RAM ceiling, e.g. 512MiB (the guest grows into it)', sizeArg('memory size'), '256MiB')
    .option('--config <text>', "configuration string for the guest, e.g. 'wss=64MiB pattern=zipf'", '')
    .option('--expose <host:port>', "give the VM a TCP endpoint (e.g. 127.0.0.1:0 picks a free port)", addrArg)
    .option('--disk <path>', 'attach a sparse file-backed block device (created if missing)')
    .option('--disk-size <size>', 'size of the block device', sizeArg('disk size'), '64MiB')
    .option('--budget <n>', 'fixed work budget per quantum instead of ~1 ms quanta (deterministic runs)', intArg('budget'))
    .option('--state-dir <dir>', 'where VMs register and ferry keeps caches (default $FERRY_HOME or ~/.ferry)')
    .option('--json', 'print events as JSON lines')
    .action(async (guest: string, o) => {
      const name = o.name ?? guest.replace(/^.*\//, '').replace(/\.wasm$/, '').replace(/[^a-zA-Z0-9_.-]/g, '-');
      process.exitCode = await foreground((agent) => agent.createVm({
        name, guest, memory: o.memory, config: o.config, expose: o.expose,
        ...(o.disk ? { disk: o.disk, diskSize: o.diskSize } : {}),
        ...(o.budget ? { fixedBudget: o.budget } : {}),
      }), { ...o, name });
    });

  vm.command('restore')
    .description('continue a VM from a snapshot file, in the foreground')
    .argument('<snapshot>', 'snapshot file written by ferry vm snapshot')
    .option('--name <name>', 'VM name (default: the name stored in the snapshot)')
    .option('--expose <host:port>', 'give the VM a TCP endpoint', addrArg)
    .option('--state-dir <dir>', 'where VMs and hosts register (default $FERRY_HOME or ~/.ferry)')
    .option('--json', 'print events as JSON lines')
    .action(async (snapshot: string, o) => {
      process.exitCode = await foreground((agent) => agent.restoreVm(resolve(snapshot), { name: o.name, expose: o.expose }), o);
    });

  vm.command('snapshot')
    .description('pause a running VM, write its snapshot, and resume it (or stop it with --stop)')
    .argument('<vm>', 'name of a running VM (in a process of its own or on a host agent)')
    .requiredOption('--out <file>', 'snapshot file to write (written atomically)')
    .option('--stop', 'stop the VM after the snapshot (cold migration)')
    .option('--state-dir <dir>', 'where VMs and hosts register (default $FERRY_HOME or ~/.ferry)')
    .option('--json', 'print the result as JSON')
    .action(async (name: string, o) => {
      const vm = await findVm(stateHome(o.stateDir), name);
      const r = (await callVm(vm, 'POST', '/snapshot', { out: resolve(o.out), stop: !!o.stop })) as { path: string; bytes: number; pagesWritten: number; zeroPagesSkipped: number; ms: number };
      if (o.json) console.log(JSON.stringify(r));
      else console.log(`snapshot of ${name}: ${r.path}, ${formatBytes(r.bytes)} (${r.pagesWritten} pages, ${r.zeroPagesSkipped} zero pages skipped) in ${formatDuration(r.ms)}`);
    });

  vm.command('list')
    .description('list the VMs running on this machine: in processes of their own (vm run, vm restore) and on host agents')
    .option('--state-dir <dir>', 'where VMs and hosts register (default $FERRY_HOME or ~/.ferry)')
    .option('--json', 'one JSON object per line')
    .action(async (o) => {
      for (const { loc, summary } of await listVms(stateHome(o.stateDir))) printSummary(summary, loc.host, !!o.json);
    });

  for (const [verb, desc] of [['pause', 'pause a running VM between quanta'], ['resume', 'resume a paused VM'], ['stop', 'stop a VM (it is gone afterwards)']] as const) {
    vm.command(verb)
      .description(desc)
      .argument('<vm>', 'name of a running VM (in a process of its own or on a host agent)')
      .option('--state-dir <dir>', 'where VMs and hosts register (default $FERRY_HOME or ~/.ferry)')
      .action(async (name: string, o) => {
        const vm = await findVm(stateHome(o.stateDir), name);
        if (verb === 'stop') await callVm(vm, 'DELETE');
        else await callVm(vm, 'POST', `/${verb}`);
        console.log(`${name}: ${verb === 'stop' ? 'stopped' : verb === 'pause' ? 'paused' : 'resumed'}`);
      });
  }

  registerHostCommands(program);
  registerMigrateCommand(program);

  program.command('demo')
    .description('two hosts, the kv guest serving a client, live pre-copy a → b, post-copy b → a with data reduction over two streams, and a report per migration')
    .option('--json', 'print the report as JSON')
    .action(async (o) => {
      process.exitCode = await runDemo({ json: !!o.json });
    });

  registerSimCommands(program);
  return program;
}

/**
 * Output whose reader went away (`ferry host start --json | head -1`, a closed terminal) ends
 * the output, not the command: a host keeps its VMs and shuts down cleanly when told to.
 */
function outputMayClose(): void {
  for (const stream of [process.stdout, process.stderr]) {
    stream.on('error', (e: NodeJS.ErrnoException) => {
      if (e.code !== 'EPIPE' && e.code !== 'ERR_STREAM_DESTROYED') throw e;
    });
  }
}

export async function main(argv: string[]): Promise<void> {
  outputMayClose();
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
  } catch (e) {
    if (e instanceof CommanderError) {
      process.exitCode = e.exitCode === 0 ? 0 : 2;
      return;
    }
    if (e instanceof FerryError) {
      console.error(`ferry: ${e.message} (${e.code})`);
      process.exitCode = 1;
      return;
    }
    console.error('ferry: internal error:', e);
    process.exitCode = 70;
  }
}
