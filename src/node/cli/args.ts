/**
 * Option parsers for the CLI: each turns one of ferry's named-error parsers into what commander
 * expects, so a bad flag exits 2 with the parser's own message.
 */
import { InvalidArgumentError as CommanderArgError } from 'commander';
import { CODEC_NAMES, parseCodecNames, type CodecName } from '../../core/engine/codecs.js';
import { parseBandwidth, parseDuration, parseSize } from '../../core/units.js';
import { parseHostPort } from '../net/expose.js';

export function flag<T>(parse: (v: string) => T): (v: string) => T {
  return (v) => {
    try {
      return parse(v);
    } catch (e) {
      throw new CommanderArgError((e as Error).message);
    }
  };
}

/** A size, validated and kept as text (`512MiB`). */
export const sizeText = (what: string) => flag((v) => (parseSize(v, what), v));
/** A size in bytes. */
export const sizeBytes = (what: string) => flag((v) => parseSize(v, what));
/** A duration in milliseconds. */
export const durationMs = (what: string) => flag((v) => parseDuration(v, what));
/** `host:port`, validated and kept as text. */
export const addressText = flag((v) => (parseHostPort(v), v));
/** A bandwidth, validated and kept as text (`1Gbit`). */
export const bandwidthText = flag((v) => (parseBandwidth(v), v));
export const positiveInt = (what: string) => flag((v) => {
  const n = Number(v);
  if (!Number.isInteger(n) || n <= 0) throw new Error(`${what} must be a positive integer`);
  return n;
});
/** An integer in [min, max]. */
export const intInRange = (what: string, min: number, max: number) => flag((v) => {
  const n = Number(v);
  if (!/^\d+$/.test(v) || !Number.isInteger(n) || n < min || n > max) throw new Error(`${what} must be an integer from ${min} to ${max}, got '${v}'`);
  return n;
});
/** Codec names separated by commas (`xbzrle,dedup,zstd`), or `none`. */
export const codecList = flag((v): CodecName[] => {
  if (v.trim() === 'none') return [];
  const names = v.split(',').map((s) => s.trim());
  if (names.some((n) => n === '')) throw new Error(`--codecs wants names separated by commas (${CODEC_NAMES.join(', ')}) or none, got '${v}'`);
  return parseCodecNames(names);
});
/** A gang name: 1–64 printable ASCII characters. */
export const gangName = flag((v) => {
  if (!/^[\x21-\x7e]{1,64}$/.test(v)) throw new Error(`gang name '${v}' must be 1–64 printable ASCII characters without spaces`);
  return v;
});
