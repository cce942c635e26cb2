/** The discrete-event migration simulator (docs/simulator.md). */
export * from './charts.js';
export * from './migration.js';
export * from './network.js';
export * from './rng.js';
export * from './scenario.js';
export * from './trace-format.js';
export * from './workload.js';
export * from './world.js';
