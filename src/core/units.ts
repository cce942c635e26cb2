import { InvalidArgumentError } from './errors.js';

const SIZE_UNITS: Record<string, number> = {
  b: 1, k: 1e3, kb: 1e3, m: 1e6, mb: 1e6, g: 1e9, gb: 1e9,
  kib: 1024, mib: 1024 ** 2, gib: 1024 ** 3, tib: 1024 ** 4,
};

/** Parses a byte size: `4096`, `512MiB`, `1.5GiB`, `64kb`. */
export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(String(text));
  const unit = m ? (m[2] || 'b').toLowerCase() : '';
  const mult = SIZE_UNITS[unit];
  if (!m || mult === undefined) throw new InvalidArgumentError(`invalid ${what} '${text}' (expected e.g. 512MiB, 1GiB, 4096)`);
  const v = Math.round(Number(m[1]) * mult);
  if (!Number.isSafeInteger(v)) throw new InvalidArgumentError(`${what} '${text}' is too large`);
  return v;
}

const DURATION_UNITS: Record<string, number> = { us: 1e-3, µs: 1e-3, ms: 1, s: 1000, m: 60_000, min: 60_000, h: 3_600_000 };

/** Parses a duration into milliseconds: `300ms`, `2s`, `1.5m`, `250us`. A bare number is milliseconds. */
export function parseDuration(text: string, what = 'duration'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Zµ]*)\s*$/.exec(String(text));
  const mult = m ? DURATION_UNITS[(m[2] || 'ms').toLowerCase()] : undefined;
  if (!m || mult === undefined) throw new InvalidArgumentError(`invalid ${what} '${text}' (expected e.g. 300ms, 2s)`);
  return Number(m[1]) * mult;
}

const RATE_UNITS: Record<string, number> = {
  bit: 1 / 8, kbit: 1e3 / 8, mbit: 1e6 / 8, gbit: 1e9 / 8,
  bps: 1 / 8, kbps: 1e3 / 8, mbps: 1e6 / 8, gbps: 1e9 / 8,
  'b/s': 1, 'kb/s': 1e3, 'mb/s': 1e6, 'gb/s': 1e9, 'kib/s': 1024, 'mib/s': 1024 ** 2, 'gib/s': 1024 ** 3,
};

/** Parses a bandwidth into bytes per second: `1Gbit`, `100Mbit`, `50MB/s`, `1GiB/s`. */
export function parseBandwidth(text: string, what = 'bandwidth'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z/]+)\s*$/.exec(String(text));
  const mult = m ? RATE_UNITS[m[2].toLowerCase()] : undefined;
  if (!m || mult === undefined) throw new InvalidArgumentError(`invalid ${what} '${text}' (expected e.g. 1Gbit, 100Mbit, 50MB/s)`);
  const v = Number(m[1]) * mult;
  if (!(v > 0)) throw new InvalidArgumentError(`${what} '${text}' must be positive`);
  return v;
}

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${i === 0 ? v : v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2)} ${units[i]}`;
}

export function formatDuration(ms: number): string {
  if (ms < 1) return `${(ms * 1000).toFixed(0)} µs`;
  if (ms < 1000) return `${ms.toFixed(ms < 10 ? 2 : 1)} ms`;
  return `${(ms / 1000).toFixed(2)} s`;
}
