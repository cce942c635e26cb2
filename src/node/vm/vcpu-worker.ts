/**
 * The vCPU thread: runs one guest in quanta.
 *
 * The loop is synchronous on purpose. Between quanta it polls its message port with
 * receiveMessageOnPort and reads commands from the shared control block; when paused or idle it
 * blocks in Atomics.wait on the doorbell. It never yields to its own event loop, so a quantum
 * boundary is a point the host can reason about (see dirty-log.ts).
 */
import { getPriority, setPriority } from 'node:os';
import { parentPort, receiveMessageOnPort, workerData, type MessagePort } from 'node:worker_threads';
import { FERRY_IMPORT_MODULE, NetRecord, PRESENCE_MAP_OFFSET, RESERVED_BYTES, REWRITE, RunStatus } from '../../core/abi.js';
import { WASM_PAGE_SIZE } from '../../core/pages.js';
import { Cmd, Ctl, Stat, VARIANTS, VmRunState, faultWaitsOf, type VariantName } from './control.js';
import { SharedGuestMemory } from './memory-access.js';
import { Devices, type DeviceHooks, type DeviceState, type DevicesInit } from './devices/index.js';
import { NetRing, ringLayout, type NetRecordData } from '../../core/net-ring.js';
import { Histogram } from '../../core/metrics.js';
import { decodeGlobals, encodeGlobals, type GlobalDesc, type GlobalValue } from './globals.js';
import { SPARE_ROLE, type SpareThreadData } from './vcpu-threads.js';
import { FaultChannelBlock, FaultFetcher, MAX_FETCH_PAGES, StoppedWhileFaulting, rehearseFaultPath, type FaultChannelUse } from './fault-channel.js';
import { ForwardingImports } from './forwarding-imports.js';
import { blockingSocketsAvailable } from '../net/blocking-socket.js';
import { loadedLibc } from '../libc.js';

export interface VcpuWorkerData {
  name: string;
  memory: WebAssembly.Memory;
  control: SharedArrayBuffer;
  stats: SharedArrayBuffer;
  port: MessagePort;
  modules: Partial<Record<VariantName, WebAssembly.Module>>;
  globals: GlobalDesc[];
  initExport: string | null;
  hasProgress: boolean;
  devices: DevicesInit;
  /** Cold boot, or resume from exported state (snapshot restore, migration destination). */
  boot: { kind: 'cold' } | { kind: 'state'; globals: GlobalValue[]; devices: unknown };
  quantumMs: number;
  idleWaitMs: number;
  /** The nice value to run at in the presence variant (VmInit.faultNice); null: unchanged. */
  faultNice: number | null;
}

export type ToWorker =
  | { t: 'boot'; boot: VcpuWorkerData['boot'] }
  | { t: 'net'; records: NetRecordData[] }
  | { t: 'export'; id: number }
  | { t: 'soft-pages'; id: number }
  | { t: 'block-bitmap'; id: number; clear: boolean }
  /** Answer once paused (at once if paused now) with the state and the soft pages: see Vm.pauseWithState. */
  | { t: 'export-at-pause'; id: number }
  /** Post-copy: fetch missing pages on this fault channel (see fault-channel.ts); `pages`: the presence map's. */
  | ({ t: 'fault-channel' } & FaultChannelUse);

export type FromWorker =
  | { t: 'standby' }
  | { t: 'ready' }
  | { t: 'console'; line: string }
  | { t: 'net'; records: NetRecordData[] }
  | { t: 'credit'; bytes: number }
  | { t: 'trap'; message: string }
  | { t: 'halt'; code: number }
  | { t: 'stopped' }
  | { t: 'reply'; id: number; ok: true; value: unknown }
  | { t: 'reply'; id: number; ok: false; error: { name: string; code?: string; message: string } };

/**
 * A vCPU thread may be spawned before it knows how to boot (a migration destination starts it
 * while pages are still arriving, so thread start-up is not part of the downtime). It then waits
 * here for its 'boot' message; anything else that arrives meanwhile is kept for later.
 */
type InitialData = Omit<VcpuWorkerData, 'boot'> & { boot?: VcpuWorkerData['boot'] };

/**
 * Devices that serve no VM: on a memory of their own (one 64 KiB page unless given), with hooks
 * that do nothing. For running code paths ahead of need (warmRestorePath) and for the shape of the
 * imports (importShape). Declared before anything at the top level runs it.
 */
function throwawayDevices(memory = new WebAssembly.Memory({ initial: 1, maximum: 1, shared: true })): { devices: Devices; mem: SharedGuestMemory; hooks: DeviceHooks } {
  const noop = () => undefined;
  const hooks = { console: noop, netTx: noop, halt: noop, abort: noop };
  const mem = new SharedGuestMemory(memory, noop);
  return { devices: new Devices({ config: '' }, mem, hooks), mem, hooks };
}

/**
 * The post-copy fault path once, before any fault: its socket calls load and a fault's round trip
 * runs on scratch memory (rehearseFaultPath), while the source still runs, not at the first fault.
 */
function warmFaultPath(): void {
  blockingSocketsAvailable();
  rehearseFaultPath();
}

/**
 * A spare thread (vcpu-threads.ts) starts before its VM exists: it warms what it can, then waits
 * for the VM's thread data on its port. Any other thread has that data as workerData. What it
 * warms needs no VM: the restore path, and the post-copy fault path (the socket calls loaded, a
 * fault's round trip run on scratch memory) — after adoption these took 5-15 ms of the thread,
 * inside the first round of the migration bringing its VM, where the destination's cores are busy
 * taking pages.
 */
function adopt(): InitialData {
  const spare = workerData as SpareThreadData | InitialData;
  if (!('role' in spare) || spare.role !== SPARE_ROLE) return spare as InitialData;
  warmRestorePath();
  warmFaultPath();
  const wake = new Int32Array(spare.wake);
  for (;;) {
    const rung = Atomics.load(wake, 0);
    const m = receiveMessageOnPort(spare.port);
    if (m) {
      spare.port.close();
      // The pool is closing (VcpuThreadPool.close): this thread ends, in a worker only itself.
      if ((m.message as { exit?: true }).exit) process.exit(0);
      return (m.message as { data: InitialData }).data;
    }
    Atomics.wait(wake, 0, rung);
  }
}
const adopted = (workerData as { role?: string } | null)?.role === SPARE_ROLE;
const initial = adopt();
const ctl = new Int32Array(initial.control);
const backlog: ToWorker[] = [];
function awaitBoot(): VcpuWorkerData['boot'] | null {
  for (;;) {
    const bell = Atomics.load(ctl, Ctl.DOORBELL);
    for (let m = receiveMessageOnPort(initial.port); m; m = receiveMessageOnPort(initial.port)) {
      const msg = m.message as ToWorker;
      if (msg.t === 'boot') return msg.boot;
      backlog.push(msg);
    }
    if (Atomics.load(ctl, Ctl.CMD) === Cmd.STOP) return null;
    Atomics.wait(ctl, Ctl.DOORBELL, bell);
  }
}
/**
 * A thread standing by will continue a VM from state (migration destination, restore): run that
 * path once on a throwaway device set first, so that validating the real state (schema
 * compilation, cold code) is not paid during the downtime — measured 6–11 ms in a fresh thread,
 * 0.1–0.4 ms after this. On `memory` (default: a page of its own); nothing of it touches guest
 * memory. A failure only loses the warm-up.
 */
function warmRestorePath(memory?: WebAssembly.Memory): void {
  try {
    const { devices, mem, hooks } = throwawayDevices(memory);
    const restored = Devices.fromState(devices.exportState(), { config: '' }, mem, hooks);
    devices.close();
    void restored.softPageWords(); // and the rest of what a pause exports, should this VM leave again
    restored.close();
  } catch {
    // not needed for correctness
  }
}

/**
 * The network path once, on throwaway devices (rings in scratch memory): records delivered into the
 * rx ring, taken out as the guest would, records put in the tx ring and drained, three times so
 * that V8 has its type feedback. Every VM arriving here runs on a new thread, whose first client
 * request after the switchover ran this code for the first time: in the clients bench (pre-copy)
 * the guest's first reply came 0.88-3.98 ms (median 1.45) after the request reached the thread,
 * 0.47-0.85 ms with this, and 0.5-0.6 ms for later replies either way. A failure only loses the
 * warm-up.
 */
function warmNetPath(): void {
  try {
    // Guest address 0 is RESERVED_BYTES into the memory: one 64 KiB Wasm page of guest memory.
    const pages = RESERVED_BYTES / WASM_PAGE_SIZE + 1;
    const memory = new WebAssembly.Memory({ initial: pages, maximum: pages, shared: true });
    const { devices } = throwawayDevices(memory);
    const size = 4096;
    const base = 4096;
    const netInit = (devices.imports()[FERRY_IMPORT_MODULE] as Record<string, (base: number, size: number) => number>).net_init;
    if (netInit(base, size) !== 0) throw new Error('net_init refused the warm-up rings');
    const { rx, tx } = ringLayout(base, size);
    const bytes = new Uint8Array(memory.buffer, RESERVED_BYTES);
    const guestRx = new NetRing(bytes, rx, size);
    const guestTx = new NetRing(bytes, tx, size);
    const payload = new Uint8Array(64);
    devices.resume();
    for (let i = 0; i < 3; i++) {
      devices.deliverNet([{ conn: 1, type: NetRecord.OPEN, payload: new Uint8Array(0) }, { conn: 1, type: NetRecord.DATA, payload }]);
      devices.betweenQuanta();
      while (guestRx.pop()) { /* the guest consumes */ }
      guestTx.push({ conn: 1, type: NetRecord.DATA, payload });
      devices.hasPendingInput();
      devices.betweenQuanta();
    }
    devices.pause();
    devices.close();
  } catch {
    // not needed for correctness
  }
}

const stats = new Float64Array(initial.stats);
const faultWaits = faultWaitsOf(stats);
const post = (m: FromWorker, transfer?: ArrayBuffer[]) => parentPort!.postMessage(m, transfer);

class HaltSignal extends Error {
  constructor(readonly code: number) {
    super(`guest exited with code ${code}`);
  }
}

let presence = new Uint8Array(initial.memory.buffer);
function isPresent(page: number): boolean {
  if (presence.byteLength !== initial.memory.buffer.byteLength) presence = new Uint8Array(initial.memory.buffer);
  // Sequentially consistent: pairs with the fault service's store (see DestinationVmAdapter.markPresent).
  return Atomics.load(presence, PRESENCE_MAP_OFFSET + page) !== 0;
}

/** Post-copy with a fault channel: this thread fetches its missing pages itself. */
let fetcher: FaultFetcher | null = null;

/**
 * Blocks the vCPU until `page` is present: fetched on the fault channel by this thread, or else
 * served by the destination's fault service.
 */
function fault(page: number): void {
  if (isPresent(page)) return;
  const t0 = process.hrtime.bigint();
  if (!fetcher?.fetch(page)) {
    Atomics.store(ctl, Ctl.FAULT_PAGE, page);
    Atomics.add(ctl, Ctl.FAULT_REQ, 1);
    Atomics.notify(ctl, Ctl.FAULT_REQ);
    awaitInstall(page);
  }
  Histogram.recordShared(faultWaits, Number(process.hrtime.bigint() - t0) / 1e6);
}

/**
 * Blocks until physical page `page` is present, woken by whichever thread installs it (it wakes
 * the vCPU when FAULT_PAGE names the page: DestinationVmAdapter.markPresent, the fault thread).
 * FAULT_PAGE is published before presence is looked at again, so no wake-up is lost.
 */
function awaitInstall(page: number): void {
  Atomics.store(ctl, Ctl.FAULT_PAGE, page);
  while (!isPresent(page)) {
    const seen = Atomics.load(ctl, Ctl.FAULT_DONE);
    if (isPresent(page)) break;
    if (Atomics.load(ctl, Ctl.CMD) === Cmd.STOP) throw new StoppedWhileFaulting();
    Atomics.wait(ctl, Ctl.FAULT_DONE, seen, 100);
  }
}

/**
 * Blocks until every page of `pages` is present: those still absent asked for in one request on
 * the fault channel (MAX_FETCH_PAGES at a time), else each in turn as {@link fault} does. One wait
 * for the fault histogram per request.
 */
function faultAll(pages: number[]): void {
  const absent = pages.filter((p) => !isPresent(p));
  for (let i = 0; i < absent.length; i += MAX_FETCH_PAGES) {
    const some = absent.slice(i, i + MAX_FETCH_PAGES);
    const t0 = process.hrtime.bigint();
    if (some.length > 1 && fetcher?.fetchAll(some)) Histogram.recordShared(faultWaits, Number(process.hrtime.bigint() - t0) / 1e6);
    else for (const p of some) fault(p);
  }
}

const mem = new SharedGuestMemory(initial.memory, fault, faultAll);
let halted: number | null = null;
const hooks = {
  console: (line: string) => post({ t: 'console', line }),
  netTx: (records: NetRecordData[]) => post({ t: 'net', records }),
  halt: (code: number) => {
    halted = code;
    throw new HaltSignal(code);
  },
  abort: (message: string) => {
    throw new Error(`guest aborted: ${message}`);
  },
  netRxCredit: (bytes: number) => {
    credit += bytes;
  },
};
let credit = 0;
/**
 * The guest's instances call its devices through forwarders (forwarding-imports.ts), bound when
 * the VM boots: a thread standing by makes its instances before the state arrives (see below).
 * The shape comes from a throwaway device set: every device set has the same imports.
 */
function importShape(): WebAssembly.Imports {
  const { devices } = throwawayDevices();
  const shape = devices.imports();
  devices.close();
  return shape;
}
const deviceImports = new ForwardingImports(importShape());
const imports: WebAssembly.Imports = {
  ...deviceImports.imports,
  [REWRITE.memoryModule]: { [REWRITE.memoryName]: initial.memory, [REWRITE.faultName]: fault },
};

const instances = new Map<VariantName, WebAssembly.Instance>();
function instanceOf(v: VariantName): WebAssembly.Instance {
  let inst = instances.get(v);
  if (!inst) {
    const mod = initial.modules[v];
    if (!mod) throw new Error(`variant ${v} was not loaded`);
    inst = new WebAssembly.Instance(mod, imports);
    instances.set(v, inst);
  }
  return inst;
}

function readGlobals(inst: WebAssembly.Instance): GlobalValue[] {
  return initial.globals.map((g) => (inst.exports[g.export] as WebAssembly.Global).value as GlobalValue);
}
function writeGlobals(inst: WebAssembly.Instance, values: GlobalValue[]): void {
  initial.globals.forEach((g, i) => {
    (inst.exports[g.export] as WebAssembly.Global).value = values[i];
  });
}

/** The thread's own nice value, and the one it runs at in the presence variant (see VmInit.faultNice). */
const ownNice = getPriority(0);
stats[Stat.VCPU_NICE] = ownNice;

/**
 * What the boot of a VM continued from state runs, done once while the thread stands by: every
 * loaded variant instantiated (instantiating touches no guest memory: the rewritten modules have
 * no start function and only passive data segments, applied by a cold boot alone), the globals'
 * encoding and decoding round-tripped on one instance (its globals are its own, written again at
 * the boot), Node's performance timing loaded, and for post-copy a fault fetcher built on a
 * throwaway block. Cold, this code ran between the state's arrival and the guest's first
 * instruction (measured 1.5-2.5 ms of a post-copy destination's 3-4 ms there). A failure only
 * loses the warm-up.
 */
function rehearseBoot(): void {
  try {
    for (const v of VARIANTS) if (initial.modules[v]) instanceOf(v);
    const inst = instances.values().next().value;
    // More than once: V8 compiles a regular expression to machine code on its second use, and
    // the decoding's are used once per global.
    for (let i = 0; inst && i < 3; i++) writeGlobals(inst, decodeGlobals(initial.globals, encodeGlobals(initial.globals, readGlobals(inst))));
    // A worker loads Node's performance timing on its first performance.now() (~1 ms), which the
    // fault fetcher's first fetch made inside the downtime.
    performance.now();
    // V8 compiles a function's bytecode when it is first called, all of it at once: the boot's
    // first call of main() compiled it between the state's arrival and the VM being ready
    // (0.21-0.26 ms measured there; 0.04-0.07 ms after this). Called so, it returns at once.
    main(true);
    warmNetPath();
    if (initial.modules.presence) {
      void new FaultFetcher({
        block: FaultChannelBlock.create(32), pages: 0, waitNice: null, shape: null,
        memory: () => initial.memory.buffer, stopping: () => true, awaitInstall,
      });
    }
  } catch {
    // not needed for correctness
  }
}

if (!initial.boot) {
  // A spare warmed both paths while it stood by (adopt).
  if (!adopted) {
    warmRestorePath(initial.memory);
    // A destination that may take post-copy faults fetches pages itself (fault-channel.ts).
    if (initial.modules.presence) warmFaultPath();
  }
  rehearseBoot();
  parentPort!.postMessage({ t: 'standby' } satisfies FromWorker);
}
const bootInfo = initial.boot ?? awaitBoot();
if (!bootInfo) {
  Atomics.store(ctl, Ctl.STATE, VmRunState.STOPPED);
  Atomics.notify(ctl, Ctl.STATE);
  parentPort!.postMessage({ t: 'stopped' });
  process.exit(0);
}
const data: VcpuWorkerData = { ...initial, boot: bootInfo! };
const devices = data.boot.kind === 'state'
  ? Devices.fromState(data.boot.devices as DeviceState, data.devices, mem, hooks) // validated by the host thread (Vm.bootFromState)
  : new Devices(data.devices, mem, hooks);
deviceImports.bind(devices.imports());

let variant: VariantName = VARIANTS[Atomics.load(ctl, Ctl.VARIANT_REQ)] ?? 'plain';
let current = instanceOf(variant);
let run = current.exports.run as (budget: number) => number;
let progress = data.hasProgress ? (current.exports.progress as () => bigint) : null;

/**
 * The export a migration's pause runs (exportState), once after a cold boot: the devices' part on
 * throwaway devices (warmRestorePath, which a thread that boots from state ran when it stood by),
 * then the globals' encoding. Run cold it took 1-4 ms, inside the downtime. Nothing of it touches
 * the VM's devices or memory.
 */
function warmExport(): void {
  warmRestorePath();
  try {
    encodeGlobals(data.globals, readGlobals(current));
  } catch {
    // not needed for correctness
  }
}

function niceFor(v: VariantName): void {
  const want = v === 'presence' && data.faultNice !== null ? data.faultNice : ownNice;
  if (stats[Stat.VCPU_NICE] === want) return;
  try {
    setPriority(0, want); // this thread only (Linux: a thread's own setpriority)
    stats[Stat.VCPU_NICE] = want;
  } catch {
    // Not permitted (CAP_SYS_NICE): the thread keeps what it has.
  }
}

function activate(v: VariantName): void {
  niceFor(v);
  if (v !== variant) {
    const next = instanceOf(v);
    writeGlobals(next, readGlobals(current));
    current = next;
    variant = v;
    run = current.exports.run as (budget: number) => number;
    progress = data.hasProgress ? (current.exports.progress as () => bigint) : null;
  }
  mem.logDirty = v === 'dirty';
  mem.checkPresence = v === 'presence';
  Atomics.store(ctl, Ctl.VARIANT_CUR, VARIANTS.indexOf(v));
  Atomics.notify(ctl, Ctl.VARIANT_CUR);
}

/**
 * Device work between quanta. A guest that corrupted its rings is aborted by the device, which
 * surfaces here as an exception: that is a guest trap, not a crash of the vCPU thread.
 */
function tick(): boolean {
  try {
    devices.betweenQuanta();
  } catch (e) {
    bumpEpoch();
    setState(VmRunState.TRAPPED);
    post({ t: 'trap', message: errorOf(e).message });
    return false;
  } finally {
    if (credit > 0) {
      post({ t: 'credit', bytes: credit });
      credit = 0;
    }
  }
  return true;
}

/**
 * Once, as the VM starts or resumes: this thread, woken by the host thread that resumed it, often
 * lands on that thread's core and takes it, and the host thread then waits a time slice to act on
 * the VM running — a migration destination's RESUMED waited 1.5–2.5 ms so in traces, whenever
 * the guest had work at once. One sched_yield lets it go first (with nothing else runnable on
 * this core it returns at once). Only where this thread has libc loaded already (a destination's
 * thread does, for post-copy's fault path): never a ~30 ms load here.
 */
function yieldCore(): void {
  try {
    loadedLibc()?.schedYield();
  } catch {
    // not needed for correctness
  }
}

function setState(s: VmRunState): void {
  Atomics.store(ctl, Ctl.STATE, s);
  Atomics.notify(ctl, Ctl.STATE);
}

function bumpEpoch(): void {
  Atomics.add(ctl, Ctl.EPOCH, 1);
  Atomics.notify(ctl, Ctl.EPOCH);
}

function errorOf(e: unknown): { name: string; code?: string; message: string } {
  const err = e as { name?: string; code?: string; message?: string };
  return { name: err?.name ?? 'Error', code: err?.code, message: err?.message ?? String(e) };
}

/** An export-at-pause waiting for the pause. */
let exportAtPause: number | null = null;

/** Answers the export-at-pause waiting, if one is (the VM has paused). */
function answerExportAtPause(): void {
  if (exportAtPause === null) return;
  exportState(exportAtPause, true);
  exportAtPause = null;
}

function exportState(id: number, soft: boolean): void {
  try {
    const globals = encodeGlobals(data.globals, readGlobals(current));
    post({ t: 'reply', id, ok: true, value: { globals, devices: devices.exportState(), ...(soft ? { soft: devices.softPageWords() } : {}) } });
  } catch (e) {
    post({ t: 'reply', id, ok: false, error: errorOf(e) });
  }
}

function handle(msg: ToWorker): void {
  switch (msg.t) {
    case 'boot':
      return; // booted already
    case 'net':
      devices.deliverNet(msg.records);
      return;
    case 'export':
      exportState(msg.id, false);
      return;
    case 'export-at-pause':
      exportAtPause = msg.id;
      return;
    case 'soft-pages':
      // Typed arrays: one copy when cloned (a number[] of 32 Ki words took ~2 ms per request).
      post({ t: 'reply', id: msg.id, ok: true, value: devices.softPageWords() });
      return;
    case 'fault-channel':
      fetcher = new FaultFetcher({
        block: new FaultChannelBlock(msg.block), pages: msg.pages, waitNice: msg.waitNice, shape: msg.shape,
        memory: () => data.memory.buffer, stopping: () => Atomics.load(ctl, Ctl.CMD) === Cmd.STOP, awaitInstall,
      });
      return;
    case 'block-bitmap': {
      const bm = devices.blockWriteBitmap();
      post({ t: 'reply', id: msg.id, ok: true, value: bm ? { size: bm.size, words: bm.words } : null });
      if (msg.clear) devices.clearBlockWrites();
      return;
    }
  }
}

function drainMessages(): void {
  for (const msg of backlog.splice(0)) handle(msg);
  for (let m = receiveMessageOnPort(data.port); m; m = receiveMessageOnPort(data.port)) handle(m.message as ToWorker);
}

/** Blocks until the host rings the doorbell (or `timeoutMs` passes). */
function waitDoorbell(seen: number, timeoutMs?: number): void {
  Atomics.wait(ctl, Ctl.DOORBELL, seen, timeoutMs);
}

function boot(): void {
  if (data.boot.kind === 'cold') {
    (current.exports[REWRITE.boot] as () => void)();
    if (data.initExport) (current.exports[data.initExport] as () => void)();
  } else {
    writeGlobals(current, decodeGlobals(data.globals, data.boot.globals));
  }
  activate(variant);
}

/** Runs the VM until it stops. `rehearse`: return at once (see rehearseBoot). */
function main(rehearse = false): void {
  if (rehearse) return;
  try {
    boot();
  } catch (e) {
    if (e instanceof HaltSignal) {
      setState(VmRunState.HALTED);
      post({ t: 'halt', code: e.code });
    } else {
      setState(VmRunState.TRAPPED);
      post({ t: 'trap', message: `during boot: ${errorOf(e).message}` });
    }
    return waitForStop();
  }
  post({ t: 'ready' });
  if (data.boot.kind === 'cold') warmExport();
  let budget = Atomics.load(ctl, Ctl.FIXED_BUDGET) || 1024;
  /** The variant `budget` was steered for. */
  let budgetFor: VariantName | null = variant === 'presence' ? null : variant;
  let idle = false;
  // Device work between quanta is for guest code that ran. A VM continued from state and kept
  // paused has run none: its devices touch no guest memory until it runs (a migration destination
  // loads the state while the last pages still arrive, and a delivery now would be overwritten).
  let guestRan = data.boot.kind === 'cold';
  const targetNs = data.quantumMs * 1e6;
  for (;;) {
    const bell = Atomics.load(ctl, Ctl.DOORBELL);
    drainMessages();
    const cmd = Atomics.load(ctl, Ctl.CMD);
    if (cmd === Cmd.STOP) break;
    if (cmd === Cmd.PAUSE) {
      // No guest code runs while paused, so a variant switch asked for now is safe at once.
      const wanted = VARIANTS[Atomics.load(ctl, Ctl.VARIANT_REQ)];
      if (wanted && wanted !== variant) activate(wanted);
      if (Atomics.load(ctl, Ctl.STATE) !== VmRunState.PAUSED) {
        if (guestRan && !tick()) return waitForStop();
        devices.pause();
        // The state goes before PAUSED is told, while this thread still has its core from the
        // quantum that just ended: told first, the host's thread it woke took the core, and the
        // state came 1-20 ms later while both cores moved pages. The host learns how long the
        // guest had been stopped by then, so the pause is stamped when the guest stopped.
        const stopped = process.hrtime.bigint();
        answerExportAtPause();
        stats[Stat.STOPPED_BEFORE_PAUSED_NS] = Number(process.hrtime.bigint() - stopped);
        setState(VmRunState.PAUSED);
        bumpEpoch();
      }
      answerExportAtPause(); // asked while already paused
      waitDoorbell(bell);
      continue;
    }
    if (Atomics.load(ctl, Ctl.STATE) !== VmRunState.RUNNING) {
      devices.resume();
      setState(VmRunState.RUNNING);
      yieldCore();
    }
    const want = VARIANTS[Atomics.load(ctl, Ctl.VARIANT_REQ)];
    if (want && want !== variant) activate(want);
    if (!tick()) return waitForStop();
    if (idle && !devices.hasPendingInput()) {
      waitDoorbell(bell, data.idleWaitMs);
      idle = false;
      continue;
    }

    if (variant !== budgetFor) {
      // Pages missing (post-copy): every first touch waits for the network, so a budget steered
      // without faults makes a quantum of tens of ms, and the replies the guest writes wait for
      // its end (the tx ring is drained between quanta). Start again from one unit of work.
      if (variant === 'presence') budget = 1;
      budgetFor = variant;
    }
    const fixed = Atomics.load(ctl, Ctl.FIXED_BUDGET);
    if (fixed > 0) budget = fixed;
    let status: number;
    const t0 = process.hrtime.bigint();
    guestRan = true;
    try {
      status = run(budget);
    } catch (e) {
      if (e instanceof HaltSignal) {
        status = RunStatus.HALTED;
      } else if (e instanceof StoppedWhileFaulting) {
        bumpEpoch();
        break; // a stop, not a trap: the VM is discarded while pages are missing
      } else {
        bumpEpoch();
        setState(VmRunState.TRAPPED);
        post({ t: 'trap', message: errorOf(e).message });
        return waitForStop();
      }
    }
    fetcher?.relax();
    const dt = Number(process.hrtime.bigint() - t0);
    stats[Stat.QUANTA]++;
    stats[Stat.RUN_NS] += dt;
    stats[Stat.LAST_QUANTUM_NS] = dt;
    stats[Stat.BUDGET] = budget;
    if (progress) stats[Stat.PROGRESS] = Number(progress());
    bumpEpoch();
    if (!tick()) return waitForStop();

    if (status === RunStatus.HALTED) {
      setState(VmRunState.HALTED);
      post({ t: 'halt', code: halted ?? 0 });
      return waitForStop();
    }
    idle = status === RunStatus.IDLE;

    const left = Atomics.load(ctl, Ctl.QUANTA_LEFT);
    if (left > 0 && Atomics.sub(ctl, Ctl.QUANTA_LEFT, 1) === 1) {
      Atomics.compareExchange(ctl, Ctl.CMD, Cmd.RUN, Cmd.PAUSE);
    }

    const throttle = Atomics.load(ctl, Ctl.THROTTLE);
    if (throttle > 0) {
      // Sleep `throttle`‰ of each period: after a quantum of dt, sleep dt·f/(1−f). A command wakes us.
      const f = Math.min(throttle, 990) / 1000;
      waitDoorbell(Atomics.load(ctl, Ctl.DOORBELL), (dt / 1e6) * (f / (1 - f)));
    }

    if (fixed === 0 && status === RunStatus.RUNNING && dt > 0) {
      // Steer the budget toward one quantum ≈ quantumMs, damped so one odd quantum can't swing it.
      const ratio = Math.min(4, Math.max(0.25, targetNs / dt));
      budget = Math.max(1, Math.min(0x3fffffff, Math.round(budget * Math.sqrt(ratio))));
    }
  }
  tick();
  devices.pause();
  devices.flushConsole();
  devices.close();
  setState(VmRunState.STOPPED);
  post({ t: 'stopped' });
}

/** After a trap or halt: keep answering messages (state stays inspectable) until told to stop. */
function waitForStop(): void {
  for (;;) {
    const bell = Atomics.load(ctl, Ctl.DOORBELL);
    drainMessages();
    if (exportAtPause !== null) {
      post({ t: 'reply', id: exportAtPause, ok: false, error: { name: 'VmStateError', code: 'ERR_VM_STATE', message: 'the VM stopped instead of pausing' } });
      exportAtPause = null;
    }
    if (Atomics.load(ctl, Ctl.CMD) === Cmd.STOP) break;
    waitDoorbell(bell);
  }
  devices.flushConsole();
  devices.close();
  post({ t: 'stopped' });
}

main();
