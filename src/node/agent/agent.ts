/**
 * The host agent: runs VMs on one host and exposes them through an HTTP control API.
 * Several agents can live in one process (tests, the demo): no module-level state.
 */
import { EventEmitter } from 'node:events';
import { existsSync, readdirSync } from 'node:fs';
import { mkdir, readFile } from 'node:fs/promises';
import { basename, isAbsolute, join, resolve } from 'node:path';
import Fastify, { type FastifyInstance } from 'fastify';
import { z } from 'zod';
import { FerryError, InvalidArgumentError, VmStateError } from '../../core/errors.js';
import { parseSize } from '../../core/units.js';
import { InstrumentCache } from '../vm/instrument.js';
import { Vm, type VmStats } from '../vm/vm.js';
import { restoreSnapshot, writeSnapshot, type SnapshotStats } from '../vm/snapshot.js';
import { ExposeEndpoint, parseHostPort } from '../net/expose.js';
import { guestsDir } from '../paths.js';
import type { NetRecordData } from '../../core/net-ring.js';

export interface HostAgentInit {
  name: string;
  dataDir: string;
  /** Where built-in guests are looked up by name. Default: the package's build/guests. */
  guestsDir?: string;
  cache?: InstrumentCache;
  quantumMs?: number;
}

export interface VmSpec {
  name: string;
  /** A built-in guest name (kv, memstress, …) or a path to a .wasm file. */
  guest: string;
  memory: string | number;
  config?: string;
  /** host:port for the VM's TCP endpoint, e.g. 127.0.0.1:0. */
  expose?: string;
  disk?: string;
  diskSize?: string | number;
  fixedBudget?: number;
  paused?: boolean;
}

export interface VmSummary {
  name: string;
  guest: string;
  memoryBytes: number;
  guestBytes: number;
  endpoint: string | null;
  stats: VmStats;
  error: string | null;
}

/** Client bytes in flight toward a guest before it must consume some (below the rx queue limit). */
const EXPOSE_WINDOW = 8 << 20;

export class NotFoundError extends FerryError {
  constructor(message: string) {
    super('ERR_NOT_FOUND', message);
  }
}

interface ManagedVm {
  vm: Vm;
  guest: string;
  expose: ExposeEndpoint | null;
}

export { parseHostPort };

export class HostAgent extends EventEmitter {
  readonly name: string;
  readonly dataDir: string;
  readonly cache: InstrumentCache;
  private readonly guests: string;
  private readonly quantumMs: number | undefined;
  private readonly vms = new Map<string, ManagedVm>();
  private http: FastifyInstance | null = null;

  constructor(init: HostAgentInit) {
    super();
    this.name = init.name;
    this.dataDir = init.dataDir;
    this.guests = init.guestsDir ?? guestsDir();
    this.cache = init.cache ?? new InstrumentCache({ dir: join(init.dataDir, 'cache') });
    this.quantumMs = init.quantumMs;
  }

  /** Resolves a guest name or path to module bytes. */
  async loadGuest(guest: string): Promise<{ bytes: Uint8Array; label: string }> {
    const builtin = join(this.guests, `${guest}.wasm`);
    const path = /^[a-z][a-z0-9_-]*$/.test(guest) && existsSync(builtin) ? builtin : resolve(guest);
    if (!existsSync(path)) {
      throw new NotFoundError(`guest '${guest}' is neither a built-in guest (${this.builtinGuests().join(', ') || 'none built: run npm run build'}) nor an existing file`);
    }
    return { bytes: new Uint8Array(await readFile(path)), label: path === builtin ? guest : basename(path) };
  }

  builtinGuests(): string[] {
    try {
      return readdirSync(this.guests).filter((f) => f.endsWith('.wasm')).map((f) => f.slice(0, -5)).sort();
    } catch {
      return [];
    }
  }

  get(name: string): ManagedVm {
    const m = this.vms.get(name);
    if (!m) throw new NotFoundError(`no VM named '${name}' on host ${this.name}`);
    return m;
  }

  vm(name: string): Vm {
    return this.get(name).vm;
  }

  async createVm(spec: VmSpec): Promise<VmSummary> {
    if (this.vms.has(spec.name)) throw new VmStateError(`a VM named '${spec.name}' already exists on host ${this.name}`);
    const memoryBytes = typeof spec.memory === 'number' ? spec.memory : parseSize(spec.memory, 'memory size');
    const exposeAt = spec.expose ? parseHostPort(spec.expose) : null;
    const { bytes, label } = await this.loadGuest(spec.guest);
    let block: { path: string; sizeBytes: number } | undefined;
    if (spec.disk || spec.diskSize) {
      const sizeBytes = spec.diskSize === undefined ? 64 << 20 : typeof spec.diskSize === 'number' ? spec.diskSize : parseSize(spec.diskSize, 'disk size');
      await mkdir(join(this.dataDir, 'disks'), { recursive: true });
      block = { path: spec.disk ? resolve(spec.disk) : join(this.dataDir, 'disks', `${spec.name}.img`), sizeBytes };
    }
    const vm = Vm.create({
      name: spec.name, module: bytes, memoryBytes, config: spec.config ?? '', cache: this.cache,
      ...(block ? { block } : {}),
      ...(spec.fixedBudget ? { fixedBudget: spec.fixedBudget } : {}),
      ...(this.quantumMs ? { quantumMs: this.quantumMs } : {}),
    });
    const managed: ManagedVm = { vm, guest: label, expose: null };
    this.attach(managed);
    try {
      if (exposeAt) managed.expose = await this.exposeVm(vm, exposeAt);
      this.vms.set(spec.name, managed);
      await vm.bootCold({ paused: spec.paused });
    } catch (e) {
      this.vms.delete(spec.name);
      await managed.expose?.close();
      await vm.stop();
      throw e;
    }
    return this.summary(spec.name);
  }

  /** Restores a snapshot file as a new VM on this host and continues it. */
  async restoreVm(path: string, opts: { name?: string; expose?: string; paused?: boolean } = {}): Promise<VmSummary> {
    const exposeAt = opts.expose ? parseHostPort(opts.expose) : null;
    const { vm, header } = await restoreSnapshot(path, { cache: this.cache, noStart: true, ...(opts.name ? { name: opts.name } : {}) });
    if (this.vms.has(vm.name)) throw new VmStateError(`a VM named '${vm.name}' already exists on host ${this.name}`);
    const managed: ManagedVm = { vm, guest: header.state.name, expose: null };
    this.attach(managed);
    try {
      if (exposeAt) managed.expose = await this.exposeVm(vm, exposeAt);
      this.vms.set(vm.name, managed);
      await vm.bootFromState(header.state, { paused: opts.paused });
    } catch (e) {
      this.vms.delete(vm.name);
      await managed.expose?.close();
      await vm.stop();
      throw e;
    }
    return this.summary(vm.name);
  }

  private attach(m: ManagedVm): void {
    const { vm } = m;
    vm.on('console', (line: string) => this.emit('console', vm.name, line));
    vm.on('trap', (err: Error) => this.emit('trap', vm.name, err));
    vm.on('halt', (code: number) => this.emit('halt', vm.name, code));
    vm.on('error', (err: Error) => this.emit('vm-error', vm.name, err));
    vm.on('net', (records: NetRecordData[]) => m.expose?.deliver(records));
  }

  private async exposeVm(vm: Vm, at: { host: string; port: number }): Promise<ExposeEndpoint> {
    // The window keeps client input the guest has not consumed below the device's rx queue limit;
    // the vCPU returns credit as records enter the guest's ring (so nothing overflows or is lost).
    const ep = await ExposeEndpoint.listen({ host: at.host, port: at.port, window: EXPOSE_WINDOW, onRecords: (records) => vm.deliverNet(records) });
    vm.on('net-credit', (bytes: number) => ep.credit(bytes));
    return ep;
  }

  async pauseVm(name: string): Promise<VmSummary> {
    const m = this.get(name);
    m.expose?.hold();
    await m.vm.pause();
    return this.summary(name);
  }

  async resumeVm(name: string): Promise<VmSummary> {
    const m = this.get(name);
    m.vm.resume();
    await m.vm.whenRunning();
    m.expose?.release();
    return this.summary(name);
  }

  /** Pauses the VM, writes a snapshot, then resumes it (or stops and removes it with `stop`). */
  async snapshotVm(name: string, out: string, opts: { stop?: boolean } = {}): Promise<SnapshotStats> {
    if (!isAbsolute(out)) throw new InvalidArgumentError(`snapshot path '${out}' must be absolute (the agent may run in another directory)`);
    const m = this.get(name);
    const wasPaused = m.vm.state === 'paused';
    m.expose?.hold();
    await m.vm.pause();
    try {
      const stats = await writeSnapshot(m.vm, out);
      if (opts.stop) await this.stopVm(name);
      return stats;
    } finally {
      if (!opts.stop && !wasPaused) {
        m.vm.resume();
        m.expose?.release();
      }
    }
  }

  async stopVm(name: string): Promise<void> {
    const m = this.get(name);
    this.vms.delete(name);
    await m.expose?.close();
    await m.vm.stop();
  }

  summary(name: string): VmSummary {
    const m = this.get(name);
    const addr = m.expose?.address();
    return {
      name,
      guest: m.guest,
      memoryBytes: m.vm.memoryBytes,
      guestBytes: m.vm.guestBytes,
      endpoint: addr ? `${addr.host}:${addr.port}` : null,
      stats: m.vm.stat(),
      error: m.vm.trap?.message ?? null,
    };
  }

  list(): VmSummary[] {
    return [...this.vms.keys()].sort().map((n) => this.summary(n));
  }

  /** Starts the HTTP control API; returns its base URL. */
  async listen(host = '127.0.0.1', port = 0): Promise<string> {
    const app = buildControlApi(this);
    await app.listen({ host, port });
    this.http = app;
    const a = app.server.address();
    if (!a || typeof a === 'string') throw new FerryError('ERR_LISTEN', 'control API did not bind a TCP address');
    return `http://${host}:${a.port}`;
  }

  async close(): Promise<void> {
    await this.http?.close();
    this.http = null;
    for (const name of [...this.vms.keys()]) await this.stopVm(name).catch(() => undefined);
  }
}

const createBody = z.object({
  name: z.string().regex(/^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$/, 'name must be 1–64 letters, digits, ".", "_" or "-"'),
  guest: z.string().min(1).max(4096),
  memory: z.union([z.string().max(32), z.number().int().positive()]),
  config: z.string().max(65536).optional(),
  expose: z.string().max(64).optional(),
  disk: z.string().max(4096).optional(),
  diskSize: z.union([z.string().max(32), z.number().int().positive()]).optional(),
  fixedBudget: z.number().int().positive().max(0x3fffffff).optional(),
  paused: z.boolean().optional(),
}).strict();
const snapshotBody = z.object({ out: z.string().min(1).max(4096), stop: z.boolean().optional() }).strict();
const restoreBody = z.object({ path: z.string().min(1).max(4096), name: z.string().max(64).optional(), expose: z.string().max(64).optional(), paused: z.boolean().optional() }).strict();

function statusOf(e: unknown): number {
  if (e instanceof NotFoundError) return 404;
  if (e instanceof VmStateError) return 409;
  if (e instanceof z.ZodError || e instanceof InvalidArgumentError) return 400;
  if (e instanceof FerryError) return 422;
  return 500;
}

/** The control API. Every body is validated; errors come back as {error: {code, message}}. */
export function buildControlApi(agent: HostAgent): FastifyInstance {
  const app = Fastify({ logger: false, bodyLimit: 1 << 20 });
  app.setErrorHandler((err, _req, reply) => {
    const status = (err as { statusCode?: number }).statusCode && !(err instanceof FerryError) && !(err instanceof z.ZodError) ? (err as { statusCode: number }).statusCode : statusOf(err);
    const code = err instanceof FerryError ? err.code : err instanceof z.ZodError ? 'ERR_INVALID_BODY' : ((err as { code?: string }).code ?? 'ERR_INTERNAL');
    const message = err instanceof z.ZodError ? err.issues.map((i) => `${i.path.join('.') || 'body'}: ${i.message}`).join('; ') : (err as Error).message;
    void reply.status(status).send({ error: { code, message } });
  });
  app.get('/v1/host', async () => ({ name: agent.name, vms: agent.list().length }));
  app.get('/v1/vms', async () => agent.list());
  app.post('/v1/vms', async (req, reply) => {
    const body = createBody.parse(req.body);
    return reply.status(201).send(await agent.createVm(body));
  });
  app.post('/v1/vms/restore', async (req, reply) => {
    const body = restoreBody.parse(req.body);
    return reply.status(201).send(await agent.restoreVm(body.path, body));
  });
  app.get<{ Params: { name: string } }>('/v1/vms/:name', async (req) => agent.summary(req.params.name));
  app.post<{ Params: { name: string } }>('/v1/vms/:name/pause', async (req) => agent.pauseVm(req.params.name));
  app.post<{ Params: { name: string } }>('/v1/vms/:name/resume', async (req) => agent.resumeVm(req.params.name));
  app.post<{ Params: { name: string } }>('/v1/vms/:name/snapshot', async (req) => {
    const body = snapshotBody.parse(req.body);
    return agent.snapshotVm(req.params.name, body.out, body);
  });
  app.delete<{ Params: { name: string } }>('/v1/vms/:name', async (req, reply) => {
    await agent.stopVm(req.params.name);
    return reply.status(204).send();
  });
  return app;
}
