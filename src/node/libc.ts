/**
 * The few libc calls Node has no API for, through koffi (a well-kept FFI library with prebuilt
 * binaries): blocking sockets (net/blocking-socket.ts), a thread's fair-scheduler settings
 * (fair-scheduling.ts) and a socket's TCP congestion control (transport/congestion.ts). Loaded
 * once per thread, on first use (~30 ms the first time: a thread that will need them soon loads
 * them early).
 */
import { createRequire } from 'node:module';

export interface Libc {
  dup(fd: number): number;
  socket(domain: number, type: number, protocol: number): number;
  fcntl(fd: number, cmd: number, ...rest: unknown[]): number;
  poll(fds: Uint8Array, n: number, timeoutMs: number): number;
  recv(fd: number, into: Uint8Array, n: number, flags: number): number;
  send(fd: number, from: Uint8Array, n: number, flags: number): number;
  shutdown(fd: number, how: number): number;
  setsockopt(fd: number, level: number, name: number, value: Uint8Array, length: number): number;
  /** `length`: a 4-byte buffer holding the value buffer's size on the way in, what was written on the way out. */
  getsockopt(fd: number, level: number, name: number, value: Uint8Array, length: Uint8Array): number;
  close(fd: number): number;
  /** syscall(2) with one pointer and two unsigned ints after the number (sched_setattr, sched_getattr). */
  syscallPtr(n: number, a: number, ptr: Uint8Array, b: number, c: number): number;
  /** sched_yield(2): let another runnable thread of this core go first. */
  schedYield(): number;
  errno(): number;
}

let loaded: Libc | null = null;

/** The file descriptor under a node:net socket or server (null: none, e.g. not connected yet). */
export function fdOf(s: object): number | null {
  const fd = (s as { _handle?: { fd?: unknown } | null })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : null;
}

/** libc's calls if this thread has loaded them already (null: not yet, or they cannot load), for a path that must not wait ~30 ms for the load. */
export function loadedLibc(): Libc | null {
  return loaded;
}

/** libc's calls; throws where there is no libc to load (not Linux, or no koffi binary here). */
export function libc(): Libc {
  if (loaded) return loaded;
  if (process.platform !== 'linux') throw new Error(`libc calls are built for Linux, not ${process.platform}`);
  const koffi = createRequire(import.meta.url)('koffi') as {
    load(name: string): { func(decl: string): (...args: unknown[]) => number };
    errno(): number;
  };
  const lib = koffi.load('libc.so.6');
  const f = (decl: string) => lib.func(decl);
  const fcntl = f('int fcntl(int fd, int cmd, ...)');
  const syscall = f('long syscall(long n, ...)');
  loaded = {
    dup: f('int dup(int fd)') as Libc['dup'],
    socket: f('int socket(int domain, int type, int protocol)') as Libc['socket'],
    fcntl: (fd, cmd, ...rest) => fcntl(fd, cmd, ...rest),
    poll: f('int poll(void *fds, uint64_t n, int timeout)') as Libc['poll'],
    recv: f('intptr_t recv(int fd, void *buf, uintptr_t n, int flags)') as Libc['recv'],
    send: f('intptr_t send(int fd, void *buf, uintptr_t n, int flags)') as Libc['send'],
    shutdown: f('int shutdown(int fd, int how)') as Libc['shutdown'],
    setsockopt: f('int setsockopt(int fd, int level, int name, void *value, uint32_t length)') as Libc['setsockopt'],
    getsockopt: f('int getsockopt(int fd, int level, int name, void *value, void *length)') as Libc['getsockopt'],
    close: f('int close(int fd)') as Libc['close'],
    syscallPtr: (n, a, ptr, b, c) => syscall(n, 'int', a, 'void *', ptr, 'unsigned int', b, 'unsigned int', c),
    schedYield: f('int sched_yield(void)') as Libc['schedYield'],
    errno: () => koffi.errno(),
  };
  return loaded;
}
