/**
 * Deterministic (seeded) page corpora for codec tests and benchmarks: zero pages, text-like pages,
 * random pages, sparse "heap" pages, re-dirtied versions of a page, and pages duplicated across VMs.
 */
import { PAGE_SIZE } from '../../src/core/pages.js';
import { mulberry32 as rng } from './prng.js';
export { rng };


const WORDS = [
  'the', 'page', 'memory', 'migration', 'dirty', 'round', 'host', 'guest', 'ferry', 'copy', 'stop', 'and', 'of', 'to',
  'in', 'is', 'for', 'request', 'response', 'GET', '/index.html', 'HTTP/1.1', '200', 'OK', 'user', 'session', 'id',
  'value', 'null', 'true', 'false', '{"key":', '"name":', 'error', 'log', 'info', 'debug', 'time', '2026-11-26', 'cache',
];

export function zeroPage(): Uint8Array {
  return new Uint8Array(PAGE_SIZE);
}

export function randomPage(r: () => number): Uint8Array {
  const p = new Uint8Array(PAGE_SIZE);
  const w = new Uint32Array(p.buffer);
  for (let i = 0; i < w.length; i++) w[i] = (r() * 4294967296) >>> 0;
  return p;
}

/** Word-ish ASCII: words from a small vocabulary, spaces, newlines, some numbers. */
export function textPage(r: () => number): Uint8Array {
  const p = new Uint8Array(PAGE_SIZE);
  let i = 0;
  while (i < PAGE_SIZE) {
    const word = r() < 0.1 ? String(Math.floor(r() * 100000)) : WORDS[Math.floor(r() * WORDS.length)];
    for (let k = 0; k < word.length && i < PAGE_SIZE; k++) p[i++] = word.charCodeAt(k);
    if (i < PAGE_SIZE) p[i++] = r() < 0.08 ? 10 : 32;
  }
  return p;
}

/** Mostly zero with small integers and pointers here and there (a typical heap page). */
export function sparsePage(r: () => number): Uint8Array {
  const p = new Uint8Array(PAGE_SIZE);
  const v = new DataView(p.buffer);
  const n = 20 + Math.floor(r() * 100);
  for (let k = 0; k < n; k++) {
    const at = Math.floor(r() * (PAGE_SIZE / 8)) * 8;
    v.setUint32(at, r() < 0.5 ? Math.floor(r() * 256) : 0x10000 + Math.floor(r() * 0x100000), true);
  }
  return p;
}

/**
 * A copy of `page` with about `fraction` of its bytes changed. `clustered` changes runs of
 * 8–64 bytes (how programs write: structs, buffers); otherwise single bytes at random places.
 */
export function mutate(page: Uint8Array, fraction: number, r: () => number, clustered = true): Uint8Array {
  const p = page.slice();
  let left = Math.round(fraction * PAGE_SIZE);
  while (left > 0) {
    const len = clustered ? Math.min(left, 8 + Math.floor(r() * 57)) : 1;
    const at = Math.floor(r() * (PAGE_SIZE - len + 1));
    for (let i = at; i < at + len; i++) p[i] = (p[i] + 1 + Math.floor(r() * 255)) & 0xff; // always a different value
    left -= len;
  }
  return p;
}

export interface Corpus {
  name: string;
  pages: Uint8Array[];
}

export type CorpusName = 'zero' | 'text' | 'random' | 'sparse' | 'mixed' | 'duplicated';

/** `count` pages of one kind; `duplicated` repeats 8 distinct text pages; `mixed` interleaves all kinds. */
export function corpus(name: CorpusName, count: number, seed = 1): Corpus {
  const r = rng(seed);
  const pages: Uint8Array[] = [];
  const distinct = Array.from({ length: 8 }, () => textPage(r));
  for (let i = 0; i < count; i++) {
    switch (name) {
      case 'zero': pages.push(zeroPage()); break;
      case 'text': pages.push(textPage(r)); break;
      case 'random': pages.push(randomPage(r)); break;
      case 'sparse': pages.push(sparsePage(r)); break;
      case 'duplicated': pages.push(distinct[i % distinct.length].slice()); break;
      case 'mixed': {
        const k = i % 5;
        pages.push(k === 0 ? zeroPage() : k === 1 ? textPage(r) : k === 2 ? randomPage(r) : k === 3 ? sparsePage(r) : distinct[i % 8].slice());
        break;
      }
    }
  }
  return { name, pages };
}

export const CORPUS_NAMES: readonly CorpusName[] = ['zero', 'text', 'random', 'sparse', 'mixed', 'duplicated'];

/**
 * Memories of `vms` VMs of `pagesPerVm` pages each, where `sharedFraction` of every VM's pages are
 * the same "OS image" pages (identical across VMs) and the rest are the VM's own text/random pages.
 */
export function gangCorpus(vms: number, pagesPerVm: number, sharedFraction: number, seed = 7): Uint8Array[][] {
  const r = rng(seed);
  const shared = Array.from({ length: Math.max(1, Math.round(pagesPerVm * sharedFraction)) }, () => textPage(r));
  return Array.from({ length: vms }, () => Array.from({ length: pagesPerVm }, (_, i) =>
    i < shared.length ? shared[i].slice() : r() < 0.5 ? textPage(r) : randomPage(r)));
}

/** Concatenates pages into one buffer (a batch). */
export function concat(pages: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(pages.length * PAGE_SIZE);
  pages.forEach((p, k) => out.set(p, k * PAGE_SIZE));
  return out;
}
