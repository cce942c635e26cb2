/**
 * A host agent in a process of its own (`ferry host start`), driven through its control API: two
 * of them are two hosts on one machine, each with its own event loop, as `ferry demo` and the
 * clients bench run them.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { FerryError } from '../core/errors.js';
import type { MigrationJobJson } from './agent/migrations.js';
import { HOST_NODE_FLAGS } from './host-runtime.js';

const FERRY = fileURLToPath(new URL('../../../bin/ferry.js', import.meta.url));

/** How long a host may take to listen (it loads and warms its code first). */
const START_TIMEOUT_MS = 60_000;

/** The host process failed: it would not start, it went away, or its API answered an error. */
export class HostProcessError extends FerryError {
  constructor(message: string, options?: ErrorOptions) {
    super('ERR_HOST_PROCESS', message, options);
  }
}

export interface HostProcess {
  readonly name: string;
  /** Its control API, http://host:port. */
  readonly url: string;
  readonly child: ChildProcess;
  /** A request to its control API; resolves with the JSON body, throws HostProcessError on an HTTP error. */
  api<T>(method: 'GET' | 'POST' | 'DELETE', path: string, body?: unknown): Promise<T>;
  /** Stops it (SIGTERM, then SIGKILL after `graceMs`) and resolves once it has exited. */
  stop(graceMs?: number): Promise<void>;
}

/** Host processes still running: killed if this process exits without stopping them (an error, process.exit). */
const running = new Set<ChildProcess>();
let reaping = false;

/** Starts `ferry host start --name <name>` registering in `stateDir`; resolves once its API listens. */
export function startHostProcess(name: string, stateDir: string): Promise<HostProcess> {
  const child = spawn(process.execPath, [...HOST_NODE_FLAGS, FERRY, 'host', 'start', '--name', name, '--json', '--state-dir', stateDir], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  running.add(child);
  child.once('exit', () => running.delete(child));
  if (!reaping) {
    reaping = true;
    process.once('exit', () => { for (const c of running) c.kill('SIGKILL'); });
  }
  // What it said on stderr that explains a failure: its first error line, else its last lines.
  const said: string[] = [];
  let errorLine: string | null = null;
  createInterface({ input: child.stderr! }).on('line', (l) => {
    if (errorLine === null && /^error\b|Error\b/.test(l)) errorLine = l;
    said.push(l);
    if (said.length > 20) said.shift();
  });
  const saying = () => {
    const lines = errorLine !== null ? [errorLine] : said.slice(-3);
    return lines.length ? `: ${lines.join(' | ')}` : '';
  };
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  return new Promise<HostProcess>((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new HostProcessError(`host ${name} did not start within ${START_TIMEOUT_MS} ms`));
    }, START_TIMEOUT_MS);
    child.once('error', (e) => {
      clearTimeout(timer);
      reject(new HostProcessError(`host ${name} could not be started: ${e.message}`, { cause: e }));
    });
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new HostProcessError(`host ${name} exited (${signal ?? code}) before it listened${saying()}`));
    });
    // Its events on stdout, read to the end (a pipe left unread would block its writes).
    createInterface({ input: child.stdout! }).on('line', (line) => {
      let e: { event?: string; control?: string };
      try {
        e = JSON.parse(line) as typeof e;
      } catch {
        return;
      }
      if (e.event !== 'started' || !e.control) return;
      clearTimeout(timer);
      const url = e.control;
      resolve({
        name, url, child,
        async api<T>(method: 'GET' | 'POST' | 'DELETE', path: string, body?: unknown): Promise<T> {
          let res: Response;
          try {
            res = await fetch(`${url}${path}`, { method, ...(body === undefined ? {} : { headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) }) });
          } catch (e) {
            const how = child.exitCode !== null || child.signalCode !== null ? `it exited (${child.signalCode ?? child.exitCode})` : (e as Error).message;
            throw new HostProcessError(`host ${name}: ${method} ${path} failed: ${how}${saying()}`, { cause: e });
          }
          const json = (await res.json().catch(() => null)) as (T & { error?: { code?: string; message?: string } }) | null;
          if (!res.ok || json === null) {
            throw new HostProcessError(`host ${name}: ${method} ${path} answered HTTP ${res.status}${json?.error ? `: ${json.error.message} (${json.error.code})` : ''}`);
          }
          return json;
        },
        async stop(graceMs = 5000): Promise<void> {
          if (child.exitCode !== null || child.signalCode !== null) return;
          child.kill('SIGTERM');
          const kill = setTimeout(() => child.kill('SIGKILL'), graceMs);
          await exited;
          clearTimeout(kill);
        },
      });
    });
  });
}

/**
 * Starts one host process per name (in parallel); resolves with them in that order. If any fails
 * to start, the others are stopped and the first failure is thrown.
 */
export async function startHostProcesses(names: readonly string[], stateDir: string): Promise<HostProcess[]> {
  const started = await Promise.allSettled(names.map((n) => startHostProcess(n, stateDir)));
  const failed = started.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  const up = started.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
  if (!failed) return up;
  await Promise.all(up.map((h) => h.stop()));
  throw failed.reason;
}

/** Starts a migration on `from` (POST /v1/migrations with `body`) and polls it until it no longer runs. */
export async function migrateVia(from: HostProcess, body: Record<string, unknown>, pollMs = 20): Promise<MigrationJobJson> {
  const { id } = await from.api<{ id: string }>('POST', '/v1/migrations', body);
  for (;;) {
    await new Promise((r) => setTimeout(r, pollMs));
    const job = await from.api<MigrationJobJson>('GET', `/v1/migrations/${encodeURIComponent(id)}`);
    if (job.status !== 'running') return job;
  }
}
