/**
 * The migration engine's contracts. The engine (source and destination sessions for pre-copy,
 * post-copy and hybrid) is written against these two small views of a VM and a Clock — never
 * against the Wasm runtime — so the same sessions run on real VMs (src/node/engine adapters) and
 * the simulator can drive the same policies.
 */
import type { Bitmap } from '../bitmap.js';
import type { Clock } from '../clock.js';
import type { Histogram, MigrationReport } from '../metrics.js';
import type { HelloFrame, MigrationMode, WireGlobal } from '../protocol/frames.js';
import type { Connection } from '../transport/transport.js';
import type { BlobCodecFactory, CodecName, Gang } from './codecs.js';

/** CPU and device state as it crosses the wire (STATE frame). */
export interface VmWireState {
  guestBytes: number;
  globals: WireGlobal[];
  devices: Record<string, unknown>;
}

/** The source VM as the engine sees it. Page numbers are guest pages. */
export interface SourceVm {
  readonly name: string;
  /** Guest RAM ceiling, bytes. */
  readonly memoryBytes: number;
  readonly config: string;
  /** The original guest module and its SHA-256 (hex). */
  readonly module: Uint8Array;
  readonly moduleSha256: string;
  /** What the VM runs, by name (HELLO's `guest`: the destination lists the VM by it), if it has one. */
  readonly guest?: string;
  /** Current guest memory size in pages (it may grow while the VM runs). */
  guestPages(): number;
  /** Copies guest page `page` into `into` at `offset` (PAGE_SIZE bytes). */
  readPage(page: number, into: Uint8Array, offset: number): void;
  /**
   * Sets `out[k]` to 1 when guest page `first + k` is all zeros, else 0, for k < `count`; returns
   * how many are (one call per batch: the hot path of every round; may be called on a running VM).
   */
  zeroPages(first: number, count: number, out: Uint8Array): number;
  /**
   * Guest pages `first` … `first + count − 1` in place, as one view (optional: a run of pages is
   * then written to the wire without a copy). The bytes change while the guest runs: a page
   * written after the harvest that made it due is dirty again, and sent again.
   */
  pagesView?(first: number, count: number): Uint8Array;
  /** The page's hash as EngineDeps.hashPage computes it, without copying the page out (optional fast path). */
  hashPage?(page: number): bigint;
  /**
   * Every guest page's hash (index = page) as hashPage computes it, on threads of its own
   * (optional fast path for the digest of the paused memory; the VM must be paused).
   */
  hashAllPages?(): Promise<BigUint64Array>;
  startDirtyLog(): Promise<void>;
  /** Pages written since the last harvest; pages read after this resolves are current. */
  harvestDirty(): Promise<Bitmap>;
  /**
   * Pages written since the last harvest, counted without clearing them (optional): the engine
   * samples it during the first pass for the dirty curve its ETA forecasts with (HIST).
   */
  dirtyCount?(): number;
  stopDirtyLog(): Promise<void>;
  /**
   * Stops the guest between quanta; from now on nothing changes memory. May resolve with how long
   * (ms) the guest had already been stopped when it could say so (work it did while stopped, such
   * as exporting the state): the pause is stamped that much earlier.
   */
  pause(): Promise<number | void>;
  resume(): Promise<void>;
  /** vCPU throttle, 0 … 0.99 (auto-converge). */
  throttle(fraction: number): void;
  /** CPU and device state; the VM must be paused. */
  exportState(): Promise<VmWireState>;
  /** Guest pages the guest reported free (soft pages): migration never sends them. */
  softPages(): Promise<Bitmap>;
  /** Cumulative guest progress (application degradation). */
  progress(): number;
  /** Called once the destination owns the VM: stop it here and free everything. */
  release(): Promise<void>;
}

/**
 * The destination VM as the engine sees it. Its guest memory is all zero until the engine installs
 * pages (a zero page for a page never installed is not written).
 */
export interface DestinationVm {
  /** Makes sure memory holds at least `pages` guest pages. */
  ensurePages(pages: number): void;
  /** Installs page content (before start, or into an absent page after a post-copy start). */
  writePage(page: number, data: Uint8Array, offset: number): void;
  /** Installs a zero page. */
  zeroPage(page: number): void;
  readPage(page: number, into: Uint8Array, offset: number): void;
  /**
   * Guest pages `first` … `first + count − 1` as one writable view (optional; before start only):
   * pages of a RUN are then read from the wire straight into guest memory. Memory must hold the
   * pages already (ensurePages).
   */
  pagesView?(first: number, count: number): Uint8Array;
  /**
   * Loads the CPU and device state into the VM without running it: no guest code runs and no
   * device touches guest memory until start(), so pages may still be installed meanwhile. Once.
   * `pagesMissing`: start() will most likely have absent pages (post-copy), so the VM may be
   * readied for that now, inside the load, rather than at the start.
   */
  load(state: VmWireState, hint?: { pagesMissing?: boolean }): Promise<void>;
  /**
   * Runs the VM once load() is done (it may be called before load() has resolved, never before
   * load() was called); resolves once its vCPU runs, rejects with the load's error. With
   * `absent`, it runs in post-copy mode: those pages are not yet present, any access to one
   * blocks the vCPU and calls `onFault`.
   */
  start(absent: Bitmap | null): Promise<void>;
  /**
   * Optional: hashes of installed pages (EngineDeps.hashPage), taken off the engine's thread before
   * the start. The engine queues each page once installed and reads `out` (index = page) once
   * `settled()` has resolved; pages are hashed in the order queued, each from memory as it is
   * then, so a page queued after each install ends with its last content's hash. The engine
   * calls `hurry()` once the source is paused (its last pages are coming: hash each soon rather
   * than cheaply) and closes the queue once it needs no more (settled, or the migration failed).
   */
  pageHashes?(pages: number): {
    readonly out: BigUint64Array;
    add(page: number): void;
    addRange(first: number, count: number): void;
    hurry(): void;
    settled(): Promise<void>;
    close(): void;
  };
  /** Post-copy: a page arrived; wake a vCPU waiting for it. */
  markPresent(page: number): void;
  /** Post-copy: every page is present; run without presence checks from now on. */
  allPresent(): Promise<void>;
  /** Post-copy fault notifications (guest page numbers), registered before start. */
  onFault(handler: (page: number) => void): void;
  /**
   * Post-copy: each fault's wait as the vCPU saw it, ms, from the moment it stopped to the moment
   * it ran on (optional: a VM that cannot measure it leaves the engine its fault service's
   * measure, request sent → page installed, which leaves out both hand-overs with the vCPU).
   */
  faultWaits?(): Histogram;
  /** Resolves once the VM can start without further set-up (its vCPU thread is loaded). */
  warm(): Promise<void>;
  /**
   * Resolves once pages may be installed (guest memory is set up), which may be before warm():
   * pre-copy then moves pages while the vCPU thread still loads. Without it, pages wait for warm().
   */
  memoryReady?(): Promise<void>;
  /** Throws the destination's VM away (migration failed before it owned the VM). */
  discard(): Promise<void>;
  progress(): number;
  /**
   * Post-copy: serve this VM's faults on `link`'s thread instead of through onFault (see
   * {@link FaultThreads}); called instead of onFault, before start. `events` hears what that thread
   * does. False when this VM cannot: onFault is used then.
   */
  serveFaultsOn?(link: DestinationFaultLink, events: FaultThreadEvents): boolean;
  /**
   * With a fault thread: claims `page` for this thread's install (exactly one install wins);
   * false when the fault thread has it already.
   */
  claim?(page: number): boolean;
}

/**
 * Post-copy demand paging on a thread of its own at each end: page requests and their answers
 * never wait behind the work of the threads that push and apply background pages (FINDINGS:
 * faults waited behind pushes). The engine only routes: the destination names the port its fault
 * thread listens on (HELLO_ACK faultPort), the source's fault thread connects there, and each
 * engine hears what its thread did. Edge-provided; without it page requests travel on the fault
 * channel or the control connection and the engine's own thread serves them.
 */
export interface FaultThreads {
  /** The port the destination's fault thread listens on (on the host migrations come in to). */
  port(): Promise<number>;
  /** Expects the fault connection of session `token` (a JOIN presenting it). */
  expect(token: string): DestinationFaultLink;
}

/** A destination session's side of a fault thread. */
export interface DestinationFaultLink {
  /** The source's fault thread has joined (its JOIN was acknowledged). */
  readonly joined: boolean;
  /**
   * Done with the session (its VM has every page, or the migration ended): the connection closes.
   * Resolves once the thread will touch the VM's memory no more (it may go back to a pool then).
   */
  close(): Promise<void>;
}

/** What a destination's fault thread tells the engine. */
export interface FaultThreadEvents {
  /**
   * The thread installed `page` (its hash, for the digest); `waitedMs`: how long the vCPU waited,
   * if it faulted on it (each such page is one fault). Also for a page it asked for that the
   * session's own thread installed first (a push won the claim): then only `waitedMs` counts, an
   * upper bound (the time until the thread's answer came).
   */
  installed(page: number, hash: bigint, waitedMs: number | null): void;
  /** The fault connection failed: post-copy cannot go on. */
  failed(e: Error): void;
}

/** A source's fault thread, connected to the destination's (see {@link FaultThreads}). */
export interface SourceFaultLink {
  /**
   * Answers page requests from now on (the VM is paused: its memory is final); soft pages are
   * never sent. `served` hears each answer: its pages, wire bytes and how long it took.
   */
  serve(soft: Bitmap, served: (pages: number[], bytes: number, latencyMs: number) => void, failed: (e: Error) => void): void;
  close(): Promise<void>;
}

/** What a destination host decides when a migration arrives. */
export interface DestinationFactory {
  /**
   * Admission: called with the source's HELLO and the mode it asks for. Throw a FerryError to
   * refuse (its code goes back in HELLO_ACK). Returns the VM to fill once the module arrived.
   */
  admit(hello: HelloFrame, mode: MigrationMode): Promise<{ create(module: Uint8Array): Promise<DestinationVm> }>;
}

/** Host services the pure engine needs from its edge. */
export interface EngineDeps {
  clock: Clock;
  sha256Hex(bytes: Uint8Array): string;
  /** A fast 64-bit hash of one page, the same on every host (the memory digest is built from these; ferry: XXH3-64, seed 0). */
  hashPage(bytes: Uint8Array, offset: number): bigint;
  /** Lets pending I/O (incoming frames) run; as cheap as possible (Node: setImmediate). */
  yieldToIo(): Promise<void>;
  /** Byte compressors by codec name (`lz4`, `zstd`): native, so the edge supplies them. */
  blobCodecs?: Readonly<Record<string, BlobCodecFactory>>;
}

export interface MigrationOptions {
  mode: MigrationMode;
  /** Downtime budget for pre-copy's stop condition, ms. Default 300. */
  downtimeMs?: number;
  /**
   * The downtime's fixed part, ms, which pre-copy's stop condition adds to eq. (2) (the dirty pages
   * over the bandwidth): the CPU and device state, round trips, the destination starting the VM.
   * Default 0, the survey's condition. The report's estimatedDowntimeMs beside downtimeMs shows
   * what the model missed.
   */
  fixedDowntimeMs?: number;
  /** Most pre-copy rounds. Default 30. */
  maxRounds?: number;
  /** Stop pre-copy once this × memory has been sent. Default 3. */
  maxSentRatio?: number;
  /** Throttle the vCPU when pre-copy does not converge (QEMU's auto-converge). Default false. */
  autoConverge?: boolean;
  /** Hybrid: most pre-copy rounds before switching to post-copy. Default 3. */
  hybridRounds?: number;
  /** Post-copy pre-paging around faults (Hines' bubbling). Default true. */
  prepaging?: boolean;
  /** Pages per batch (a RUN or BATCH frame) in pre-copy's first pass. Default 1024 (4 MiB raw); with codecs, in later rounds, the stop-and-copy and post-copy's push at most 256. */
  batchPages?: number;
  /** Measure the guest's work rate for this long before starting (degradation baseline), ms. Default 200; 0 skips it. */
  baselineMs?: number;
  /**
   * Codecs to offer beyond zero pages (always on): `xbzrle`, `dedup`, `lz4`, `zstd`. The
   * destination accepts those it can decode. Default none.
   */
  codecs?: readonly CodecName[];
  /** XBZRLE page cache for the whole VM (split over the streams), bytes. Default 64 MiB. */
  xbzrleCacheBytes?: number;
  /** lz4/zstd: `auto` (default) lets a measured controller turn compression off when it makes a stream slower; `always` never turns it off. */
  compression?: 'auto' | 'always';
  /** Data streams (connections carrying pages; the control connection is the first). Default 1; more need `connect`. */
  streams?: number;
  /**
   * Opens another connection to the same destination: a parallel data stream (`data`) or the
   * post-copy fault channel (`fault`). The edge may set them up differently (the node edge sends a
   * data stream's bytes from a thread of its own).
   */
  connect?: (purpose: 'data' | 'fault') => Promise<Connection>;
  /** Post-copy / hybrid: page requests and their answers on a connection of their own (default true when `connect` is given). */
  faultChannel?: boolean;
  /**
   * Opens the fault channel from a thread of its own to the port the destination named (HELLO_ACK
   * faultPort), presenting `token`. Used when the destination names one; if it fails, the fault
   * channel joins through `connect` as without it.
   */
  faultThread?: (port: number, token: string) => Promise<SourceFaultLink>;
  /** Gang migration: VMs migrating together share this de-duplication index (implies the `dedup` codec). */
  gang?: Gang;
  /**
   * A destination silent this long during the handshake (HELLO_ACK, JOIN) fails the migration with
   * ERR_MIGRATION_TIMEOUT, the VM running on here; its VM set-up (ACK of MODULE) gets 4×. Default 30 s.
   */
  handshakeTimeoutMs?: number;
  signal?: AbortSignal;
  onProgress?: (p: MigrationProgress) => void;
}

export type MigrationPhase = 'handshake' | 'precopy' | 'stop-and-copy' | 'postcopy' | 'complete' | 'failed';

export interface MigrationProgress {
  phase: MigrationPhase;
  mode: MigrationMode;
  round: number;
  /** Bytes put on the wire so far. */
  bytesSent: number;
  pagesSent: number;
  /** Pages the engine knows it still has to send (dirty pages, or absent pages in post-copy). */
  pagesRemaining: number;
  /**
   * Measured dirtying rate, bytes/s (pre-copy): distinct pages dirtied in the last round over its
   * duration; during the first pass, those dirtied so far over the time since dirty logging began
   * (0 until counted: a VM that cannot count its dirty pages, or nobody following the progress).
   */
  dirtyRateBytesPerSec: number;
  /** Measured transfer rate, bytes/s. */
  bandwidthBytesPerSec: number;
  elapsedMs: number;
  /**
   * Time left, ms, null while no rate is known. Pre-copy and hybrid: the bytes the stop policy, run
   * forward on what has been measured, still has to send (policy/forecast.ts) over the bandwidth;
   * the stop-and-copy and post-copy's push: the pages left over the rate they go at.
   */
  etaMs: number | null;
  /**
   * `etaMs` counts only what is known to remain — the first pass's rest, before anything is known
   * of the guest's dirtying (no VM that can count its dirty pages, or too early to have) — so the
   * migration takes at least that long.
   */
  etaAtLeast: boolean;
}

export interface MigrationResult {
  report: MigrationReport;
  /** Why pre-copy stopped, or why hybrid switched. */
  stopReason: string;
}
