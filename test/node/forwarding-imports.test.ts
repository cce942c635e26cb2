import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BugIndicatingError } from '../../src/core/errors.js';
import { ForwardingImports } from '../../src/node/vm/forwarding-imports.js';
import binaryen from 'binaryen';

// A guest whose exports call its imports: add3 passes three i32s, ping none, wide seven (its shape
// declares only a rest parameter, so `length` says 0).
const m = binaryen.parseText(`(module
  (import "dev" "add3" (func $add3 (param i32 i32 i32) (result i32)))
  (import "dev" "ping" (func $ping (result i64)))
  (import "wasi" "wide" (func $wide (param i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (func (export "callAdd3") (param i32 i32 i32) (result i32) (call $add3 (local.get 0) (local.get 1) (local.get 2)))
  (func (export "callPing") (result i64) (call $ping))
  (func (export "callWide") (result i32) (call $wide (i32.const 1) (i32.const 2) (i32.const 3) (i32.const 4) (i32.const 5) (i32.const 6) (i32.const 7))))`);
m.setFeatures(binaryen.Features.MVP); // no newer encodings this Node's V8 would not read
const guest = m.emitBinary();
m.dispose();

const shape = () => ({
  dev: { add3: (_a: number, _b: number, _c: number) => 0, ping: () => 0n },
  wasi: { wide: (..._xs: number[]) => 0 },
});

test('an instance made before the functions are bound calls the ones bound later, with every argument', () => {
  const fwd = new ForwardingImports(shape());
  const inst = new WebAssembly.Instance(new WebAssembly.Module(guest as Uint8Array<ArrayBuffer>), fwd.imports);
  const call = inst.exports as { callAdd3(a: number, b: number, c: number): number; callPing(): bigint; callWide(): number };
  assert.throws(() => call.callPing(), BugIndicatingError, 'unbound: a named bug, not a silent undefined');

  const receivers: unknown[] = [];
  const seen: number[][] = [];
  fwd.bind({
    dev: {
      add3: function (this: unknown, a: number, b: number, c: number) { receivers.push(this); return a * 100 + b * 10 + c; },
      ping: () => 42n,
    },
    wasi: { wide: (...xs: number[]) => { seen.push(xs); return xs.reduce((s, x) => s + x, 0); } },
  });
  assert.equal(call.callAdd3(1, 2, 3), 123);
  assert.deepEqual(receivers, [undefined], 'called with no receiver, as WebAssembly calls an import');
  assert.equal(call.callPing(), 42n);
  assert.equal(call.callWide(), 28);
  assert.deepEqual(seen, [[1, 2, 3, 4, 5, 6, 7]], 'every argument arrives, also where the shape says nothing of them (rest parameters)');

  // Bound again (a VM booted twice on one thread is not a case, but nothing forbids it): the new ones run.
  fwd.bind({ dev: { add3: () => -1, ping: () => 0n }, wasi: { wide: () => 0 } });
  assert.equal(call.callAdd3(1, 2, 3), -1);
});

test('binding imports of another shape is refused, and leaves the bound functions as they were', () => {
  const fwd = new ForwardingImports(shape());
  const inst = new WebAssembly.Instance(new WebAssembly.Module(guest as Uint8Array<ArrayBuffer>), fwd.imports);
  const call = inst.exports as { callPing(): bigint };
  fwd.bind({ dev: { add3: () => 0, ping: () => 7n }, wasi: { wide: () => 0 } });
  assert.throws(() => fwd.bind({ dev: { add3: () => 0, ping: () => 1n } }), /wasi\.wide has no function/);
  assert.throws(() => fwd.bind({ dev: { add3: () => 0, ping: () => 1n, extra: () => 0 }, wasi: { wide: () => 0 } }), /4 imports to bind where the forwarders have 3/);
  assert.equal(call.callPing(), 7n, 'the refused binds changed nothing');
  assert.throws(() => new ForwardingImports({ dev: { memory: new WebAssembly.Memory({ initial: 1 }) } }), /dev\.memory is not a function/);
});
