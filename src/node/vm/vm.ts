/**
 * A running ferry VM, seen from the host thread: guest RAM (a shared WebAssembly.Memory the host
 * reads while the guest runs), a vCPU worker that runs quanta, the dirty log, pause/resume/throttle,
 * and state export/import.
 */
import { EventEmitter } from 'node:events';
import { createHash } from 'node:crypto';
import { MessageChannel, Worker } from 'node:worker_threads';
import { DIRTY_MAP_OFFSET, MAX_GUEST_BYTES, PRESENCE_MAP_OFFSET, RESERVED_BYTES, RESERVED_PAGES, RESERVED_WASM_PAGES } from '../../core/abi.js';
import { Bitmap } from '../../core/bitmap.js';
import { FerryError, GuestModuleError, GuestTrapError, InvalidArgumentError, VmStateError } from '../../core/errors.js';
import { formatBytes } from '../../core/units.js';
import { PAGE_SIZE, WASM_PAGE_SIZE, pageBytes } from '../../core/pages.js';
import type { NetRecordData } from '../../core/net-ring.js';
import { Histogram } from '../../core/metrics.js';
import { Cmd, Ctl, Stat, VARIANTS, VmRunState, faultWaitsOf, stateName, variantId, type VariantName } from './control.js';
import type { GuestModuleInfo, InstrumentCache } from './instrument.js';
import type { DevicesInit } from './devices/index.js';
import { parseDeviceState } from './devices/state-schema.js';
import type { FromWorker, ToWorker, VcpuWorkerData } from './vcpu-worker.js';
import type { GlobalDesc } from './globals.js';
import { copyBytes, prefaultFreshMemory } from './memory-access.js';
import type { GuestMemoryPool } from './memory-pool.js';
import type { VcpuThreadPool } from './vcpu-threads.js';
import type { FaultChannelUse } from './fault-channel.js';

export interface VmInit {
  name: string;
  /** The guest module as the user gave it (uninstrumented). */
  module: Uint8Array;
  /** Guest RAM ceiling in bytes (the guest may grow its memory up to this). */
  memoryBytes: number;
  /** Configuration string handed to the guest (`config_read`). */
  config?: string;
  block?: { path: string; sizeBytes: number };
  cache: InstrumentCache;
  /** Target duration of one quantum (adaptive budget). Default 1 ms. */
  quantumMs?: number;
  /** A fixed budget per quantum instead of the adaptive one (deterministic runs). */
  fixedBudget?: number;
  /** How long an IDLE guest sleeps at most before run() is called again. Default 1 ms. */
  idleWaitMs?: number;
  /** Variants to prepare. Default plain + dirty; a post-copy destination adds presence. */
  variants?: VariantName[];
  /**
   * The host's pool of ready guest memories: the VM takes its memory from it when one of its shape
   * is there (zeroed and already backed: no page faults on first write), and dispose() gives it back.
   */
  pool?: GuestMemoryPool;
  /** The host's spare vCPU threads: the VM's thread is taken from there when one stands by. */
  threads?: VcpuThreadPool;
  /**
   * The nice value the vCPU thread takes while it runs with pages missing (the presence variant:
   * a post-copy destination), back to its own once every page is there. Each fault blocks the
   * vCPU, and how soon it runs on once the page is in is part of the fault's latency (see
   * POSTCOPY_VCPU_NICE for what it bought here). Lowering a nice value needs CAP_SYS_NICE;
   * without it the thread keeps its own. Default: unchanged.
   */
  faultNice?: number;
}


/**
 * InvalidArgumentError unless `bytes` is a memory size a VM can have: a positive multiple of 64 KiB
 * (a Wasm page), at most MAX_GUEST_BYTES (4 GiB, Wasm's 32-bit limit, less ferry's reserved 2 MiB).
 */
export function checkMemorySize(bytes: number): void {
  if (!Number.isInteger(bytes) || bytes <= 0 || bytes % WASM_PAGE_SIZE !== 0) {
    throw new InvalidArgumentError(`memory size ${bytes} bytes must be a positive multiple of 64 KiB`);
  }
  if (bytes > MAX_GUEST_BYTES) {
    throw new InvalidArgumentError(`memory size ${formatBytes(bytes)} is more than a VM can have: at most ${MAX_GUEST_BYTES / 2 ** 20} MiB (WebAssembly's 4 GiB less ferry's 2 MiB)`);
  }
}
/** Everything about a VM that is not in guest memory. JSON-serializable. */
export interface VmState {
  version: 1;
  name: string;
  moduleHash: string;
  /** Guest RAM ceiling. */
  memoryBytes: number;
  /** Guest memory size at the moment of export. */
  guestBytes: number;
  config: string;
  globals: string[];
  devices: unknown;
}

export interface BootOptions {
  /** Stay paused after booting (state imported / init run) until resume(). */
  paused?: boolean;
  /** Run exactly this many quanta, then pause (deterministic experiments). */
  pauseAfterQuanta?: number;
  /** Variant to start in. Default plain. */
  variant?: VariantName;
}

export interface VmStats {
  state: string;
  quanta: number;
  runMs: number;
  progress: number;
  budget: number;
  /** Post-copy faults the vCPU waited out, and how long in all (see faultWaits()). */
  faults: number;
  faultWaitMs: number;
  /** The nice value the vCPU thread runs at (see VmInit.faultNice). */
  vcpuNice: number;
}

type Pending = { resolve: (v: unknown) => void; reject: (e: unknown) => void };

export class Vm extends EventEmitter {
  readonly name: string;
  private mem: WebAssembly.Memory | null;
  /** The memory came from the host's pool: zero, and every page already backed. */
  readonly memoryBacked: boolean;
  /** The memory's maximum in Wasm pages (reserved region included): its shape in the pool. */
  private readonly maxWasmPages: number;
  readonly info: GuestModuleInfo;
  readonly memoryBytes: number;
  readonly maxPages: number;
  readonly config: string;
  private readonly init: VmInit;
  private readonly modules: Partial<Record<VariantName, WebAssembly.Module>> = {};
  private readonly ctl = new Int32Array(new SharedArrayBuffer(Ctl.WORDS * 4));
  private readonly stats = new Float64Array(new SharedArrayBuffer(Stat.WORDS * 8));
  private worker: Worker | null = null;
  private port: MessageChannel['port1'] | null = null;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private exited: Promise<void> | null = null;
  private trapError: GuestTrapError | null = null;
  private haltCode: number | null = null;
  /** stop() was called (a VM stopped before it ever ran is 'stopped', not 'created'). */
  private discarded = false;
  private booted = false;
  private readyP: Promise<void> = Promise.resolve();
  private standby: () => void = () => undefined;
  private standbyP: Promise<void> | null = null;
  private ready: () => void = () => undefined;
  private failed: (e: unknown) => void = () => undefined;

  private constructor(init: VmInit, info: GuestModuleInfo, initialGuestBytes: number) {
    super();
    this.init = init;
    this.name = init.name;
    this.info = info;
    this.memoryBytes = init.memoryBytes;
    this.maxPages = init.memoryBytes / PAGE_SIZE;
    this.config = init.config ?? '';
    this.maxWasmPages = RESERVED_WASM_PAGES + init.memoryBytes / WASM_PAGE_SIZE;
    const shape = { initial: RESERVED_WASM_PAGES + initialGuestBytes / WASM_PAGE_SIZE, maximum: this.maxWasmPages };
    const pooled = init.pool?.take(shape) ?? null;
    this.memoryBacked = pooled !== null;
    this.mem = pooled ?? new WebAssembly.Memory({ ...shape, shared: true });
  }

  /** Guest RAM (reserved region first). A VM that was disposed of has none: VmStateError. */
  get memory(): WebAssembly.Memory {
    if (!this.mem) throw new VmStateError(`VM ${this.name} was disposed of: its memory is gone`);
    return this.mem;
  }

  /**
   * Loads and instruments the guest and allocates its memory, without running anything yet.
   * `guestBytes` sizes the memory (default: what the module declares); a restore or migration
   * destination passes the source's current size.
   */
  static create(init: VmInit, guestBytes?: number): Vm {
    if (!/^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$/.test(init.name)) {
      throw new InvalidArgumentError(`VM name '${init.name}' must be 1–64 letters, digits, '.', '_' or '-'`);
    }
    checkMemorySize(init.memoryBytes);
    const variants = init.variants ?? ['plain', 'dirty'];
    const compiled = variants.map((v) => init.cache.get(init.module, v));
    const info = compiled[0].info;
    if (info.globals.some((g) => g.type === 'v128')) {
      throw new GuestModuleError('ERR_MODULE_V128_GLOBAL', 'the guest has a mutable v128 global, which JavaScript cannot save or restore');
    }
    if (info.initialGuestBytes > init.memoryBytes) {
      throw new InvalidArgumentError(`the guest declares ${info.initialGuestBytes} bytes of initial memory, more than the VM's ${init.memoryBytes}`);
    }
    if (info.maxGuestBytes !== null && info.maxGuestBytes < init.memoryBytes) {
      // The guest asked for less than the VM offers: honour the guest's own ceiling.
      init = { ...init, memoryBytes: Math.max(info.maxGuestBytes, info.initialGuestBytes) };
    }
    const size = guestBytes ?? info.initialGuestBytes;
    if (size % WASM_PAGE_SIZE !== 0 || size > init.memoryBytes || size < info.initialGuestBytes) {
      throw new InvalidArgumentError(`guest memory size ${size} does not fit the VM (${info.initialGuestBytes}–${init.memoryBytes} bytes, a multiple of 64 KiB)`);
    }
    const vm = new Vm(init, info, size);
    variants.forEach((v, i) => (vm.modules[v] = compiled[i].module));
    return vm;
  }

  // ---------------------------------------------------------------- lifecycle

  /** Cold boot: data segments, start function, init(); then run. */
  async bootCold(opts: BootOptions = {}): Promise<void> {
    await this.spawn({ kind: 'cold' }, opts);
  }

  /** Continue a VM from exported state; guest memory must already hold its pages. */
  async bootFromState(state: VmState, opts: BootOptions = {}): Promise<void> {
    if (state.moduleHash !== this.info.hash) {
      throw new FerryError('ERR_STATE_MODULE', `state is for module ${state.moduleHash.slice(0, 12)}…, this VM runs ${this.info.hash.slice(0, 12)}…`);
    }
    // Validated here, on the host thread, so the vCPU thread need not load the schema library.
    const devices = parseDeviceState(state.devices);
    this.growTo(state.guestBytes);
    await this.spawn({ kind: 'state', globals: state.globals as never, devices }, opts);
  }

  /**
   * Starts the vCPU thread ahead of booting (it waits for its boot message). A migration
   * destination calls this when the VM arrives, so thread start-up is not part of the downtime.
   * Resolves once the thread has loaded and waits for its boot message.
   */
  prewarm(): Promise<void> {
    if (this.worker || this.discarded) return this.standbyP ?? Promise.resolve();
    this.standbyP = new Promise<void>((res) => (this.standby = res));
    const { port1, port2 } = new MessageChannel();
    this.port = port1;
    const devices: DevicesInit = { config: this.config, ...(this.init.block ? { block: this.init.block } : {}) };
    const data: Omit<VcpuWorkerData, 'boot'> = {
      name: this.name,
      memory: this.memory,
      control: this.ctl.buffer as SharedArrayBuffer,
      stats: this.stats.buffer as SharedArrayBuffer,
      port: port2,
      modules: this.modules,
      globals: this.info.globals as GlobalDesc[],
      initExport: this.info.initExport,
      hasProgress: this.info.hasProgress,
      devices,
      quantumMs: this.init.quantumMs ?? 1,
      idleWaitMs: this.init.idleWaitMs ?? 1,
      faultNice: this.init.faultNice ?? null,
    };
    const spare = this.init.threads?.take() ?? null;
    let worker: Worker;
    if (spare) {
      worker = spare.worker;
      spare.adopt(data, [port2]);
    } else worker = new Worker(new URL('./vcpu-worker.js', import.meta.url), { workerData: data, transferList: [port2] });
    this.worker = worker;
    this.readyP = new Promise<void>((res, rej) => ((this.ready = res), (this.failed = rej)));
    this.readyP.catch(() => undefined);
    worker.on('message', (m: FromWorker) => this.onMessage(m, this.ready, this.failed));
    worker.on('error', (e) => {
      const err = new FerryError('ERR_VCPU_CRASH', `vCPU thread of ${this.name} failed: ${e.message}`, { cause: e });
      this.failed(err);
      this.emit('error', err);
    });
    this.exited = new Promise((res) => worker.once('exit', () => {
      for (const p of this.pending.values()) p.reject(new VmStateError(`VM ${this.name} has stopped`));
      this.pending.clear();
      this.failed(new VmStateError(`VM ${this.name} exited during boot`));
      this.standby();
      res();
    }));
    return this.standbyP;
  }

  private async spawn(boot: VcpuWorkerData['boot'], opts: BootOptions): Promise<void> {
    if (this.booted || this.discarded) throw new VmStateError(`VM ${this.name} has already been started or stopped`);
    const variant = opts.variant ?? 'plain';
    if (!this.modules[variant]) throw new VmStateError(`variant ${variant} was not prepared for VM ${this.name}`);
    this.booted = true;
    Atomics.store(this.ctl, Ctl.VARIANT_REQ, variantId(variant));
    Atomics.store(this.ctl, Ctl.CMD, opts.paused ? Cmd.PAUSE : Cmd.RUN);
    Atomics.store(this.ctl, Ctl.QUANTA_LEFT, opts.pauseAfterQuanta ?? 0);
    Atomics.store(this.ctl, Ctl.FIXED_BUDGET, this.init.fixedBudget ?? 0);
    void this.prewarm();
    this.port!.postMessage({ t: 'boot', boot } satisfies ToWorker);
    this.ring();
    await this.readyP;
    // Paused (or already resumed by a resume() that did not wait for this).
    if (opts.paused) await this.waitState((s) => s !== VmRunState.BOOTING);
  }

  private onMessage(m: FromWorker, ready: () => void, failed: (e: unknown) => void): void {
    switch (m.t) {
      case 'standby': this.standby(); break;
      case 'ready': ready(); break;
      case 'console': this.emit('console', m.line); break;
      case 'net': this.emit('net', m.records); break;
      case 'credit': this.emit('net-credit', m.bytes); break;
      case 'trap':
        this.trapError = new GuestTrapError(`VM ${this.name} stopped: the guest trapped: ${m.message}`);
        failed(this.trapError);
        this.emit('trap', this.trapError);
        break;
      case 'halt':
        this.haltCode = m.code;
        ready();
        this.emit('halt', m.code);
        break;
      case 'stopped': break;
      case 'reply': {
        const p = this.pending.get(m.id);
        if (!p) break;
        this.pending.delete(m.id);
        if (m.ok) p.resolve(m.value);
        else p.reject(Object.assign(new FerryError(m.error.code ?? 'ERR_VCPU', m.error.message), { name: m.error.name }));
        break;
      }
    }
  }

  private ring(): void {
    Atomics.add(this.ctl, Ctl.DOORBELL, 1);
    Atomics.notify(this.ctl, Ctl.DOORBELL);
  }

  private send(msg: ToWorker): void {
    if (!this.port) throw new VmStateError(`VM ${this.name} is not running`);
    this.port.postMessage(msg);
    this.ring();
  }

  private request<T>(msg: ToWorker & { id: number }): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.pending.set(msg.id, { resolve: resolve as (v: unknown) => void, reject });
      this.send(msg);
    });
  }

  private async waitState(pred: (s: number) => boolean): Promise<number> {
    for (;;) {
      const s = Atomics.load(this.ctl, Ctl.STATE);
      if (pred(s)) return s;
      const r = Atomics.waitAsync(this.ctl, Ctl.STATE, s, 1000);
      if (r.async) await r.value;
      if (!this.worker) throw new VmStateError(`VM ${this.name} is not running`);
    }
  }

  get state(): string {
    if (this.trapError) return 'trapped';
    if (!this.booted) return this.discarded ? 'stopped' : 'created';
    return stateName(Atomics.load(this.ctl, Ctl.STATE));
  }

  get trap(): GuestTrapError | null { return this.trapError; }
  /** The guest module as given (uninstrumented). */
  get module(): Uint8Array { return this.init.module; }
  get exitCode(): number | null { return this.haltCode; }

  /**
   * pause(), with the CPU and device state and the soft pages exported by the vCPU thread as it
   * stops — where exportState() and softPages() after pause() are each a round trip to a thread
   * that has gone to sleep (3-9 ms measured inside a migration's downtime while both cores moved
   * pages). `state` rejects if the VM traps or halts instead.
   */
  pauseWithState(): { paused: Promise<number>; state: Promise<VmState>; soft: Promise<Bitmap> } {
    this.requireWorker();
    const v = this.request<{ globals: string[]; devices: unknown; soft: Uint32Array }>({ t: 'export-at-pause', id: this.nextId++ });
    // Resolves with how long (ms) the guest had been stopped before it said PAUSED: it exported the state first.
    const paused = this.pause().then(() => this.stats[Stat.STOPPED_BEFORE_PAUSED_NS] / 1e6);
    const state = v.then((x) => this.stateOf(x));
    const soft = v.then((x) => this.softOf(x.soft));
    for (const p of [state, soft]) p.catch(() => undefined);
    return { paused, state, soft };
  }

  /** Resolves once the guest is stopped between quanta. */
  async pause(): Promise<void> {
    this.requireWorker();
    Atomics.store(this.ctl, Ctl.CMD, Cmd.PAUSE);
    this.ring();
    const s = await this.waitState((x) => x !== VmRunState.RUNNING && x !== VmRunState.BOOTING);
    if (s !== VmRunState.PAUSED) throw this.terminalError('pause');
  }

  /** `variant`: run this instrumentation variant from the first quantum on (as switchVariant, without waiting). */
  resume(opts: { pauseAfterQuanta?: number; variant?: VariantName } = {}): void {
    this.requireWorker();
    const s = Atomics.load(this.ctl, Ctl.STATE);
    if (s === VmRunState.TRAPPED || s === VmRunState.HALTED || s === VmRunState.STOPPED) throw this.terminalError('resume');
    if (opts.variant !== undefined) {
      if (!this.modules[opts.variant]) throw new VmStateError(`variant ${opts.variant} was not prepared for VM ${this.name}`);
      Atomics.store(this.ctl, Ctl.VARIANT_REQ, variantId(opts.variant));
    }
    Atomics.store(this.ctl, Ctl.QUANTA_LEFT, opts.pauseAfterQuanta ?? 0);
    Atomics.store(this.ctl, Ctl.CMD, Cmd.RUN);
    this.ring();
  }

  /** Waits until the vCPU has left the paused state (after resume()). */
  async whenRunning(): Promise<void> {
    await this.waitState((x) => x !== VmRunState.PAUSED && x !== VmRunState.BOOTING);
  }

  /** Waits until the VM pauses by itself (after `pauseAfterQuanta`) or stops. */
  async whenPaused(): Promise<void> {
    const s = await this.waitState((x) => x === VmRunState.PAUSED || x >= VmRunState.STOPPED);
    if (s !== VmRunState.PAUSED) throw this.terminalError('wait for pause');
  }

  /** Make the vCPU sleep `fraction` (0–0.99) of each period: auto-converge's lever. */
  throttle(fraction: number): void {
    if (!(fraction >= 0 && fraction <= 0.99)) throw new InvalidArgumentError(`throttle ${fraction} must be between 0 and 0.99`);
    Atomics.store(this.ctl, Ctl.THROTTLE, Math.round(fraction * 1000));
    this.ring();
  }

  get throttleFraction(): number { return Atomics.load(this.ctl, Ctl.THROTTLE) / 1000; }

  /** Stops the vCPU and releases the worker (guest memory stays readable until the Vm is dropped). */
  async stop(): Promise<void> {
    this.discarded = true;
    const w = this.worker;
    if (!w) return;
    Atomics.store(this.ctl, Ctl.CMD, Cmd.STOP);
    this.ring();
    const timeout = new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), 5000).unref());
    if ((await Promise.race([this.exitedOrStopped(), timeout])) === 'timeout') await w.terminate();
    await w.terminate();
    await this.exited;
    this.port?.close();
  }

  /**
   * Stops the VM for good and gives its memory back to the host's pool (VmInit.pool), to be zeroed
   * and used by a later VM. Only for a VM nothing will read again: its memory is gone after this.
   */
  async dispose(): Promise<void> {
    await this.stop();
    const mem = this.mem;
    if (!mem) return;
    this.mem = null;
    this.bytes = new Uint8Array(0);
    this.init.pool?.give(mem, this.maxWasmPages);
  }

  private async exitedOrStopped(): Promise<void> {
    await this.waitState((x) => x >= VmRunState.STOPPED).catch(() => undefined);
  }

  private requireWorker(): void {
    if (!this.booted) throw new VmStateError(`VM ${this.name} has not been started`);
  }

  private terminalError(what: string): FerryError {
    if (this.trapError) return this.trapError;
    return new VmStateError(`cannot ${what} VM ${this.name}: it is ${this.state}`);
  }

  // ---------------------------------------------------------------- memory

  /** Current guest memory size in bytes. */
  get guestBytes(): number { return this.memory.buffer.byteLength - RESERVED_BYTES; }
  get guestPages(): number { return this.guestBytes / PAGE_SIZE; }

  /** Grows guest memory to at least `bytes` (a restore or migration destination matching its source). */
  growTo(bytes: number): void {
    if (bytes > this.memoryBytes) throw new InvalidArgumentError(`guest memory of ${bytes} bytes exceeds this VM's ${this.memoryBytes}`);
    const have = this.guestBytes;
    if (bytes > have) this.memory.grow(Math.ceil((bytes - have) / WASM_PAGE_SIZE));
  }

  /** A live view of guest page `page` (reads race with a running guest; see dirty log). */
  pageView(page: number): Uint8Array {
    return new Uint8Array(this.memory.buffer, RESERVED_BYTES + page * PAGE_SIZE, PAGE_SIZE);
  }

  /** Guest pages `first` … `first + count − 1` in place (a racing view while the guest runs, as pageView). */
  pagesView(first: number, count: number): Uint8Array {
    if (!Number.isSafeInteger(first) || !Number.isSafeInteger(count) || first < 0 || count < 1 || first + count > this.guestPages) {
      throw new RangeError(`pages ${first}+${count} are not all in the guest's ${this.guestPages}`);
    }
    return new Uint8Array(this.memory.buffer, RESERVED_BYTES + first * PAGE_SIZE, count * PAGE_SIZE);
  }

  /** All of memory (reserved region included), refreshed when the memory has grown past it. */
  private bytes = new Uint8Array(0);
  /** Scratch for copyBytes (page copies at any alignment). */
  private readonly bounce = new Uint8Array(PAGE_SIZE + 16);

  /** Physical offset of guest page `page`; RangeError outside guest memory. */
  private pageAt(page: number): number {
    const at = RESERVED_BYTES + page * PAGE_SIZE;
    if (!(at + PAGE_SIZE <= this.bytes.length && page >= 0)) {
      this.bytes = new Uint8Array(this.memory.buffer); // the guest may have grown its memory
      if (!Number.isInteger(page) || page < 0 || at + PAGE_SIZE > this.bytes.length) throw new RangeError(`guest page ${page} is outside the guest's ${this.guestPages} pages`);
    }
    return at;
  }

  /**
   * Copies guest page `page` into `into` at `offset`: the racing read pageView gives, without a
   * view per page and at memory speed at any alignment of `into` (see copyBytes).
   */
  readPageInto(page: number, into: Uint8Array, offset = 0): void {
    const at = this.pageAt(page);
    copyBytes(into, offset, this.bytes.subarray(at, at + PAGE_SIZE), this.bounce);
  }

  /** Copies a page (`data` from `offset`) into guest page `page`, at any alignment of `data` (see copyBytes). */
  writePageFrom(page: number, data: Uint8Array, offset = 0): void {
    const at = this.pageAt(page);
    if (offset < 0 || data.length - offset < PAGE_SIZE) throw new RangeError(`a page needs ${PAGE_SIZE} bytes from offset ${offset}, ${data.length - offset} are there`);
    copyBytes(this.bytes, at, pageBytes(data, offset), this.bounce);
  }

  /**
   * Faults in every guest page now (see prefaultFreshMemory), a slice at a time between event-loop
   * turns. Only for a VM whose memory nobody has written yet: a migration destination before the
   * first page arrives. Resolves with the pages touched.
   */
  prefaultFresh(signal?: AbortSignal): Promise<number> {
    if (this.memoryBacked) return Promise.resolve(0);
    return prefaultFreshMemory(this.memory, RESERVED_BYTES, RESERVED_BYTES + this.guestBytes, {
      yieldFn: () => new Promise<void>((r) => setImmediate(r)),
      signal,
    });
  }

  /** A live view of guest memory. */
  guestView(addr = 0, len = this.guestBytes - addr): Uint8Array {
    return new Uint8Array(this.memory.buffer, RESERVED_BYTES + addr, len);
  }

  /** SHA-256 of guest memory. Only meaningful while the VM is paused or stopped. */
  digest(): string {
    const h = createHash('sha256');
    const all = this.guestView();
    for (let off = 0; off < all.length; off += 1 << 22) h.update(all.subarray(off, Math.min(all.length, off + (1 << 22))));
    return h.digest('hex');
  }

  // ---------------------------------------------------------------- post-copy presence

  /** Presence-map byte view over guest pages (for a post-copy destination). */
  presenceView(): Uint8Array {
    return new Uint8Array(this.memory.buffer, PRESENCE_MAP_OFFSET + RESERVED_PAGES, this.maxPages);
  }

  // ---------------------------------------------------------------- dirty log

  /**
   * Starts dirty logging: clears the dirty map and switches the vCPU to the dirty variant.
   * Resolves once the switch has happened; only writes after that are guaranteed logged.
   */
  async startDirtyLog(): Promise<void> {
    this.requireWorker();
    new Uint8Array(this.memory.buffer, DIRTY_MAP_OFFSET, RESERVED_PAGES + this.maxPages).fill(0);
    await this.switchVariant('dirty');
  }

  async stopDirtyLog(): Promise<void> {
    await this.switchVariant('plain');
  }

  /** Switches the vCPU between prepared variants (between quanta). */
  async switchVariant(v: VariantName): Promise<void> {
    if (!this.modules[v]) throw new VmStateError(`variant ${v} was not prepared for VM ${this.name}`);
    const id = variantId(v);
    Atomics.store(this.ctl, Ctl.VARIANT_REQ, id);
    this.ring();
    for (;;) {
      const cur = Atomics.load(this.ctl, Ctl.VARIANT_CUR);
      if (cur === id) return;
      const s = Atomics.load(this.ctl, Ctl.STATE);
      if (s >= VmRunState.STOPPED) throw this.terminalError(`switch variant of`);
      const r = Atomics.waitAsync(this.ctl, Ctl.VARIANT_CUR, cur, 50);
      if (r.async) await r.value;
    }
  }

  get dirtyLogging(): boolean { return Atomics.load(this.ctl, Ctl.VARIANT_CUR) === variantId('dirty'); }
  /** The instrumentation variant the vCPU runs now (or was last readied with). */
  get variant(): VariantName { return VARIANTS[Atomics.load(this.ctl, Ctl.VARIANT_CUR)] ?? 'plain'; }

  /**
   * Pages written since the last harvest, counted without clearing them (a byte per page in the
   * dirty map, read a word at a time). For the dirty curve a migration samples during its first
   * pass (Akoush et al.'s HIST): cheap enough to call every few ms, ~0.3 ms per GiB of guest memory.
   */
  /** The dirty map's guest part as words: a byte per page, four pages a word. */
  private dirtyWords(): Int32Array {
    return new Int32Array(this.memory.buffer, DIRTY_MAP_OFFSET + RESERVED_PAGES, Math.ceil(this.guestPages / 4));
  }

  dirtyCount(): number {
    const words = this.dirtyWords();
    let n = 0;
    for (let w = 0; w < words.length; w++) {
      const v = words[w];
      if (v === 0) continue;
      n += (v & 0xff ? 1 : 0) + (v & 0xff00 ? 1 : 0) + (v & 0xff0000 ? 1 : 0) + (v & 0xff000000 ? 1 : 0);
    }
    return n;
  }

  /**
   * Get-and-clear of the dirty log: returns the guest pages written since the last harvest.
   *
   * Why this is safe without atomic marks: each dirty-map word is read-and-zeroed with
   * Atomics.exchange, so a mark is either seen here or survives for the next round. A store whose
   * mark we saw may still be in flight in the vCPU's current quantum; the promise therefore
   * resolves only after the vCPU has crossed a quantum boundary (an atomic epoch bump, which
   * orders every store of that quantum before it), so copying the returned pages afterwards reads
   * their latest data. Later writes set their marks again and show up in the next harvest.
   */
  async harvestDirty(into?: Bitmap): Promise<Bitmap> {
    const out = into ?? new Bitmap(this.maxPages);
    const words = this.dirtyWords();
    for (let w = 0; w < words.length; w++) {
      if (words[w] === 0) continue;
      const v = Atomics.exchange(words, w, 0);
      if (v & 0xff) out.set(w * 4);
      if (v & 0xff00) out.set(w * 4 + 1);
      if (v & 0xff0000) out.set(w * 4 + 2);
      if (v & 0xff000000) out.set(w * 4 + 3);
    }
    await this.quantumBoundary();
    return out;
  }

  /** Resolves once the vCPU is between quanta at least once after this call (or not running). */
  async quantumBoundary(): Promise<void> {
    const e0 = Atomics.load(this.ctl, Ctl.EPOCH);
    for (;;) {
      const s = Atomics.load(this.ctl, Ctl.STATE);
      if (s !== VmRunState.RUNNING && s !== VmRunState.BOOTING) return;
      if (Atomics.load(this.ctl, Ctl.EPOCH) !== e0) return;
      const r = Atomics.waitAsync(this.ctl, Ctl.EPOCH, e0, 50);
      if (r.async) await r.value;
    }
  }

  // ---------------------------------------------------------------- state

  /** CPU and device state; the VM must be paused (or halted). */
  async exportState(): Promise<VmState> {
    const s = Atomics.load(this.ctl, Ctl.STATE);
    if (s !== VmRunState.PAUSED && s !== VmRunState.HALTED) throw new VmStateError(`export needs VM ${this.name} paused; it is ${this.state}`);
    return this.stateOf(await this.request<{ globals: string[]; devices: unknown }>({ t: 'export', id: this.nextId++ }));
  }

  /** Guest pages the guest reported free (soft pages). */
  async softPages(): Promise<Bitmap> {
    return this.softOf(await this.request<Uint32Array>({ t: 'soft-pages', id: this.nextId++ }));
  }

  /** The VM's state from what its vCPU thread exported (the VM paused meanwhile). */
  private stateOf(v: { globals: string[]; devices: unknown }): VmState {
    return { version: 1, name: this.name, moduleHash: this.info.hash, memoryBytes: this.memoryBytes, guestBytes: this.guestBytes, config: this.config, globals: v.globals, devices: v.devices };
  }

  /** The soft-page bitmap from the words the vCPU thread sent. */
  private softOf(words: Uint32Array): Bitmap {
    const bm = new Bitmap(this.maxPages);
    bm.words.set(words.subarray(0, bm.words.length));
    return bm;
  }

  async blockWriteBitmap(clear = false): Promise<Bitmap | null> {
    const v = await this.request<{ size: number; words: Uint32Array } | null>({ t: 'block-bitmap', id: this.nextId++, clear });
    return v ? new Bitmap(v.size, v.words) : null;
  }

  /** Hands records from the network endpoint to the guest. */
  deliverNet(records: NetRecordData[]): void {
    if (records.length) this.send({ t: 'net', records });
  }

  // ---------------------------------------------------------------- post-copy fault channel

  /** Control words for the post-copy fault service (a destination's fault thread uses them). */
  get controlBuffer(): SharedArrayBuffer { return this.ctl.buffer as SharedArrayBuffer; }

  // ---------------------------------------------------------------- stats

  stat(): VmStats {
    return {
      state: this.state,
      quanta: this.stats[Stat.QUANTA],
      runMs: this.stats[Stat.RUN_NS] / 1e6,
      progress: this.stats[Stat.PROGRESS],
      budget: this.stats[Stat.BUDGET],
      // The fault-wait histogram's count and sum (Histogram.recordShared).
      faults: this.stats[Stat.FAULT_WAITS],
      faultWaitMs: this.stats[Stat.FAULT_WAITS + 1],
      vcpuNice: this.stats[Stat.VCPU_NICE],
    };
  }

  /**
   * Post-copy: the vCPU fetches its missing pages itself on the fault channel `use.block` shares
   * (see fault-channel.ts). Before resume(): the thread takes it before it runs again.
   */
  useFaultChannel(use: FaultChannelUse): void {
    this.send({ t: 'fault-channel', ...use });
  }

  /** Each post-copy fault's wait as the vCPU saw it, ms (a copy). */
  faultWaits(): Histogram {
    return Histogram.fromShared(faultWaitsOf(this.stats));
  }
}
