/**
 * Option parsers for the CLI: each turns one of ferry's named-error parsers into what commander
 * expects, so a bad flag exits 2 with the parser's own message.
 */
import { InvalidArgumentError as CommanderArgError } from 'commander';
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
