/**
 * The devices' state that does not live in guest memory, as plain JSON (its schema and validation
 * are in state-schema.ts: they need zod, which the vCPU thread does not load — 75 ms of every
 * thread's start; the VM validates state on the host thread before it reaches the vCPU).
 * Byte strings and bitmaps travel as base64 (bitmap words little-endian, trailing zero words
 * dropped), so the state stays compact and bounded:
 *   - rx queue ≤ `rxQueueLimit` bytes (default 16 MiB) of payload,
 *   - soft-page bitmap ≤ 128 KiB (one bit per 4 KiB guest page of a 4 GiB memory),
 *   - block write bitmap ≤ disk size / 32768 bytes,
 *   - console partial line ≤ 64 KiB.
 */
import { Bitmap } from '../../../core/bitmap.js';
import { FerryError } from '../../../core/errors.js';
import type { EncodedBitmap } from './state-schema.js';

export class DeviceStateError extends FerryError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_DEVICE_STATE', message, options);
  }
}

export type { DeviceState, EncodedBitmap } from './state-schema.js';

export function toBase64(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('base64');
}

export function fromBase64(text: string): Uint8Array {
  return new Uint8Array(Buffer.from(text, 'base64'));
}

/** `bm` as state; `words`: how many of its words may hold a set bit (a bound the caller knows; default all). */
export function encodeBitmap(bm: Bitmap, words = bm.words.length): EncodedBitmap {
  let n = Math.min(words, bm.words.length);
  while (n > 0 && bm.words[n - 1] === 0) n--;
  const bytes = new Uint8Array(n * 4);
  const dv = new DataView(bytes.buffer);
  for (let i = 0; i < n; i++) dv.setUint32(i * 4, bm.words[i], true);
  return { size: bm.size, words: toBase64(bytes) };
}

export function decodeBitmap(enc: EncodedBitmap, expectedSize: number, what: string): Bitmap {
  if (enc.size !== expectedSize) throw new DeviceStateError(`${what} bitmap has ${enc.size} bits, expected ${expectedSize}`);
  const bm = new Bitmap(expectedSize);
  const bytes = fromBase64(enc.words);
  if (bytes.length % 4 !== 0 || bytes.length / 4 > bm.words.length) throw new DeviceStateError(`${what} bitmap words are malformed`);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let i = 0; i < bytes.length / 4; i++) bm.words[i] = dv.getUint32(i * 4, true);
  const tail = expectedSize & 31;
  if (tail && bm.words.length > 0 && (bm.words[bm.words.length - 1] >>> tail) !== 0) throw new DeviceStateError(`${what} bitmap has bits beyond its size`);
  return bm;
}
