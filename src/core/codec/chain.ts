/**
 * chain: several page codecs tried in order (e.g. zero → xbzrle → dedup); the first that encodes a
 * page wins, and every other stateful part hears what the destination will hold (`delivered`), so
 * their states stay in step. The decoder dispatches on the codec id.
 */
import { PAGE_SIZE } from '../pages.js';
import { CodecErrorCode, ZERO_CODEC_ID, codecFail, type PageCodec, type PageDecoder, type PageEncoder } from './codec.js';

const ZERO_PAGE = new Uint8Array(PAGE_SIZE);

export interface ChainInit {
  /** Name in the HELLO offer (default: the parts' names joined with '+'). */
  name?: string;
}

export function chain(codecs: readonly PageCodec[], init: ChainInit = {}): PageCodec {
  if (codecs.length === 0) throw new RangeError('chain needs at least one codec');
  const ids = new Set<number>();
  for (const c of codecs) {
    if (ids.has(c.id)) throw new RangeError(`chain: codec id ${c.id} used twice`);
    ids.add(c.id);
  }
  const name = init.name ?? codecs.map((c) => c.name).join('+');
  return {
    name,
    id: codecs[0].id,
    createEncoder(): PageEncoder {
      const parts = codecs.map((c) => c.createEncoder());
      const wins = new Array<number>(parts.length).fill(0);
      let raw = 0;
      return {
        name,
        encode(pageIndex, page) {
          for (let k = 0; k < parts.length; k++) {
            const r = parts[k].encode(pageIndex, page);
            if (r !== null) {
              wins[k]++;
              // Parts before k already assumed `page` (they returned null); parts after k never saw it.
              const isZero = r.codecId === ZERO_CODEC_ID && r.bytes.length === 0;
              for (let j = k + 1; j < parts.length; j++) {
                const p = parts[j];
                if (isZero && p.deliveredZero) p.deliveredZero(pageIndex);
                else p.delivered(pageIndex, page);
              }
              return r;
            }
          }
          raw++;
          return null;
        },
        delivered(pageIndex, page) {
          for (const p of parts) p.delivered(pageIndex, page);
        },
        deliveredZero(pageIndex) {
          for (const p of parts) {
            if (p.deliveredZero) p.deliveredZero(pageIndex);
            else p.delivered(pageIndex, ZERO_PAGE);
          }
        },
        stats() {
          const s: Record<string, number> = { raw };
          parts.forEach((p, k) => {
            s[`${p.name}.wins`] = wins[k];
            for (const [key, v] of Object.entries(p.stats())) s[`${p.name}.${key}`] = v;
          });
          return s;
        },
      };
    },
    createDecoder(): PageDecoder {
      const parts = codecs.map((c) => c.createDecoder());
      const byId = new Map<number, PageDecoder>();
      for (const p of parts) for (const i of p.ids) byId.set(i, p);
      return {
        name,
        ids: [...byId.keys()],
        decode(pageIndex, codecId, bytes, page) {
          const d = byId.get(codecId);
          if (!d) return codecFail(CodecErrorCode.UNKNOWN, `${name} does not know codec id ${codecId} (page ${pageIndex})`);
          d.decode(pageIndex, codecId, bytes, page);
          for (const p of parts) if (p !== d) p.delivered(pageIndex, page);
        },
        delivered(pageIndex, page) {
          for (const p of parts) p.delivered(pageIndex, page);
        },
        stats() {
          const s: Record<string, number> = {};
          for (const p of parts) for (const [key, v] of Object.entries(p.stats())) s[`${p.name}.${key}`] = v;
          return s;
        },
      };
    },
  };
}
