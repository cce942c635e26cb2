/**
 * Validation and refusal: everything that decides whether ferry can run a guest module, and the
 * facts about it that the rewriter and the VM need.
 */
import { createHash } from 'node:crypto';
import binaryen from 'binaryen';
import { FERRY_IMPORTS, FERRY_IMPORT_MODULE, MAX_GUEST_BYTES, RESERVED_BYTES, WASI_IMPORTS, WASI_IMPORT_MODULE } from '../../../core/abi.js';
import { GuestModuleError } from '../../../core/errors.js';
import { hasNameSection, hasWasmMagic, scanModule } from './sections.js';
import { call, expressionId, forEachExpression, UnsupportedExpressionError } from './walk.js';

/** What the VM needs to know about a guest module (see `instrument.ts`). */
export interface GuestModuleInfo {
  /** sha256 hex of the original module bytes. */
  hash: string;
  /** Declared initial memory in bytes. */
  initialGuestBytes: number;
  /** Declared maximum memory in bytes (null if none). */
  maxGuestBytes: number | null;
  /** Exported mutable globals (`__ferry_g<i>`), in index order. */
  globals: { export: string; type: 'i32' | 'i64' | 'f32' | 'f64' | 'v128' }[];
  initExport: 'init' | '_initialize' | null;
  /** Exports progress(): i64. */
  hasProgress: boolean;
  /** Function imports the runtime must provide (the memory import, if any, is replaced). */
  imports: { module: string; name: string }[];
}

/** Features a guest may use (ferry's Node 20 baseline), set on the binaryen module for writing. */
export const GUEST_FEATURES =
  binaryen.Features.MVP | binaryen.Features.Atomics | binaryen.Features.MutableGlobals |
  binaryen.Features.NontrappingFPToInt | binaryen.Features.SIMD128 | binaryen.Features.BulkMemory |
  binaryen.Features.BulkMemoryOpt | binaryen.Features.SignExt | binaryen.Features.ReferenceTypes |
  binaryen.Features.Multivalue | binaryen.Features.TailCall | binaryen.Features.CallIndirectOverlong;

/** Facts the rewriter needs besides the public info. */
export interface Analysis {
  info: GuestModuleInfo;
  module: binaryen.Module;
  /** The original has a name section: keep names in the output. */
  names: boolean;
  memoryName: string;
  initialPages: number;
  /** Indexes (in binaryen's global order) and internal names of the mutable globals. */
  mutableGlobals: { index: number; name: string }[];
}

const TABLE_MUTATION_IDS = new Map<number, string>([
  [expressionId('TableSet'), 'table.set'], [expressionId('TableGrow'), 'table.grow'], [expressionId('TableFill'), 'table.fill'],
  [expressionId('TableCopy'), 'table.copy'], [expressionId('TableInit'), 'table.init'], [expressionId('ElemDrop'), 'elem.drop'],
]);

const RESERVED_PREFIX = '__ferry_';
const MAX_OFFSET = 2 ** 32 - 1 - RESERVED_BYTES;

const TYPE_NAMES = new Map<number, 'i32' | 'i64' | 'f32' | 'f64' | 'v128'>([
  [binaryen.i32, 'i32'], [binaryen.i64, 'i64'], [binaryen.f32, 'f32'], [binaryen.f64, 'f64'], [binaryen.v128, 'v128'],
]);

function typeName(t: number): string {
  return TYPE_NAMES.get(t) ?? `type#${t}`;
}
function typeList(t: number): string[] {
  return binaryen.expandType(t).map(typeName);
}
function sameList(a: readonly string[], b: readonly string[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

/** Expression kind names by id, for messages. */
const ID_NAMES = new Map<number, string>(
  Object.entries(binaryen as unknown as Record<string, unknown>)
    .filter(([k, v]) => /^_Binaryen\w+Id$/.test(k) && typeof v === 'function' && v.length === 0)
    .map(([k]) => k.slice('_Binaryen'.length, -2))
    .map((kind) => [expressionId(kind), kind]),
);

/** The static memarg offset of an expression binaryen.js offers no getter for (atomic wait/notify). */
export function textOffset(e: number): number {
  const m = /offset=(\d+)/.exec(binaryen.emitText(e).split('\n')[0]);
  return m ? Number(m[1]) : 0;
}

/** The static offset of any memory-access expression, or null if it has none. */
export function memargOffset(e: number): number | null {
  const id = binaryen.getExpressionId(e);
  const cls = id === binaryen.LoadId ? 'Load' : id === binaryen.StoreId ? 'Store' : id === binaryen.AtomicRMWId ? 'AtomicRMW'
    : id === binaryen.AtomicCmpxchgId ? 'AtomicCmpxchg' : id === binaryen.SIMDLoadId ? 'SIMDLoad'
      : id === binaryen.SIMDLoadStoreLaneId ? 'SIMDLoadStoreLane' : null;
  if (cls) return call<number>(cls, 'getOffset', e) >>> 0;
  if (id === binaryen.AtomicWaitId || id === binaryen.AtomicNotifyId) return textOffset(e);
  return null;
}

function refuse(code: string, message: string): never {
  throw new GuestModuleError(code, message);
}

function compileError(bytes: Uint8Array): string {
  try {
    new WebAssembly.Module(bytes as Uint8Array<ArrayBuffer>);
    return 'unknown reason';
  } catch (e) {
    return e instanceof Error ? e.message : String(e);
  }
}

/**
 * Validates `bytes` as a ferry guest and reads the facts the rewriter needs. The returned binaryen
 * module belongs to the caller (dispose it). Throws `GuestModuleError`.
 */
export function analyze(bytes: Uint8Array): Analysis {
  if (!hasWasmMagic(bytes)) refuse('ERR_MODULE_INVALID', 'not a WebAssembly module (missing the \\0asm header)');
  const scan = scanModule(bytes);
  if (scan?.memory64) refuse('ERR_MODULE_MEMORY64', 'the module uses a 64-bit memory (memory64); ferry guests use one 32-bit memory');
  if (scan && scan.memoryCount > 1) refuse('ERR_MODULE_MULTI_MEMORY', `the module has ${scan.memoryCount} memories; ferry guests have exactly one`);
  if (!WebAssembly.validate(bytes as Uint8Array<ArrayBuffer>)) refuse('ERR_MODULE_INVALID', `the module fails WebAssembly validation: ${compileError(bytes)}`);
  if (!scan) refuse('ERR_MODULE_INVALID', 'the module\'s sections could not be read');
  if (scan.memoryCount === 0) refuse('ERR_MODULE_NO_MEMORY', 'the module has no memory; a ferry guest declares (or imports) exactly one');
  for (const imp of scan.imports) {
    if (imp.module.startsWith(RESERVED_PREFIX) || imp.name.startsWith(RESERVED_PREFIX)) {
      refuse('ERR_MODULE_RESERVED_NAME', `import "${imp.module}" "${imp.name}" uses the reserved prefix ${RESERVED_PREFIX}`);
    }
  }

  let module: binaryen.Module;
  try {
    module = binaryen.readBinary(bytes);
  } catch (e) {
    // binaryen.js throws opaque objects; V8 accepted the module, so binaryen lacks a feature it uses.
    refuse('ERR_MODULE_INVALID', `the module uses something the rewriter (binaryen) cannot read: ${e instanceof Error ? e.message : 'parse error'}`);
  }
  try {
    module.setFeatures(GUEST_FEATURES);
    return { ...analyzeModule(module, bytes, scan.imports), names: hasNameSection(bytes) };
  } catch (e) {
    module.dispose();
    throw e;
  }
}

function analyzeModule(module: binaryen.Module, bytes: Uint8Array, imports: { module: string; name: string; kind: string }[]): Omit<Analysis, 'names'> {
  // Globals first: an imported mutable global is reference state even before it is an unknown import.
  const mutableGlobals: { index: number; name: string }[] = [];
  const globals: GuestModuleInfo['globals'] = [];
  for (let i = 0; i < module.getNumGlobals(); i++) {
    const g = binaryen.getGlobalInfo(module.getGlobalByIndex(i));
    if (g.module) {
      if (g.mutable) refuse('ERR_MODULE_REFERENCE_STATE', `the module imports mutable global "${g.module}" "${g.base}"; its value would not migrate`);
      continue;
    }
    if (!g.mutable) continue;
    const type = TYPE_NAMES.get(g.type);
    if (!type) refuse('ERR_MODULE_REFERENCE_STATE', `global ${i} ("${g.name}") is a mutable global of reference type; its value would not migrate`);
    mutableGlobals.push({ index: i, name: g.name });
    globals.push({ export: `__ferry_g${i}`, type });
  }

  const funcImports: { module: string; name: string }[] = [];
  for (const imp of imports) {
    if (imp.kind === 'memory') continue;
    const table = imp.module === FERRY_IMPORT_MODULE ? FERRY_IMPORTS : imp.module === WASI_IMPORT_MODULE ? WASI_IMPORTS : null;
    const sig = table ? (table as Record<string, { params: readonly string[]; results: readonly string[] }>)[imp.name] : undefined;
    if (!sig || !Object.hasOwn(table as object, imp.name)) {
      refuse('ERR_MODULE_UNKNOWN_IMPORT', `unknown import "${imp.module}" "${imp.name}" (${imp.kind}); ferry provides only the ${FERRY_IMPORT_MODULE} and ${WASI_IMPORT_MODULE} imports of docs/guest-abi.md`);
    }
    if (imp.kind !== 'func') {
      refuse('ERR_MODULE_IMPORT_SIGNATURE', `import "${imp.module}" "${imp.name}" is imported as a ${imp.kind}, but it is a function`);
    }
    funcImports.push({ module: imp.module, name: imp.name });
  }

  const exports = new Map<string, { kind: number; value: string }>();
  for (let i = 0; i < module.getNumExports(); i++) {
    const x = binaryen.getExportInfo(module.getExportByIndex(i));
    if (x.name.startsWith(RESERVED_PREFIX)) refuse('ERR_MODULE_RESERVED_NAME', `export "${x.name}" uses the reserved prefix ${RESERVED_PREFIX}`);
    exports.set(x.name, { kind: x.kind, value: x.value });
  }

  const funcType = (name: string): { params: string[]; results: string[] } => {
    const f = binaryen.getFunctionInfo(module.getFunction(name));
    return { params: typeList(f.params), results: typeList(f.results) };
  };
  const run = exports.get('run');
  const runType = run?.kind === binaryen.ExternalFunction ? funcType(run.value) : null;
  if (!runType || !sameList(runType.params, ['i32']) || !sameList(runType.results, ['i32'])) {
    refuse('ERR_MODULE_NO_RUN', runType
      ? `export "run" has type (${runType.params.join(', ')}) -> (${runType.results.join(', ')}); it must be (i32) -> i32`
      : 'the module does not export a function "run" of type (i32) -> i32');
  }
  const isFunc = (name: string, params: string[], results: string[]): boolean => {
    const x = exports.get(name);
    if (x?.kind !== binaryen.ExternalFunction) return false;
    const t = funcType(x.value);
    return sameList(t.params, params) && sameList(t.results, results);
  };
  const initExport = isFunc('init', [], []) ? 'init' : isFunc('_initialize', [], []) ? '_initialize' : null;

  const mem = module.getMemoryInfo();
  const initialGuestBytes = mem.initial * 65536;
  if (initialGuestBytes > MAX_GUEST_BYTES) {
    refuse('ERR_MODULE_MEMORY_TOO_LARGE', `the module declares ${mem.initial} pages (${initialGuestBytes} bytes) of initial memory; ferry guests get at most ${MAX_GUEST_BYTES} bytes`);
  }
  const memoryName = /^\(memory\.size \$(\S+)\)/.exec(binaryen.emitText(module.memory.size()).trim())?.[1];
  if (!memoryName || memoryName.startsWith('"')) refuse('ERR_MODULE_INVALID', 'the module\'s memory has a name ferry cannot handle');

  for (let i = 0; i < module.getNumFunctions(); i++) {
    const f = binaryen.getFunctionInfo(module.getFunctionByIndex(i));
    if (f.name.startsWith(RESERVED_PREFIX)) refuse('ERR_MODULE_RESERVED_NAME', `function "${f.name}" uses the reserved prefix ${RESERVED_PREFIX}`);
    if (f.module) {
      const want = (f.module === FERRY_IMPORT_MODULE ? FERRY_IMPORTS : WASI_IMPORTS) as Record<string, { params: readonly string[]; results: readonly string[] }>;
      const sig = want[f.base ?? ''];
      const have = { params: typeList(f.params), results: typeList(f.results) };
      if (sig && (!sameList(have.params, sig.params) || !sameList(have.results, sig.results))) {
        refuse('ERR_MODULE_IMPORT_SIGNATURE', `import "${f.module}" "${f.base}" has type (${have.params.join(', ')}) -> (${have.results.join(', ')}); ferry provides (${sig.params.join(', ')}) -> (${sig.results.join(', ')})`);
      }
      continue;
    }
    checkBody(f.name, f.body);
  }

  return {
    module,
    memoryName,
    initialPages: mem.initial,
    mutableGlobals,
    info: {
      hash: createHash('sha256').update(bytes).digest('hex'),
      initialGuestBytes,
      maxGuestBytes: mem.max === undefined ? null : mem.max * 65536,
      globals,
      initExport,
      hasProgress: isFunc('progress', [], ['i64']),
      imports: funcImports,
    },
  };
}

function checkBody(func: string, body: number): void {
  if (!body) return;
  try {
    forEachExpression(body, (e) => {
      const id = binaryen.getExpressionId(e);
      const mutation = TABLE_MUTATION_IDS.get(id);
      if (mutation) refuse('ERR_MODULE_TABLE_MUTATION', `function "${func}" uses ${mutation}; table state would not migrate`);
      const off = memargOffset(e);
      if (off !== null && off > MAX_OFFSET) {
        refuse('ERR_MODULE_OFFSET_OVERFLOW', `function "${func}" has a memory access with offset ${off}; ferry adds ${RESERVED_BYTES} to every offset, so offsets above ${MAX_OFFSET} do not fit`);
      }
    });
  } catch (e) {
    if (e instanceof UnsupportedExpressionError) {
      refuse('ERR_MODULE_INVALID', `function "${func}" uses ${ID_NAMES.get(e.id) ?? `expression kind ${e.id}`}, which ferry guests may not use`);
    }
    throw e;
  }
}
