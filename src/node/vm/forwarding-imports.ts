/**
 * Guest imports that forward to functions bound later: a module can be instantiated before the
 * functions its imports will call exist, and the instance made then calls whatever was bound since.
 *
 * Why: a vCPU thread that stands by for a migrating VM (vcpu-threads.ts) gets the VM's device
 * state only inside the downtime, and the devices are built from it then. Instantiating the
 * guest's modules, building its imports and running that code for the first time in the thread
 * took 0.8-1 ms of the 3-4 ms a post-copy destination's vCPU thread spent between the state's
 * arrival and the guest's first instruction, on the downtime's critical path (measured here).
 * With forwarders the instances are made while the thread stands by; the boot binds the devices.
 *
 * A forwarder calls its function with no receiver, as WebAssembly calls an import.
 */
import { BugIndicatingError } from '../../core/errors.js';

type ImportFn = (...args: unknown[]) => unknown;

/** Imports (module → name → function) whose functions are bound after the instances are made. */
export class ForwardingImports {
  /** What to instantiate with: one forwarder per function of the shape. */
  readonly imports: WebAssembly.Imports;
  private readonly slots: ImportFn[] = [];
  private readonly names: [string, string][] = [];

  /** @param shape imports with the names (and arities) the bound ones will have; only functions */
  constructor(shape: WebAssembly.Imports) {
    const out: WebAssembly.Imports = {};
    for (const [m, fns] of Object.entries(shape)) {
      const mod: Record<string, ImportFn> = {};
      for (const [n, f] of Object.entries(fns)) {
        if (typeof f !== 'function') throw new BugIndicatingError(`import ${m}.${n} is not a function: only functions can be forwarded`);
        const i = this.slots.length;
        this.slots.push(() => {
          throw new BugIndicatingError(`import ${m}.${n} was called before its function was bound`);
        });
        this.names.push([m, n]);
        mod[n] = forwarder(this.slots, i);
      }
      out[m] = mod;
    }
    this.imports = out;
  }

  /**
   * Points every forwarder at its function in `real`, which has the shape's names and no others
   * (checked first: on a mismatch nothing is bound).
   */
  bind(real: WebAssembly.Imports): void {
    let count = 0;
    for (const fns of Object.values(real)) count += Object.keys(fns).length;
    const fns = this.names.map(([m, n]) => {
      const f = real[m]?.[n];
      if (typeof f !== 'function') throw new BugIndicatingError(`import ${m}.${n} has no function to bind`);
      return f as ImportFn;
    });
    if (count !== fns.length) throw new BugIndicatingError(`${count} imports to bind where the forwarders have ${fns.length}`);
    fns.forEach((f, i) => {
      this.slots[i] = f;
    });
  }
}

/**
 * A forwarder for the function in slot `i`: every argument passed on (a function's `length`
 * leaves out rest and default parameters, so it cannot say how many WebAssembly passes; optimized
 * code passes a rest parameter spread straight on without making the array).
 */
function forwarder(slots: ImportFn[], i: number): ImportFn {
  return (...args) => {
    const fn = slots[i];
    return fn(...args);
  };
}
