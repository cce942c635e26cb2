/**
 * The destination host the migration benchmarks move VMs to: a child process (this file, started
 * with FERRY_BENCH_DESTINATION=1), so the two engines have an event loop each, as on two hosts —
 * both share this machine's cores. It serves every connection through one MigrationAcceptor
 * (parallel streams and the fault channel JOIN their session; gang members share a store), sizes
 * each VM as the source announced, reports each outcome with its set-up time and CPU time, and
 * frees the VM: it only measures. Like a host, it keeps a pool of guest memories
 * (src/node/vm/memory-pool.ts): a VM that is done gives its memory back, zeroed in the background,
 * and the next VM of that shape starts with backed memory; a VM with fresh memory has it faulted in
 * while it is readied. Each outcome says which it was.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { migrateSource } from '../src/core/engine/source.js';
import { MigrationAcceptor, type DestinationOutcome } from '../src/core/engine/destination.js';
import type { DestinationFactory, MigrationOptions, MigrationResult } from '../src/core/engine/types.js';
import { shaped, type ShapedConnectionInit } from '../src/core/transport/shaped.js';
import { TokenBucket } from '../src/core/rate.js';
import type { Connection } from '../src/core/transport/transport.js';
import { realClock } from '../src/node/clock.js';
import { DestinationVmAdapter, nodeEngineDeps, sourceVmOf } from '../src/node/engine/adapters.js';
import { FaultThreadListener, SourceFaultThreads, faultLinkShape, sourceFaultThread } from '../src/node/engine/fault-thread.js';
import { POSTCOPY_VCPU_NICE, type FaultThreadPriority } from '../src/node/engine/thread-priority.js';
import { InstrumentCache } from '../src/node/vm/instrument.js';
import { GuestMemoryPool } from '../src/node/vm/memory-pool.js';
import { VcpuThreadPool } from '../src/node/vm/vcpu-threads.js';
import { Vm } from '../src/node/vm/vm.js';
import { guestsDir } from '../src/node/paths.js';
import { HOST_NODE_FLAGS, hasHostFlags } from '../src/node/host-runtime.js';
import { sendFromThread } from '../src/node/transport/tcp.js';
import { BENCH_CONGESTION, benchTcp } from './congestion.js';
import { SendThreads } from '../src/node/transport/send-threads.js';

export type LinkInit = Omit<ShapedConnectionInit, 'clock' | 'bucket'>;

/**
 * Shapes every connection `shape` is given like `link`, their caps drawing on one token bucket:
 * a migration's parallel streams and its fault channel share one link, as a host agent's do.
 */
function linkShaper(link: LinkInit): (c: Connection) => Connection {
  const rate = link.bandwidthBytesPerSec;
  const bucket = rate === undefined ? undefined : new TokenBucket({ rateBytesPerSec: rate, ...(link.burstBytes === undefined ? {} : { burstBytes: link.burstBytes }) });
  return (c) => shaped(c, { ...link, clock: realClock(), ...(bucket ? { bucket } : {}) });
}

/**
 * The destination's outcome, with how long its VM took to get ready, the CPU it spent, and whether
 * its guest memory came from the host's pool (already backed) or was fresh.
 */
export type Outcome = DestinationOutcome & { readyMs: number | null; cpuMs: number; pooled: boolean };

export const deps = nodeEngineDeps();
/** The bench process's fault threads (the source side of every post-copy migration it runs), one per scheduling policy asked for. */
const sourceFaultThreads = new Map<FaultThreadPriority, SourceFaultThreads>();
function sourceThreadsFor(ask: FaultThreadPriority): SourceFaultThreads {
  let t = sourceFaultThreads.get(ask);
  if (!t) sourceFaultThreads.set(ask, (t = new SourceFaultThreads(ask, BENCH_CONGESTION)));
  return t;
}
/** How fault threads asking for `ask` are scheduled here (see FaultThreadPriority): the source's say for this machine. */
export const faultThreadPriority = (ask: FaultThreadPriority = 'nice'): FaultThreadPriority => sourceThreadsFor(ask).priority;

const MiB = 1 << 20;
const sourceCache = new InstrumentCache();
let memstressModule: Uint8Array | null = null;

/**
 * A memstress VM (the source side of a benchmark) with a `mem`-byte region, booted, its init
 * (the content fill) done and running. Waits for init's region line: filling a large region takes
 * a while.
 */
export async function memstressVm(name: string, mem: number, config: string): Promise<Vm> {
  memstressModule ??= new Uint8Array(readFileSync(join(guestsDir(), 'memstress.wasm')));
  const vm = Vm.create({ name, module: memstressModule, memoryBytes: mem + 16 * MiB, config: `mem=${mem} ${config}`, cache: sourceCache });
  let ready = false;
  vm.on('console', (l: string) => { if (l.startsWith('memstress: region')) ready = true; });
  await vm.bootCold();
  for (let i = 0; i < 6000 && !ready; i++) await sleep(5);
  if (!ready) throw new Error(`${name}: memstress did not finish its init`);
  await sleep(50);
  return vm;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** CPU time (user + system, all threads) this process spent since `since`, ms. */
export function cpuMs(since: NodeJS.CpuUsage): number {
  const d = process.cpuUsage(since);
  return (d.user + d.system) / 1000;
}

type ToDestination = { type: 'expect'; link: LinkInit | null };
type FromDestination =
  | { type: 'ready'; address: string }
  | { type: 'expecting' }
  | { type: 'outcome'; vmName: string; outcome: Outcome }
  | { type: 'failed'; vmName: string | null; message: string };

async function destinationHost(): Promise<void> {
  const cache = new InstrumentCache();
  const memstress = new Uint8Array(readFileSync(join(guestsDir(), 'memstress.wasm')));
  for (const v of ['plain', 'dirty', 'presence'] as const) cache.get(memstress, v); // instrument before any migration
  let link: ((c: Connection) => Connection) | null = null;
  const send = (m: FromDestination) => process.send!(m);
  // Post-copy faults on threads of their own, as a host serves them (shaped like every connection).
  const faultThreads = new FaultThreadListener('127.0.0.1', (process.env.FERRY_BENCH_FAULT_PRIORITY ?? 'nice') as FaultThreadPriority, BENCH_CONGESTION);
  const acceptor = new MigrationAcceptor(deps, { faultThreads });
  // As a host would: a VM that is done gives its memory back, and the next VM of its shape takes it.
  const pool = new GuestMemoryPool(1 << 30);
  // And a vCPU thread started ahead of the next VM (HostAgent's spareVcpuThreads default).
  let accepting = 0;
  const threads = new VcpuThreadPool(1, { busy: () => accepting > 0 });
  const l = await benchTcp().listen({
    onConnection: (c) => {
      const conn = link ? link(c) : c;
      const made: Vm[] = [];
      const ready: { ms: number | null; pooled: boolean } = { ms: null, pooled: false };
      let vmName: string | null = null;
      const cpu0 = process.cpuUsage();
      const factory: DestinationFactory = {
        async admit(hello) {
          vmName = hello.vmName;
          return {
            async create(module) {
              const t0 = performance.now();
              const vm = Vm.create({ name: hello.vmName, module, memoryBytes: hello.memoryBytes, config: hello.config, cache, variants: ['plain', 'dirty', 'presence'], pool, threads, faultNice: Number(process.env.FERRY_BENCH_VCPU_NICE ?? POSTCOPY_VCPU_NICE) }, hello.guestBytes);
              made.push(vm);
              ready.pooled = vm.memoryBacked;
              const adapter = new DestinationVmAdapter(vm, { guestBytes: hello.guestBytes });
              adapter.warm().then(() => { ready.ms = performance.now() - t0; }, () => undefined);
              return adapter;
            },
          };
        },
      };
      accepting++;
      acceptor.accept(conn, factory)
        .finally(() => accepting--)
        .then((o) => { if (o) send({ type: 'outcome', vmName: o.vmName, outcome: { ...o, readyMs: ready.ms, cpuMs: cpuMs(cpu0), pooled: ready.pooled } }); }, (e: Error) => send({ type: 'failed', vmName, message: e.message }))
        .finally(async () => { for (const vm of made) await vm.dispose().catch(() => undefined); });
    },
  });
  process.on('message', (m: ToDestination) => {
    if (m.type === 'expect') {
      link = m.link && linkShaper(m.link);
      faultThreads.shape = m.link ? faultLinkShape(m.link) : null;
      send({ type: 'expecting' });
    }
  });
  process.on('disconnect', () => process.exit(0));
  send({ type: 'ready', address: l.address });
}

interface Deferred<T> {
  promise: Promise<T>;
  resolve(v: T): void;
  reject(e: Error): void;
}

function deferred<T>(): Deferred<T> {
  let resolve!: (v: T) => void;
  let reject!: (e: Error) => void;
  const promise = new Promise<T>((res, rej) => { resolve = res; reject = rej; });
  promise.catch(() => undefined); // awaited after the source's result
  return { promise, resolve, reject };
}

export interface Run {
  result: MigrationResult;
  outcome: Outcome;
}

let threads: SendThreads | null = null;
/** The source side's sender threads (one pool for the bench process, as a host agent has one). */
function sendThreads(): SendThreads {
  return (threads ??= new SendThreads());
}

export class DestinationProcess {
  private readonly outcomes = new Map<string, Deferred<Outcome>>();
  private ack: Deferred<void> | null = null;

  private constructor(private readonly child: ChildProcess, readonly address: string, readonly faultPriority: FaultThreadPriority, readonly vcpuNice: number) {
    child.on('message', (m: FromDestination) => this.onMessage(m));
    child.once('exit', (code) => this.failAll(new Error(`destination process exited (${code})`)));
  }

  /**
   * @param faultPriority how both ends' post-copy fault threads ask to be scheduled (a host's default: 'nice').
   * @param vcpuNice the arriving VMs' vCPU nice value while pages are missing (a host's default: POSTCOPY_VCPU_NICE).
   */
  static async start(faultPriority: FaultThreadPriority = 'nice', vcpuNice = POSTCOPY_VCPU_NICE): Promise<DestinationProcess> {
    // FERRY_BENCH_DESTINATION_ARGS: node options for the destination alone (e.g. `--cpu-prof
    // --cpu-prof-dir=/tmp/prof` to profile the receiving side, which NODE_OPTIONS does not allow).
    const args = process.env.FERRY_BENCH_DESTINATION_ARGS?.split(' ').filter((a) => a !== '');
    // A destination host runs with a host's heap settings, as `ferry host start` does.
    const own = args ?? process.execArgv;
    const execArgv = hasHostFlags(own) ? own : [...HOST_NODE_FLAGS, ...own];
    const child = fork(fileURLToPath(import.meta.url), [], { execArgv, env: { ...process.env, FERRY_BENCH_DESTINATION: '1', FERRY_BENCH_FAULT_PRIORITY: faultPriority, FERRY_BENCH_VCPU_NICE: String(vcpuNice) }, stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
    const address = await new Promise<string>((resolve, reject) => {
      child.once('exit', (code) => reject(new Error(`destination process exited (${code})`)));
      child.once('message', (m: FromDestination) => (m.type === 'ready' ? resolve(m.address) : reject(new Error(`destination process said ${m.type}`))));
    });
    sendThreads(); // the source's sender thread starts now, not inside the first migration
    return new DestinationProcess(child, address, faultPriority, vcpuNice);
  }

  private onMessage(m: FromDestination): void {
    if (m.type === 'expecting') this.ack?.resolve();
    else if (m.type === 'outcome') {
      this.outcomes.get(m.vmName)?.resolve(m.outcome);
      this.outcomes.delete(m.vmName);
    } else if (m.type === 'failed') {
      const e = new Error(`destination failed: ${m.message}`);
      if (m.vmName === null) this.failAll(e); // refused before HELLO, or a JOIN: whose is unknown
      else {
        this.outcomes.get(m.vmName)?.reject(e);
        this.outcomes.delete(m.vmName);
      }
    }
  }

  private failAll(e: Error): void {
    for (const d of this.outcomes.values()) d.reject(e);
    this.outcomes.clear();
    this.ack?.reject(e);
  }

  /** Readies the next migrations (VMs named `vmNames`, every connection shaped by `link`); each outcome settles when the destination is done with it. */
  private async expect(link: LinkInit | null, vmNames: string[]): Promise<Map<string, Promise<Outcome>>> {
    this.ack = deferred<void>();
    this.child.send({ type: 'expect', link } satisfies ToDestination);
    await this.ack.promise;
    const out = new Map<string, Promise<Outcome>>();
    for (const n of vmNames) {
      const d = deferred<Outcome>();
      this.outcomes.set(n, d);
      out.set(n, d.promise);
    }
    return out;
  }

  /**
   * Migrates every VM in `srcs` (concurrently) to fresh VMs here over loopback TCP — our direction
   * shaped when `link` is given, as the child shapes its own — then stops the sources. The engine
   * may open more connections (parallel streams, the post-copy fault channel).
   */
  async migrate(srcs: Vm[], opts: MigrationOptions, link?: LinkInit): Promise<Run[]> {
    try {
      const outcomes = await this.expect(link ?? null, srcs.map((s) => s.name));
      return await Promise.all(srcs.map(async (src) => {
        // Each VM's migration has its link (one cap over all its connections, as from a host agent).
        const shape = link ? linkShaper(link) : (c: Connection) => c;
        const dial = async (purpose?: 'data' | 'fault') => {
          const c = await benchTcp().dial(this.address);
          // As a host agent does: a parallel data stream sends from a thread of its own.
          if (purpose === 'data') sendFromThread(c, sendThreads());
          return shape(c);
        };
        // A shaped link shapes every connection, the fault threads' too.
        const faultShape = link ? faultLinkShape(link) : null;
        const faultThread = link && !faultShape ? {} : { faultThread: sourceFaultThread(sourceThreadsFor(this.faultPriority), src, '127.0.0.1', faultShape) };
        const result = await migrateSource(await dial(), sourceVmOf(src), deps, { connect: dial, ...faultThread, ...opts });
        return { result, outcome: await outcomes.get(src.name)! };
      }));
    } finally {
      for (const src of srcs) await src.stop().catch(() => undefined);
    }
  }

  stop(): void {
    this.child.disconnect();
  }
}

if (process.env.FERRY_BENCH_DESTINATION === '1' && process.send) await destinationHost();
