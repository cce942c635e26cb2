/** Page codecs (see codec.ts for the contract). */
export * from './codec.js';
export * from './zero.js';
export * from './xbzrle.js';
export * from './dedup.js';
export * from './chain.js';
export * from './adaptive.js';
