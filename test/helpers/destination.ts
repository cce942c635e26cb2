/**
 * The destination factory the engine tests use: localDestination (admits every migration and
 * creates a real VM with every variant, collected in `made` so the test can stop it), or one that
 * refuses with `refuse`.
 * `adapter` wraps the VM for the engine (default: the real DestinationVmAdapter) — a test's own
 * subclass, to watch or slow down a part.
 */
import type { DestinationFactory, DestinationVm } from '../../src/core/engine/types.js';
import type { FerryError } from '../../src/core/errors.js';
import { localDestination } from '../../src/node/engine/adapters.js';
import type { InstrumentCache } from '../../src/node/vm/instrument.js';
import type { Vm } from '../../src/node/vm/vm.js';

export function vmFactory(made: Vm[], cache: InstrumentCache, opts: { refuse?: FerryError; adapter?: (vm: Vm) => DestinationVm } = {}): DestinationFactory {
  const local = localDestination(made, cache, opts.adapter);
  return {
    async admit(hello, mode) {
      if (opts.refuse) throw opts.refuse;
      return local.admit(hello, mode);
    },
  };
}
