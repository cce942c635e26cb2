/** Node-edge codecs: native byte compressors for packed batches. */
export * from './blob.js';
