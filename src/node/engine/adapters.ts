/**
 * The engine's views of a real ferry VM (src/core/engine/types.ts), and the host services it needs.
 */
import { createHash } from 'node:crypto';
import { RESERVED_BYTES, RESERVED_PAGES } from '../../core/abi.js';
import { Bitmap } from '../../core/bitmap.js';
import { VmStateError } from '../../core/errors.js';
import { zeroScanner, type ZeroScanner } from '../../core/codec/zero.js';
import { nodeBlobCodecs } from '../codec/blob.js';
import type { DestinationFactory, DestinationFaultLink, DestinationVm, EngineDeps, FaultThreadEvents, SourceVm, VmWireState } from '../../core/engine/types.js';
import { NodeDestinationFaultLink } from './fault-thread.js';
import { PAGE_SIZE, WASM_PAGE_SIZE, pageBytes } from '../../core/pages.js';
import type { WireGlobal } from '../../core/protocol/frames.js';
import type { Histogram } from '../../core/metrics.js';
import { realClock } from '../clock.js';
import { Ctl } from '../vm/control.js';
import { warmDeviceStateValidation } from '../vm/devices/state-schema.js';
import type { GlobalDesc } from '../vm/globals.js';
import { hashPage, pageHashBackend } from '../vm/page-hash.js';
import { FaultChannelBlock } from '../vm/fault-channel.js';
import { PageHasher, type PageHashQueue } from '../vm/page-hasher.js';
import { Vm, type VmState } from '../vm/vm.js';
import type { InstrumentCache } from '../vm/instrument.js';


export function nodeEngineDeps(): EngineDeps {
  pageHashBackend(); // the hashing library loads with the engine, not inside its first migration
  return {
    clock: realClock(),
    sha256Hex: (b) => createHash('sha256').update(b).digest('hex'),
    hashPage: (b, off) => hashPage(pageBytes(b, off)),
    blobCodecs: nodeBlobCodecs(),
    yieldToIo: () => new Promise<void>((r) => setImmediate(r)),
  };
}

// ---------------------------------------------------------------- CPU state conversion
// The runtime keeps globals as exact strings (globals.ts); the wire carries typed values.

function toWire(descs: readonly GlobalDesc[], encoded: string[]): WireGlobal[] {
  return descs.map((d, i) => {
    const s = encoded[i];
    switch (d.type) {
      case 'i32': return { type: 'i32', value: Number(s) };
      case 'i64': return { type: 'i64', value: BigInt(s) };
      case 'f32': return { type: 'f32', bits: parseInt(s, 16) };
      case 'f64': return { type: 'f64', bits: BigInt('0x' + s) };
      default: throw new TypeError(`global type ${d.type} cannot migrate`);
    }
  });
}

function fromWire(globals: WireGlobal[]): string[] {
  return globals.map((g) => {
    switch (g.type) {
      case 'i32': return String(g.value | 0);
      case 'i64': return String(BigInt.asIntN(64, g.value));
      case 'f32': return (g.bits >>> 0).toString(16);
      case 'f64': return BigInt.asUintN(64, g.bits).toString(16);
    }
  });
}

export interface SourceHooks {
  /** The VM is about to pause for the switchover (hold client input). */
  onPause?(): void;
  /** The migration failed and the VM runs here again. */
  onResume?(): void;
  /** The destination owns the VM; it is about to be stopped here. */
  onRelease?(): void;
}

let hasher: PageHasher | null = null;
/** This process's page-hashing threads (the digest of a paused source VM), started on first use. */
function pageHasher(): PageHasher {
  return (hasher ??= new PageHasher());
}

/**
 * Starts this process's page-hashing threads now (a host that takes migrations, when it starts).
 * Started on first use instead, they loaded (a few tens of ms of CPU each) while the first
 * arriving VM was readied, and in post-copy, which pauses the source as soon as that VM is
 * ready, inside its downtime.
 */
export function startPageHashers(): void {
  pageHasher().warm();
}

/** The engine's view of a VM that is leaving this host; `guest`: what it runs, by name (SourceVm.guest). */
export function sourceVmOf(vm: Vm, hooks: SourceHooks = {}, guest?: string): SourceVm {
  let zero: ZeroScanner | null = null;
  let atPause: ReturnType<Vm['pauseWithState']> | null = null;
  startPageHashers(); // their threads load while the rounds run

  return {
    name: vm.name,
    memoryBytes: vm.memoryBytes,
    config: vm.config,
    module: vm.module,
    moduleSha256: vm.info.hash,
    ...(guest ? { guest } : {}),
    guestPages: () => vm.guestPages,
    readPage: (p, into, off) => vm.readPageInto(p, into, off),
    // The binding reads shared memory in place: no copy for the digest.
    hashPage: (p) => hashPage(vm.pageView(p)),
    hashAllPages: () => pageHasher().hash(vm.memory, RESERVED_BYTES, vm.guestPages),
    zeroPages: (first, count, out) => (zero ??= zeroScanner({ memory: vm.memory })).zeroMap(vm.pagesView(first, count), out),
    pagesView: (first, count) => vm.pagesView(first, count),
    startDirtyLog: () => vm.startDirtyLog(),
    harvestDirty: () => vm.harvestDirty(),
    dirtyCount: () => vm.dirtyCount(),
    stopDirtyLog: () => vm.stopDirtyLog(),
    // The state and soft pages a migration asks for right after the pause come with it.
    pause: async () => {
      hooks.onPause?.();
      const p = vm.pauseWithState();
      atPause = p;
      return await p.paused;
    },
    resume: async () => {
      atPause = null;
      vm.resume();
      await vm.whenRunning();
      hooks.onResume?.();
    },
    throttle: (f) => vm.throttle(f),
    exportState: async (): Promise<VmWireState> => {
      const s = await (atPause?.state ?? vm.exportState());
      return { guestBytes: s.guestBytes, globals: toWire(vm.info.globals as GlobalDesc[], s.globals), devices: s.devices as Record<string, unknown> };
    },
    softPages: () => atPause?.soft ?? vm.softPages(),
    progress: () => vm.stat().progress,
    release: async () => {
      hooks.onRelease?.();
      await vm.stop();
    },
  };
}

export interface DestinationVmAdapterInit {
  /**
   * Guest memory size the source announced (HELLO's guestBytes): memory grows to it at once, so
   * that it is prefaulted with the rest. Default: the VM's size as created.
   */
  guestBytes?: number;
  /**
   * Fault in all guest memory while the VM is readied, before the destination acknowledges the
   * module and pages start to arrive (default true). Writing a page into fresh shared memory costs
   * a page fault: 1.7–15 µs per 4 KiB page measured on this machine kind (the hypervisor backs
   * fresh memory lazily), against ~0.4 µs to copy the page. This moves that cost out of the
   * transfer into the set-up, where it overlaps the vCPU thread's start. The price: the destination
   * holds all of guest memory from the start, zero pages included.
   */
  prefault?: boolean;
}

/**
 * A destination in this process that admits every migration and runs it in a VM of its own,
 * created at the source's size with every variant (each kept in `made`, for the caller to stop):
 * the warm-up's destination (warm-up.ts), and the engine tests'. `adapter` wraps each VM for the
 * engine (default: DestinationVmAdapter).
 */
export function localDestination(made: Vm[], cache: InstrumentCache, adapter: (vm: Vm) => DestinationVm = (vm) => new DestinationVmAdapter(vm)): DestinationFactory {
  return {
    admit: async (hello) => ({
      create: async (module) => {
        const vm = Vm.create({ name: hello.vmName, module, memoryBytes: hello.memoryBytes, config: hello.config, cache, variants: ['plain', 'dirty', 'presence'] }, hello.guestBytes);
        made.push(vm);
        return adapter(vm);
      },
    }),
  };
}

/**
 * The engine's view of a VM arriving on this host. The VM must have been created with the
 * presence variant prepared (post-copy and hybrid need it), and nothing may have written its
 * memory yet.
 */
export class DestinationVmAdapter implements DestinationVm {
  private faultHandler: ((page: number) => void) | null = null;
  private serving = false;
  private readonly ctl: Int32Array;
  /** The presence map (one byte per guest page), set up by start() for post-copy. */
  private presence: Uint8Array | null = null;
  /** Post-copy on a fault thread: its link, what it tells, and the block shared with it and the vCPU (install claims, the detached channel). */
  private thread: { link: NodeDestinationFaultLink; events: FaultThreadEvents; block: FaultChannelBlock } | null = null;
  private readonly warming: Promise<void>;
  private readonly memory: Promise<void>;
  private readonly stopPrefault = new AbortController();
  private prefaulting: boolean;

  constructor(readonly vm: Vm, init: DestinationVmAdapterInit = {}) {
    this.ctl = new Int32Array(vm.controlBuffer);
    if (init.guestBytes !== undefined) vm.growTo(init.guestBytes);
    // The vCPU thread starts before the source pauses; memory is faulted in meanwhile, on this
    // thread while that one loads (touching from the vCPU thread had to wait for it to load first:
    // measured slower).
    const thread = vm.prewarm();
    // The state that arrives is validated on this thread inside the downtime (Vm.bootFromState).
    warmDeviceStateValidation();
    this.prefaulting = init.prefault !== false;
    const memory = this.prefaulting ? vm.prefaultFresh(this.stopPrefault.signal).finally(() => (this.prefaulting = false)) : Promise.resolve(0);
    this.memory = memory.then(() => undefined);
    this.warming = Promise.all([thread, memory]).then(() => undefined);
  }

  /** Resolves once guest memory is faulted in (at once for memory from the host's pool). */
  memoryReady(): Promise<void> {
    return this.memory;
  }

  /**
   * Prefaulting writes zeros, so it must be over before a page is installed. The engine installs
   * pages only after warm(); should one come earlier anyway, prefaulting stops first (it runs on
   * this thread between event-loop turns, so it is not inside a slice now).
   */
  private beforeInstall(): void {
    if (this.prefaulting) {
      this.stopPrefault.abort();
      this.prefaulting = false;
    }
  }

  /** Resolves once the vCPU thread stands by and guest memory is faulted in. */
  warm(): Promise<void> {
    return this.warming;
  }

  pageHashes(pages: number): PageHashQueue {
    return pageHasher().queue(this.vm.memory, RESERVED_BYTES, pages);
  }

  ensurePages(pages: number): void {
    // Called for every page installed: memory never shrinks, so what was ensured once stays so
    // (reading the memory's size makes a new SharedArrayBuffer object each time).
    if (pages <= this.ensuredPages) return;
    const bytes = Math.ceil((pages * PAGE_SIZE) / WASM_PAGE_SIZE) * WASM_PAGE_SIZE;
    if (bytes > this.vm.guestBytes) this.vm.growTo(bytes);
    this.ensuredPages = bytes / PAGE_SIZE;
  }

  /** Guest pages known to be in memory (see ensurePages). */
  private ensuredPages = 0;

  writePage(page: number, data: Uint8Array, offset: number): void {
    this.beforeInstall();
    this.vm.writePageFrom(page, data, offset);
  }

  zeroPage(page: number): void {
    this.beforeInstall();
    this.vm.pageView(page).fill(0);
  }

  readPage(page: number, into: Uint8Array, offset: number): void {
    this.vm.readPageInto(page, into, offset);
  }

  pagesView(first: number, count: number): Uint8Array {
    this.beforeInstall();
    return this.vm.pagesView(first, count);
  }

  faultWaits(): Histogram {
    return this.vm.faultWaits();
  }

  onFault(handler: (page: number) => void): void {
    this.faultHandler = handler;
  }

  load(state: VmWireState, hint: { pagesMissing?: boolean } = {}): Promise<void> {
    const vm = this.vm;
    const full: VmState = {
      version: 1, name: vm.name, moduleHash: vm.info.hash, memoryBytes: vm.memoryBytes, guestBytes: state.guestBytes,
      config: vm.config, globals: fromWire(state.globals), devices: state.devices,
    };
    // Booted paused: the vCPU thread restores globals and devices and runs nothing. The boot
    // message is on its way when this returns, so start() may follow before it resolves. For
    // post-copy it boots in the presence-checking variant: one instance, not one plain and then
    // one with presence checks inside the downtime.
    this.loading = vm.bootFromState(full, { paused: true, ...(hint.pagesMissing ? { variant: 'presence' as const } : {}) });
    return this.loading;
  }

  /** The load under way (see load). */
  private loading: Promise<void> | null = null;

  async start(absent: Bitmap | null): Promise<void> {
    const vm = this.vm;
    const loading = this.loading;
    if (!loading) throw new VmStateError(`VM ${vm.name} was started before its state was loaded`);
    // Resumed before the load has settled (post-copy's STATE comes just before SWITCHOVER): the
    // vCPU thread takes the boot, then the resume, in order — one round trip instead of two.
    const run = async (opts: { variant: 'plain' | 'presence' }) => {
      try {
        vm.resume(opts);
      } catch (e) {
        await loading; // a failed load says more than the resume it failed
        throw e;
      }
      await loading;
      await vm.whenRunning();
    };
    if (!absent) {
      await run({ variant: 'plain' }); // whatever the load was readied for
      return;
    }
    // The map lies in the memory's reserved first 2 MiB: growth never moves it, one view serves.
    const presence = (this.presence = vm.presenceView());
    presence.fill(1);
    // A run at a time: in post-copy nearly every page is absent (a step per page took ms of the downtime).
    for (const [first, count] of absent.runs()) presence.fill(0, first, first + count);
    if (this.thread) {
      // With the connection detached, the vCPU fetches its missing pages itself (told before it
      // runs); else the fault thread takes its fault notifications. Either way the thread tells
      // the session what was installed.
      const { link, events, block } = this.thread;
      if (link.fd !== null) {
        block.setSocket(link.fd);
        vm.useFaultChannel({ block: block.buffer, pages: presence.length, waitNice: link.waitNice, shape: link.shape });
      }
      link.start({ memory: vm.memory.buffer as unknown as SharedArrayBuffer, ctl: this.vm.controlBuffer, channel: block.buffer, pages: presence.length }, events);
    } else {
      this.serving = true;
      void this.serveFaults();
    }
    await run({ variant: 'presence' });
  }

  /**
   * The fault service: the vCPU publishes a physical page and bumps FAULT_REQ, then blocks until
   * the page is present. Pages outside guest memory (an access that is about to trap) and pages
   * that arrived meanwhile are released at once; the others go to the engine, which requests them.
   */
  private async serveFaults(): Promise<void> {
    let seen = Atomics.load(this.ctl, Ctl.FAULT_REQ);
    const presence = this.presence!;
    while (this.serving) {
      const r = Atomics.waitAsync(this.ctl, Ctl.FAULT_REQ, seen, 100);
      if (r.async) await r.value;
      const now = Atomics.load(this.ctl, Ctl.FAULT_REQ);
      if (now === seen) continue;
      seen = now;
      const page = Atomics.load(this.ctl, Ctl.FAULT_PAGE) - RESERVED_PAGES;
      if (page < 0 || page >= presence.length || presence[page]) {
        if (page >= 0 && page < presence.length) presence[page] = 1;
        this.wake();
      } else {
        this.faultHandler?.(page);
      }
    }
  }

  private wake(): void {
    Atomics.add(this.ctl, Ctl.FAULT_DONE, 1);
    Atomics.notify(this.ctl, Ctl.FAULT_DONE);
  }

  serveFaultsOn(link: DestinationFaultLink, events: FaultThreadEvents): boolean {
    if (!(link instanceof NodeDestinationFaultLink)) return false;
    this.thread = { link, events, block: FaultChannelBlock.create(this.vm.presenceView().length) };
    return true;
  }

  claim(page: number): boolean {
    return this.thread?.block.claim(page) ?? true;
  }

  markPresent(page: number): void {
    // Data was written before this (writePage); presence second, then the vCPU is woken if it
    // waits for this page. Both stores and loads are sequentially consistent, and the vCPU
    // publishes FAULT_PAGE before it looks at presence again, so one of the two sides sees the
    // other's store: no lost wake-up, and a pushed page nobody waits for (nearly all of them)
    // costs no notify (one per page was 2.5 µs: 166 ms of a 256 MiB push, profiled).
    Atomics.store(this.presence!, page, 1);
    if (Atomics.load(this.ctl, Ctl.FAULT_PAGE) === page + RESERVED_PAGES) this.wake();
  }

  async allPresent(): Promise<void> {
    this.serving = false;
    await this.vm.switchVariant('plain');
  }

  async discard(): Promise<void> {
    this.serving = false;
    this.stopPrefault.abort();
    await this.vm.stop();
  }

  progress(): number {
    return this.vm.stat().progress;
  }
}
