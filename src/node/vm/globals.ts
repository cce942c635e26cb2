/**
 * CPU state: the guest's mutable globals, exported by the rewriter as `__ferry_g<i>`.
 * Encoded for snapshots and the wire as strings that keep every bit (i64 as decimal, floats as the
 * hex of their IEEE bits), because JSON numbers can't carry 64-bit integers or NaN payloads.
 */
import { FerryError } from '../../core/errors.js';

export type GlobalType = 'i32' | 'i64' | 'f32' | 'f64' | 'v128';
export interface GlobalDesc { export: string; type: GlobalType }
export type GlobalValue = number | bigint;

export class GlobalStateError extends FerryError {
  constructor(message: string) {
    super('ERR_GLOBAL_STATE', message);
  }
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);
const f64 = new Float64Array(1);
const u64 = new BigUint64Array(f64.buffer);

export function encodeGlobals(descs: GlobalDesc[], values: GlobalValue[]): string[] {
  return descs.map((d, i) => {
    const v = values[i];
    switch (d.type) {
      case 'i32': return String((v as number) | 0);
      case 'i64': return String(v as bigint);
      case 'f32': f32[0] = v as number; return u32[0].toString(16);
      case 'f64': f64[0] = v as number; return u64[0].toString(16);
      default: throw new GlobalStateError(`global ${d.export} has type ${d.type}, which cannot be saved`);
    }
  });
}

export function decodeGlobals(descs: GlobalDesc[], encoded: unknown): GlobalValue[] {
  if (!Array.isArray(encoded) || encoded.length !== descs.length) {
    throw new GlobalStateError(`expected ${descs.length} globals, got ${Array.isArray(encoded) ? encoded.length : typeof encoded}`);
  }
  return descs.map((d, i) => {
    const s = encoded[i];
    if (typeof s !== 'string' || s.length > 24) throw new GlobalStateError(`global ${i} is not an encoded value`);
    try {
      switch (d.type) {
        case 'i32': { if (!/^-?\d+$/.test(s)) throw new Error(); const n = Number(s); if (n !== (n | 0)) throw new Error(); return n; }
        case 'i64': { if (!/^-?\d+$/.test(s)) throw new Error(); const b = BigInt(s); return BigInt.asIntN(64, b) === b ? b : (() => { throw new Error(); })(); }
        case 'f32': { if (!/^[0-9a-f]{1,8}$/.test(s)) throw new Error(); u32[0] = parseInt(s, 16); return f32[0]; }
        case 'f64': { if (!/^[0-9a-f]{1,16}$/.test(s)) throw new Error(); u64[0] = BigInt('0x' + s); return f64[0]; }
        default: throw new Error();
      }
    } catch {
      throw new GlobalStateError(`global ${i} (${d.type}) has an invalid value '${s}'`);
    }
  });
}
