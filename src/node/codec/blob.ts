/**
 * lz4 and zstd blob codecs (native bindings `lz4-napi`, `zstd-napi`) for whole packed batches.
 *
 * Both blobs start with the raw length as a u32 LE (lz4_flex's own size prefix for lz4; ours for
 * zstd), which the decoder checks against `maxRawBytes` before the native code allocates anything,
 * and then insists the output has exactly that length. Native failures become `ERR_CODEC_CORRUPT`
 * with the binding's error as `cause`.
 */
import { createRequire } from 'node:module';
import { CodecErrorCode, DEFAULT_BATCH_BYTES, DEFAULT_CODEC_IDS, codecFail, type BlobCodec } from '../../core/codec/codec.js';

const require = createRequire(import.meta.url);

interface Lz4Binding {
  compressSync(data: Buffer): Buffer;
  uncompressSync(data: Uint8Array): Buffer;
}
interface ZstdBinding {
  CCtx: new () => { compress(dst: Uint8Array, src: Uint8Array, level: number): number };
  DCtx: new () => { decompress(dst: Uint8Array, src: Uint8Array): number };
  compressBound(size: number): number;
  getFrameContentSize(frame: Uint8Array): number | null;
}

let lz4Binding: Lz4Binding | undefined;
let zstdBinding: ZstdBinding | undefined;
const lz4Native = () => (lz4Binding ??= require('lz4-napi') as Lz4Binding);
const zstdNative = () => (zstdBinding ??= require('zstd-napi/binding.js') as ZstdBinding);

/** Default cap on a blob's raw size: a 1 MiB batch of pages plus its packing overhead. */
export const DEFAULT_MAX_RAW_BYTES = DEFAULT_BATCH_BYTES + 64 * 1024;

export interface BlobInit {
  /** Wire id. */
  id?: number;
  /** Largest raw input / output (default DEFAULT_MAX_RAW_BYTES). */
  maxRawBytes?: number;
}

function rawLength(blob: Uint8Array, name: string, max: number): number {
  if (blob.length < 4) codecFail(CodecErrorCode.CORRUPT, `${name} blob is ${blob.length} bytes, shorter than its length prefix`);
  const n = new DataView(blob.buffer, blob.byteOffset, blob.byteLength).getUint32(0, true);
  if (n > max) codecFail(CodecErrorCode.LIMIT, `${name} blob declares ${n} raw bytes (limit ${max})`);
  return n;
}

function checkInput(raw: Uint8Array, name: string, max: number): void {
  if (raw.length > max) throw new RangeError(`${name}: ${raw.length} raw bytes (limit ${max})`);
}

const asBuffer = (u: Uint8Array) => Buffer.from(u.buffer, u.byteOffset, u.byteLength);

/** lz4 (lz4_flex block format with size prefix) — fast, modest ratio. */
export function lz4(init: BlobInit = {}): BlobCodec {
  const name = 'lz4';
  const max = init.maxRawBytes ?? DEFAULT_MAX_RAW_BYTES;
  return {
    name,
    id: init.id ?? DEFAULT_CODEC_IDS.lz4,
    maxRawBytes: max,
    compress(raw) {
      checkInput(raw, name, max);
      const out = lz4Native().compressSync(asBuffer(raw));
      return out.length < raw.length ? new Uint8Array(out.buffer, out.byteOffset, out.length) : null;
    },
    decompress(blob) {
      const n = rawLength(blob, name, max);
      let out: Buffer;
      try {
        out = lz4Native().uncompressSync(blob);
      } catch (e) {
        return codecFail(CodecErrorCode.CORRUPT, `lz4 blob does not decompress`, e);
      }
      if (out.length !== n) codecFail(CodecErrorCode.CORRUPT, `lz4 blob decompressed to ${out.length} bytes, declared ${n}`);
      return new Uint8Array(out.buffer, out.byteOffset, out.length);
    },
  };
}

export interface ZstdInit extends BlobInit {
  /** Compression level (default 1; FINDINGS measured ~430 MB/s on text at level 1). */
  level?: number;
}

/** zstd — better ratio, slower. One frame with its content size, after our u32 raw length. */
export function zstd(init: ZstdInit = {}): BlobCodec {
  const name = 'zstd';
  const max = init.maxRawBytes ?? DEFAULT_MAX_RAW_BYTES;
  const level = init.level ?? 1;
  let cctx: InstanceType<ZstdBinding['CCtx']> | undefined;
  let dctx: InstanceType<ZstdBinding['DCtx']> | undefined;
  // Where each batch is compressed, allocated once: a fresh, zeroed 1 MiB output per batch was
  // external memory that kept V8 collecting garbage during a post-copy push.
  let scratch: Uint8Array | undefined;
  return {
    name,
    id: init.id ?? DEFAULT_CODEC_IDS.zstd,
    maxRawBytes: max,
    compress(raw) {
      checkInput(raw, name, max);
      const z = zstdNative();
      cctx ??= new z.CCtx();
      const need = 4 + z.compressBound(raw.length);
      if (!scratch || scratch.length < need) scratch = new Uint8Array(Math.max(need, 4 + z.compressBound(max)));
      new DataView(scratch.buffer).setUint32(0, raw.length, true);
      const n = cctx.compress(scratch.subarray(4, need), raw, level);
      return 4 + n < raw.length ? scratch.slice(0, 4 + n) : null;
    },
    decompress(blob) {
      const n = rawLength(blob, name, max);
      const z = zstdNative();
      const frame = blob.subarray(4);
      let size: number | null;
      try {
        size = z.getFrameContentSize(frame);
      } catch (e) {
        return codecFail(CodecErrorCode.CORRUPT, 'zstd frame header is invalid', e);
      }
      if (size !== n) codecFail(CodecErrorCode.CORRUPT, `zstd frame holds ${size ?? 'an unknown number of'} bytes, declared ${n}`);
      const out = new Uint8Array(n);
      dctx ??= new z.DCtx();
      let got: number;
      try {
        got = dctx.decompress(out, frame);
      } catch (e) {
        return codecFail(CodecErrorCode.CORRUPT, 'zstd frame does not decompress', e);
      }
      if (got !== n) codecFail(CodecErrorCode.CORRUPT, `zstd frame decompressed to ${got} bytes, declared ${n}`);
      return out;
    },
  };
}

/** The blob codecs this edge supplies to the migration engine (EngineDeps.blobCodecs), by codec name. */
export function nodeBlobCodecs(): Record<string, (id: number) => BlobCodec> {
  return { lz4: (id) => lz4({ id }), zstd: (id) => zstd({ id }) };
}
