/**
 * A generic child walker over binaryen.js expressions. binaryen.js has no such walker, and its type
 * declarations omit the per-class accessors (`binaryen.Store.getPtr`, …) that do exist at run time,
 * so this file declares the ones it uses and checks at load time that they are really there.
 */
import binaryen from 'binaryen';
import { BugIndicatingError } from '../../../core/errors.js';

type Ref = number;
type Get = (e: Ref) => Ref;
type Set = (e: Ref, c: Ref) => void;
type Fn = (...args: never[]) => unknown;

/** The run-time accessor classes of binaryen.js this module relies on, by class then method. */
const NEEDED: Record<string, string[]> = {
  Block: ['getNumChildren', 'getChildAt', 'setChildAt'],
  If: ['getCondition', 'setCondition', 'getIfTrue', 'setIfTrue', 'getIfFalse', 'setIfFalse'],
  Loop: ['getBody', 'setBody'],
  Break: ['getCondition', 'setCondition', 'getValue', 'setValue'],
  Switch: ['getCondition', 'setCondition', 'getValue', 'setValue'],
  Call: ['getNumOperands', 'getOperandAt', 'setOperandAt'],
  CallIndirect: ['getNumOperands', 'getOperandAt', 'setOperandAt', 'getTarget', 'setTarget'],
  LocalSet: ['getValue', 'setValue'],
  GlobalSet: ['getValue', 'setValue'],
  Load: ['getPtr', 'setPtr', 'getOffset', 'setOffset', 'getBytes', 'isAtomic'],
  Store: ['getPtr', 'setPtr', 'getValue', 'setValue', 'getOffset', 'setOffset', 'getBytes', 'isAtomic'],
  AtomicRMW: ['getPtr', 'setPtr', 'getValue', 'setValue', 'getOffset', 'setOffset', 'getBytes'],
  AtomicCmpxchg: ['getPtr', 'setPtr', 'getExpected', 'setExpected', 'getReplacement', 'setReplacement', 'getOffset', 'setOffset', 'getBytes'],
  AtomicWait: ['getPtr', 'setPtr', 'getExpected', 'setExpected', 'getTimeout', 'setTimeout', 'getExpectedType'],
  AtomicNotify: ['getPtr', 'setPtr', 'getNotifyCount', 'setNotifyCount'],
  SIMDExtract: ['getVec', 'setVec'],
  SIMDReplace: ['getVec', 'setVec', 'getValue', 'setValue'],
  SIMDShuffle: ['getLeft', 'setLeft', 'getRight', 'setRight'],
  SIMDTernary: ['getA', 'setA', 'getB', 'setB', 'getC', 'setC'],
  SIMDShift: ['getVec', 'setVec', 'getShift', 'setShift'],
  SIMDLoad: ['getPtr', 'setPtr', 'getOffset', 'setOffset', 'getOp'],
  SIMDLoadStoreLane: ['getPtr', 'setPtr', 'getVec', 'setVec', 'getOffset', 'setOffset', 'getOp', 'isStore'],
  MemoryInit: ['getDest', 'setDest', 'getOffset', 'setOffset', 'getSize', 'setSize', 'getSegment'],
  MemoryCopy: ['getDest', 'setDest', 'getSource', 'setSource', 'getSize', 'setSize'],
  MemoryFill: ['getDest', 'setDest', 'getValue', 'setValue', 'getSize', 'setSize'],
  Unary: ['getValue', 'setValue'],
  Binary: ['getLeft', 'setLeft', 'getRight', 'setRight'],
  Select: ['getIfTrue', 'setIfTrue', 'getIfFalse', 'setIfFalse', 'getCondition', 'setCondition'],
  Drop: ['getValue', 'setValue'],
  Return: ['getValue', 'setValue'],
  MemoryGrow: ['getDelta', 'setDelta'],
  RefIsNull: ['getValue', 'setValue'],
  TableGet: ['getIndex', 'setIndex'],
  TupleMake: ['getNumOperands', 'getOperandAt', 'setOperandAt'],
  TupleExtract: ['getTuple', 'setTuple'],
};

/**
 * An expression kind's id. Some `binaryen.XxxId` constants named in the type declarations are
 * missing at run time (TableFillId, ElemDropId, …); the C getter `_BinaryenXxxId()` always exists.
 */
export function expressionId(kind: string): number {
  const b = binaryen as unknown as Record<string, unknown>;
  const direct = b[`${kind}Id`];
  if (typeof direct === 'number') return direct;
  const getter = b[`_Binaryen${kind}Id`];
  if (typeof getter === 'function') return (getter as () => number)();
  throw new BugIndicatingError(`binaryen.js has no expression kind ${kind}`);
}

/** Typed access to binaryen.js's run-time accessor classes: `cls('Store').getPtr(expr)`. */
export type Accessors = Record<string, Fn>;
const runtime = binaryen as unknown as Record<string, Record<string, Fn> | undefined>;
for (const [cls, methods] of Object.entries(NEEDED)) {
  for (const m of methods) {
    if (typeof runtime[cls]?.[m] !== 'function') {
      throw new BugIndicatingError(`binaryen.js lacks ${cls}.${m} at run time; the instrumenter needs it`);
    }
  }
}
export function cls(name: keyof typeof NEEDED): Accessors {
  return runtime[name] as Accessors;
}
export function call<T>(name: keyof typeof NEEDED, method: string, ...args: unknown[]): T {
  return (runtime[name] as Record<string, (...a: unknown[]) => T>)[method](...args);
}

interface Slot { get: Get; set: Set }
interface VarSlots { num: (e: Ref) => number; at: (e: Ref, i: number) => Ref; setAt: (e: Ref, i: number, c: Ref) => void }

function fixed(name: string, ...fields: string[]): Slot[] {
  const c = runtime[name] as Record<string, Fn>;
  return fields.map((f) => ({ get: c[`get${f}`] as Get, set: c[`set${f}`] as Set }));
}
function varying(name: string, what: 'Children' | 'Operands'): VarSlots {
  const c = runtime[name] as Record<string, Fn>;
  const one = what === 'Children' ? 'Child' : 'Operand';
  return {
    num: c[`getNum${what}`] as (e: Ref) => number,
    at: c[`get${one}At`] as (e: Ref, i: number) => Ref,
    setAt: c[`set${one}At`] as (e: Ref, i: number, c: Ref) => void,
  };
}

/** Expression kinds with no children. */
const LEAVES = new Set<number>([
  binaryen.NopId, binaryen.LocalGetId, binaryen.GlobalGetId, binaryen.ConstId, binaryen.UnreachableId,
  binaryen.MemorySizeId, binaryen.AtomicFenceId, binaryen.RefNullId, binaryen.RefFuncId, binaryen.DataDropId,
  binaryen.TableSizeId,
]);

const FIXED = new Map<number, Slot[]>([
  [binaryen.IfId, fixed('If', 'Condition', 'IfTrue', 'IfFalse')],
  [binaryen.LoopId, fixed('Loop', 'Body')],
  [binaryen.BreakId, fixed('Break', 'Condition', 'Value')],
  [binaryen.SwitchId, fixed('Switch', 'Condition', 'Value')],
  [binaryen.LocalSetId, fixed('LocalSet', 'Value')],
  [binaryen.GlobalSetId, fixed('GlobalSet', 'Value')],
  [binaryen.LoadId, fixed('Load', 'Ptr')],
  [binaryen.StoreId, fixed('Store', 'Ptr', 'Value')],
  [binaryen.AtomicRMWId, fixed('AtomicRMW', 'Ptr', 'Value')],
  [binaryen.AtomicCmpxchgId, fixed('AtomicCmpxchg', 'Ptr', 'Expected', 'Replacement')],
  [binaryen.AtomicWaitId, fixed('AtomicWait', 'Ptr', 'Expected', 'Timeout')],
  [binaryen.AtomicNotifyId, fixed('AtomicNotify', 'Ptr', 'NotifyCount')],
  [binaryen.SIMDExtractId, fixed('SIMDExtract', 'Vec')],
  [binaryen.SIMDReplaceId, fixed('SIMDReplace', 'Vec', 'Value')],
  [binaryen.SIMDShuffleId, fixed('SIMDShuffle', 'Left', 'Right')],
  [binaryen.SIMDTernaryId, fixed('SIMDTernary', 'A', 'B', 'C')],
  [binaryen.SIMDShiftId, fixed('SIMDShift', 'Vec', 'Shift')],
  [binaryen.SIMDLoadId, fixed('SIMDLoad', 'Ptr')],
  [binaryen.SIMDLoadStoreLaneId, fixed('SIMDLoadStoreLane', 'Ptr', 'Vec')],
  [binaryen.MemoryInitId, fixed('MemoryInit', 'Dest', 'Offset', 'Size')],
  [binaryen.MemoryCopyId, fixed('MemoryCopy', 'Dest', 'Source', 'Size')],
  [binaryen.MemoryFillId, fixed('MemoryFill', 'Dest', 'Value', 'Size')],
  [binaryen.UnaryId, fixed('Unary', 'Value')],
  [binaryen.BinaryId, fixed('Binary', 'Left', 'Right')],
  [binaryen.SelectId, fixed('Select', 'IfTrue', 'IfFalse', 'Condition')],
  [binaryen.DropId, fixed('Drop', 'Value')],
  [binaryen.ReturnId, fixed('Return', 'Value')],
  [binaryen.MemoryGrowId, fixed('MemoryGrow', 'Delta')],
  [binaryen.RefIsNullId, fixed('RefIsNull', 'Value')],
  [binaryen.TableGetId, fixed('TableGet', 'Index')],
  [binaryen.TupleExtractId, fixed('TupleExtract', 'Tuple')],
]);

const VARYING = new Map<number, VarSlots>([
  [binaryen.BlockId, varying('Block', 'Children')],
  [binaryen.CallId, varying('Call', 'Operands')],
  [binaryen.CallIndirectId, varying('CallIndirect', 'Operands')],
  [binaryen.TupleMakeId, varying('TupleMake', 'Operands')],
]);
const CALL_INDIRECT_TARGET = fixed('CallIndirect', 'Target')[0];

/** Memory-accessing kinds: their children run at one more "site depth" (see `walk`). */
export const ACCESS_IDS = new Set<number>([
  binaryen.LoadId, binaryen.StoreId, binaryen.AtomicRMWId, binaryen.AtomicCmpxchgId, binaryen.AtomicWaitId,
  binaryen.AtomicNotifyId, binaryen.SIMDLoadId, binaryen.SIMDLoadStoreLaneId, binaryen.MemoryInitId,
  binaryen.MemoryCopyId, binaryen.MemoryFillId,
]);

/** Thrown by `walk` for an expression kind it has no table entry for. */
export class UnsupportedExpressionError extends Error {
  constructor(readonly id: number) {
    super(`unsupported expression kind ${id}`);
  }
}

/** Calls `fn(child, replace)` for every direct child of `e`, in no particular order. */
function forEachChild(e: Ref, fn: (child: Ref, replace: (r: Ref) => void) => void): void {
  const id = binaryen.getExpressionId(e);
  if (LEAVES.has(id)) return;
  const slots = FIXED.get(id);
  if (slots) {
    for (const s of slots) {
      const c = s.get(e);
      if (c) fn(c, (r) => s.set(e, r));
    }
    return;
  }
  const v = VARYING.get(id);
  if (v) {
    const n = v.num(e);
    for (let i = 0; i < n; i++) {
      const c = v.at(e, i);
      if (c) fn(c, (r) => v.setAt(e, i, r));
    }
    if (id === binaryen.CallIndirectId) {
      const t = CALL_INDIRECT_TARGET.get(e);
      fn(t, (r) => CALL_INDIRECT_TARGET.set(e, r));
    }
    return;
  }
  throw new UnsupportedExpressionError(id);
}

/**
 * Rewrites a tree bottom-up without recursion (compiled guests nest deeply): `visit(e, depth)` sees
 * every expression after its children were rewritten and returns its replacement (or `e`). `depth`
 * counts the memory-access expressions enclosing `e`, so a rewrite can give each nesting level its
 * own scratch locals. Returns the new root.
 */
export function walk(root: Ref, visit: (e: Ref, depth: number) => Ref): Ref {
  interface Frame { e: Ref; depth: number; replace: (r: Ref) => void; expanded: boolean }
  let out = root;
  const stack: Frame[] = [{ e: root, depth: 0, replace: (r) => { out = r; }, expanded: false }];
  while (stack.length > 0) {
    const f = stack[stack.length - 1];
    if (!f.expanded) {
      f.expanded = true;
      const childDepth = f.depth + (ACCESS_IDS.has(binaryen.getExpressionId(f.e)) ? 1 : 0);
      forEachChild(f.e, (c, replace) => stack.push({ e: c, depth: childDepth, replace, expanded: false }));
      continue;
    }
    stack.pop();
    const r = visit(f.e, f.depth);
    if (r !== f.e) f.replace(r);
  }
  return out;
}

/** Visits every expression of a tree (no rewriting), iteratively. */
export function forEachExpression(root: Ref, fn: (e: Ref) => void): void {
  const stack = [root];
  while (stack.length > 0) {
    const e = stack.pop() as Ref;
    fn(e);
    forEachChild(e, (c) => stack.push(c));
  }
}
