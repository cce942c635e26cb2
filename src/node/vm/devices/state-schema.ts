/**
 * The schema of the devices' state (state.ts) and its validation, with zod. Loaded on the host
 * thread only: the VM validates state here before the vCPU thread sees it.
 */
import { z } from 'zod';
import { DeviceStateError } from './state.js';

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

/**
 * A device state with every optional part present (a ring, a pending record, a block device), for
 * warmDeviceStateValidation.
 */
export const SAMPLE_DEVICE_STATE: DeviceState = {
  version: 1,
  clock: { ns: '0', realtimeBaseNs: '0' },
  net: { ring: { base: 0, size: 0 }, failed: false, rx: [{ conn: 0, type: 1, payload: '' }] },
  block: { path: '', sizeBytes: 0, written: { size: 0, words: '' } },
  soft: { size: 0, words: '' },
  console: { partial: '' },
};
let validationWarm = false;

/**
 * Validates a sample state once per thread, so that the first real validation is not a cold one.
 * Why: zod builds its checks on first use; the first parseDeviceState in a process took 6-7 ms,
 * later ones 0.2-0.3 ms (measured here). A destination validates the arriving state when STATE
 * comes, inside the downtime, so every host's first incoming migration paid it.
 */
export function warmDeviceStateValidation(): void {
  if (validationWarm) return;
  validationWarm = true;
  parseDeviceState(SAMPLE_DEVICE_STATE);
}

export function parseDeviceState(state: unknown): DeviceState {
  const r = deviceStateSchema.safeParse(state);
  if (!r.success) {
    const issue = r.error.issues[0];
    throw new DeviceStateError(`invalid device state: ${issue ? `${issue.path.join('.') || '(root)'}: ${issue.message}` : 'malformed'}`, { cause: r.error });
  }
  return r.data;
}
