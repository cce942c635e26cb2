/**
 * The message sequences of docs/protocol.md as a checker. The decoder judges frames one at a time;
 * a `SequenceChecker` judges their order. Each side keeps one and shows it every frame it sends and
 * receives: a received frame out of sequence is the peer's fault (ProtocolError
 * `ERR_PROTOCOL_SEQUENCE`), a sent one is ours (BugIndicatingError).
 */
import { BugIndicatingError, ProtocolError } from '../errors.js';
import { ProtocolErrorCode, type Frame, type FrameType, type MigrationMode } from './frames.js';

export type Role = 'source' | 'destination';

export type Phase =
  /** Nothing yet (source sends HELLO). */
  | 'start'
  /** HELLO sent, waiting for HELLO_ACK. */
  | 'hello'
  /** Accepted: module, pre-copy rounds, STATE. */
  | 'transfer'
  /** SWITCHOVER sent: the outcome is in doubt until RESUMED. */
  | 'switched'
  /** RESUMED: the destination runs the VM (post-copy phase, if any). */
  | 'resumed'
  /** COMPLETE sent by the destination, waiting for the source's ACK. */
  | 'complete'
  /** Terminal: migrated. */
  | 'done'
  /** Terminal: refused, cancelled or failed (ERROR). */
  | 'failed';

const FROM_SOURCE: ReadonlySet<FrameType> = new Set(['HELLO', 'JOIN', 'MODULE', 'PAGES', 'BATCH', 'RUN', 'ROUND_END', 'STATE', 'SWITCHOVER', 'PUSH_DONE']);
const FROM_DESTINATION: ReadonlySet<FrameType> = new Set(['HELLO_ACK', 'RESUMED', 'PAGE_REQUEST', 'COMPLETE']);

export class SequenceChecker {
  private _phase: Phase = 'start';
  private _mode: MigrationMode | undefined;
  private moduleBytes = 0;
  private moduleReceived = 0;
  private lastRound = -1;
  private stateSeen = false;
  private pushDone = false;
  private failedIn: Phase = 'start';
  private failedBy: Role | undefined;
  /** Request ids increase strictly, so both sides agree on which are valid without bookkeeping. */
  private lastRequest = -1;

  constructor(readonly role: Role) {}

  get phase(): Phase {
    return this._phase;
  }

  /** The agreed mode (after HELLO_ACK accepted). */
  get mode(): MigrationMode | undefined {
    return this._mode;
  }

  /**
   * True when the source's copy is the VM (it may resume it): before SWITCHOVER, after a failure
   * before SWITCHOVER, and after an ERROR the destination sent in place of RESUMED (it promises it
   * never ran the guest). False once the destination runs the VM — and while the outcome is in
   * doubt (SWITCHOVER sent, no answer yet), which only the controller can settle.
   */
  get sourceOwnsVm(): boolean {
    const p = this._phase === 'failed' ? this.failedIn : this._phase;
    if (p === 'start' || p === 'hello' || p === 'transfer') return true;
    return this._phase === 'failed' && p === 'switched' && this.failedBy === 'destination';
  }

  /** Checks and records a frame this side sends. Throws BugIndicatingError when out of sequence. */
  sent(frame: Frame): void {
    const why = this.check(frame, this.role);
    if (why) throw new BugIndicatingError(`${this.role} must not send ${frame.type} now: ${why}`);
    this.apply(frame, this.role);
  }

  /** Checks and records a frame the peer sent. Throws ProtocolError ERR_PROTOCOL_SEQUENCE when out of sequence. */
  received(frame: Frame): void {
    const from: Role = this.role === 'source' ? 'destination' : 'source';
    const why = this.check(frame, from);
    if (why) throw new ProtocolError(ProtocolErrorCode.SEQUENCE, `unexpected ${frame.type} from the ${from}: ${why}`);
    this.apply(frame, from);
  }

  /** Why `frame` from `from` is out of sequence now, or undefined when it is fine. */
  private check(frame: Frame, from: Role): string | undefined {
    const t = frame.type;
    if (from === 'source' && FROM_DESTINATION.has(t)) return 'only the destination sends it';
    if (from === 'destination' && FROM_SOURCE.has(t)) return 'only the source sends it';
    const phase = this._phase;
    if (phase === 'done' || phase === 'failed') return `the migration has ended (${phase})`;
    const post = this._mode === 'postcopy' || this._mode === 'hybrid';
    switch (frame.type) {
      case 'HELLO': return phase === 'start' ? undefined : 'HELLO was already sent';
      case 'HELLO_ACK': return phase === 'hello' ? undefined : 'no HELLO is waiting for an answer';
      case 'ERROR': return undefined;
      case 'JOIN': return 'JOIN opens an extra connection of a session; the control connection never carries it';
      case 'PING':
      case 'PONG': return phase === 'start' ? 'before HELLO' : undefined;
      case 'CANCEL': return phase === 'hello' || phase === 'transfer' ? undefined : 'CANCEL is only valid before SWITCHOVER';
      default: break;
    }
    if (phase === 'start' || phase === 'hello') return 'before the handshake completed';
    switch (frame.type) {
      case 'MODULE':
        if (phase !== 'transfer') return 'after SWITCHOVER';
        if (frame.totalBytes !== this.moduleBytes) return `totalBytes ${frame.totalBytes} differs from HELLO's ${this.moduleBytes}`;
        if (frame.offset !== this.moduleReceived) return `chunk at ${frame.offset}, expected ${this.moduleReceived}`;
        return undefined;
      case 'PAGES':
      case 'BATCH':
      case 'RUN':
        if (frame.type !== 'RUN' && frame.demand) {
          if (!post || (phase !== 'switched' && phase !== 'resumed')) return 'demand pages outside a post-copy phase';
          if (frame.seq > this.lastRequest) return `no PAGE_REQUEST ${frame.seq} was made`;
          return undefined;
        }
        if (phase === 'transfer') return this._mode === 'postcopy' ? 'post-copy sends no pages before SWITCHOVER' : undefined;
        if (!post || (phase !== 'switched' && phase !== 'resumed')) return 'after the last round';
        if (this.pushDone) return 'after PUSH_DONE';
        return undefined;
      case 'ROUND_END':
        if (phase !== 'transfer' || this._mode === 'postcopy') return 'no pre-copy round is open';
        if (frame.round !== this.lastRound + 1) return `round ${frame.round}, expected ${this.lastRound + 1}`;
        return undefined;
      case 'STATE':
        if (phase !== 'transfer' || this.stateSeen) return 'STATE is sent once, before SWITCHOVER';
        if (this.moduleReceived !== this.moduleBytes) return `the module is incomplete (${this.moduleReceived} of ${this.moduleBytes} bytes)`;
        return undefined;
      case 'SWITCHOVER':
        if (phase !== 'transfer' || !this.stateSeen) return 'SWITCHOVER follows STATE, once';
        if (this._mode === 'precopy' && frame.pagesRemaining !== 0) return 'pre-copy switches over with every page sent';
        return undefined;
      case 'RESUMED': return phase === 'switched' ? undefined : 'RESUMED answers SWITCHOVER, once';
      case 'PAGE_REQUEST':
        if (!post || (phase !== 'switched' && phase !== 'resumed')) return 'page requests belong to a post-copy phase';
        if (frame.id <= this.lastRequest) return `request id ${frame.id} is not above the last one (${this.lastRequest})`;
        return undefined;
      case 'PUSH_DONE':
        if (!post || (phase !== 'switched' && phase !== 'resumed') || this.pushDone) return 'PUSH_DONE ends a post-copy push, once';
        return undefined;
      case 'COMPLETE': return phase === 'resumed' ? undefined : 'COMPLETE follows RESUMED, once';
      case 'ACK':
        if (frame.acked === 'ROUND_END') return from === 'destination' && frame.value <= this.lastRound ? undefined : `no round ${frame.value} to acknowledge`;
        if (frame.acked === 'MODULE') return from === 'destination' && frame.value === this.moduleReceived && this.moduleBytes > 0 ? undefined : 'the module is not complete';
        if (frame.acked === 'COMPLETE') return from === 'source' && phase === 'complete' ? undefined : 'no COMPLETE to acknowledge';
        return `${frame.acked} is not acknowledged with ACK`;
    }
  }

  private apply(frame: Frame, from: Role): void {
    switch (frame.type) {
      case 'HELLO':
        this._phase = 'hello';
        this.moduleBytes = frame.moduleBytes;
        break;
      case 'HELLO_ACK':
        if (frame.accepted) {
          this._phase = 'transfer';
          this._mode = frame.mode;
        } else {
          this.fail(from);
        }
        break;
      case 'MODULE': this.moduleReceived += frame.chunk.length; break;
      case 'ROUND_END': this.lastRound = frame.round; break;
      case 'STATE': this.stateSeen = true; break;
      case 'SWITCHOVER': this._phase = 'switched'; break;
      case 'RESUMED': this._phase = 'resumed'; break;
      case 'PAGE_REQUEST': this.lastRequest = frame.id; break;
      case 'PUSH_DONE': this.pushDone = true; break;
      case 'COMPLETE': this._phase = 'complete'; break;
      case 'ACK': if (frame.acked === 'COMPLETE') this._phase = 'done'; break;
      case 'ERROR':
      case 'CANCEL': this.fail(from); break;
      default: break;
    }
  }

  private fail(by: Role): void {
    this.failedIn = this._phase;
    this.failedBy = by;
    this._phase = 'failed';
  }
}
