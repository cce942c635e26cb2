/**
 * The destination factory the engine tests use: admits every migration (or refuses it with
 * `refuse`) and creates a real VM with every variant, collected in `made` so the test can stop it.
 * `adapter` wraps the VM for the engine (default: the real DestinationVmAdapter) — a test's own
 * subclass, to watch or slow down a part.
 */
import type { DestinationFactory, DestinationVm } from '../../src/core/engine/types.js';
import type { FerryError } from '../../src/core/errors.js';
import { DestinationVmAdapter } from '../../src/node/engine/adapters.js';
import type { InstrumentCache } from '../../src/node/vm/instrument.js';
import { Vm } from '../../src/node/vm/vm.js';

export function vmFactory(made: Vm[], cache: InstrumentCache, opts: { refuse?: FerryError; adapter?: (vm: Vm) => DestinationVm } = {}): DestinationFactory {
  return {
    async admit(hello) {
      if (opts.refuse) throw opts.refuse;
      return {
        async create(module) {
          const vm = Vm.create({ name: hello.vmName, module, memoryBytes: hello.memoryBytes, config: hello.config, cache, variants: ['plain', 'dirty', 'presence'] });
          made.push(vm);
          return opts.adapter ? opts.adapter(vm) : new DestinationVmAdapter(vm);
        },
      };
    },
  };
}
