/**
 * SVG line charts drawn by hand (no chart library): axes with "nice" ticks, optional log x axis,
 * one polyline per series, a legend. Pure strings, deterministic output.
 */
import { formatBytes, formatDuration } from '../units.js';
import type { ScenarioResult, SweepPoint } from './world.js';

export interface Series {
  name: string;
  points: [number, number][];
}

export interface ChartSpec {
  title: string;
  xLabel: string;
  yLabel: string;
  series: Series[];
  logX?: boolean;
  /** Tick label formatters. */
  formatX?: (v: number) => string;
  formatY?: (v: number) => string;
  width?: number;
  height?: number;
}

const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf'];

const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
const num = (v: number) => (Math.round(v * 100) / 100).toString();

/** Up to ~6 round tick values covering [lo, hi]. */
export function niceTicks(lo: number, hi: number, count = 5): number[] {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? 10 * mag;
  const out: number[] = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
  return out;
}

export function lineChart(spec: ChartSpec): string {
  const W = spec.width ?? 640;
  const H = spec.height ?? 400;
  const m = { l: 78, r: 150, t: 36, b: 52 };
  const pw = W - m.l - m.r;
  const ph = H - m.t - m.b;
  const pts = spec.series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y) && (!spec.logX || x > 0));
  const fx = spec.formatX ?? ((v: number) => String(v));
  const fy = spec.formatY ?? ((v: number) => String(v));
  let x0 = Math.min(...pts.map((p) => p[0]));
  let x1 = Math.max(...pts.map((p) => p[0]));
  const y1raw = Math.max(0, ...pts.map((p) => p[1]));
  if (!pts.length) {
    x0 = 0;
    x1 = 1;
  }
  if (x0 === x1) {
    x0 = spec.logX ? x0 / 2 : x0 - 1;
    x1 = spec.logX ? x1 * 2 : x1 + 1;
  }
  const yTicks = niceTicks(0, y1raw > 0 ? y1raw : 1);
  const y1 = Math.max(yTicks[yTicks.length - 1], y1raw > 0 ? y1raw : 1);
  const tx = (x: number) => m.l + (spec.logX ? (Math.log(x) - Math.log(x0)) / (Math.log(x1) - Math.log(x0)) : (x - x0) / (x1 - x0)) * pw;
  const ty = (y: number) => m.t + ph - (y / y1) * ph;
  let xTicks: number[];
  if (spec.logX) {
    xTicks = [];
    for (let e = Math.floor(Math.log10(x0)); e <= Math.ceil(Math.log10(x1)); e++) for (const k of [1, 2, 5]) {
      const v = k * Math.pow(10, e);
      if (v >= x0 * (1 - 1e-9) && v <= x1 * (1 + 1e-9)) xTicks.push(v);
    }
    if (xTicks.length < 2) xTicks = [x0, x1];
  } else xTicks = niceTicks(x0, x1);
  const o: string[] = [];
  openChart(o, W, H, m, spec.title);
  yGrid(o, yTicks, ty, m, pw, fy);
  for (const v of xTicks) {
    const x = num(tx(v));
    o.push(`<line x1="${x}" y1="${m.t}" x2="${x}" y2="${m.t + ph}" stroke="#f0f0f0"/>`);
    o.push(`<text x="${x}" y="${m.t + ph + 16}" text-anchor="middle">${esc(fx(v))}</text>`);
  }
  o.push(`<rect x="${m.l}" y="${m.t}" width="${pw}" height="${ph}" fill="none" stroke="#333"/>`);
  o.push(`<text x="${m.l + pw / 2}" y="${H - 12}" text-anchor="middle">${esc(spec.xLabel)}</text>`);
  o.push(`<text transform="translate(16 ${m.t + ph / 2}) rotate(-90)" text-anchor="middle">${esc(spec.yLabel)}</text>`);
  spec.series.forEach((s, i) => {
    const c = COLORS[i % COLORS.length];
    const ps = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y) && (!spec.logX || x > 0)).sort((a, b) => a[0] - b[0]);
    if (ps.length > 1) o.push(`<polyline fill="none" stroke="${c}" stroke-width="2" points="${ps.map(([x, y]) => `${num(tx(x))},${num(ty(y))}`).join(' ')}"/>`);
    for (const [x, y] of ps) o.push(`<circle cx="${num(tx(x))}" cy="${num(ty(y))}" r="3" fill="${c}"/>`);
    const ly = m.t + 8 + i * 18;
    o.push(`<line x1="${m.l + pw + 12}" y1="${ly}" x2="${m.l + pw + 32}" y2="${ly}" stroke="${c}" stroke-width="2"/>`);
    o.push(`<text x="${m.l + pw + 38}" y="${ly}" dominant-baseline="middle">${esc(s.name)}</text>`);
  });
  o.push('</svg>');
  return o.join('\n') + '\n';
}

export interface BarChartSpec {
  title: string;
  yLabel: string;
  /** Group labels along x (e.g. metrics). */
  groups: string[];
  /** One bar per series in each group; `values[g]` for group g. */
  series: { name: string; values: number[] }[];
  /** Text above each bar (e.g. the raw value); defaults to the value. */
  labels?: string[][];
  formatY?: (v: number) => string;
  width?: number;
  height?: number;
}

/** Grouped bars. */
export function barChart(spec: BarChartSpec): string {
  const W = spec.width ?? 720;
  const H = spec.height ?? 400;
  const m = { l: 64, r: 150, t: 36, b: 52 };
  const pw = W - m.l - m.r;
  const ph = H - m.t - m.b;
  const fy = spec.formatY ?? ((v: number) => num(v));
  const vmax = Math.max(1e-300, ...spec.series.flatMap((s) => s.values.filter(Number.isFinite)));
  const ticks = niceTicks(0, vmax);
  const y1 = Math.max(ticks[ticks.length - 1], vmax);
  const ty = (y: number) => m.t + ph - (y / y1) * ph;
  const gw = pw / spec.groups.length;
  const bw = (gw * 0.8) / Math.max(1, spec.series.length);
  const o: string[] = [];
  openChart(o, W, H, m, spec.title);
  yGrid(o, ticks, ty, m, pw, fy);
  o.push(`<rect x="${m.l}" y="${m.t}" width="${pw}" height="${ph}" fill="none" stroke="#333"/>`);
  o.push(`<text transform="translate(16 ${m.t + ph / 2}) rotate(-90)" text-anchor="middle">${esc(spec.yLabel)}</text>`);
  spec.groups.forEach((g, gi) => {
    o.push(`<text x="${num(m.l + gw * gi + gw / 2)}" y="${m.t + ph + 16}" text-anchor="middle">${esc(g)}</text>`);
    spec.series.forEach((s, si) => {
      const v = s.values[gi];
      if (!Number.isFinite(v)) return;
      const x = m.l + gw * gi + gw * 0.1 + bw * si;
      o.push(`<rect x="${num(x)}" y="${num(ty(v))}" width="${num(bw * 0.92)}" height="${num(ty(0) - ty(v))}" fill="${COLORS[si % COLORS.length]}"/>`);
      const label = spec.labels?.[si]?.[gi];
      if (label) o.push(`<text x="${num(x + bw * 0.46)}" y="${num(ty(v) - 3)}" text-anchor="middle" font-size="9">${esc(label)}</text>`);
    });
  });
  spec.series.forEach((s, i) => {
    const ly = m.t + 8 + i * 18;
    o.push(`<rect x="${m.l + pw + 12}" y="${ly - 5}" width="20" height="10" fill="${COLORS[i % COLORS.length]}"/>`);
    o.push(`<text x="${m.l + pw + 38}" y="${ly}" dominant-baseline="middle">${esc(s.name)}</text>`);
  });
  o.push('</svg>');
  return o.join('\n') + '\n';
}

const fmtMbit = (v: number) => `${num((v * 8) / 1e6)} Mbit/s`;
const fmtMBs = (v: number) => `${num(v / 1e6)} MB/s`;
const fmtMs = (v: number) => formatDuration(v);

const METRICS: { key: 'totalMigrationTimeMs' | 'downtimeMs' | 'wireBytes'; label: string; fmt: (v: number) => string; file: string }[] = [
  { key: 'totalMigrationTimeMs', label: 'total migration time', fmt: fmtMs, file: 'tmt' },
  { key: 'downtimeMs', label: 'downtime', fmt: fmtMs, file: 'downtime' },
  { key: 'wireBytes', label: 'bytes on the wire', fmt: formatBytes, file: 'bytes' },
];

/** The charts of a scenario's results: per sweep and workload, TMT, downtime and bytes against bandwidth and dirty rate; dirty pages per round. */
export function scenarioCharts(r: ScenarioResult): { file: string; svg: string }[] {
  const out: { file: string; svg: string }[] = [];
  for (const sw of r.sweeps) {
    const workloads = [...new Set(sw.points.map((p) => p.workload))];
    for (const w of workloads) {
      const pts = sw.points.filter((p) => p.workload === w);
      const bws = [...new Set(pts.map((p) => p.bandwidthBytesPerSec))];
      const drs = [...new Set(pts.map((p) => p.dirtyRateBytesPerSec))];
      const axes: { name: string; x: (p: SweepPoint) => number; label: string; fmt: (v: number) => string; group: (p: SweepPoint) => string; logX: boolean }[] = [];
      if (bws.length > 1) axes.push({ name: 'bandwidth', x: (p) => p.bandwidthBytesPerSec, label: 'link bandwidth', fmt: fmtMbit, group: (p) => (drs.length > 1 ? `${p.technique} @ ${fmtMBs(p.dirtyRateBytesPerSec ?? 0)}` : p.technique), logX: true });
      if (drs.length > 1) axes.push({ name: 'dirty-rate', x: (p) => p.dirtyRateBytesPerSec ?? 0, label: 'dirty rate', fmt: fmtMBs, group: (p) => (bws.length > 1 ? `${p.technique} @ ${fmtMbit(p.bandwidthBytesPerSec)}` : p.technique), logX: false });
      if (axes.length === 0) {
        // One point per technique: compare them side by side (each metric relative to the worst), then rounds.
        const metrics: { name: string; v: (p: SweepPoint) => number; fmt: (v: number) => string }[] = [
          { name: 'total migration time', v: (p) => p.totalMigrationTimeMs, fmt: fmtMs },
          { name: 'downtime', v: (p) => p.downtimeMs, fmt: fmtMs },
          { name: 'bytes on the wire', v: (p) => p.wireBytes, fmt: formatBytes },
          { name: 'app slowdown', v: (p) => 1 - (p.degradationRatio ?? 1), fmt: (v) => `${num(v * 100)} %` },
        ];
        const worst = metrics.map((mt) => Math.max(1e-300, ...pts.map(mt.v)));
        out.push({
          file: `${r.name}-${sw.name}-${w}-techniques.svg`,
          svg: barChart({
            title: `${sw.name} / ${w}: techniques compared (lower is better)`,
            yLabel: 'relative to the worst technique',
            groups: metrics.map((mt) => mt.name),
            series: pts.map((p) => ({ name: p.technique, values: metrics.map((mt, i) => mt.v(p) / worst[i]) })),
            labels: pts.map((p) => metrics.map((mt) => mt.fmt(mt.v(p)))),
            formatY: (v) => num(v),
          }),
        });
        const series = pts.filter((p) => p.dirtyPerRound.length).map((p) => ({ name: p.technique, points: p.dirtyPerRound.map((d, i) => [i, d] as [number, number]) }));
        if (series.length) out.push({ file: `${r.name}-${sw.name}-${w}-rounds.svg`, svg: lineChart({ title: `${sw.name} / ${w}: dirty pages per round`, xLabel: 'pre-copy round', yLabel: 'pages dirty at round end', series, formatX: (v) => String(v), formatY: (v) => num(v) }) });
        continue;
      }
      for (const ax of axes) {
        for (const mt of METRICS) {
          const groups = new Map<string, [number, number][]>();
          for (const p of pts) {
            const g = ax.group(p);
            if (!groups.has(g)) groups.set(g, []);
            groups.get(g)!.push([ax.x(p), p[mt.key]]);
          }
          out.push({
            file: `${r.name}-${sw.name}-${w}-${mt.file}-vs-${ax.name}.svg`,
            svg: lineChart({ title: `${w}: ${mt.label} vs ${ax.label}`, xLabel: ax.label, yLabel: mt.label, series: [...groups].map(([name, points]) => ({ name, points })), logX: ax.logX, formatX: ax.fmt, formatY: mt.fmt }),
          });
        }
      }
    }
  }
  const withRounds = r.migrations.filter((m) => m.report.rounds.length);
  if (withRounds.length) {
    out.push({
      file: `${r.name}-rounds.svg`,
      svg: lineChart({ title: `${r.name}: dirty pages per pre-copy round`, xLabel: 'round', yLabel: 'pages dirty at round end', series: withRounds.slice(0, 8).map((m) => ({ name: `${m.vm} (${m.technique})`, points: m.report.rounds.map((x) => [x.round, x.dirtyPages] as [number, number]) })), formatX: (v) => String(v), formatY: (v) => num(v) }),
    });
  }
  return out;
}

type Margins = { l: number; r: number; t: number; b: number };

/** The SVG element, its white background and the title: the start of every chart. */
function openChart(o: string[], W: number, H: number, m: Margins, title: string): void {
  o.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="11">`);
  o.push(`<rect width="${W}" height="${H}" fill="white"/>`);
  o.push(`<text x="${W / 2 - m.r / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">${esc(title)}</text>`);
}

/** Horizontal grid lines with their y-axis labels. */
function yGrid(o: string[], ticks: readonly number[], ty: (y: number) => number, m: Margins, pw: number, fy: (v: number) => string): void {
  for (const v of ticks) {
    const y = num(ty(v));
    o.push(`<line x1="${m.l}" y1="${y}" x2="${m.l + pw}" y2="${y}" stroke="#e5e5e5"/>`);
    o.push(`<text x="${m.l - 6}" y="${y}" text-anchor="end" dominant-baseline="middle">${esc(fy(v))}</text>`);
  }
}
