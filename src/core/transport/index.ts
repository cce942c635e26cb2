/** Transports: the Connection contract, an in-memory implementation, and framed connections. */
export * from './transport.js';
export * from './chunk-queue.js';
export * from './memory.js';
export * from './framed.js';
