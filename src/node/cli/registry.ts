/**
 * Registrations of running ferry processes (`ferry vm run`, `ferry host start`): one JSON file per
 * name under `<state dir>/<kind>/`, found by other commands. A file whose process has exited is
 * stale and is removed when read.
 */
import { mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { ferryHome } from '../paths.js';

export interface Registered { name: string; pid: number }

export const registryDir = (home: string, kind: 'vms' | 'hosts') => join(home, kind);

/** The state directory a command's --state-dir names, else $FERRY_HOME or ~/.ferry. */
export function stateHome(stateDir: string | undefined): string {
  return stateDir ? resolve(stateDir) : ferryHome();
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Writes the registration; returns its file. */
export async function register<T extends Registered>(home: string, kind: 'vms' | 'hosts', reg: T): Promise<string> {
  await mkdir(registryDir(home, kind), { recursive: true });
  const file = join(registryDir(home, kind), `${reg.name}.json`);
  await writeFile(file, JSON.stringify(reg));
  return file;
}

/** The live registration, `{ exited: pid }` for a stale one (now removed), or null if there is none. */
export async function readRegistration<T extends Registered>(home: string, kind: 'vms' | 'hosts', name: string): Promise<T | { exited: number } | null> {
  const file = join(registryDir(home, kind), `${name}.json`);
  let reg: T;
  try {
    reg = JSON.parse(await readFile(file, 'utf8')) as T;
  } catch {
    return null;
  }
  if (!alive(reg.pid)) {
    await rm(file, { force: true });
    return { exited: reg.pid };
  }
  return reg;
}

/** Names registered under `kind`, sorted (live or not: read each to know). */
export async function registeredNames(home: string, kind: 'vms' | 'hosts'): Promise<string[]> {
  return (await readdir(registryDir(home, kind)).catch(() => [] as string[])).filter((f) => f.endsWith('.json')).map((f) => f.slice(0, -5)).sort();
}

export interface HostRegistration { name: string; pid: number; control: string; migration: string }

/** The registration of a running host agent, or null (a stale one is removed). */
export async function findHost(home: string, name: string): Promise<HostRegistration | null> {
  const reg = await readRegistration<HostRegistration>(home, 'hosts', name);
  return reg && !('exited' in reg) ? reg : null;
}

/** Every running host agent registered under `home`. */
export async function listHosts(home: string): Promise<HostRegistration[]> {
  const names = await registeredNames(home, 'hosts');
  const out: HostRegistration[] = [];
  for (const n of names) {
    const r = await findHost(home, n);
    if (r) out.push(r);
  }
  return out;
}
