/**
 * Sender threads: a TCP connection's writes made by a thread of its own, so that parallel data
 * streams put their bytes through the kernel on several cores at once (QEMU's multifd: a thread
 * per channel). More sockets on one event loop were slower than one (FINDINGS: parallel streams
 * need parallel threads): on loopback the sender's `send` does most of the kernel's work, the
 * receiver's only the last copy, so one thread sending is what bounds a stream.
 *
 * Only the writing moves. The connection stays a node:net socket on its event loop, which reads,
 * half-closes and resets it as before (transport/tcp.ts); the thread sends on a duplicate of its
 * descriptor with send(2), waiting in poll(2) while the kernel's buffer is full. The descriptor
 * stays non-blocking (the flag belongs to the socket, which the event loop still reads). Bytes to
 * send reach the thread by postMessage: views of shared memory (guest pages) as they are, anything
 * else copied, so a writer may reuse its buffers as with any connection.
 *
 * A host keeps one pool ({@link SendThreads}): a thread takes tens of milliseconds to start, so
 * threads return to the pool when their connection ends and serve the next one (a pool may also
 * start some ahead of the first).
 */
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { fileURLToPath } from 'node:url';
import { BugIndicatingError } from '../../core/errors.js';
import { BlockingSocket, BlockingSocketError, blockingSocketsAvailable } from '../net/blocking-socket.js';
import { collectSoon } from '../threads.js';

/**
 * What a thread is told, in order: a session's `open`, its `write`s, its `end` (close the
 * descriptor), then the next session's `open` — or `exit`. Messages are handled in the order sent,
 * so a thread is free for the next session as soon as `end` is posted.
 */
type ToThread =
  | { t: 'open'; fd: number; session: number }
  | { t: 'write'; bytes: Uint8Array }
  | { t: 'end' }
  | { t: 'exit' };

type FromThread =
  | { t: 'wrote'; session: number; bytes: number }
  | { t: 'failed'; session: number; errno: number; message: string };

interface ThreadInit {
  role: 'ferry-send-thread';
  /** Holds the session the owner aborted: the thread stops sending for it. */
  abort: SharedArrayBuffer;
}

const HERE = fileURLToPath(import.meta.url);
/** Idle threads a pool keeps (more are ended as their connections end). */
const MAX_IDLE = 4;

/** What a {@link ThreadSender} tells its connection. */
export interface SendSink {
  /** Some written bytes reached the kernel: `pending` went down. */
  written(): void;
  /** A send failed (the peer reset the connection, …); nothing more is sent. */
  failed(e: BlockingSocketError): void;
}

interface PoolThread {
  worker: Worker;
  abort: Int32Array;
  /** The sender using the thread now. */
  sender: ThreadSender | null;
}

/**
 * The main thread's end of one connection's sender thread: `write` queues bytes for the thread,
 * `pending` counts those the kernel has not taken yet.
 */
export class ThreadSender {
  /** Bytes written and not yet in the kernel's buffer. */
  pending = 0;
  private failure: BlockingSocketError | null = null;
  private ended = false;
  private flushWaiters: (() => void)[] = [];

  constructor(private readonly thread: PoolThread, readonly session: number, private readonly sink: SendSink, private readonly release: () => void) {}

  /** Queues `bytes` (a view of shared memory goes as it is, read when sent; other bytes are copied now). */
  write(bytes: Uint8Array): void {
    if (this.ended) throw new BugIndicatingError('write on a sender thread that was let go');
    if (this.failure || bytes.length === 0) return;
    this.pending += bytes.length;
    if (bytes.buffer instanceof SharedArrayBuffer) this.thread.worker.postMessage({ t: 'write', bytes } satisfies ToThread);
    else {
      // A copy of just these bytes (a view's whole buffer would go otherwise), moved, not copied again.
      const copy = bytes.slice();
      this.thread.worker.postMessage({ t: 'write', bytes: copy } satisfies ToThread, [copy.buffer]);
    }
  }

  /** Calls `then` once everything written is in the kernel's buffer (at once if it is; never if a send fails). */
  whenFlushed(then: () => void): void {
    if (this.pending === 0) then();
    else this.flushWaiters.push(then);
  }

  /** Stops sending: what is queued is dropped (a thread waiting for room in the kernel's buffer notices within 20 ms), then lets the thread go. */
  abort(): void {
    if (this.ended) return;
    Atomics.store(this.thread.abort, 0, this.session);
    this.end();
  }

  /** Lets the thread go: it sends what was written, closes its descriptor, and is the pool's again. */
  end(): void {
    if (this.ended) return;
    this.ended = true;
    this.flushWaiters = [];
    this.thread.worker.postMessage({ t: 'end' } satisfies ToThread);
    this.release();
  }

  /** @internal a message from the thread for this session (only while it has the thread: none come after end()). */
  handle(m: FromThread): void {
    if (m.t === 'wrote') {
      this.pending -= m.bytes;
      if (this.pending === 0) {
        const w = this.flushWaiters;
        this.flushWaiters = [];
        for (const f of w) f();
      }
      this.sink.written();
    } else {
      this.failure = new BlockingSocketError(m.message, m.errno);
      this.flushWaiters = [];
      this.sink.failed(this.failure);
    }
  }
}

/**
 * A host's sender threads. `take` gives a connection's descriptor to a thread (an idle one, or a
 * new one); `spares` are started at once, so the first connections do not wait for theirs.
 */
export class SendThreads {
  private readonly idle: PoolThread[] = [];
  private readonly all = new Set<PoolThread>();
  private nextSession = 1;
  private closed = false;
  /** Connections handed to a thread so far. */
  taken = 0;

  /** Whether this machine has sender threads (Linux, with koffi's binary for it). */
  static available(): boolean {
    return blockingSocketsAvailable();
  }

  /** @param spares threads started now, ready for the first connections. */
  constructor(spares = 1) {
    if (!SendThreads.available()) return;
    for (let i = 0; i < spares; i++) this.idle.push(this.spawn());
  }

  /** Threads alive (idle and sending). */
  get threads(): number {
    return this.all.size;
  }

  private spawn(): PoolThread {
    const abort = new SharedArrayBuffer(4);
    const worker = new Worker(HERE, { workerData: { role: 'ferry-send-thread', abort } satisfies ThreadInit });
    worker.unref(); // it never keeps a process alive by itself
    const thread: PoolThread = { worker, abort: new Int32Array(abort), sender: null };
    this.all.add(thread);
    worker.on('message', (m: FromThread) => {
      const s = thread.sender;
      if (s && m.session === s.session) s.handle(m);
    });
    const gone = (e?: unknown) => {
      this.all.delete(thread);
      const i = this.idle.indexOf(thread);
      if (i >= 0) this.idle.splice(i, 1);
      const s = thread.sender;
      thread.sender = null;
      s?.handle({ t: 'failed', session: s.session, errno: 0, message: `the sender thread stopped${e instanceof Error ? `: ${e.message}` : ''}` });
    };
    worker.on('error', gone);
    worker.on('exit', () => gone());
    return thread;
  }

  /**
   * Hands `fd` (a duplicate the thread will own and close) to a thread: from now on the returned
   * sender's writes go out on it. Null if this machine has no sender threads or the pool is closed
   * (the caller keeps writing itself; `fd` is then still the caller's).
   */
  take(fd: number, sink: SendSink): ThreadSender | null {
    if (this.closed || !SendThreads.available()) return null;
    const thread = this.idle.pop() ?? this.spawn();
    const session = this.nextSession++;
    const sender = new ThreadSender(thread, session, sink, () => {
      thread.sender = null;
      // After the `end` just posted: the descriptor is closed before the thread exits.
      if (this.closed || this.idle.length >= MAX_IDLE) thread.worker.postMessage({ t: 'exit' } satisfies ToThread);
      else this.idle.push(thread);
    });
    thread.sender = sender;
    this.taken++;
    thread.worker.postMessage({ t: 'open', fd, session } satisfies ToThread);
    return sender;
  }

  /** Ends the idle threads now and the others as their connections end (a host shutting down). */
  async close(): Promise<void> {
    this.closed = true;
    const idle = this.idle.splice(0);
    await Promise.all(idle.map((t) => new Promise<void>((done) => {
      t.worker.ref(); // waited for now
      t.worker.once('exit', () => done());
      t.worker.postMessage({ t: 'exit' } satisfies ToThread);
    })));
  }
}

// ------------------------------------------------------------------ the thread

function senderThread(init: ThreadInit): void {
  const aborted = new Int32Array(init.abort);
  let sock: BlockingSocket | null = null;
  let session = 0;
  let failed = false;
  const stop = () => Atomics.load(aborted, 0) === session;
  const post = (m: FromThread) => parentPort!.postMessage(m);

  parentPort!.on('message', (m: ToThread) => {
    if (m.t === 'open') {
      sock = new BlockingSocket(m.fd);
      session = m.session;
      failed = false;
      return;
    }
    if (m.t === 'end') {
      sock?.close();
      sock = null;
      // The session's writes were views of guest memory, which this thread would otherwise keep (threads.ts).
      collectSoon();
      return;
    }
    if (m.t === 'exit') {
      sock?.close();
      process.exit(0); // in a worker, ends this thread only
    }
    if (failed || !sock) return;
    try {
      sock.sendAll(m.bytes, stop);
      post({ t: 'wrote', session, bytes: m.bytes.length });
    } catch (e) {
      failed = true;
      const err = e instanceof BlockingSocketError ? e : new BlockingSocketError(String(e));
      post({ t: 'failed', session, errno: err.errno, message: err.message });
    }
  });
}

const init = isMainThread ? undefined : (workerData as ThreadInit | undefined);
if (init?.role === 'ferry-send-thread') senderThread(init);
