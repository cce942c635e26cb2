/**
 * Host agents for tests: two real agents in one process on 127.0.0.1 (port 0), their HTTP API,
 * kv clients of their VMs, and a TCP transport that stalls a migration in pre-copy on purpose.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HostAgent, type HostAgentInit } from '../../src/node/agent/agent.js';
import { KvClient } from '../../src/node/kv-client.js';
import type { Connection, Transport } from '../../src/core/transport/transport.js';
import { tcp } from '../../src/node/transport/tcp.js';
import { startsLikeRelay } from '../../src/node/net/relay.js';

// eslint-disable-next-line @typescript-eslint/no-explicit-any -- JSON replies of several shapes, checked field by field
export type Reply = any;

export async function http(url: string, method: string, body?: unknown): Promise<{ status: number; json: Reply }> {
  const res = await fetch(url, { method, headers: body === undefined ? {} : { 'content-type': 'application/json' }, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  return { status: res.status, json: text ? JSON.parse(text) : null };
}

export interface Host { agent: HostAgent; url: string }

/** Runs `fn` with hosts a and b listening (data in a fresh temporary directory), then closes both. */
export async function withHosts(fn: (a: Host, b: Host) => Promise<void>, init: { a?: Partial<HostAgentInit>; b?: Partial<HostAgentInit> } = {}): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-hosts-'));
  const a = new HostAgent({ name: 'a', dataDir: join(dir, 'a'), ...init.a });
  const b = new HostAgent({ name: 'b', dataDir: join(dir, 'b'), ...init.b });
  try {
    const [ua, ub] = [await a.listen(), await b.listen()];
    await fn({ agent: a, url: ua }, { agent: b, url: ub });
  } finally {
    await a.close();
    await b.close();
    await rm(dir, { recursive: true, force: true });
  }
}

/** A connected kv client of `vm` on `host`, through the VM's endpoint. */
export async function clientOf(host: Host, vm: string): Promise<KvClient> {
  const ep = host.agent.summary(vm).endpoint!;
  const i = ep.lastIndexOf(':');
  const c = new KvClient(ep.slice(0, i), Number(ep.slice(i + 1)));
  await c.connect();
  return c;
}

/** Waits for the migration to end (polling the real API) and returns its final status. */
export async function finished(host: Host, id: string): Promise<Reply> {
  for (;;) {
    const r = await http(`${host.url}/v1/migrations/${id}`, 'GET');
    assert.equal(r.status, 200);
    if (r.json.status !== 'running') return r.json;
    await new Promise((res) => setTimeout(res, 20));
  }
}

/**
 * A TCP transport whose migration streams (not relays) stop sending after `limit` bytes until
 * `open()`: a migration that is certainly still in pre-copy, without relying on timing.
 */
export function gatedTcp(limit: number): { transport: Transport; stalled: Promise<void>; open(): void } {
  const inner = tcp();
  let open!: () => void;
  const gate = new Promise<void>((r) => (open = r));
  let stalledNow!: () => void;
  const stalled = new Promise<void>((r) => (stalledNow = r));
  const wrap = (c: Connection): Connection => {
    let sent = 0;
    let relay: boolean | null = null;
    let aborted!: (e: Error) => void;
    const abortedP = new Promise<never>((_, rej) => (aborted = rej));
    abortedP.catch(() => undefined);
    return {
      localAddress: c.localAddress, remoteAddress: c.remoteAddress, closed: c.closed,
      close: () => c.close(),
      abort: (e) => {
        aborted(e ?? new Error('aborted'));
        c.abort(e);
      },
      [Symbol.asyncIterator]: () => c[Symbol.asyncIterator](),
      write: async (bytes) => {
        relay ??= startsLikeRelay(bytes);
        sent += bytes.length;
        if (!relay && sent > limit) {
          stalledNow();
          await Promise.race([gate, abortedP]);
        }
        return c.write(bytes);
      },
    };
  };
  return { transport: { name: 'gated-tcp', dial: async (addr, o) => wrap(await inner.dial(addr, o)), listen: (o) => inner.listen(o) }, stalled, open };
}
