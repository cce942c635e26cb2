/**
 * A client for the kv guest's line protocol (docs: guests/as/kv.ts). Used by the demo, tests and
 * benchmarks; it records every request's latency and the longest stall it saw, which is how
 * client-observed downtime is measured.
 */
import { connect, type Socket } from 'node:net';
import { FerryError } from '../core/errors.js';

export class KvClientError extends FerryError {}

interface Waiter { resolve: (line: string) => void; reject: (e: Error) => void; sentAt: number }

export class KvClient {
  private sock: Socket | null = null;
  private buf = '';
  private readonly waiting: Waiter[] = [];
  /** Latency of every completed request, ms. */
  readonly latencies: number[] = [];
  /** Longest time between consecutive replies while requests were outstanding, ms. */
  maxStallMs = 0;
  private lastReplyAt = 0;

  constructor(readonly host: string, readonly port: number) {}

  async connect(): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      const s = connect({ host: this.host, port: this.port }, () => resolve());
      s.setNoDelay(true);
      s.setEncoding('utf8');
      s.once('error', reject);
      s.on('data', (d: string) => this.onData(d));
      s.on('close', () => this.failAll(new KvClientError('ERR_KV_CLOSED', 'kv connection closed')));
      s.on('error', (e) => this.failAll(new KvClientError('ERR_KV_SOCKET', `kv connection failed: ${e.message}`, { cause: e })));
      this.sock = s;
    });
    this.lastReplyAt = performance.now();
  }

  private onData(d: string): void {
    this.buf += d;
    for (let nl = this.buf.indexOf('\n'); nl >= 0; nl = this.buf.indexOf('\n')) {
      const line = this.buf.slice(0, nl);
      this.buf = this.buf.slice(nl + 1);
      const w = this.waiting.shift();
      if (!w) continue;
      const now = performance.now();
      this.latencies.push(now - w.sentAt);
      this.maxStallMs = Math.max(this.maxStallMs, now - Math.max(this.lastReplyAt, w.sentAt));
      this.lastReplyAt = now;
      w.resolve(line);
    }
  }

  private failAll(e: Error): void {
    for (const w of this.waiting.splice(0)) w.reject(e);
  }

  /** Sends one request line and resolves with the reply line. Requests may be pipelined. */
  request(line: string): Promise<string> {
    if (!this.sock) return Promise.reject(new KvClientError('ERR_KV_NOT_CONNECTED', 'kv client is not connected'));
    return new Promise((resolve, reject) => {
      if (this.waiting.length === 0) this.lastReplyAt = performance.now();
      this.waiting.push({ resolve, reject, sentAt: performance.now() });
      this.sock!.write(`${line}\n`);
    });
  }

  async set(key: string, value: string): Promise<void> {
    const r = await this.request(`SET ${key} ${value}`);
    if (r !== 'OK') throw new KvClientError('ERR_KV_REPLY', `SET ${key}: unexpected reply '${r}'`);
  }

  async get(key: string): Promise<string | null> {
    const r = await this.request(`GET ${key}`);
    if (r === 'NOTFOUND') return null;
    if (!r.startsWith('VALUE ')) throw new KvClientError('ERR_KV_REPLY', `GET ${key}: unexpected reply '${r}'`);
    return r.slice(6);
  }

  async close(): Promise<void> {
    const s = this.sock;
    this.sock = null;
    if (!s) return;
    // Half-close and wait until our FIN is written; the server may keep its side open a little
    // longer (until the guest acknowledges), which is no reason to wait.
    await new Promise<void>((r) => s.end(() => r()));
    s.destroy();
  }
}
