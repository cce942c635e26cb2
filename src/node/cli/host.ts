/**
 * `ferry host start`: a host agent in the foreground — the control API, the migration endpoint —
 * registered under $FERRY_HOME/hosts/<name>.json so `ferry migrate` and friends can find it.
 */
import { Command, InvalidArgumentError as CommanderArgError } from 'commander';
import { mkdir, rm } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { FerryError } from '../../core/errors.js';
import { formatBytes } from '../../core/units.js';
import { DEFAULT_MEMORY_POOL_BYTES, HostAgent, parseHostPort, type WarmUpJson } from '../agent/agent.js';
import { FAULT_THREAD_PRIORITIES, POSTCOPY_VCPU_NICE, type FaultThreadPriority } from '../engine/thread-priority.js';
import { pageHashBackend, pageHashIsa } from '../vm/page-hash.js';
import { checkCongestionControl, systemCongestionControl } from '../transport/congestion.js';
import { addressText, sizeBytes, sizeText } from './args.js';
import { findHost, listHosts, register, registryDir, stateHome, type HostRegistration } from './registry.js';
import { callAgent } from './vms.js';

const hostsDir = (home: string) => registryDir(home, 'hosts');


const nameArg = (v: string) => {
  if (!/^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$/.test(v)) throw new CommanderArgError('host name must be 1–64 letters, digits, ".", "_" or "-"');
  return v;
};
const addrArg = addressText;
const sizeArg = sizeBytes('capacity');
const poolArg = sizeBytes('memory pool size');
const priorityArg = (v: string): FaultThreadPriority => {
  if (!(FAULT_THREAD_PRIORITIES as readonly string[]).includes(v)) throw new CommanderArgError(`'${v}' is not one of ${FAULT_THREAD_PRIORITIES.join(', ')}`);
  return v as FaultThreadPriority;
};
const niceArg = (v: string) => {
  if (!/^-?\d{1,2}$/.test(v) || Number(v) < -20 || Number(v) > 19) throw new CommanderArgError(`a nice value must be an integer from -20 to 19, got '${v}'`);
  return Number(v);
};
const sparesArg = (v: string) => {
  if (!/^\d{1,2}$/.test(v) || Number(v) > 16) throw new CommanderArgError(`spare vCPU threads must be an integer from 0 to 16, got '${v}'`);
  return Number(v);
};

/** --tcp-congestion: an algorithm this process may set on its sockets. */
function congestionArg(v: string): string {
  try {
    checkCongestionControl(v);
  } catch (e) {
    throw new CommanderArgError((e as Error).message);
  }
  return v;
}

export function registerHostCommands(program: Command): void {
  const host = program.command('host').description('run host agents: the control API and migration endpoint of one host');

  host.command('start')
    .description('run a host agent in the foreground until Ctrl-C (its VMs stop with it)')
    .requiredOption('--name <name>', 'host name (unique under the state dir)', nameArg)
    .option('--listen <host:port>', 'control API address (port 0 picks a free one)', addrArg, '127.0.0.1:0')
    .option('--migration <host:port>', 'migration listener address (default: the control host, a free port)', addrArg)
    .option('--data-dir <dir>', 'caches and disks of this host (default: <state dir>/hosts/<name>.d)')
    .option('--capacity <size>', 'guest RAM this host may reserve, e.g. 8GiB (default: the machine\'s memory)', sizeArg)
    .option('--memory-pool <size>', `guest memory kept ready for later VMs, e.g. 1GiB: a VM that leaves this host gives its memory back, and a VM created or arriving later with the same memory size and ceiling takes it, zeroed and already backed (no page faults as it fills); 0 turns it off (default: ${formatBytes(DEFAULT_MEMORY_POOL_BYTES)})`, poolArg)
    .option('--spare-vcpu-threads <n>', 'vCPU threads kept started ahead of the VMs that will run on them, 0–16: an arriving VM takes a loaded one instead of starting its own during the migration (default: 1)', sparesArg)
    .option('--fault-thread-priority <policy>', 'how the post-copy fault threads are scheduled: nice (nice -10 and, on Linux 6.12 or later, the kernel\'s shortest time slice; an arriving VM\'s vCPU is scheduled so from each wait for a missing page to the end of that quantum), realtime (SCHED_FIFO for the fault threads: a slower push, so a service stalls longer) or default; each takes the next one down where it is not permitted (both raised policies need root or CAP_SYS_NICE) and GET /v1/host says what they got (default: nice)', priorityArg)
    .option('--postcopy-vcpu-nice <n>', `the nice value an arriving VM's vCPU thread runs at while post-copy pages are still missing, -20 to 19: the guest then takes cores from the push (post-copy took up to 50 % longer here at -10); while it waits for a page it runs as the fault threads do whatever this is; 0 leaves it as it is; below 0 needs root or CAP_SYS_NICE (default: ${POSTCOPY_VCPU_NICE})`, niceArg)
    .option('--tcp-congestion <algorithm>', `TCP congestion control for this host's migration connections, dialled and accepted (post-copy's fault channel too), e.g. cubic or bbr (Linux; one listed in net.ipv4.tcp_available_congestion_control, and, without root, in tcp_allowed_congestion_control); a lab pins it so that results do not depend on each machine's sysctl (default: the system's${systemCongestionControl() ? `, here ${systemCongestionControl()}` : ''})`, congestionArg)
    .option('--no-warm-up', 'skip the warm-up migration: by default the host migrates a small VM of its own to itself once when it starts, then runs a client relay to itself, so that its first real migration does not run cold code inside its downtime (migrations wait for it: about a second, most of it rewriting the guest; one still running after a minute is abandoned; GET /v1/host says how it went)')
    .option('--state-dir <dir>', 'where hosts and VMs register (default $FERRY_HOME or ~/.ferry)')
    .option('--json', 'print events as JSON lines')
    .action(async (o: { name: string; warmUp: boolean; listen: string; migration?: string; dataDir?: string; capacity?: number; memoryPool?: number; spareVcpuThreads?: number; faultThreadPriority?: FaultThreadPriority; postcopyVcpuNice?: number; tcpCongestion?: string; stateDir?: string; json?: boolean }) => {
      const home = stateHome(o.stateDir);
      if (await findHost(home, o.name)) throw new FerryError('ERR_HOST_EXISTS', `a host named '${o.name}' is already running (see ${join(hostsDir(home), `${o.name}.json`)})`);
      const at = parseHostPort(o.listen);
      const dataDir = o.dataDir ? resolve(o.dataDir) : join(hostsDir(home), `${o.name}.d`);
      await mkdir(dataDir, { recursive: true });
      const agent = new HostAgent({
        // A host of its own: its first arriving VM should not meet a cold module rewriter.
        name: o.name, dataDir, warmRewriter: true, warmMigrations: o.warmUp,
        ...(o.capacity !== undefined ? { capacityBytes: o.capacity } : {}),
        ...(o.memoryPool !== undefined ? { memoryPoolBytes: o.memoryPool } : {}),
        ...(o.spareVcpuThreads !== undefined ? { spareVcpuThreads: o.spareVcpuThreads } : {}),
        ...(o.faultThreadPriority !== undefined ? { faultThreadPriority: o.faultThreadPriority } : {}),
        ...(o.postcopyVcpuNice !== undefined ? { postcopyVcpuNice: o.postcopyVcpuNice } : {}),
        ...(o.migration ? { migrationAddress: o.migration } : {}),
        ...(o.tcpCongestion !== undefined ? { tcpCongestion: o.tcpCongestion } : {}),
      });
      const log = (event: string, fields: Record<string, unknown>, text: string) => {
        if (o.json) console.log(JSON.stringify({ event, ...fields }));
        else console.error(`ferry: ${text}`);
      };
      agent.on('console', (vm: string, line: string) => (o.json ? console.log(JSON.stringify({ event: 'console', vm, line })) : console.log(`[${vm}] ${line}`)));
      agent.on('trap', (vm: string, err: Error) => log('trap', { vm, message: err.message }, err.message));
      agent.on('migration-in', (x: { vmName: string; mode: string }) => log('migration-in', { vm: x.vmName, mode: x.mode }, `VM ${x.vmName} arrived (${x.mode})`));
      agent.on('migration-out', (j: { vm: string; to: string; status: string }) => log('migration-out', { vm: j.vm, to: j.to, status: j.status }, `migration of ${j.vm} to ${j.to}: ${j.status}`));
      agent.on('warmed', (w: WarmUpJson) => log('warmed', { ...w }, w.state === 'done'
        ? `migration paths warmed: a small VM migrated to this host itself in ${w.ms.toFixed(0)} ms, verified ${w.verified ? 'yes' : 'NO'}`
        : `warm-up migration failed (the first migration will run cold code): ${w.state === 'failed' ? w.error : w.state}`));
      agent.on('vm-lost', (vm: string) => log('vm-lost', { vm }, `lost VM ${vm}: the host running it went away`));
      const control = await agent.listen(at.host, at.port);
      const migration = agent.migrationAddress ?? '';
      const regFile = await register(home, 'hosts', { name: o.name, pid: process.pid, control, migration } satisfies HostRegistration);
      const poolBytes = agent.memoryPool().capacityBytes;
      const pageHash = pageHashBackend();
      const isa = pageHashIsa();
      log('started', { name: o.name, control, migration, capacityBytes: agent.capacityBytes, memoryPoolBytes: poolBytes, pageHash, pageHashIsa: isa, tcpCongestion: agent.tcpCongestion },
        `host ${o.name} running; control ${control}, migration ${migration} (TCP congestion control ${agent.tcpCongestion ?? 'unknown'}), capacity ${formatBytes(agent.capacityBytes)}, memory pool ${poolBytes === 0 ? 'off' : formatBytes(poolBytes)}${pageHash === 'native' ? `, page hashes native (${isa})` : '; page hashes without the native library, several times slower (npm run build makes it where cc and xxhash.h exist: bash scripts/setup.sh)'}`);
      await new Promise<void>((res) => {
        process.once('SIGINT', res);
        process.once('SIGTERM', res);
      });
      await rm(regFile, { force: true });
      await agent.close();
      log('stopped', { name: o.name }, `host ${o.name} stopped`);
    });

  host.command('boot')
    .description('boot a guest on a running host agent (the VM runs there; migrate it with ferry migrate)')
    .argument('<host>', 'a host name registered here, or its control URL')
    .argument('<guest>', 'a built-in guest (kv, memstress, compute, wordfreq) or a path to a .wasm module on that host')
    .option('--name <name>', 'VM name (default: the guest name)')
    .option('--memory <size>', 'guest RAM ceiling, e.g. 512MiB', sizeText('memory size'), '256MiB')
    .option('--config <text>', 'configuration string for the guest', '')
    .option('--expose <host:port>', 'give the VM a TCP endpoint on that host (it stays there when the VM moves)', addrArg)
    .option('--state-dir <dir>', 'where hosts register (default $FERRY_HOME or ~/.ferry)')
    .option('--json', 'print the VM as JSON')
    .action(async (hostName: string, guest: string, o: { name?: string; memory: string; config: string; expose?: string; stateDir?: string; json?: boolean }) => {
      let control = hostName;
      if (!/^https?:\/\//i.test(hostName)) {
        const h = await findHost(stateHome(o.stateDir), hostName);
        if (!h) throw new FerryError('ERR_NOT_FOUND', `no host named '${hostName}' is running (start one with: ferry host start --name ${hostName})`);
        control = h.control;
      }
      const name = o.name ?? guest.replace(/^.*\//, '').replace(/\.wasm$/, '').replace(/[^a-zA-Z0-9_.-]/g, '-');
      const body = await callAgent<{ name?: string; endpoint?: string | null }>(control, 'the host agent', 'POST', '/v1/vms', { name, guest, memory: o.memory, config: o.config, ...(o.expose ? { expose: o.expose } : {}) });
      if (o.json) console.log(JSON.stringify(body));
      else console.log(`${body.name}: running on ${hostName}${body.endpoint ? `, endpoint ${body.endpoint}` : ''}`);
    });

  host.command('list')
    .description('list the host agents running on this machine')
    .option('--state-dir <dir>', 'where hosts register (default $FERRY_HOME or ~/.ferry)')
    .option('--json', 'one JSON object per line')
    .action(async (o: { stateDir?: string; json?: boolean }) => {
      for (const h of await listHosts(stateHome(o.stateDir))) {
        if (o.json) console.log(JSON.stringify(h));
        else console.log(`${h.name.padEnd(16)} ${h.control.padEnd(28)} ${h.migration}`);
      }
    });
}
