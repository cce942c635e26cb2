/**
 * A host's first migration, in either direction, runs code its process has never run: every
 * function of the engine, the protocol and the transport is parsed, compiled and given type
 * feedback inside that migration, much of it inside its downtime. Measured with the demo's two
 * host processes (a kv guest under load, 6.8 MiB on the wire; 6 demos each, alternating): the
 * first migration's downtime had a median of 15.4 ms (12.3-21.5) from cold hosts and 10.0 ms
 * (8.9-14.6) from hosts that had run this, the client's longest stall 25.5 and 14.6 ms (a second
 * round of 8 demos each: 21.0 and 11.9 ms, 30.9 and 20.6 ms). The demo's post-copy migration back
 * did not change, and a post-copy leg added here (through the host's fault threads) did not
 * change it either, so the warm-up is pre-copy only.
 *
 * So a host can warm those paths when it starts: it migrates a small VM that keeps dirtying its
 * memory from itself to itself, pre-copy over loopback TCP, with the engine it migrates real VMs
 * with — both roles, every phase (rounds, stop-and-copy, switchover, the digest check) — and then
 * runs a client relay to itself (net/relay.ts rehearseRelay). The two VMs are its own and are
 * stopped at the end: nothing of it is seen on the host (no VM, no job, no pooled memory).
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { migrateSource } from '../../core/engine/source.js';
import { MigrationAcceptor, type DestinationOutcome } from '../../core/engine/destination.js';
import type { EngineDeps } from '../../core/engine/types.js';
import type { Connection } from '../../core/transport/transport.js';
import { tcp } from '../transport/tcp.js';
import { rehearseRelay, type RelayRehearsal } from '../net/relay.js';
import type { InstrumentCache } from '../vm/instrument.js';
import { Vm } from '../vm/vm.js';
import { localDestination, sourceVmOf } from './adapters.js';

/** The warm-up VM: 16 MiB, a quarter of it rewritten at ~2 MB/s, so every round has dirty pages and the last one some to carry. */
const MEMORY_BYTES = 16 << 20;
const CONFIG = `wss=${4 << 20} rate=2000000`;
const NAME = 'ferry-warm-up';

export interface WarmUpResult {
  /** Start to the migration's end (the guest rewritten, both VMs booted and the migration run), ms. */
  ms: number;
  /** The warm-up migration's own check of the memory digest. */
  verified: boolean;
  /** Frames the client relay's rehearsal moved each way (see rehearseRelay). */
  relay?: RelayRehearsal;
}

/**
 * Migrates a small memstress VM from this process to itself once (see above). `guests` is where
 * the built-in guests are (memstress.wasm); `cache` the host's instrumentation cache, so the
 * guest's variants are rewritten once for this and for any later VM of it. `signal` stops it: it
 * rejects with the signal's reason (the migration as a cancelled one), its VMs stopped.
 */
export async function warmMigrationPaths(deps: EngineDeps, cache: InstrumentCache, guests: string, signal?: AbortSignal): Promise<WarmUpResult> {
  const t0 = performance.now();
  signal?.throwIfAborted();
  const module = new Uint8Array(await readFile(join(guests, 'memstress.wasm')));
  await cache.prepare(module, ['plain', 'dirty', 'presence']);
  signal?.throwIfAborted();
  const made: Vm[] = [];
  const src = Vm.create({ name: NAME, module, memoryBytes: MEMORY_BYTES, config: CONFIG, cache });
  made.push(src);
  const factory = localDestination(made, cache);
  const acceptor = new MigrationAcceptor(deps);
  let arrived: Promise<DestinationOutcome | null> | null = null;
  const transport = tcp();
  const listener = await transport.listen({
    onConnection: (c: Connection) => {
      const r = acceptor.accept(c, factory);
      r.catch(() => undefined);
      arrived ??= r;
    },
  });
  let verified: boolean;
  try {
    await src.bootCold();
    const conn = await transport.dial(listener.address, signal ? { signal } : {});
    const result = await migrateSource(conn, sourceVmOf(src), deps, { mode: 'precopy', baselineMs: 0, ...(signal ? { signal } : {}) });
    await arrived;
    verified = result.report.verified === true;
  } finally {
    await listener.close();
    for (const vm of made) await vm.stop().catch(() => undefined);
  }
  signal?.throwIfAborted();
  // A VM whose clients stay connected through its home relays their traffic once it has moved.
  // Run with the warm-up's VMs stopped: nothing else of it is left running beside it.
  const relay = await rehearseRelay(transport);
  return { ms: performance.now() - t0, verified, relay };
}
