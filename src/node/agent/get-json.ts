/**
 * One small JSON GET (a destination agent's /v1/host), with node:http(s).
 *
 * Not the global fetch: a host agent's first fetch loads and compiles Node's bundled undici on its
 * event loop, measured 50-60 ms in one block at the start of the host's first migration by URL —
 * during which every client of every VM it serves (their endpoints live on that loop) waited.
 */
import http from 'node:http';
import https from 'node:https';

/** Most bytes of body read. */
const MAX_BODY_BYTES = 64 * 1024;

export interface JsonReply {
  status: number;
  /** The parsed body, or null when it was not JSON (or too long). */
  body: unknown;
}

/** GETs `url` (http or https); rejects on a network failure or after `timeoutMs`. */
export function getJson(url: string, timeoutMs: number): Promise<JsonReply> {
  const get = url.startsWith('https:') ? https.get : http.get;
  return new Promise((resolve, reject) => {
    const req = get(url, { headers: { accept: 'application/json' }, timeout: timeoutMs }, (res) => {
      const chunks: Buffer[] = [];
      let n = 0;
      res.on('data', (c: Buffer) => {
        n += c.length;
        if (n <= MAX_BODY_BYTES) chunks.push(c);
      });
      res.on('end', () => {
        let body: unknown = null;
        if (n <= MAX_BODY_BYTES) {
          try {
            body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
          } catch {
            body = null;
          }
        }
        resolve({ status: res.statusCode ?? 0, body });
      });
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)));
    req.on('error', reject);
  });
}
