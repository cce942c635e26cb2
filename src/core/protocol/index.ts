/** The migration wire protocol: frames, encoders and the bounded decoder. See docs/protocol.md. */
export * from './frames.js';
export * from './encode.js';
export * from './decoder.js';
export * from './sequence.js';
