/**
 * The few libc calls Node has no API for, through koffi (a well-kept FFI library with prebuilt
 * binaries): blocking sockets (net/blocking-socket.ts) and a thread's fair-scheduler settings
 * (fair-scheduling.ts). Loaded once per thread, on first use (~30 ms the first time: a thread that
 * will need them soon loads them early).
 */
import { createRequire } from 'node:module';

export interface Libc {
  dup(fd: number): number;
  fcntl(fd: number, cmd: number, ...rest: unknown[]): number;
  poll(fds: Uint8Array, n: number, timeoutMs: number): number;
  recv(fd: number, into: Uint8Array, n: number, flags: number): number;
  send(fd: number, from: Uint8Array, n: number, flags: number): number;
  shutdown(fd: number, how: number): number;
  close(fd: number): number;
  /** syscall(2) with one pointer and two unsigned ints after the number (sched_setattr, sched_getattr). */
  syscallPtr(n: number, a: number, ptr: Uint8Array, b: number, c: number): number;
  errno(): number;
}

let loaded: Libc | null = null;

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
    fcntl: (fd, cmd, ...rest) => fcntl(fd, cmd, ...rest),
    poll: f('int poll(void *fds, uint64_t n, int timeout)') as Libc['poll'],
    recv: f('intptr_t recv(int fd, void *buf, uintptr_t n, int flags)') as Libc['recv'],
    send: f('intptr_t send(int fd, void *buf, uintptr_t n, int flags)') as Libc['send'],
    shutdown: f('int shutdown(int fd, int how)') as Libc['shutdown'],
    close: f('int close(int fd)') as Libc['close'],
    syscallPtr: (n, a, ptr, b, c) => syscall(n, 'int', a, 'void *', ptr, 'unsigned int', b, 'unsigned int', c),
    errno: () => koffi.errno(),
  };
  return loaded;
}
