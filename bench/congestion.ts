/**
 * FERRY_BENCH_TCP_CONGESTION=cubic (or any algorithm this machine allows) pins the TCP sockets of
 * the migration and transport benches, ferry's (post-copy's fault channels included) and the
 * baselines' alike, to one congestion control (not the clients bench's host processes). Unset,
 * each socket gets the system's (net.ipv4.tcp_congestion_control), as a plain Node program's would.
 *
 * Why: the algorithm moves the baselines the targets are measured against. On the machine these
 * benches were written on the system default is BBR, which paces even loopback, and raw loopback
 * TCP ran 1.6× faster under CUBIC (README, "TCP congestion control"). Pinned, a run says how much
 * of a ratio is the engine and how much the machine's default.
 */
import net from 'node:net';
import { checkCongestionControl, connectWith, setCongestionControl, systemCongestionControl } from '../src/node/transport/congestion.js';
import { tcp } from '../src/node/transport/tcp.js';
import type { Transport } from '../src/core/transport/transport.js';

function fromEnv(): string | undefined {
  const v = process.env.FERRY_BENCH_TCP_CONGESTION;
  if (v === undefined || v === '') return undefined;
  checkCongestionControl(v);
  return v;
}

/** The algorithm the bench pins (undefined: the system's). */
export const BENCH_CONGESTION = fromEnv();

/** What the bench's sockets run, for its notes. */
export function benchCongestionText(): string {
  return BENCH_CONGESTION ? `TCP congestion control pinned to ${BENCH_CONGESTION} (FERRY_BENCH_TCP_CONGESTION)` : `TCP congestion control the system's (${systemCongestionControl() ?? 'unknown'})`;
}

/**
 * net.connect to 127.0.0.1, the socket born with the pinned algorithm (if any): set on a connected
 * socket instead, BBR's pacing outlives it (see setCongestionControl).
 */
export function connect(port: number, opts: { noDelay?: boolean } = {}): net.Socket {
  return BENCH_CONGESTION ? connectWith({ port, host: '127.0.0.1', ...opts }, BENCH_CONGESTION) : net.connect({ port, host: '127.0.0.1', ...opts });
}

/** A listening server whose accepted sockets are born with the pinned algorithm (if any). */
export function pinServer<S extends net.Server>(server: S): S {
  if (BENCH_CONGESTION) setCongestionControl(server, BENCH_CONGESTION);
  return server;
}

/** ferry's TCP transport with the pinned algorithm (if any). */
export function benchTcp(): Transport {
  return tcp(BENCH_CONGESTION ? { congestion: BENCH_CONGESTION } : {});
}
