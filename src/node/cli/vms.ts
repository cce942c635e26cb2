/**
 * Where a VM named on the command line runs, and its agent's control API. A VM runs either in a
 * `ferry vm run` / `vm restore` process of its own (registered under <state dir>/vms/) or on a
 * host agent (`ferry host start`, registered under <state dir>/hosts/, which lists its VMs). Every
 * command that names a VM — `vm snapshot`, `pause`, `resume`, `stop`, `list` and `migrate` —
 * finds it the same way, here.
 */
import { FerryError } from '../../core/errors.js';
import type { VmSummary } from '../agent/agent.js';
import { listHosts, readRegistration, registeredNames } from './registry.js';

export interface VmLocation {
  name: string;
  /** Control URL of the agent running it. */
  control: string;
  /** The host agent's name; null for a VM in a `ferry vm run` process of its own. */
  host: string | null;
}

interface VmRegistration { name: string; pid: number; control: string }

/**
 * A request to the control API of the agent at `control` (`what` it is, for the error when it
 * cannot be reached): its JSON answer, null for 204. An error answer becomes a FerryError with
 * the agent's code.
 */
export async function callAgent<T = unknown>(control: string, what: string, method: string, path: string, body?: unknown): Promise<T> {
  const base = control.replace(/\/+$/, '');
  const res = await fetch(`${base}${path}`, {
    method,
    headers: body === undefined ? {} : { 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  }).catch((e: Error) => {
    throw new FerryError('ERR_CONTROL_UNREACHABLE', `cannot reach ${what} at ${base}: ${e.message}`, { cause: e });
  });
  if (res.status === 204) return null as T;
  const data = (await res.json().catch(() => ({}))) as T & { error?: { code: string; message: string } };
  if (!res.ok) throw new FerryError(data.error?.code ?? 'ERR_CONTROL', data.error?.message ?? `HTTP ${res.status} from ${base}${path}`);
  return data;
}

/** `callAgent` for the VM at `loc`, under /v1/vms/<name>. */
export function callVm<T = unknown>(loc: VmLocation, method: string, sub = '', body?: unknown): Promise<T> {
  return callAgent(loc.control, `VM '${loc.name}'${loc.host ? ` on host ${loc.host}` : ''}`, method, `/v1/vms/${encodeURIComponent(loc.name)}${sub}`, body);
}

/**
 * The VM named `name`: its own process's registration first, else the first running host agent
 * that lists it. ERR_NOT_FOUND otherwise (`hint` ends the message: what else the user may try).
 */
export async function findVm(home: string, name: string, hint = `start one with: ferry vm run <guest> --name ${name}, or ferry host boot <host> <guest> --name ${name}`): Promise<VmLocation> {
  const reg = await readRegistration<VmRegistration>(home, 'vms', name);
  if (reg && !('exited' in reg)) return { name, control: reg.control, host: null };
  for (const h of await listHosts(home)) {
    const loc = { name, control: h.control, host: h.name };
    if (await callVm(loc, 'GET').then(() => true, () => false)) return loc;
  }
  const gone = reg ? ` (its \`ferry vm run\` process ${reg.exited} has exited)` : '';
  throw new FerryError('ERR_NOT_FOUND', `no running VM named '${name}'${gone}: none in a process of its own, and no host agent registered under ${home} has it; ${hint}`);
}

/** Every VM running under `home`: those in processes of their own, then each host agent's, by name. */
export async function listVms(home: string): Promise<{ loc: VmLocation; summary: VmSummary }[]> {
  const out: { loc: VmLocation; summary: VmSummary }[] = [];
  for (const name of await registeredNames(home, 'vms')) {
    const reg = await readRegistration<VmRegistration>(home, 'vms', name);
    if (!reg || 'exited' in reg) continue; // a stale registration is removed as it is read
    const loc = { name, control: reg.control, host: null };
    const summary = (await callVm(loc, 'GET').catch(() => null)) as VmSummary | null; // exited meanwhile
    if (summary) out.push({ loc, summary });
  }
  for (const h of await listHosts(home)) {
    const vms = (await callAgent(h.control, `host ${h.name}`, 'GET', '/v1/vms').catch(() => [])) as VmSummary[];
    for (const summary of vms) out.push({ loc: { name: summary.name, control: h.control, host: h.name }, summary });
  }
  return out;
}
