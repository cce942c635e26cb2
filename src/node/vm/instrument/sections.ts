/**
 * A minimal reader of the wasm binary's section layout, for the two things binaryen.js cannot tell
 * us: how many memories a module has (and whether any is 64-bit) before validation rejects it with a
 * vaguer message, and how to drop the start section from binaryen's output (binaryen.js has no way
 * to clear a start function).
 */

const MAGIC = [0x00, 0x61, 0x73, 0x6d];
const SECTION_IMPORT = 2;
const SECTION_MEMORY = 5;
const SECTION_START = 8;

export interface Section { id: number; start: number; end: number; headerStart: number }

export interface ImportEntry { module: string; name: string; kind: 'func' | 'table' | 'memory' | 'global' | 'tag' }
export interface ModuleScan { imports: ImportEntry[]; memoryCount: number; memory64: boolean }

class Reader {
  pos: number;
  constructor(readonly bytes: Uint8Array, pos = 0) { this.pos = pos; }
  byte(): number {
    if (this.pos >= this.bytes.length) throw new RangeError('unexpected end of module');
    return this.bytes[this.pos++];
  }
  /** Unsigned LEB128, up to 64 bits (returned as a number; precision beyond 2^53 is irrelevant here). */
  uleb(): number {
    let result = 0;
    let scale = 1;
    for (let i = 0; i < 10; i++) {
      const b = this.byte();
      result += (b & 0x7f) * scale;
      if ((b & 0x80) === 0) return result;
      scale *= 128;
    }
    throw new RangeError('LEB128 too long');
  }
  skip(n: number): void {
    if (this.pos + n > this.bytes.length) throw new RangeError('unexpected end of module');
    this.pos += n;
  }
  name(): string {
    const n = this.uleb();
    const s = new TextDecoder().decode(this.bytes.subarray(this.pos, this.pos + n));
    this.skip(n);
    return s;
  }
}

export function hasWasmMagic(bytes: Uint8Array): boolean {
  return bytes.length >= 8 && MAGIC.every((b, i) => bytes[i] === b);
}

/** The module's sections in order; throws RangeError on a truncated module. */
export function sections(bytes: Uint8Array): Section[] {
  const r = new Reader(bytes, 8);
  const out: Section[] = [];
  while (r.pos < bytes.length) {
    const headerStart = r.pos;
    const id = r.byte();
    const size = r.uleb();
    const start = r.pos;
    r.skip(size);
    out.push({ id, start, end: start + size, headerStart });
  }
  return out;
}

/** Limits: flags, min, optional max. Returns whether the memory64 flag is set. */
function readLimits(r: Reader): boolean {
  const flags = r.uleb();
  r.uleb();
  if (flags & 1) r.uleb();
  if (flags & 8) r.uleb(); // custom page size (log2)
  return (flags & 4) !== 0;
}

function skipValType(r: Reader): void {
  const t = r.byte();
  if (t === 0x63 || t === 0x64) r.uleb(); // (ref null? ht): heap type as s33; uleb skips it as well
}

/**
 * Lists the imports and counts memories (imported and defined), noting memory64. Returns null if
 * the module holds something this reader does not understand (the caller then relies on validation).
 */
export function scanModule(bytes: Uint8Array): ModuleScan | null {
  const imports: ImportEntry[] = [];
  let memoryCount = 0;
  let memory64 = false;
  try {
    for (const s of sections(bytes)) {
      const r = new Reader(bytes, s.start);
      if (s.id === SECTION_IMPORT) {
        const n = r.uleb();
        for (let i = 0; i < n; i++) {
          const module = r.name();
          const name = r.name();
          const kind = r.byte();
          if (kind === 0) { r.uleb(); imports.push({ module, name, kind: 'func' }); }
          else if (kind === 1) { skipValType(r); readLimits(r); imports.push({ module, name, kind: 'table' }); }
          else if (kind === 2) { memoryCount++; memory64 ||= readLimits(r); imports.push({ module, name, kind: 'memory' }); }
          else if (kind === 3) { skipValType(r); r.byte(); imports.push({ module, name, kind: 'global' }); }
          else if (kind === 4) { r.byte(); r.uleb(); imports.push({ module, name, kind: 'tag' }); }
          else return null;
        }
      } else if (s.id === SECTION_MEMORY) {
        const n = r.uleb();
        for (let i = 0; i < n; i++) { memoryCount++; memory64 ||= readLimits(r); }
      }
    }
  } catch {
    return null;
  }
  return { imports, memoryCount, memory64 };
}

/** Whether the module carries a `name` custom section (function names for stack traces). */
export function hasNameSection(bytes: Uint8Array): boolean {
  try {
    return sections(bytes).some((s) => s.id === 0 && new Reader(bytes, s.start).name() === 'name');
  } catch {
    return false;
  }
}

/** The module without its start section (binaryen.js cannot remove a start function). */
export function stripStartSection(bytes: Uint8Array): Uint8Array {
  const start = sections(bytes).find((s) => s.id === SECTION_START);
  if (!start) return bytes;
  const out = new Uint8Array(bytes.length - (start.end - start.headerStart));
  out.set(bytes.subarray(0, start.headerStart), 0);
  out.set(bytes.subarray(start.end), start.headerStart);
  return out;
}
