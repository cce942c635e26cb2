/**
 * The page hash of the memory digest (EngineDeps.hashPage): xxh64 of one page, read in place. Every
 * thread that hashes pages for a digest (the engine's, the fault threads, the page hasher) uses
 * this one, so their hashes agree.
 */
import { xxh64 } from '@node-rs/xxhash';

export const hashPage = (page: Uint8Array): bigint => xxh64(page);
