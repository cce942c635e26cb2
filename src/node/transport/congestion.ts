/**
 * A TCP socket's congestion control (Linux's TCP_CONGESTION), for the sockets a host migrates over.
 *
 * Why a host may want to choose it: the algorithm decides how fast a connection may send after it
 * was idle, and migration traffic is rounds with pauses between them, the last of them inside the
 * downtime. On the machine ferry is developed on, the system default is BBR, which paces even
 * loopback: raw loopback TCP in one process ran about 1.6× faster under CUBIC (README, "TCP
 * congestion control", has the figures). A lab that compares techniques across machines pins the
 * algorithm instead of inheriting each machine's sysctl.
 */
import { readFileSync } from 'node:fs';
import net from 'node:net';
import { InvalidArgumentError } from '../../core/errors.js';
import { fdOf, libc } from '../libc.js';

const IPPROTO_TCP = 6;
const TCP_CONGESTION = 13;
/** TCP_CA_NAME_MAX: names are shorter than this. */
const NAME_MAX = 16;

function procList(name: string): string[] | null {
  try {
    return readFileSync(`/proc/sys/net/ipv4/${name}`, 'utf8').trim().split(/\s+/).filter(Boolean);
  } catch {
    return null;
  }
}

/** The algorithms this machine has (null where it does not say: not Linux). */
export function availableCongestionControls(): string[] | null {
  return procList('tcp_available_congestion_control');
}

/** What new sockets get unless told otherwise (null where unknown). */
export function systemCongestionControl(): string | null {
  return procList('tcp_congestion_control')?.[0] ?? null;
}

/**
 * Checks that sockets of this process may use `name`: the kernel must have it, and a process
 * without CAP_NET_ADMIN may only choose the algorithms in tcp_allowed_congestion_control (root is
 * taken to have it; any other capable process fails later, at its first socket, by name). Throws
 * InvalidArgumentError saying which are there.
 */
export function checkCongestionControl(name: string): void {
  if (typeof name !== 'string' || !/^[a-z0-9_-]+$/.test(name) || name.length >= NAME_MAX) {
    throw new InvalidArgumentError(`TCP congestion control '${String(name)}' is not a name such as cubic or bbr`);
  }
  if (process.platform !== 'linux') throw new InvalidArgumentError(`choosing the TCP congestion control is built for Linux, not ${process.platform}`);
  const available = availableCongestionControls() ?? [];
  if (!available.includes(name)) {
    throw new InvalidArgumentError(`TCP congestion control '${name}' is not available on this machine (available: ${available.join(', ') || 'none listed'}; others need their kernel module loaded)`);
  }
  const allowed = procList('tcp_allowed_congestion_control') ?? [];
  if (process.getuid?.() !== 0 && !allowed.includes(name)) {
    throw new InvalidArgumentError(`TCP congestion control '${name}' is not allowed for this user (allowed: ${allowed.join(', ') || 'none'}; see net.ipv4.tcp_allowed_congestion_control)`);
  }
}

function fdOfSocket(socket: net.Socket | net.Server): number {
  const fd = fdOf(socket);
  if (fd === null) throw new InvalidArgumentError('the socket has no file descriptor (not connected, or not a TCP socket on Linux)');
  return fd;
}

function setOn(fd: number, name: string): void {
  const l = libc();
  const value = new TextEncoder().encode(name);
  if (l.setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, value, value.length) !== 0) {
    throw new InvalidArgumentError(`the kernel refused TCP congestion control '${name}' for a socket (errno ${l.errno()})`);
  }
}

/**
 * Sets the congestion control of a socket (connected, or listening: the sockets it accepts are
 * born with it). Throws (with errno) if the kernel refuses.
 *
 * On a connected socket, set it before anything is sent, and know that it is not the same as a
 * socket born with it: an algorithm that paces (BBR) leaves pacing on when another replaces it.
 * Raw loopback TCP switched from BBR to CUBIC after connecting ran at 2.8 GB/s here, against 3.4
 * GB/s for sockets born CUBIC. Hence {@link connectWith} for the sockets a host dials.
 */
export function setCongestionControl(socket: net.Socket | net.Server, name: string): void {
  setOn(fdOfSocket(socket), name);
}

const AF_INET = 2;
const AF_INET6 = 10;
const SOCK_STREAM = 1;
const SOCK_CLOEXEC = 0o2000000;

/**
 * A node:net socket connecting to `to` (an IP address: its family decides the socket made), born
 * with congestion control `name` (see setCongestionControl for why not set after connecting):
 * made with libc's socket(), given the algorithm, handed to node:net, then connected.
 */
export function connectWith(to: { host: string; port: number; noDelay?: boolean }, name: string, opts: { allowHalfOpen?: boolean; onread?: net.OnReadOpts } = {}): net.Socket {
  const family = net.isIP(to.host);
  if (family === 0) throw new InvalidArgumentError(`'${to.host}' is not an IP address (look the name up first)`);
  const l = libc();
  const fd = l.socket(family === 6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw new InvalidArgumentError(`socket() failed (errno ${l.errno()})`);
  let socket: net.Socket;
  try {
    setOn(fd, name);
    socket = new net.Socket({ fd, readable: true, writable: true, ...opts } as net.SocketConstructorOpts);
  } catch (e) {
    l.close(fd);
    throw e;
  }
  return socket.connect(to as net.TcpSocketConnectOpts);
}

/** The socket's congestion control, as the kernel has it. */
export function congestionControlOf(socket: net.Socket): string {
  const l = libc();
  const value = new Uint8Array(NAME_MAX);
  const length = new Uint8Array(4);
  new DataView(length.buffer).setUint32(0, NAME_MAX, true);
  if (l.getsockopt(fdOfSocket(socket), IPPROTO_TCP, TCP_CONGESTION, value, length) !== 0) throw new InvalidArgumentError(`getsockopt(TCP_CONGESTION) failed (errno ${l.errno()})`);
  const n = new DataView(length.buffer).getUint32(0, true);
  const end = value.subarray(0, n).indexOf(0);
  return new TextDecoder().decode(value.subarray(0, end < 0 ? n : end));
}
