/**
 * Scenario files (JSON or YAML): hosts, links, VMs, workloads, migrations and sweeps, validated
 * with zod. Sizes, rates and durations are written as in the CLI (`4GiB`, `1Gbit`, `300ms`) or as
 * plain numbers (bytes, bytes/s, ms). Every problem is a {@link ScenarioError} naming its path.
 * docs/simulator.md documents the format with examples.
 */
import { parse as parseYaml } from 'yaml';
import { z } from 'zod';
import { FerryError } from '../errors.js';
import { parseBandwidth, parseDuration, parseSize } from '../units.js';

/** A scenario that does not parse or does not hold together. `code` is `ERR_SCENARIO`. */
export class ScenarioError extends FerryError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_SCENARIO', message, options);
  }
}

const unit = <T>(fn: (s: string) => T, what: string) =>
  z.union([z.number(), z.string()]).transform((v, ctx) => {
    if (typeof v === 'number') return v as unknown as T;
    try {
      return fn(v);
    } catch (e) {
      ctx.addIssue({ code: 'custom', message: `${(e as Error).message}` });
      return z.NEVER;
    }
  }).describe(what);

const size = unit((s) => parseSize(s, 'size'), 'size');
const rate = unit((s) => parseBandwidth(s, 'rate'), 'rate');
const duration = unit((s) => parseDuration(s, 'duration'), 'duration');
/** A size, or a percentage of the VM's memory (`25%`). Resolved per VM. */
const sizeOrShare = z.union([z.number(), z.string()]).transform((v, ctx): { bytes: number } | { share: number } => {
  if (typeof v === 'number') return { bytes: v };
  const m = /^\s*(\d+(?:\.\d+)?)\s*%\s*$/.exec(v);
  if (m) {
    const share = Number(m[1]) / 100;
    if (share > 1 || share <= 0) ctx.addIssue({ code: 'custom', message: `share ${v} must be in (0 %, 100 %]` });
    return { share };
  }
  try {
    return { bytes: parseSize(v, 'size') };
  } catch (e) {
    ctx.addIssue({ code: 'custom', message: (e as Error).message });
    return z.NEVER;
  }
});

const access = { writeRate: rate, readRate: rate.optional(), wss: sizeOrShare.optional() };
export const WorkloadSchema = z.discriminatedUnion('kind', [
  z.strictObject({ kind: z.literal('constant'), dirtyRate: rate, touchRate: rate.optional() }),
  z.strictObject({ kind: z.literal('uniform'), ...access }),
  z.strictObject({ kind: z.literal('hotcold'), ...access, hot: sizeOrShare, hotFraction: z.number().min(0).max(1) }),
  z.strictObject({ kind: z.literal('zipf'), ...access, exponent: z.number().min(0).max(5) }),
  z.strictObject({ kind: z.literal('trace'), file: z.string().min(1), offset: duration.optional() }),
]);
export type Workload = z.output<typeof WorkloadSchema>;

const contentClass = z.union([z.number().min(0).max(1), z.strictObject({ fraction: z.number().min(0).max(1), ratio: z.number().positive().optional(), cpuNsPerPage: z.number().min(0).optional() })]);
export const ContentSchema = z.strictObject({
  codec: z.enum(['none', 'compress']).default('compress'),
  zero: contentClass.optional(),
  text: contentClass.optional(),
  random: contentClass.optional(),
  duplicate: contentClass.optional(),
});
export type Content = z.output<typeof ContentSchema>;

export const TechniqueSchema = z.enum(['precopy', 'postcopy', 'hybrid']);

export const OptionsSchema = z.strictObject({
  downtime: duration.optional(),
  fixedDowntime: duration.optional(),
  maxRounds: z.number().int().positive().optional(),
  maxSentRatio: z.number().positive().optional(),
  dirtyPageThreshold: z.number().min(0).optional(),
  notConvergingRounds: z.number().int().positive().optional(),
  autoConverge: z.boolean().optional(),
  hybridRounds: z.number().int().positive().optional(),
  maxDirtyToBandwidth: z.number().positive().optional(),
  prepaging: z.boolean().optional(),
  batchPages: z.number().int().positive().optional(),
  resume: duration.optional(),
  setup: duration.optional(),
});
export type Options = z.output<typeof OptionsSchema>;

const name = z.string().regex(/^[A-Za-z0-9_.-]+$/, 'names use letters, digits, _ . -');
const workloadRef = z.union([name, WorkloadSchema]);

export const ScenarioSchema = z.strictObject({
  name,
  description: z.string().optional(),
  seed: z.number().int().default(1),
  pageSize: z.number().int().positive().default(4096),
  workloads: z.record(name, WorkloadSchema).default({}),
  hosts: z.array(z.strictObject({ name, cores: z.number().positive().default(8), nic: rate })).default([]),
  links: z.array(z.strictObject({ name, bandwidth: rate, latency: duration.default(0) })).default([]),
  vms: z.array(z.strictObject({
    name,
    host: name,
    memory: size,
    workload: workloadRef,
    content: ContentSchema.optional(),
    state: size.default(65536),
    workRate: z.number().positive().default(1000),
    seed: z.number().int().optional(),
  })).default([]),
  migrations: z.array(z.strictObject({
    vm: name,
    to: name,
    at: duration.default(0),
    technique: TechniqueSchema,
    via: z.array(name).default([]),
    latency: duration.default(0),
    /** Sender-side buffer (socket/shaper queue): the sender's write returns before the bytes leave. */
    sendBuffer: size.default(0),
    rateLimit: rate.optional(),
    options: OptionsSchema.default({}),
  })).default([]),
  sweeps: z.array(z.strictObject({
    name,
    memory: size,
    workloads: z.array(workloadRef).min(1),
    techniques: z.array(TechniqueSchema).min(1).default(['precopy', 'postcopy', 'hybrid']),
    bandwidth: z.array(rate).min(1),
    dirtyRate: z.array(rate).min(1).optional(),
    latency: duration.default(0),
    sendBuffer: size.default(0),
    cores: z.number().positive().default(8),
    content: ContentSchema.optional(),
    state: size.default(65536),
    workRate: z.number().positive().default(1000),
    options: OptionsSchema.default({}),
  })).default([]),
});
export type Scenario = z.output<typeof ScenarioSchema>;

/** Parses scenario text (YAML is a superset of JSON, so both work) and validates it. */
export function parseScenario(text: string, source = 'scenario'): Scenario {
  let raw: unknown;
  try {
    raw = parseYaml(text);
  } catch (e) {
    throw new ScenarioError(`${source}: not valid YAML/JSON: ${(e as Error).message}`, { cause: e });
  }
  return validateScenario(raw, source);
}

/** Validates an already-parsed scenario object, including cross-references. */
export function validateScenario(raw: unknown, source = 'scenario'): Scenario {
  const r = ScenarioSchema.safeParse(raw);
  if (!r.success) {
    const lines = r.error.issues.slice(0, 8).map((i) => `  ${i.path.length ? i.path.join('.') : '(top)'}: ${i.message}`);
    throw new ScenarioError(`${source} is invalid:\n${lines.join('\n')}`);
  }
  const s = r.data;
  const fail = (path: string, msg: string): never => {
    throw new ScenarioError(`${source} is invalid:\n  ${path}: ${msg}`);
  };
  const unique = (xs: { name: string }[], what: string) => {
    const seen = new Set<string>();
    xs.forEach((x, i) => {
      if (seen.has(x.name)) fail(`${what}.${i}.name`, `duplicate ${what.replace(/s$/, '')} '${x.name}'`);
      seen.add(x.name);
    });
    return seen;
  };
  const hosts = unique(s.hosts, 'hosts');
  const links = unique(s.links, 'links');
  const vms = unique(s.vms, 'vms');
  unique(s.sweeps, 'sweeps');
  const checkRef = (w: string | Workload, path: string) => {
    if (typeof w === 'string' && !(w in s.workloads)) fail(path, `unknown workload '${w}' (defined: ${Object.keys(s.workloads).join(', ') || 'none'})`);
  };
  s.vms.forEach((v, i) => {
    if (!hosts.has(v.host)) fail(`vms.${i}.host`, `unknown host '${v.host}'`);
    if (!(v.memory >= s.pageSize)) fail(`vms.${i}.memory`, `memory ${v.memory} is smaller than a page`);
    checkRef(v.workload, `vms.${i}.workload`);
  });
  const migrated = new Set<string>();
  s.migrations.forEach((m, i) => {
    if (!vms.has(m.vm)) fail(`migrations.${i}.vm`, `unknown VM '${m.vm}'`);
    if (!hosts.has(m.to)) fail(`migrations.${i}.to`, `unknown host '${m.to}'`);
    if (s.vms.find((v) => v.name === m.vm)!.host === m.to) fail(`migrations.${i}.to`, `VM '${m.vm}' is already on host '${m.to}'`);
    if (migrated.has(m.vm)) fail(`migrations.${i}.vm`, `VM '${m.vm}' is migrated twice (one migration per VM)`);
    migrated.add(m.vm);
    m.via.forEach((l, j) => {
      if (!links.has(l)) fail(`migrations.${i}.via.${j}`, `unknown link '${l}'`);
    });
  });
  s.sweeps.forEach((sw, i) => sw.workloads.forEach((w, j) => checkRef(w, `sweeps.${i}.workloads.${j}`)));
  return s;
}
