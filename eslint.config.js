// Lint enforces the layering in ARCHITECTURE.md: src/core is pure TypeScript (no Node APIs, no I/O,
// no imports from the node edge), so the simulator and the browser can run it.
import tseslint from 'typescript-eslint';

const nodeBuiltins = ['fs', 'net', 'tls', 'os', 'path', 'url', 'crypto', 'worker_threads', 'child_process', 'http', 'https', 'stream', 'events', 'buffer', 'util', 'zlib', 'dgram', 'dns', 'perf_hooks', 'timers', 'readline', 'process'];

export default tseslint.config(
  { ignores: ['dist/**', 'node_modules/**', 'build/**', 'guests/**', 'scratch/**'] },
  ...tseslint.configs.recommended,
  {
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
      '@typescript-eslint/ban-ts-comment': ['error', { 'ts-expect-error': 'allow-with-description', 'ts-ignore': true }],
    },
  },
  {
    files: ['src/core/**/*.ts'],
    rules: {
      'no-restricted-imports': ['error', {
        patterns: [
          { group: ['node:*'], message: 'src/core is pure: no Node APIs (see ARCHITECTURE.md, Layering).' },
          { group: ['**/node/**', '../node/*'], message: 'src/core must not depend on the node edge.' },
        ],
        paths: nodeBuiltins.map((name) => ({ name, message: 'src/core is pure: no Node APIs.' })),
      }],
      'no-restricted-globals': ['error', { name: 'process', message: 'src/core is pure: no process.' }, { name: 'Buffer', message: 'src/core is pure: use Uint8Array.' }, { name: 'require', message: 'ESM only.' }],
    },
  },
);
