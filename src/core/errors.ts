/**
 * Error taxonomy.
 *
 * Expected failures (bad input, a lost peer, a guest that traps) are `FerryError`s with a stable
 * `code` that tests, the CLI and the HTTP API can rely on. Programming mistakes are
 * `BugIndicatingError`s and are never caught to be turned into user-facing messages.
 */
export class FerryError extends Error {
  /** Stable, machine-readable identifier (e.g. `ERR_MODULE_NO_RUN`). */
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

/** Something that can only happen if ferry itself is wrong. */
export class BugIndicatingError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'BugIndicatingError';
  }
}

/** A user-supplied value (flag, config field, HTTP body) is malformed or out of range. */
export class InvalidArgumentError extends FerryError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_INVALID_ARGUMENT', message, options);
  }
}

/** A guest module ferry cannot run. `code` says which rule it broke. */
export class GuestModuleError extends FerryError {}

/** The guest trapped (or aborted); the VM is stopped and its memory stays inspectable. */
export class GuestTrapError extends FerryError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_GUEST_TRAP', message, options);
  }
}

/** An operation was asked of a VM in a state that does not allow it. */
export class VmStateError extends FerryError {
  constructor(message: string) {
    super('ERR_VM_STATE', message);
  }
}

/** A snapshot file that is truncated, altered, of another version or for another module. */
export class SnapshotError extends FerryError {}

/** Wire-protocol violations: the decoder refuses what it does not understand. */
export class ProtocolError extends FerryError {}

/** The operation was cancelled through its AbortSignal. */
export class AbortError extends FerryError {
  constructor(message = 'operation aborted', options?: { cause?: unknown }) {
    super('ERR_ABORTED', message, options);
  }
}

/** Throws a `BugIndicatingError` when `condition` is false. */
export function assert(condition: unknown, message = 'assertion failed'): asserts condition {
  if (!condition) throw new BugIndicatingError(message);
}
