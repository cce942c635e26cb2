/**
 * The host agent: runs VMs on one host and exposes them through an HTTP control API.
 * Several agents can live in one process (tests, the demo): no module-level state.
 */
import { availableParallelism } from 'node:os';
import { createHash, randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { existsSync, readdirSync } from 'node:fs';
import { mkdir, readFile } from 'node:fs/promises';
import { totalmem } from 'node:os';
import { basename, isAbsolute, join, resolve } from 'node:path';
import type { ServerResponse } from 'node:http';
import Fastify, { type FastifyInstance } from 'fastify';
import { z } from 'zod';
import { AbortError, FerryError, InvalidArgumentError, VmStateError } from '../../core/errors.js';
import { formatBytes, parseBandwidth, parseSize } from '../../core/units.js';
import type { DestinationFactory, DestinationVm, EngineDeps, MigrationOptions } from '../../core/engine/types.js';
import { migrateSource } from '../../core/engine/source.js';
import { MigrationAcceptor } from '../../core/engine/destination.js';
import { CODEC_NAMES, Gang, parseCodecNames, type CodecName } from '../../core/engine/codecs.js';
import { MIGRATION_MODES, type HelloFrame, type MigrationMode } from '../../core/protocol/frames.js';
import { shaped } from '../../core/transport/shaped.js';
import { TokenBucket } from '../../core/rate.js';
import { FixedDowntimeLearner } from '../../core/policy/fixed-downtime.js';
import type { Connection, Listener, Transport } from '../../core/transport/transport.js';
import { DestinationVmAdapter, nodeEngineDeps, sourceVmOf, startPageHashers } from '../engine/adapters.js';
import { warmMigrationPaths, type WarmUpResult } from '../engine/warm-up.js';
import { tcp, parseTcpAddress, sendFromThread } from '../transport/tcp.js';
import { systemCongestionControl } from '../transport/congestion.js';
import { SendThreads } from '../transport/send-threads.js';
import { FaultThreadListener, SourceFaultThreads, sourceFaultThread } from '../engine/fault-thread.js';
import { POSTCOPY_VCPU_NICE, type FaultThreadPriority } from '../engine/thread-priority.js';
import { InstrumentCache } from '../vm/instrument.js';
import { warmDeviceStateValidation } from '../vm/devices/state-schema.js';
import { instrumentThread } from '../vm/instrument-thread.js';
import { Vm, checkMemorySize, type VmStats } from '../vm/vm.js';
import { GuestMemoryPool, type MemoryPoolStats } from '../vm/memory-pool.js';
import { VcpuThreadPool } from '../vm/vcpu-threads.js';
import { restoreSnapshot, writeSnapshot, type SnapshotStats } from '../vm/snapshot.js';
import { ExposeEndpoint, parseHostPort } from '../net/expose.js';
import { Relay, peekStart, startsLikeRelay, withPrefix } from '../net/relay.js';
import { guestsDir } from '../paths.js';
import type { NetRecordData } from '../../core/net-ring.js';
import { HomeLink, RemoteLink, type NetLink } from './links.js';
import { MigrationJob, type MigrationJobJson } from './migrations.js';
import { getJson, type JsonReply } from './get-json.js';

export interface HostAgentInit {
  name: string;
  dataDir: string;
  /** Where built-in guests are looked up by name. Default: the package's build/guests. */
  guestsDir?: string;
  cache?: InstrumentCache;
  quantumMs?: number;
  /**
   * Guest RAM this host may reserve, bytes (sum of its VMs' memory ceilings, incoming migrations
   * included). Default: the machine's total memory.
   */
  capacityBytes?: number;
  /** Where the migration listener binds (default: the control API's host, port 0). */
  migrationAddress?: string;
  /** Transport for migrations and relays (default: TCP). */
  transport?: Transport;
  /**
   * TCP congestion control for this host's migration connections, dialled and accepted (Linux
   * TCP_CONGESTION, e.g. 'cubic'; default: the system's), post-copy's fault channel threads'
   * too. Only for the host's own TCP transport.
   */
  tcpCongestion?: string;
  /** Engine services (default: the node ones, with the lz4/zstd blob codecs). */
  engineDeps?: EngineDeps;
  /** Most parallel data streams granted to one incoming migration (default: the engine's, 16). */
  maxIncomingStreams?: number;
  /**
   * Most bytes of ready guest memory this host keeps for later VMs (default
   * {@link DEFAULT_MEMORY_POOL_BYTES}; 0 turns the pool off). A VM that leaves the host gives its
   * memory back; a VM created or arriving later with the same memory shape takes it, zeroed and
   * already backed by the kernel, instead of faulting fresh memory in (see GuestMemoryPool).
   */
  memoryPoolBytes?: number;
  /**
   * vCPU threads this host keeps started ahead of the VMs that will run on them (default 1; 0:
   * every VM starts its own). A migration's destination VM then takes a loaded thread instead of
   * starting one during the first round (see VcpuThreadPool).
   */
  spareVcpuThreads?: number;
  /**
   * How this host's post-copy fault threads ask to be scheduled (default 'nice'; each falls back
   * to what it is allowed; see FaultThreadPriority for what 'realtime' gives and costs).
   */
  faultThreadPriority?: FaultThreadPriority;
  /**
   * The nice value an arriving VM's vCPU thread takes while pages are still missing (post-copy),
   * -20 to 19 (default {@link POSTCOPY_VCPU_NICE}, 0: left as it is; see VmInit.faultNice).
   */
  postcopyVcpuNice?: number;
  /**
   * Warm the module rewriter when the migration listener opens: it rewrites a small sample guest
   * once, so the first arriving VM's rewrite does not run in (and compile) a cold rewriter while
   * that migration is under way (see InstrumentThread.warm). About a second of CPU on its own
   * thread. Default false; `ferry host start` sets it.
   */
  warmRewriter?: boolean;
  /**
   * Warm the migration code paths when the migration listener opens: migrate a small VM from this
   * host to itself once (engine/warm-up.ts), so that the first real migration, in or out, does not
   * run cold code inside its downtime. Migrations wait for it: about a second in a fresh process
   * here, most of it rewriting the guest (the migration itself about a quarter of a second).
   * A function is run instead of the built-in warm-up; it should stop when `signal` aborts. Default
   * false; `ferry host start` sets it unless told --no-warm-up.
   */
  warmMigrations?: boolean | ((signal: AbortSignal) => Promise<WarmUpResult>);
  /**
   * How long the warm-up may take before it is abandoned (reported as failed), ms: migrations wait
   * for it, so one that hung would hold every migration of this host. Default 60 000 (it takes
   * about a second).
   */
  warmUpLimitMs?: number;
}

/** The host's warm-up migration (HostAgentInit.warmMigrations), as GET /v1/host reports it. */
export type WarmUpJson =
  | { state: 'running' }
  | { state: 'done'; ms: number; verified: boolean }
  | { state: 'failed'; error: string };

/**
 * Memory pool capacity when none is given: room for the memory of a few small VMs, or one larger
 * one, coming back (a VM migrated away and back is the common case; see GuestMemoryPool). The pool
 * holds only memory VMs gave back, so an idle host keeps nothing.
 */
export const DEFAULT_MEMORY_POOL_BYTES = 512 << 20;

/** The host's memory pool as GET /v1/host reports it. */
export interface HostMemoryPoolJson extends MemoryPoolStats {
  /** Most bytes the pool holds (0: off). */
  capacityBytes: number;
}

export interface VmSpec {
  name: string;
  /** A built-in guest name (kv, memstress, …) or a path to a .wasm file. */
  guest: string;
  memory: string | number;
  config?: string;
  /** host:port for the VM's TCP endpoint, e.g. 127.0.0.1:0. */
  expose?: string;
  disk?: string;
  diskSize?: string | number;
  fixedBudget?: number;
  paused?: boolean;
}

export interface VmSummary {
  name: string;
  guest: string;
  memoryBytes: number;
  guestBytes: number;
  /** The client endpoint, host:port — on this host, or on `endpointHost` when the VM moved here. */
  endpoint: string | null;
  /** The host whose endpoint serves this VM's clients (null: this host). */
  endpointHost: string | null;
  stats: VmStats;
  error: string | null;
  /** Id of the outgoing migration in progress, if any. */
  migration: string | null;
}

export interface MigrationRequest {
  vm: string;
  /** The destination agent's control URL (http://…) or its migration address (host:port). */
  to: string;
  mode: MigrationMode;
  downtimeMs?: number;
  /**
   * The downtime's fixed part pre-copy's stop condition adds to eq. (2), ms (default 0;
   * MigrationOptions.fixedDowntimeMs), or `auto`: what eq. (2) missed in this host's latest
   * migrations to the same destination (the median; 0 before the first). The report says which.
   */
  fixedDowntimeMs?: number | 'auto';
  /** Cap on the migration stream, e.g. "1Gbit". */
  bandwidth?: string;
  maxRounds?: number;
  autoConverge?: boolean;
  /** Codecs to offer beyond zero pages: `xbzrle`, `dedup`, `lz4`, `zstd` (default none). The destination agrees to those it decodes. */
  codecs?: readonly string[];
  /** Parallel data streams, 1 … {@link MAX_MIGRATION_STREAMS} (default {@link defaultStreams}). The destination may grant fewer. */
  streams?: number;
  /** lz4/zstd: `auto` (default) turns compression off when it makes the link slower; `always` never does. */
  compression?: 'auto' | 'always';
  /** XBZRLE page cache for the VM, a size such as "64MiB" (default 64 MiB; whole pages, at least one). */
  xbzrleCache?: string;
  /**
   * Gang name (1 … 64 printable ASCII): concurrent migrations from this host to the same
   * destination naming the same gang share one de-duplication index (implies the `dedup` codec).
   */
  gang?: string;
  /** Post-copy / hybrid: page requests on a connection of their own (default true). */
  faultChannel?: boolean;
}

/**
 * Parallel data streams when a request does not say, from the mode and the core count. Where each
 * stream past the first sends from a thread of its own (`threaded`: this host's own TCP on a
 * machine with sender threads, transport/send-threads.ts), pre-copy and hybrid get one stream per
 * core, at most 4: the kernel's send path, which bounds a loopback stream, then runs on every core
 * (on 2 cores, 2 streams took 10–17 % less time than 1 for an idle 256 MiB VM, and
 * `bench/reduction.bench.ts` measured 1.20×; medians of interleaved runs). Otherwise every stream
 * is written from the one event loop, and extra sockets only pay where spare cores take the
 * kernel's socket work: one per four cores (on 2 cores such streams measured 0.89–1.12× one).
 * Post-copy keeps that rule even with threads: its push runs beside the running guest, and on 2
 * cores a second stream's thread made it 5–17 % slower (three interleaved runs of 8–10 each).
 */
export function defaultStreams(mode: MigrationMode, cores = availableParallelism(), threaded = SendThreads.available()): number {
  return Math.max(1, Math.min(4, threaded && mode !== 'postcopy' ? cores : Math.floor(cores / 4)));
}

/** Most parallel data streams one migration request may ask for. */
export const MAX_MIGRATION_STREAMS = 64;
const GANG_NAME = /^[\x21-\x7e]{1,64}$/;

/** Client bytes in flight toward a guest before it must consume some (below the rx queue limit). */
const EXPOSE_WINDOW = 8 << 20;

export class NotFoundError extends FerryError {
  constructor(message: string) {
    super('ERR_NOT_FOUND', message);
  }
}

interface ManagedVm {
  vm: Vm;
  guest: string;
  link: NetLink | null;
  migration: MigrationJob | null;
  /** Snapshots being written: they read guest memory, so it goes back to the pool only after them. */
  readers: Set<Promise<unknown>>;
}

export { parseHostPort };

/** The engine's destination VM, plus a hook run once the VM has started. */
class StartHookedDestinationVm extends DestinationVmAdapter {
  constructor(vm: Vm, guestBytes: number, private readonly afterStart: () => void) {
    // Memory as large as the source announced is faulted in while the VM is readied.
    super(vm, { guestBytes });
  }

  override async start(...args: Parameters<DestinationVmAdapter['start']>): Promise<void> {
    await super.start(...args);
    this.afterStart();
  }
}

export class HostAgent extends EventEmitter {
  readonly name: string;
  readonly dataDir: string;
  readonly cache: InstrumentCache;
  readonly capacityBytes: number;
  private readonly guests: string;
  private readonly quantumMs: number | undefined;
  private readonly postcopyVcpuNice: number;
  /** Ready guest memories: VMs leaving this host give theirs back, VMs created or arriving take them. */
  private readonly pool: GuestMemoryPool;
  private readonly threads: VcpuThreadPool;
  private readonly vms = new Map<string, ManagedVm>();
  private http: FastifyInstance | null = null;
  private readonly transport: Transport;
  private readonly deps: EngineDeps;
  private readonly migrationBind: string | undefined;
  private migrationListener: Listener | null = null;
  /** Memory reserved for migrations arriving now, by VM name. */
  private readonly incoming = new Map<string, number>();
  /** Relays opened by other homes for VMs about to arrive here, by VM name. */
  private readonly incomingRelays = new Map<string, RemoteLink>();
  /** Endpoints of VMs that live here but run elsewhere, by VM name. */
  private readonly away = new Map<string, HomeLink>();
  private readonly jobs = new Map<string, MigrationJob>();
  private nextJob = 1;
  /** Incoming migrations: one acceptor, so a JOIN finds the session it belongs to. */
  private readonly acceptor: MigrationAcceptor;
  /**
   * Post-copy faults on threads of their own (FaultThreads): the destination's, listening beside
   * the migration listener, and the source's. Only on this host's own TCP transport: a transport
   * given in the init (tests, relays) carries every connection itself.
   */
  private readonly faultListener: FaultThreadListener | null;
  private readonly warmRewriter: boolean;
  private readonly warmMigrations: boolean | ((signal: AbortSignal) => Promise<WarmUpResult>);
  private readonly warmUpLimitMs: number;
  /** Aborts the warm-up under way (its time limit, or close()). */
  private readonly warmUpAbort = new AbortController();
  /** The warm-up migration under way or done (null: none asked for); migrations wait for it. */
  private warming: Promise<void> | null = null;
  private warmUpState: WarmUpJson | null = null;
  private readonly sourceFaults: SourceFaultThreads | null;
  /** Threads that send the data streams past the first of migrations from here (this host's own TCP only). */
  private readonly senders: SendThreads | null;
  /** Gangs with a migration in flight, by destination address and gang name. */
  private readonly gangs = new Map<string, { gang: Gang; members: number }>();
  /** What eq. (2) missed in this host's migrations, by destination: `fixedDowntimeMs: 'auto'`. */
  private readonly fixedDowntime = new FixedDowntimeLearner();
  private readonly openConns = new Set<Connection>();
  private readonly sseStreams = new Set<ServerResponse>();
  private closing = false;
  /** The congestion control of this host's migration connections (null: a transport given to it, or unknown). */
  readonly tcpCongestion: string | null;

  constructor(init: HostAgentInit) {
    super();
    // Checked before anything starts (a spare vCPU thread, a pool).
    const nice = init.postcopyVcpuNice ?? POSTCOPY_VCPU_NICE;
    if (!Number.isInteger(nice) || nice < -20 || nice > 19) throw new InvalidArgumentError(`post-copy vCPU nice value ${nice} is not an integer from -20 to 19`);
    this.postcopyVcpuNice = nice;
    if (init.transport && init.tcpCongestion !== undefined) throw new InvalidArgumentError('tcpCongestion applies to the host\'s own TCP transport, not to a transport given to it');
    // Made (its congestion control checked) before anything starts.
    this.transport = init.transport ?? tcp(init.tcpCongestion !== undefined ? { congestion: init.tcpCongestion } : {});
    this.tcpCongestion = init.transport ? null : (init.tcpCongestion ?? systemCongestionControl());
    this.name = init.name;
    this.dataDir = init.dataDir;
    this.guests = init.guestsDir ?? guestsDir();
    this.cache = init.cache ?? new InstrumentCache({ dir: join(init.dataDir, 'cache') });
    this.quantumMs = init.quantumMs;
    this.pool = new GuestMemoryPool(init.memoryPoolBytes ?? DEFAULT_MEMORY_POOL_BYTES);
    // A spare starts only while no migration runs here (it would take the CPU the migration needs).
    this.threads = new VcpuThreadPool(init.spareVcpuThreads ?? 1, {
      busy: () => this.incoming.size > 0 || [...this.jobs.values()].some((j) => j.status === 'running'),
    });
    this.capacityBytes = init.capacityBytes ?? totalmem();
    this.deps = init.engineDeps ?? nodeEngineDeps();
    this.migrationBind = init.migrationAddress;
    const faultPriority = init.faultThreadPriority ?? 'nice';
    this.faultListener = init.transport ? null : new FaultThreadListener('127.0.0.1', faultPriority, init.tcpCongestion);
    this.warmRewriter = init.warmRewriter ?? false;
    this.warmMigrations = init.warmMigrations ?? false;
    this.warmUpLimitMs = init.warmUpLimitMs ?? 60_000;
    if (!(Number.isSafeInteger(this.warmUpLimitMs) && this.warmUpLimitMs > 0)) throw new InvalidArgumentError(`warm-up limit ${init.warmUpLimitMs} ms is not a positive integer`);
    this.sourceFaults = init.transport ? null : new SourceFaultThreads(faultPriority, init.tcpCongestion);
    // Started by the first migration that opens a second data stream, then kept for the next.
    this.senders = init.transport || !SendThreads.available() ? null : new SendThreads(0);
    this.acceptor = new MigrationAcceptor(this.deps, {
      ...(init.maxIncomingStreams !== undefined ? { maxStreams: init.maxIncomingStreams } : {}),
      ...(this.faultListener ? { faultThreads: this.faultListener } : {}),
    });
  }

  /** Resolves a guest name or path to module bytes. */
  async loadGuest(guest: string): Promise<{ bytes: Uint8Array; label: string }> {
    const builtin = join(this.guests, `${guest}.wasm`);
    const path = /^[a-z][a-z0-9_-]*$/.test(guest) && existsSync(builtin) ? builtin : resolve(guest);
    if (!existsSync(path)) {
      throw new NotFoundError(`guest '${guest}' is neither a built-in guest (${this.builtinGuests().join(', ') || 'none built: run npm run build'}) nor an existing file`);
    }
    return { bytes: new Uint8Array(await readFile(path)), label: path === builtin ? guest : basename(path) };
  }

  /** Built-in guests by their module's SHA-256 (hex), read once. */
  private builtinHashes: Promise<Map<string, string>> | null = null;

  /** The built-in guest whose module has this SHA-256, if any: how an arriving VM without a client link is labelled. */
  private async builtinGuestOf(sha256: string): Promise<string | null> {
    this.builtinHashes ??= Promise.all(this.builtinGuests().map(async (g) => {
      const bytes = await readFile(join(this.guests, `${g}.wasm`)).catch(() => null); // unreadable: not named
      return bytes ? [createHash('sha256').update(bytes).digest('hex'), g] as const : null;
    })).then((pairs) => new Map(pairs.filter((p) => p !== null)));
    return (await this.builtinHashes).get(sha256) ?? null;
  }

  builtinGuests(): string[] {
    try {
      return readdirSync(this.guests).filter((f) => f.endsWith('.wasm')).map((f) => f.slice(0, -5)).sort();
    } catch {
      return [];
    }
  }

  get(name: string): ManagedVm {
    const m = this.vms.get(name);
    if (!m) throw new NotFoundError(`no VM named '${name}' on host ${this.name}`);
    return m;
  }

  vm(name: string): Vm {
    return this.get(name).vm;
  }

  /** Guest RAM reserved: this host's VMs plus migrations arriving now. */
  reservedBytes(): number {
    let n = 0;
    for (const m of this.vms.values()) n += m.vm.memoryBytes;
    for (const b of this.incoming.values()) n += b;
    return n;
  }

  private checkNameFree(name: string): void {
    if (this.vms.has(name) || this.incoming.has(name)) throw new VmStateError(`a VM named '${name}' already exists on host ${this.name}`);
    if (this.away.has(name)) throw new VmStateError(`VM '${name}' lives on host ${this.name} (its clients connect here) and runs elsewhere now`);
  }

  /** A VM of `bytes` may come here: a size a VM can have (checkMemorySize), and room for it. */
  private checkCapacity(bytes: number): void {
    checkMemorySize(bytes);
    const reserved = this.reservedBytes();
    if (reserved + bytes > this.capacityBytes) {
      throw new FerryError('ERR_NO_CAPACITY', `host ${this.name} cannot reserve ${formatBytes(bytes)} of guest memory: ${formatBytes(reserved)} of its ${formatBytes(this.capacityBytes)} are reserved`);
    }
  }

  /**
   * The pool keeps only what the VMs' reservations leave of the host's capacity. Called once a
   * newly reserved VM has its memory (from the pool, if it had that shape).
   */
  private fitPool(): void {
    this.pool.trim(Math.max(0, this.capacityBytes - this.reservedBytes()));
  }

  async createVm(spec: VmSpec): Promise<VmSummary> {
    this.checkNameFree(spec.name);
    const memoryBytes = typeof spec.memory === 'number' ? spec.memory : parseSize(spec.memory, 'memory size');
    this.checkCapacity(memoryBytes);
    const exposeAt = spec.expose ? parseHostPort(spec.expose) : null;
    const { bytes, label } = await this.loadGuest(spec.guest);
    await this.cache.prepare(bytes, ['plain', 'dirty']);
    let block: { path: string; sizeBytes: number } | undefined;
    if (spec.disk || spec.diskSize) {
      const sizeBytes = spec.diskSize === undefined ? 64 << 20 : typeof spec.diskSize === 'number' ? spec.diskSize : parseSize(spec.diskSize, 'disk size');
      await mkdir(join(this.dataDir, 'disks'), { recursive: true });
      block = { path: spec.disk ? resolve(spec.disk) : join(this.dataDir, 'disks', `${spec.name}.img`), sizeBytes };
    }
    const vm = Vm.create({
      name: spec.name, module: bytes, memoryBytes, config: spec.config ?? '', cache: this.cache, pool: this.pool, threads: this.threads,
      ...(block ? { block } : {}),
      ...(spec.fixedBudget ? { fixedBudget: spec.fixedBudget } : {}),
      ...(this.quantumMs ? { quantumMs: this.quantumMs } : {}),
    });
    const managed: ManagedVm = { vm, guest: label, link: null, migration: null, readers: new Set() };
    this.attach(managed);
    try {
      if (exposeAt) managed.link = await this.exposeVm(vm, label, exposeAt);
      this.vms.set(spec.name, managed);
      this.fitPool();
      await vm.bootCold({ paused: spec.paused });
    } catch (e) {
      this.vms.delete(spec.name);
      await this.closeLink(managed.link);
      await this.retire(managed);
      throw e;
    }
    return this.summary(spec.name);
  }

  /** Restores a snapshot file as a new VM on this host and continues it. */
  async restoreVm(path: string, opts: { name?: string; expose?: string; paused?: boolean } = {}): Promise<VmSummary> {
    const exposeAt = opts.expose ? parseHostPort(opts.expose) : null;
    const { vm, header } = await restoreSnapshot(path, {
      cache: this.cache, noStart: true, pool: this.pool, ...(opts.name ? { name: opts.name } : {}),
      admit: (name, memoryBytes) => {
        this.checkNameFree(name);
        this.checkCapacity(memoryBytes);
      },
    });
    const managed: ManagedVm = { vm, guest: header.state.name, link: null, migration: null, readers: new Set() };
    this.attach(managed);
    try {
      if (exposeAt) managed.link = await this.exposeVm(vm, managed.guest, exposeAt, header.netConnsFrom);
      this.vms.set(vm.name, managed);
      this.fitPool();
      await vm.bootFromState(header.state, { paused: opts.paused });
    } catch (e) {
      this.vms.delete(vm.name);
      await this.closeLink(managed.link);
      await this.retire(managed);
      throw e;
    }
    return this.summary(vm.name);
  }

  private attach(m: ManagedVm): void {
    const { vm } = m;
    vm.on('console', (line: string) => this.emit('console', vm.name, line));
    vm.on('trap', (err: Error) => this.emit('trap', vm.name, err));
    vm.on('halt', (code: number) => this.emit('halt', vm.name, code));
    vm.on('error', (err: Error) => this.emit('vm-error', vm.name, err));
    vm.on('net', (records: NetRecordData[]) => m.link?.toClients(records));
    // The vCPU returns credit as records enter the guest's ring (see exposeVm).
    vm.on('net-credit', (bytes: number) => m.link?.credit(bytes));
  }

  /** `firstConnId`: for a restored VM, above the connection ids it may still hold records of. */
  private async exposeVm(vm: Vm, guest: string, at: { host: string; port: number }, firstConnId?: number): Promise<HomeLink> {
    // The window keeps client input the guest has not consumed below the device's rx queue limit;
    // the vCPU returns credit as records enter the guest's ring (so nothing overflows or is lost).
    const link = new HomeLink(guest, (l, err) => this.onHomeLost(vm.name, l, err));
    const ep = await ExposeEndpoint.listen({
      host: at.host, port: at.port, window: EXPOSE_WINDOW, onRecords: (records) => link.toGuest(records),
      ...(firstConnId !== undefined ? { firstConnId } : {}),
    });
    link.bind(ep, vm);
    return link;
  }

  /** The host running one of our VMs went away: its clients cannot be served any more. */
  private onHomeLost(name: string, link: HomeLink, err: Error | undefined): void {
    if (this.away.get(name) === link) this.away.delete(name);
    this.emit('vm-lost', name, err);
    void link.close();
  }

  private async closeLink(link: NetLink | null): Promise<void> {
    if (link instanceof HomeLink || link instanceof RemoteLink) await link.close().catch(() => undefined);
  }

  async pauseVm(name: string): Promise<VmSummary> {
    const m = this.get(name);
    m.link?.hold();
    await m.vm.pause();
    return this.summary(name);
  }

  async resumeVm(name: string): Promise<VmSummary> {
    const m = this.get(name);
    m.vm.resume();
    await m.vm.whenRunning();
    m.link?.release();
    return this.summary(name);
  }

  /** Pauses the VM, writes a snapshot, then resumes it (or stops and removes it with `stop`). */
  async snapshotVm(name: string, out: string, opts: { stop?: boolean } = {}): Promise<SnapshotStats> {
    if (!isAbsolute(out)) throw new InvalidArgumentError(`snapshot path '${out}' must be absolute (the agent may run in another directory)`);
    const m = this.get(name);
    if (m.migration) throw new VmStateError(`VM '${name}' is migrating (${m.migration.id})`);
    if (this.incoming.has(name)) throw new VmStateError(`VM '${name}' is still arriving (post-copy pages are on their way); a snapshot now would miss them`);
    const wasPaused = m.vm.state === 'paused';
    m.link?.hold();
    await m.vm.pause();
    try {
      // A VM exposed here records where its endpoint's connection ids stand, so a restore does not
      // hand a new client an id the guest still holds records of.
      const netConnsFrom = m.link instanceof HomeLink ? m.link.endpointObject.nextConnId : undefined;
      const writing = writeSnapshot(m.vm, out, netConnsFrom === undefined ? {} : { netConnsFrom });
      const settled = writing.then(() => undefined, () => undefined);
      m.readers.add(settled);
      void settled.then(() => m.readers.delete(settled));
      const stats = await writing;
      if (opts.stop) await this.stopVm(name);
      return stats;
    } finally {
      if (!opts.stop && !wasPaused) {
        m.vm.resume();
        m.link?.release();
      }
    }
  }

  /** Stops a VM and removes it for good: its memory goes back to the host's pool. */
  async stopVm(name: string): Promise<void> {
    const m = this.get(name);
    const job = m.migration;
    if (job) job.controller.abort(new VmStateError(`VM '${name}' was stopped`));
    this.vms.delete(name);
    await this.closeLink(m.link);
    await m.vm.stop();
    // An outgoing migration reads guest memory until it has ended.
    await job?.done;
    await this.retire(m);
  }

  /**
   * Stops a VM this host is done with and gives its memory to the pool, once nothing reads it any
   * more (snapshots being written). Only for a VM no table lists and no migration still reads: a
   * later VM may take the memory and fill it. Never throws (the VM is gone either way).
   */
  private async retire(m: ManagedVm): Promise<void> {
    await m.vm.stop().catch(() => undefined);
    await Promise.all(m.readers);
    await m.vm.dispose().catch(() => undefined);
  }

  /** The spare vCPU threads: how many this host keeps, how many it started and how many VMs took one. */
  vcpuThreads(): { spares: number; started: number; taken: number; postcopyNice: number } {
    return { spares: this.threads.spares, started: this.threads.started, taken: this.threads.taken, postcopyNice: this.postcopyVcpuNice };
  }

  /**
   * Post-copy fault threads (null: this host has none, its transport is not its own TCP). The
   * port is null until a post-copy migration first arrived. How each thread is scheduled is
   * 'default' until it started (the destination's with the first post-copy migration in, the
   * source's with the first one out), then what it was allowed of what the host asked for.
   */
  faultThreads(): { port: number | null; priority: { asked: FaultThreadPriority; destination: FaultThreadPriority; source: FaultThreadPriority } } | null {
    if (!this.faultListener || !this.sourceFaults) return null;
    return {
      port: this.faultListener.listeningPort,
      priority: { asked: this.faultListener.ask, destination: this.faultListener.priority, source: this.sourceFaults.priority },
    };
  }

  /**
   * Sender threads (null: this host's transport is not its own TCP, or this machine has none): the
   * data streams a migration from here opens unless told otherwise, the threads alive, and how many
   * data streams they have sent so far.
   */
  sendThreads(): { defaultStreams: Record<MigrationMode, number>; threads: number; streamsSent: number } | null {
    const t = this.senders;
    if (!t) return null;
    const streams = Object.fromEntries(MIGRATION_MODES.map((m) => [m, defaultStreams(m, undefined, true)])) as Record<MigrationMode, number>;
    return { defaultStreams: streams, threads: t.threads, streamsSent: t.taken };
  }

  /** By destination migration address: the fixed downtime `fixedDowntimeMs: 'auto'` would use now, and from how many migrations. */
  fixedDowntimes(): Record<string, { ms: number; migrations: number }> {
    return this.fixedDowntime.toJSON();
  }

  /** The memory pool: its capacity and what it holds and has handed out. */
  memoryPool(): HostMemoryPoolJson {
    return { capacityBytes: this.pool.capacityBytes, ...this.pool.stats() };
  }

  summary(name: string): VmSummary {
    const m = this.get(name);
    return {
      name,
      guest: m.guest,
      memoryBytes: m.vm.memoryBytes,
      guestBytes: m.vm.guestBytes,
      endpoint: m.link?.endpoint() ?? null,
      endpointHost: m.link?.endpointHost() ?? null,
      stats: m.vm.stat(),
      error: m.vm.trap?.message ?? null,
      migration: m.migration?.id ?? null,
    };
  }

  list(): VmSummary[] {
    return [...this.vms.keys()].sort().map((n) => this.summary(n));
  }

  /** VMs whose endpoint is here while they run on another host: name → where client records go. */
  awayList(): { name: string; endpoint: string | null; via: string }[] {
    return [...this.away.entries()].sort(([a], [b]) => a.localeCompare(b)).map(([name, l]) => ({ name, endpoint: l.endpoint(), via: l.describe() }));
  }

  // ---------------------------------------------------------------- migration endpoint (destination)

  /** The migration listener's address (host:port), once listening. */
  get migrationAddress(): string | null {
    return this.migrationListener?.address ?? null;
  }

  /** Opens the migration listener (migrations and client relays share it). */
  async listenMigrations(address = '127.0.0.1:0'): Promise<string> {
    if (this.migrationListener) return this.migrationListener.address;
    // Arriving VMs' modules are rewritten on the instrumenting thread: it loads while we wait for them.
    void instrumentThread().warm({ rewrite: this.warmRewriter });
    // So are the threads that hash its pages as they are installed.
    startPageHashers();
    // An arriving VM's device state is validated inside its downtime; the first validation in a
    // process is a cold one (DestinationVmAdapter warms it too, but then on this event loop in the
    // middle of a migration's set-up, where every endpoint here waited for it).
    warmDeviceStateValidation();
    this.migrationListener = await this.transport.listen({ address, onConnection: (c) => void this.onMigrationConnection(c) });
    // The fault thread listens on the host migrations come in to.
    if (this.faultListener) this.faultListener.host = parseTcpAddress(this.migrationListener.address).host;
    if (this.warmMigrations && !this.warming) this.warmUp();
    return this.migrationListener.address;
  }

  /**
   * Runs the warm-up migration (see HostAgentInit.warmMigrations); its failure only loses the
   * warm-up. Abandoned after warmUpLimitMs, and by close().
   */
  private warmUp(): void {
    this.warmUpState = { state: 'running' };
    const { signal } = this.warmUpAbort;
    const limit = this.warmUpLimitMs;
    const timer = setTimeout(() => this.warmUpAbort.abort(new FerryError('ERR_WARM_UP_TIMEOUT', `the warm-up migration did not finish within ${limit} ms`)), limit);
    timer.unref();
    const run = typeof this.warmMigrations === 'function' ? this.warmMigrations : (s: AbortSignal) => warmMigrationPaths(this.deps, this.cache, this.guests, s);
    this.warming = run(signal).then((r) => {
      this.warmUpState = { state: 'done', ms: r.ms, verified: r.verified };
    }, (e: unknown) => {
      // Abandoned: the reason says why better than the error it ended with.
      const why: unknown = signal.aborted ? signal.reason : e;
      this.warmUpState = { state: 'failed', error: why instanceof Error ? why.message : String(why) };
    }).finally(() => {
      clearTimeout(timer);
      this.emit('warmed', this.warmUpState);
    });
  }

  /** The warm-up migration: whether it runs, and how it went (null: this host does none). */
  warmUpStatus(): WarmUpJson | null {
    return this.warmUpState;
  }

  /** Keeps `conn` for close() to abort until it has ended. */
  private track(conn: Connection): void {
    this.openConns.add(conn);
    void conn.closed.then(() => this.openConns.delete(conn));
  }

  private async onMigrationConnection(conn: Connection): Promise<void> {
    this.track(conn);
    if (this.closing) return conn.abort();
    let start: Awaited<ReturnType<typeof peekStart>>;
    try {
      start = await peekStart(conn);
    } catch {
      conn.abort();
      return;
    }
    if (startsLikeRelay(start.head)) {
      await this.acceptRelay(conn, start).catch((e: Error) => {
        this.emit('relay-error', e);
        conn.abort(e);
      });
      return;
    }
    await this.serveIncoming(withPrefix(conn, start.prefix, start.chunks)).catch((e: Error) => this.emit('migration-in-error', e));
  }

  private async acceptRelay(conn: Connection, start: Awaited<ReturnType<typeof peekStart>>): Promise<void> {
    const { relay, hello } = await Relay.accept(conn, start.prefix, start.chunks);
    if (this.vms.has(hello.vm) || this.incomingRelays.has(hello.vm)) {
      throw new VmStateError(`relay for VM '${hello.vm}' refused: host ${this.name} already has one`);
    }
    const link: RemoteLink = new RemoteLink(relay, hello, (l) => {
      if (this.incomingRelays.get(hello.vm) === l) this.incomingRelays.delete(hello.vm);
    });
    this.incomingRelays.set(hello.vm, link);
  }

  /**
   * Serves one incoming migration connection. A HELLO starts a migration: on success its VM joins
   * this host's table. A JOIN (a parallel data stream or fault channel of a migration already
   * arriving) attaches to that migration's session and is nothing more here.
   */
  private async serveIncoming(conn: Connection): Promise<void> {
    let reservedName: string | null = null;
    let managed: ManagedVm | null = null;
    let adapter: StartHookedDestinationVm | null = null;
    const factory: DestinationFactory = {
      admit: async (hello: HelloFrame) => {
        const name = hello.vmName;
        await this.warming; // never fails (see warmUp)
        if (this.closing) throw new FerryError('ERR_HOST_CLOSING', `host ${this.name} is shutting down`);
        if (this.vms.has(name) || this.incoming.has(name)) throw new FerryError('ERR_VM_EXISTS', `a VM named '${name}' already exists on host ${this.name}`);
        this.checkCapacity(hello.memoryBytes);
        this.incoming.set(name, hello.memoryBytes);
        reservedName = name;
        return {
          create: async (module: Uint8Array): Promise<DestinationVm> => {
            // A module this host has not rewritten yet is rewritten off this thread (its sockets
            // and other VMs' relays go on meanwhile); Vm.create then finds it in the cache.
            await this.cache.prepare(module, ['plain', 'dirty', 'presence']);
            const builtin = await this.builtinGuestOf(hello.moduleSha256);
            // Created at the source's size, so that memory the pool holds for it fits (a pool memory
            // serves only its exact shape); the adapter's growTo is then a no-op.
            const vm = Vm.create({
              name, module, memoryBytes: hello.memoryBytes, config: hello.config, cache: this.cache, pool: this.pool, threads: this.threads,
              variants: ['plain', 'dirty', 'presence'],
              ...(this.quantumMs ? { quantumMs: this.quantumMs } : {}),
              ...(this.postcopyVcpuNice !== 0 ? { faultNice: this.postcopyVcpuNice } : {}),
            }, hello.guestBytes);
            this.fitPool(); // the arrival is reserved (incoming) and has its memory now
            const home = this.away.get(name) ?? null;
            const remote = home ? null : (this.incomingRelays.get(name) ?? null);
            const guest = home?.guest ?? remote?.hello.guest ?? hello.guest ?? builtin ?? `sha256:${hello.moduleSha256.slice(0, 12)}`;
            const m: ManagedVm = { vm, guest, link: home ?? remote, migration: null, readers: new Set() };
            managed = m;
            this.attach(m);
            remote?.bindVm(vm);
            // The VM runs here once started: its clients' records must come here.
            adapter = new StartHookedDestinationVm(vm, hello.guestBytes, () => {
              // It runs here from now on: listed at once (post-copy may still be fetching pages).
              this.vms.set(name, m);
              if (home) home.comeHome(vm);
              else remote?.running();
            });
            return adapter;
          },
        };
      },
    };
    try {
      const outcome = await this.acceptor.accept(conn, factory);
      if (outcome === null) return;
      const m = managed as ManagedVm | null;
      if (!m) throw new FerryError('ERR_MIGRATION_DESTINATION', 'migration finished without creating a VM');
      this.vms.set(outcome.vmName, m);
      if (m.link instanceof HomeLink) this.away.delete(outcome.vmName);
      if (m.link instanceof RemoteLink) this.incomingRelays.delete(outcome.vmName);
      this.emit('migration-in', outcome);
    } catch (e) {
      const m = managed as ManagedVm | null;
      // Before the start the engine discarded the VM; after it, the VM ran here and depends on a
      // source that failed: it cannot continue. Either way nothing reads it again (the source runs
      // its own copy, if any), so its memory goes to the pool.
      if (m) {
        if (reservedName !== null && this.vms.get(reservedName) === m) this.vms.delete(reservedName);
        // Ends the fault service and any prefaulting (both write guest memory); the engine may have done so.
        await (adapter as StartHookedDestinationVm | null)?.discard().catch(() => undefined);
        await this.retire(m);
      }
      throw e;
    } finally {
      if (reservedName !== null) this.incoming.delete(reservedName);
    }
  }

  // ---------------------------------------------------------------- migrations (source)

  /** Where a destination given as a control URL or a migration address takes migrations. */
  private async resolveDestination(to: string): Promise<{ address: string; label: string }> {
    if (/^https?:\/\//i.test(to)) {
      const url = to.replace(/\/+$/, '');
      let res: JsonReply;
      try {
        res = await getJson(`${url}/v1/host`, 10_000);
      } catch (e) {
        throw new FerryError('ERR_DESTINATION_UNREACHABLE', `cannot reach destination agent at ${url}: ${(e as Error).message}`, { cause: e });
      }
      const body = res.body as { name?: unknown; migration?: unknown } | null;
      if (res.status !== 200 || !body || typeof body !== 'object' || typeof body.migration !== 'string') {
        throw new FerryError('ERR_DESTINATION_UNREACHABLE', `${url}/v1/host did not report a migration address (HTTP ${res.status})`);
      }
      return { address: body.migration, label: typeof body.name === 'string' ? body.name : url };
    }
    parseTcpAddress(to);
    return { address: to, label: to };
  }

  /** Checks the transfer options of a request before anything starts (InvalidArgumentError); `threaded`: data streams send from threads here. */
  private static transferOptions(req: MigrationRequest, threaded: boolean): { codecs: CodecName[]; streams: number; faultChannel: boolean; xbzrleCacheBytes?: number } {
    const codecs = parseCodecNames(req.codecs ?? []);
    const streams = req.streams ?? defaultStreams(req.mode, undefined, threaded);
    if (!Number.isInteger(streams) || streams < 1 || streams > MAX_MIGRATION_STREAMS) {
      throw new InvalidArgumentError(`streams ${streams} must be an integer from 1 to ${MAX_MIGRATION_STREAMS}`);
    }
    if (req.compression !== undefined && req.compression !== 'auto' && req.compression !== 'always') {
      throw new InvalidArgumentError(`compression '${String(req.compression)}' is not one of auto, always`);
    }
    if (req.gang !== undefined && !GANG_NAME.test(req.gang)) throw new InvalidArgumentError(`gang '${req.gang}' must be 1–64 printable ASCII characters`);
    const xbzrleCacheBytes = req.xbzrleCache === undefined ? undefined : parseSize(req.xbzrleCache, 'xbzrle cache');
    if (xbzrleCacheBytes !== undefined && !(xbzrleCacheBytes >= 4096 && xbzrleCacheBytes <= 2 ** 32)) throw new InvalidArgumentError(`xbzrle cache ${req.xbzrleCache} must hold 1 page to 4 GiB`);
    // As the engine decides: post-copy and hybrid open a fault channel unless told not to.
    return { codecs, streams, faultChannel: req.mode !== 'precopy' && req.faultChannel !== false, ...(xbzrleCacheBytes !== undefined ? { xbzrleCacheBytes } : {}) };
  }

  /** Starts migrating `req.vm` away; the job runs in the background. */
  async startMigration(req: MigrationRequest): Promise<MigrationJob> {
    if (!MIGRATION_MODES.includes(req.mode)) throw new InvalidArgumentError(`mode '${req.mode}' is not one of ${MIGRATION_MODES.join(', ')}`);
    const bandwidth = req.bandwidth === undefined ? undefined : parseBandwidth(req.bandwidth);
    const transfer = HostAgent.transferOptions(req, this.senders !== null);
    const m = this.get(req.vm);
    if (m.migration) throw new VmStateError(`VM '${req.vm}' is already migrating (${m.migration.id})`);
    if (this.incoming.has(req.vm)) throw new VmStateError(`VM '${req.vm}' is still arriving (post-copy pages are on their way); it can move once all are here`);
    if (m.vm.state === 'booting') await m.vm.whenRunning();
    if (m.vm.state !== 'running') throw new VmStateError(`VM '${req.vm}' is ${m.vm.state}; only a running VM migrates live`);
    const dest = await this.resolveDestination(req.to);
    if (dest.address === this.migrationAddress) throw new FerryError('ERR_MIGRATION_SELF', `VM '${req.vm}' already runs on host ${this.name}`);
    if (m.link instanceof RemoteLink && m.link.hello.homeMigration !== dest.address) {
      throw new FerryError('ERR_MIGRATION_ENDPOINT', `VM '${req.vm}' serves its clients through host ${m.link.hello.home} (${m.link.hello.homeMigration}); it can only move back there for now`);
    }
    if (this.get(req.vm) !== m || m.migration) throw new VmStateError(`VM '${req.vm}' changed while the migration was being set up`);
    const job = new MigrationJob(`m${this.nextJob++}-${req.vm}`, req.vm, this.name, dest.label, dest.address, req.mode, req.gang ?? null, this.tcpCongestion);
    this.jobs.set(job.id, job);
    m.migration = job;
    // The cap shapes our direction of the migration's connections (the bulk of the bytes), and
    // holds for all of them together: every connection it opens (data streams, the fault channel)
    // draws on one token bucket.
    const bucket = bandwidth === undefined ? undefined : new TokenBucket({ rateBytesPerSec: bandwidth });
    const shape = bucket === undefined
      ? (c: Connection) => c
      : (c: Connection) => shaped(c, { bucket, clock: this.deps.clock });
    const gang = req.gang === undefined ? null : this.joinGang(req.gang, dest.address);
    // Under a cap every connection draws on the bucket: the fault thread's would not, so then none.
    const faultThread = this.sourceFaults && !bucket ? sourceFaultThread(this.sourceFaults, m.vm, parseTcpAddress(dest.address).host) : null;
    void this.runMigration(m, job, req, dest.address, shape, { ...transfer, gang, faultThread });
    return job;
  }

  /**
   * The gang object migrations to `address` naming `name` share while any of them runs. Its wire id
   * is the name plus a random suffix: the destination shares one dedup store among sessions naming
   * the same id, and ids from another source's index (or a finished gang's) must never meet there.
   */
  private joinGang(name: string, address: string): Gang {
    const key = `${address} ${name}`;
    let g = this.gangs.get(key);
    if (!g) this.gangs.set(key, (g = { gang: new Gang(`${name.slice(0, 51)}.${randomBytes(6).toString('hex')}`), members: 0 }));
    g.members++;
    return g.gang;
  }

  /**
   * A member's migration ended. A failed member may have left ids in the shared index whose
   * definitions never reached the destination, so later migrations naming the gang start a new one.
   */
  private leaveGang(gang: Gang, name: string, address: string, failed: boolean): void {
    const key = `${address} ${name}`;
    const g = this.gangs.get(key);
    if (!g || g.gang !== gang) return;
    if (--g.members === 0 || failed) this.gangs.delete(key);
  }

  private async runMigration(
    m: ManagedVm, job: MigrationJob, req: MigrationRequest, address: string, shape: (c: Connection) => Connection,
    transfer: { codecs: CodecName[]; streams: number; gang: Gang | null; xbzrleCacheBytes?: number; faultThread: MigrationOptions['faultThread'] | null },
  ): Promise<void> {
    const signal = job.controller.signal;
    const link = m.link;
    let relay: Relay | null = null;
    let held = false;
    let failed = true;
    /** Connections the engine opened beyond the first (data streams, fault channel). */
    const extra: Connection[] = [];
    let ended = false;
    const releaseHold = () => {
      if (!held) return;
      held = false;
      link?.release();
    };
    const connect = async (purpose: 'data' | 'fault'): Promise<Connection> => {
      const dialled = await this.transport.dial(address, { signal });
      // A data stream's bytes go out from a thread of its own, beside this event loop's.
      if (purpose === 'data' && this.senders) sendFromThread(dialled, this.senders);
      const c = shape(dialled);
      this.track(c);
      if (ended) {
        // The migration ended while this one was being dialled: nobody will close it.
        c.abort();
        throw new AbortError('the migration ended while a connection was opening');
      }
      extra.push(c);
      return c;
    };
    try {
      await this.warming; // never fails (see warmUp)
      if (link instanceof HomeLink) {
        relay = await Relay.dial(this.transport, address, {
          vm: m.vm.name, endpoint: link.endpoint() ?? '', guest: m.guest, home: this.name, homeMigration: this.migrationAddress ?? '',
        }, { signal });
        const r = relay;
        link.adopt(r, () => {
          // The destination runs the VM: held client input goes there now.
          link.forwardTo(r, job.to);
          releaseHold();
        });
      }
      const conn = shape(await this.transport.dial(address, { signal }));
      this.track(conn);
      const source = sourceVmOf(m.vm, {
        onPause: () => {
          if (!held && link) {
            held = true;
            link.hold();
          }
        },
        onResume: releaseHold,
      }, m.guest);
      const result = await migrateSource(conn, source, this.deps, {
        mode: req.mode, signal, onProgress: (p) => job.onProgress(p), connect,
        ...(req.downtimeMs !== undefined ? { downtimeMs: req.downtimeMs } : {}),
        ...(req.fixedDowntimeMs !== undefined ? { fixedDowntimeMs: req.fixedDowntimeMs === 'auto' ? this.fixedDowntime.fixedFor(address) : req.fixedDowntimeMs } : {}),
        ...(req.maxRounds !== undefined ? { maxRounds: req.maxRounds } : {}),
        ...(req.autoConverge !== undefined ? { autoConverge: req.autoConverge } : {}),
        ...(transfer.codecs.length > 0 ? { codecs: transfer.codecs } : {}),
        ...(transfer.streams > 1 ? { streams: transfer.streams } : {}),
        ...(req.compression !== undefined ? { compression: req.compression } : {}),
        ...(transfer.xbzrleCacheBytes !== undefined ? { xbzrleCacheBytes: transfer.xbzrleCacheBytes } : {}),
        ...(req.faultChannel !== undefined ? { faultChannel: req.faultChannel } : {}),
        ...(transfer.gang ? { gang: transfer.gang } : {}),
        ...(transfer.faultThread ? { faultThread: transfer.faultThread } : {}),
      });
      failed = false;
      // The destination owns the VM (the engine released it here: stopped).
      if (this.vms.get(m.vm.name) === m) this.vms.delete(m.vm.name);
      m.migration = null;
      if (link instanceof HomeLink && relay) {
        link.forwardTo(relay, job.to);
        releaseHold();
        this.away.set(m.vm.name, link);
      }
      // A RemoteLink is fenced and closed by the home, which the VM went back to.
      held = false;
      // Nothing reads this copy again (the engine is done with it; the links hand client records
      // on, they never read guest memory): its memory serves the next VM that arrives here.
      await this.retire(m);
      this.fixedDowntime.record(address, result.report);
      job.succeed(result);
      this.emit('migration-out', job.json());
    } catch (e) {
      m.migration = null;
      releaseHold();
      relay?.abort(e instanceof Error ? e : undefined);
      // The engine aborts the connections it knew of; one it was still joining is ours to end.
      for (const c of extra) c.abort(e instanceof Error ? e : undefined);
      job.fail(e);
      this.emit('migration-out', job.json());
    } finally {
      // After a success the connections end as the destination closes its side: aborting them now
      // could reach the destination before the final ACK does.
      ended = true;
      if (transfer.gang && req.gang !== undefined) this.leaveGang(transfer.gang, req.gang, address, failed);
    }
  }

  migration(id: string): MigrationJob {
    const j = this.jobs.get(id);
    if (!j) throw new NotFoundError(`no migration '${id}' on host ${this.name}`);
    return j;
  }

  migrations(): MigrationJobJson[] {
    return [...this.jobs.values()].map((j) => j.json());
  }

  /** Cancels a migration (before switchover it ends with the VM running here). */
  cancelMigration(id: string): MigrationJob {
    const j = this.migration(id);
    if (j.status === 'running') j.controller.abort(new FerryError('ERR_CANCELLED', 'cancelled by the operator'));
    return j;
  }

  // ---------------------------------------------------------------- lifecycle

  /** Starts the HTTP control API and the migration listener; returns the control API's base URL. */
  async listen(host = '127.0.0.1', port = 0): Promise<string> {
    const app = buildControlApi(this);
    await app.listen({ host, port });
    this.http = app;
    const a = app.server.address();
    if (!a || typeof a === 'string') throw new FerryError('ERR_LISTEN', 'control API did not bind a TCP address');
    await this.listenMigrations(this.migrationBind ?? `${host.includes(':') ? `[${host}]` : host}:0`);
    return `http://${host.includes(':') ? `[${host}]` : host}:${a.port}`;
  }

  /** @internal the control API registers its event streams so close() can end them. */
  trackStream(res: ServerResponse): () => void {
    this.sseStreams.add(res);
    return () => this.sseStreams.delete(res);
  }

  async close(): Promise<void> {
    this.closing = true;
    this.warmUpAbort.abort(new FerryError('ERR_HOST_CLOSING', `host ${this.name} is shutting down`));
    await this.warming; // its VMs stop with it
    for (const j of this.jobs.values()) if (j.status === 'running') j.controller.abort(new FerryError('ERR_HOST_CLOSING', `host ${this.name} is shutting down`));
    for (const res of this.sseStreams) res.end();
    this.sseStreams.clear();
    await this.migrationListener?.close();
    this.migrationListener = null;
    for (const c of this.openConns) c.abort();
    await Promise.all([...this.jobs.values()].map((j) => j.done));
    await this.http?.close();
    this.http = null;
    for (const name of [...this.vms.keys()]) await this.stopVm(name).catch(() => undefined);
    for (const l of this.away.values()) await l.close().catch(() => undefined);
    this.away.clear();
    for (const l of this.incomingRelays.values()) await l.close().catch(() => undefined);
    this.incomingRelays.clear();
    await this.faultListener?.close();
    await this.sourceFaults?.close();
    await this.senders?.close();
    await this.threads.close();
  }
}

/**
 * A size: text such as 256MiB (parsed where it is used, which names what is wrong with it) or a
 * byte count. Its own message: a union's own says only "Invalid input", even when the field is missing.
 */
const size = z.union([z.string().max(32), z.number().int().positive()], {
  error: (issue) => (issue.input === undefined ? 'required: a size such as 256MiB, or a byte count' : 'must be a size such as 256MiB (at most 32 characters), or a positive integer byte count'),
});
const vmName = z.string().regex(/^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$/, 'name must be 1–64 letters, digits, ".", "_" or "-"');
const createBody = z.object({
  name: vmName,
  guest: z.string().min(1).max(4096),
  memory: size,
  config: z.string().max(65536).optional(),
  expose: z.string().max(64).optional(),
  disk: z.string().max(4096).optional(),
  diskSize: size.optional(),
  fixedBudget: z.number().int().positive().max(0x3fffffff).optional(),
  paused: z.boolean().optional(),
}).strict();
const snapshotBody = z.object({ out: z.string().min(1).max(4096), stop: z.boolean().optional() }).strict();
const restoreBody = z.object({ path: z.string().min(1).max(4096), name: z.string().max(64).optional(), expose: z.string().max(64).optional(), paused: z.boolean().optional() }).strict();
const migrationBody = z.object({
  vm: vmName,
  to: z.string().min(1).max(512),
  mode: z.enum(MIGRATION_MODES as [MigrationMode, ...MigrationMode[]]),
  downtimeMs: z.number().positive().max(3_600_000).optional(),
  fixedDowntimeMs: z.union([z.number().min(0).max(3_600_000), z.literal('auto')]).optional(),
  bandwidth: z.string().min(1).max(32).optional(),
  maxRounds: z.number().int().positive().max(1000).optional(),
  autoConverge: z.boolean().optional(),
  // Names are checked by startMigration (parseCodecNames), which says which one is unknown.
  codecs: z.array(z.string().max(32)).max(CODEC_NAMES.length * 2).optional(),
  streams: z.number().int().min(1).max(MAX_MIGRATION_STREAMS).optional(),
  compression: z.enum(['auto', 'always']).optional(),
  xbzrleCache: z.string().max(32).optional(),
  gang: z.string().regex(GANG_NAME, 'gang must be 1–64 printable ASCII characters').optional(),
  faultChannel: z.boolean().optional(),
}).strict();

/**
 * One validation issue as `path: what is wrong`. A field that is missing says "required" (zod
 * says what it expected of a value it never got: "mode: Invalid option: expected one of …").
 */
function issueText(i: z.core.$ZodIssue, body: unknown): string {
  const path = i.path.join('.') || 'body';
  let v: unknown = body;
  for (const k of i.path) v = v !== null && typeof v === 'object' ? (v as Record<PropertyKey, unknown>)[k] : undefined;
  if (i.path.length === 0 || v !== undefined || i.message.startsWith('required')) return `${path}: ${i.message}`;
  return `${path}: required (${i.message.replace(/^Invalid (input|option): /, '').replace(/, received undefined$/, '')})`;
}

/** Our code for an error the HTTP framework raised (FST_…): the body could not be read, or the request was wrong. */
function requestErrorCode(code: string | undefined): string {
  if (code === undefined) return 'ERR_INTERNAL';
  if (code.startsWith('FST_ERR_CTP_')) return 'ERR_INVALID_BODY';
  return code.startsWith('FST_') ? 'ERR_INVALID_REQUEST' : code;
}

function statusOf(e: unknown): number {
  if (e instanceof NotFoundError) return 404;
  if (e instanceof VmStateError) return 409;
  if (e instanceof z.ZodError || e instanceof InvalidArgumentError) return 400;
  if (e instanceof FerryError) return 422;
  return 500;
}

/** The control API. Every body is validated; errors come back as {error: {code, message}}. */
export function buildControlApi(agent: HostAgent): FastifyInstance {
  const app = Fastify({ logger: false, bodyLimit: 1 << 20 });
  app.setErrorHandler((err, req, reply) => {
    const status = (err as { statusCode?: number }).statusCode && !(err instanceof FerryError) && !(err instanceof z.ZodError) ? (err as { statusCode: number }).statusCode : statusOf(err);
    const code = err instanceof FerryError ? err.code : err instanceof z.ZodError ? 'ERR_INVALID_BODY' : requestErrorCode((err as { code?: string }).code);
    const message = err instanceof z.ZodError ? err.issues.map((i) => issueText(i, req.body)).join('; ')
      : (err as { code?: string }).code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE' ? `the body must be JSON (content-type: application/json), not ${req.headers['content-type'] ?? 'of no declared type'}`
        : (err as Error).message;
    void reply.status(status).send({ error: { code, message } });
  });
  app.setNotFoundHandler((req, reply) => {
    void reply.status(404).send({ error: { code: 'ERR_NOT_FOUND', message: `no such endpoint: ${req.method} ${req.url.split('?')[0]} (the API: /v1/host, /v1/vms, /v1/migrations)` } });
  });
  app.get('/v1/host', async () => ({
    name: agent.name, vms: agent.list().length, migration: agent.migrationAddress,
    capacityBytes: agent.capacityBytes, reservedBytes: agent.reservedBytes(), away: agent.awayList(), tcpCongestion: agent.tcpCongestion,
    memoryPool: agent.memoryPool(), vcpuThreads: agent.vcpuThreads(), faultThreads: agent.faultThreads(), sendThreads: agent.sendThreads(), warmUp: agent.warmUpStatus(),
    fixedDowntime: agent.fixedDowntimes(),
  }));
  app.get('/v1/vms', async () => agent.list());
  app.post('/v1/vms', async (req, reply) => {
    const body = createBody.parse(req.body);
    return reply.status(201).send(await agent.createVm(body));
  });
  app.post('/v1/vms/restore', async (req, reply) => {
    const body = restoreBody.parse(req.body);
    return reply.status(201).send(await agent.restoreVm(body.path, body));
  });
  app.get<{ Params: { name: string } }>('/v1/vms/:name', async (req) => agent.summary(req.params.name));
  app.post<{ Params: { name: string } }>('/v1/vms/:name/pause', async (req) => agent.pauseVm(req.params.name));
  app.post<{ Params: { name: string } }>('/v1/vms/:name/resume', async (req) => agent.resumeVm(req.params.name));
  app.post<{ Params: { name: string } }>('/v1/vms/:name/snapshot', async (req) => {
    const body = snapshotBody.parse(req.body);
    return agent.snapshotVm(req.params.name, body.out, body);
  });
  app.delete<{ Params: { name: string } }>('/v1/vms/:name', async (req, reply) => {
    await agent.stopVm(req.params.name);
    return reply.status(204).send();
  });

  app.post('/v1/migrations', async (req, reply) => {
    const body = migrationBody.parse(req.body);
    const job = await agent.startMigration(body);
    return reply.status(202).send({ id: job.id });
  });
  app.get('/v1/migrations', async () => agent.migrations());
  app.get<{ Params: { id: string } }>('/v1/migrations/:id', async (req) => agent.migration(req.params.id).json());
  app.delete<{ Params: { id: string } }>('/v1/migrations/:id', async (req, reply) => reply.status(202).send(agent.cancelMigration(req.params.id).json()));
  // Server-Sent Events: `progress` events, then one `done` event with the final status and report.
  app.get<{ Params: { id: string } }>('/v1/migrations/:id/events', async (req, reply) => {
    const job = agent.migration(req.params.id);
    reply.hijack();
    const res = reply.raw;
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive' });
    const send = (event: string, data: unknown) => res.write(`event: ${event}\ndata: ${JSON.stringify(data, (_k, v: unknown) => (typeof v === 'number' && !Number.isFinite(v) ? null : v))}\n\n`);
    if (job.status !== 'running') {
      send('done', job.json());
      res.end();
      return;
    }
    const untrack = agent.trackStream(res);
    if (job.progress) send('progress', job.progress);
    const unsubscribe = job.subscribe((e) => {
      if (e.type === 'progress') send('progress', e.progress);
      else {
        send('done', e.job);
        res.end();
      }
    });
    res.on('close', () => {
      unsubscribe();
      untrack();
    });
  });
  return app;
}
