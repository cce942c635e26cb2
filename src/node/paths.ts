import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import { homedir } from 'node:os';

/** The package root (this file is compiled to dist/src/node/paths.js). */
export function packageRoot(): string {
  return join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
}

/** Where `npm run build` puts the built-in guests. */
export function guestsDir(): string {
  return join(packageRoot(), 'build', 'guests');
}

/** Where `npm run build` puts native libraries (scripts/build-native.mjs). */
export function nativeDir(): string {
  return join(packageRoot(), 'build', 'native');
}

/** ferry's per-user state (VM registrations, caches): $FERRY_HOME or ~/.ferry. */
export function ferryHome(): string {
  return process.env.FERRY_HOME || join(homedir(), '.ferry');
}
