/*
 * ferry's page hashing: XXH3-64 (seed 0) of each 4 KiB page of a run, from the xxHash library
 * (Debian's libxxhash-dev header, inlined), called through koffi by src/node/vm/page-hash.ts.
 *
 * Why a C loop: the memory digest hashes every page a migration moves, on both hosts. Called once
 * per page from JavaScript, a hash paid for the call, the page's view and a BigInt each time
 * (xxh64 from @node-rs/xxhash: ~5 GB/s on the machines measured; its XXH3: ~1 GB/s); one call per
 * run of pages, writing the hashes straight into the caller's BigUint64Array, runs at the speed
 * of XXH3 itself (~30 GB/s on pages in cache, memory bandwidth otherwise). Built for the machine
 * that builds it (-march=native; see scripts/build-native.mjs).
 */
#define XXH_INLINE_ALL
#include <xxhash.h>
#include <stddef.h>
#include <stdint.h>

/* out[i] = XXH3-64 (seed 0) of pages[i * page_size .. (i + 1) * page_size), for i in [0, count). */
void ferry_hash_pages(const uint8_t *pages, size_t count, size_t page_size, uint64_t *out) {
  for (size_t i = 0; i < count; i++) out[i] = XXH3_64bits(pages + i * page_size, page_size);
}
