/**
 * The devices' state that does not live in guest memory, as plain JSON, and its validation.
 * Byte strings and bitmaps travel as base64 (bitmap words little-endian, trailing zero words
 * dropped), so the state stays compact and bounded:
 *   - rx queue ≤ `rxQueueLimit` bytes (default 16 MiB) of payload,
 *   - soft-page bitmap ≤ 128 KiB (one bit per 4 KiB guest page of a 4 GiB memory),
 *   - block write bitmap ≤ disk size / 32768 bytes,
 *   - console partial line ≤ 64 KiB.
 */
import { z } from 'zod';
import { Bitmap } from '../../../core/bitmap.js';
import { FerryError } from '../../../core/errors.js';

export class DeviceStateError extends FerryError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_DEVICE_STATE', message, options);
  }
}

const u32 = z.number().int().min(0).max(0xffffffff);
const decimalBigint = z.string().regex(/^\d{1,20}$/);
const base64 = z.string().regex(/^[A-Za-z0-9+/]*={0,2}$/);
const bitmapSchema = z.object({ size: z.number().int().min(0).max(2 ** 40), words: base64 }).strict();

export const deviceStateSchema = z.object({
  version: z.literal(1),
  clock: z.object({
    /** Guest monotonic clock (ns) at export, decimal. */
    ns: decimalBigint,
    /** Wall-clock ns at cold boot; WASI realtime = this + guest clock. */
    realtimeBaseNs: decimalBigint,
  }).strict(),
  net: z.object({
    ring: z.object({ base: u32, size: u32 }).strict().nullable(),
    /** The guest corrupted its rings; the device no longer touches them. */
    failed: z.boolean(),
    /** Host→guest records not yet in the rx ring, oldest first. */
    rx: z.array(z.object({ conn: u32, type: z.number().int().min(1).max(3), payload: base64 }).strict()),
  }).strict(),
  block: z.object({
    path: z.string(),
    sizeBytes: z.number().int().min(0),
    written: bitmapSchema,
  }).strict().nullable(),
  soft: bitmapSchema,
  console: z.object({ partial: base64 }).strict(),
}).strict();

export type DeviceState = z.infer<typeof deviceStateSchema>;
export type EncodedBitmap = z.infer<typeof bitmapSchema>;

export function toBase64(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('base64');
}

export function fromBase64(text: string): Uint8Array {
  return new Uint8Array(Buffer.from(text, 'base64'));
}

export function encodeBitmap(bm: Bitmap): EncodedBitmap {
  let n = bm.words.length;
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

export function parseDeviceState(state: unknown): DeviceState {
  const r = deviceStateSchema.safeParse(state);
  if (!r.success) {
    const issue = r.error.issues[0];
    throw new DeviceStateError(`invalid device state: ${issue ? `${issue.path.join('.') || '(root)'}: ${issue.message}` : 'malformed'}`, { cause: r.error });
  }
  return r.data;
}
