/**
 * The loader/instrumenter: validates a guest module and rewrites it with binaryen into the three
 * variants of docs/guest-abi.md ("Rewriting"), which share one memory layout (src/core/abi.ts):
 *
 * - all variants: the memory becomes the shared import `ferry_rt.memory`, declared
 *   (RESERVED_WASM_PAGES + guest initial pages, max 65536); guest address `a` is physical
 *   `a + RESERVED_BYTES` (memarg offsets; bulk operands and atomic wait/notify go through a helper
 *   that traps past 4 GiB); memory.size/grow speak guest pages; mutable globals are exported as
 *   `__ferry_g<i>`; data segments become passive and `__ferry_boot` applies them, then runs the
 *   original start function (whose section is removed). Code that memory.inits from an originally
 *   active segment reads an empty one, as it would after instantiation, booted or not.
 * - dirty: after every write, the dirty-map byte of its first and last 4 KiB page is set to 1
 *   (bulk writes, and boot's segments: every page in range). Growing memory marks nothing.
 * - presence: before every access, the presence bytes of its first and last page (bulk: every page
 *   of every range, unless the op is out of bounds and will trap) are checked; absent pages are
 *   reported to the `ferry_rt.fault(page)` import, which blocks until the page is present. Memory
 *   the guest grows into is marked present: it never existed on the source.
 *
 * The rewritten modules keep the guest's name section if it had one (names in trap stacks).
 */
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { BugIndicatingError, GuestModuleError } from '../../core/errors.js';
import { analyze } from './instrument/inspect.js';
import type { GuestModuleInfo } from './instrument/inspect.js';
import { rewrite } from './instrument/rewrite.js';
import type { Variant } from './instrument/rewrite.js';
import { instrumentThread, type InstrumentThread } from './instrument-thread.js';

export type { GuestModuleInfo } from './instrument/inspect.js';
export type { Variant } from './instrument/rewrite.js';

/** Part of every cache key: bump it whenever the rewritten output changes. */
export const REWRITER_VERSION = 4;

export const VARIANTS: readonly Variant[] = ['plain', 'dirty', 'presence'];

export interface InstrumentedModule {
  variant: Variant;
  /** The rewritten module. */
  bytes: Uint8Array;
  module: WebAssembly.Module;
  info: GuestModuleInfo;
}

/** Validates a guest module; throws `GuestModuleError` naming the rule it breaks. */
export function inspectGuest(bytes: Uint8Array): GuestModuleInfo {
  const a = withStack(() => analyze(bytes));
  a.module.dispose();
  return a.info;
}

/**
 * binaryen recurses over expression trees; code nested several thousand levels deep (a huge
 * switch, say) exhausts the JS stack. That is a property of the module, so it is reported as one.
 */
function withStack<T>(fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    if (e instanceof RangeError && /call stack/i.test(e.message)) {
      throw new GuestModuleError('ERR_MODULE_INVALID', 'the module\'s code nests too deeply for the rewriter (binaryen ran out of stack)', { cause: e });
    }
    throw e;
  }
}

/** Validates and rewrites a guest module into `variant`. Throws `GuestModuleError`. */
export function instrument(bytes: Uint8Array, variant: Variant): InstrumentedModule {
  if (!VARIANTS.includes(variant)) throw new BugIndicatingError(`unknown variant ${String(variant)}`);
  const a = withStack(() => analyze(bytes));
  let out: Uint8Array;
  try {
    out = withStack(() => rewrite(a, variant));
  } finally {
    a.module.dispose();
  }
  return { variant, bytes: out, module: compile(out, variant), info: a.info };
}

function compile(bytes: Uint8Array, variant: Variant): WebAssembly.Module {
  try {
    return new WebAssembly.Module(bytes as Uint8Array<ArrayBuffer>);
  } catch (e) {
    throw new BugIndicatingError(`the ${variant} rewrite produced an invalid module`, { cause: e });
  }
}

export interface InstrumentCacheInit {
  /** Directory for a content-addressed on-disk cache (created if missing). */
  dir?: string;
}

interface DiskEntry { version: number; variant: Variant; sha256: string; info: GuestModuleInfo }

/**
 * Memoizes `instrument`. Keys are the SHA-256 of the original bytes, the variant and
 * REWRITER_VERSION; with a `dir`, results persist across processes and a disk hit skips binaryen.
 */
export class InstrumentCache {
  private readonly dir: string | null;
  private readonly memory = new Map<string, InstrumentedModule>();

  constructor(init: InstrumentCacheInit = {}) {
    this.dir = init.dir ?? null;
    if (this.dir) mkdirSync(this.dir, { recursive: true });
  }

  get(bytes: Uint8Array, variant: Variant): InstrumentedModule {
    const hash = createHash('sha256').update(bytes).digest('hex');
    const key = `${hash}-${variant}-v${REWRITER_VERSION}`;
    let hit = this.memory.get(key);
    if (!hit) {
      hit = this.fromDisk(key, hash, variant) ?? this.toDisk(key, instrument(bytes, variant));
      this.memory.set(key, hit);
    }
    return hit;
  }

  /**
   * Makes `get` of these variants a hit, rewriting what is missing on the instrumenting thread
   * (instrument-thread.ts) instead of this one: call it before Vm.create where this thread must
   * stay responsive (a host's). Rejects with GuestModuleError as `get` would throw it; what the
   * thread cannot do is left to `get`.
   */
  async prepare(bytes: Uint8Array, variants: readonly Variant[], thread: InstrumentThread = instrumentThread()): Promise<void> {
    const hash = createHash('sha256').update(bytes).digest('hex');
    await Promise.all(variants.map(async (variant) => {
      const key = `${hash}-${variant}-v${REWRITER_VERSION}`;
      if (this.memory.has(key)) return;
      const disk = this.fromDisk(key, hash, variant);
      if (disk) {
        this.memory.set(key, disk);
        return;
      }
      const m = await thread.run(bytes, variant);
      if (m && !this.memory.has(key)) this.memory.set(key, this.toDisk(key, m));
    }));
  }

  private fromDisk(key: string, hash: string, variant: Variant): InstrumentedModule | null {
    if (!this.dir) return null;
    let entry: DiskEntry;
    let out: Uint8Array;
    try {
      entry = JSON.parse(readFileSync(join(this.dir, `${key}.json`), 'utf8')) as DiskEntry;
      out = new Uint8Array(readFileSync(join(this.dir, `${key}.wasm`)));
    } catch {
      return null;
    }
    // A torn or altered entry is a miss, not an error: it is rebuilt and overwritten.
    if (entry.version !== REWRITER_VERSION || entry.variant !== variant || entry.info?.hash !== hash) return null;
    if (createHash('sha256').update(out).digest('hex') !== entry.sha256) return null;
    return { variant, bytes: out, module: compile(out, variant), info: entry.info };
  }

  private toDisk(key: string, m: InstrumentedModule): InstrumentedModule {
    if (!this.dir) return m;
    const entry: DiskEntry = { version: REWRITER_VERSION, variant: m.variant, sha256: createHash('sha256').update(m.bytes).digest('hex'), info: m.info };
    // Write-then-rename so a concurrent reader never sees half a file; the .json goes last.
    const tmp = `.${process.pid}-${Math.random().toString(36).slice(2)}`;
    writeFileSync(join(this.dir, `${key}.wasm${tmp}`), m.bytes);
    renameSync(join(this.dir, `${key}.wasm${tmp}`), join(this.dir, `${key}.wasm`));
    writeFileSync(join(this.dir, `${key}.json${tmp}`), JSON.stringify(entry));
    renameSync(join(this.dir, `${key}.json${tmp}`), join(this.dir, `${key}.json`));
    return m;
  }
}
