/** Test guests written in WAT, compiled with binaryen. */
import binaryen from 'binaryen';

export function wat(text: string): Uint8Array {
  const mod = binaryen.parseText(text);
  mod.setFeatures(binaryen.Features.All);
  if (!mod.validate()) throw new Error('test guest does not validate');
  const bytes = mod.emitBinary();
  mod.dispose();
  return bytes;
}

/**
 * "hammer": writes memory as fast as it can with every kind of write the dirty log must catch —
 * unaligned i64 stores biased to straddle page boundaries, bytes, memory.fill and memory.copy
 * ranges — driven by a xorshift PRNG whose seed the host writes at guest address 0 before boot.
 * Memory: `pages` 64 KiB pages. progress() counts writes.
 */
export function hammerGuest(pages = 64): Uint8Array {
  const bytes = pages * 65536;
  return wat(`(module
  (import "ferry" "clock_ns" (func $clock (result i64)))
  (memory (export "memory") ${pages} ${pages})
  (global $x (mut i64) (i64.const 0))
  (global $n (mut i64) (i64.const 0))
  (func $next (result i64)
    (local $v i64)
    (local.set $v (global.get $x))
    (local.set $v (i64.xor (local.get $v) (i64.shl (local.get $v) (i64.const 13))))
    (local.set $v (i64.xor (local.get $v) (i64.shr_u (local.get $v) (i64.const 7))))
    (local.set $v (i64.xor (local.get $v) (i64.shl (local.get $v) (i64.const 17))))
    (global.set $x (local.get $v))
    (local.get $v))
  (func (export "init")
    (global.set $x (i64.or (i64.load (i32.const 0)) (i64.const 1))))
  (func (export "progress") (result i64) (global.get $n))
  (func (export "run") (param $budget i32) (result i32)
    (local $r i64) (local $addr i32) (local $op i32) (local $len i32)
    (block $done
      (loop $l
        (br_if $done (i32.eqz (local.get $budget)))
        (local.set $budget (i32.sub (local.get $budget) (i32.const 1)))
        (local.set $r (call $next))
        ;; a page boundary in [4096, size-4096), then just below it half of the time (straddles), inside the page otherwise
        (local.set $addr (i32.wrap_i64 (i64.rem_u (local.get $r) (i64.const ${bytes / 4096 - 2}))))
        (local.set $addr (i32.add (i32.const 4096) (i32.mul (local.get $addr) (i32.const 4096))))
        (local.set $addr (select
          (i32.sub (local.get $addr) (i32.wrap_i64 (i64.and (i64.shr_u (local.get $r) (i64.const 32)) (i64.const 15))))
          (i32.add (local.get $addr) (i32.wrap_i64 (i64.and (i64.shr_u (local.get $r) (i64.const 32)) (i64.const 4000))))
          (i32.wrap_i64 (i64.and (i64.shr_u (local.get $r) (i64.const 20)) (i64.const 1)))))
        (local.set $op (i32.wrap_i64 (i64.and (i64.shr_u (local.get $r) (i64.const 24)) (i64.const 15))))
        (local.set $len (i32.wrap_i64 (i64.and (i64.shr_u (local.get $r) (i64.const 40)) (i64.const 8191))))
        (if (i32.lt_u (local.get $op) (i32.const 12))
          (then (i64.store (local.get $addr) (local.get $r)))
          (else (if (i32.eq (local.get $op) (i32.const 12))
            (then (i32.store8 (local.get $addr) (i32.wrap_i64 (local.get $r))))
            (else (if (i32.eq (local.get $op) (i32.const 13))
              (then (if (i32.lt_u (i32.add (local.get $addr) (local.get $len)) (i32.const ${bytes}))
                (then (memory.fill (local.get $addr) (i32.wrap_i64 (local.get $r)) (local.get $len)))))
              (else (if (i32.lt_u (i32.add (local.get $addr) (local.get $len)) (i32.const ${bytes}))
                (then (memory.copy (local.get $addr)
                        (i32.wrap_i64 (i64.rem_u (i64.shr_u (local.get $r) (i64.const 8)) (i64.const ${bytes - 8192})))
                        (local.get $len))))))))))
        (global.set $n (i64.add (global.get $n) (i64.const 1)))
        (br $l)))
    (i32.const 0)))`);
}

/** A guest that traps after `after` calls of run(). */
export function trapGuest(after = 3): Uint8Array {
  return wat(`(module
  (memory (export "memory") 1)
  (global $calls (mut i32) (i32.const 0))
  (func (export "run") (param i32) (result i32)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (i32.store (i32.const 16) (i32.const 0xdeadbeef))
    (if (i32.ge_u (global.get $calls) (i32.const ${after})) (then unreachable))
    (i32.const 0)))`);
}
