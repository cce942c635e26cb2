import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BugIndicatingError, ProtocolError } from '../../src/core/errors.js';
import { Encoding, PROTOCOL_VERSION, ProtocolErrorCode, SequenceChecker, type Frame, type MigrationMode, type Role } from '../../src/core/protocol/index.js';

const EMPTY = { size: 0, words: new Uint32Array(0) };
const S: Role = 'source';
const D: Role = 'destination';

const hello = (moduleBytes = 10): Frame => ({
  type: 'HELLO', minVersion: PROTOCOL_VERSION, maxVersion: PROTOCOL_VERSION, vmName: 'vm', memoryBytes: 1 << 20, guestBytes: 1 << 16, pageSize: 4096,
  moduleSha256: '00'.repeat(32), moduleBytes, config: '', offer: { modes: ['precopy', 'postcopy', 'hybrid'], maxStreams: 1, codecs: [] },
});
const ack = (mode: MigrationMode): Frame => ({ type: 'HELLO_ACK', accepted: true, version: 1, mode, streams: 1, codecs: [] });
const mod = (offset: number, n: number, total = 10): Frame => ({ type: 'MODULE', totalBytes: total, offset, chunk: new Uint8Array(n) });
const pages = (seq: number, demand = false): Frame => ({ type: 'PAGES', seq, demand, pages: [{ index: seq, encoding: Encoding.ZERO, data: new Uint8Array(0) }] });
const run = (seq: number): Frame => ({ type: 'RUN', seq, extents: [{ first: seq, count: 1, data: new Uint8Array(4096) }] });
const roundEnd = (round: number): Frame => ({ type: 'ROUND_END', round, pages: 1, dirty: 0 });
const state: Frame = { type: 'STATE', guestBytes: 1 << 16, globals: [], devices: {}, soft: EMPTY };
const switchover = (pagesRemaining: number): Frame => ({ type: 'SWITCHOVER', pagesRemaining, digest: null, stale: EMPTY });
const resumed: Frame = { type: 'RESUMED', pagesMissing: 0 };
const request = (id: number): Frame => ({ type: 'PAGE_REQUEST', id, pages: [1] });
const complete: Frame = { type: 'COMPLETE', digest: null, faultWaits: null };
const ackComplete: Frame = { type: 'ACK', acked: 'COMPLETE', value: 0 };
const ping: Frame = { type: 'PING', seq: 1, time: 0 };
const pong: Frame = { type: 'PONG', seq: 1, time: 0 };

type Step = [Role, Frame];

/** Plays the script through a source and a destination checker, as the two ends would see it. */
function play(script: Step[]): { src: SequenceChecker; dst: SequenceChecker; owns: boolean[] } {
  const src = new SequenceChecker('source');
  const dst = new SequenceChecker('destination');
  const owns: boolean[] = [];
  for (const [from, f] of script) {
    if (from === S) { src.sent(f); dst.received(f); } else { dst.sent(f); src.received(f); }
    assert.equal(src.phase, dst.phase, `phases diverge after ${f.type}`);
    assert.equal(src.sourceOwnsVm, dst.sourceOwnsVm);
    owns.push(src.sourceOwnsVm);
  }
  return { src, dst, owns };
}

/** The last step must be refused: as a ProtocolError by the receiver and as a bug by the sender. */
function refused(script: Step[], last: Step): void {
  const src = new SequenceChecker('source');
  const dst = new SequenceChecker('destination');
  for (const [from, f] of script) {
    if (from === S) { src.sent(f); dst.received(f); } else { dst.sent(f); src.received(f); }
  }
  const [from, f] = last;
  const [sender, receiver] = from === S ? [src, dst] : [dst, src];
  assert.throws(() => receiver.received(f), (e) => e instanceof ProtocolError && e.code === ProtocolErrorCode.SEQUENCE, `${f.type} should be refused`);
  assert.throws(() => sender.sent(f), BugIndicatingError);
}

const handshake = (mode: MigrationMode): Step[] => [[S, hello()], [D, ack(mode)], [S, mod(0, 4)], [S, mod(4, 6)]];

const precopy: Step[] = [
  ...handshake('precopy'),
  [S, pages(0)], [S, pages(0)], [S, roundEnd(0)], [D, { type: 'ACK', acked: 'MODULE', value: 10 }],
  [S, ping], [D, pong], [D, { type: 'ACK', acked: 'ROUND_END', value: 0 }],
  [S, pages(1)], [S, run(1)], [S, roundEnd(1)], [S, roundEnd(2)],
  [S, state], [S, switchover(0)], [D, resumed], [D, complete], [S, ackComplete],
];

test('pre-copy: the documented sequence is accepted and ends done', () => {
  const { src, owns } = play(precopy);
  assert.equal(src.phase, 'done');
  assert.equal(src.mode, 'precopy');
  const at = precopy.findIndex(([, f]) => f.type === 'SWITCHOVER');
  assert.ok(owns.slice(0, at).every(Boolean), 'the source owns the VM until SWITCHOVER');
  assert.ok(owns.slice(at).every((o) => !o), 'and not after');
});

test('pre-copy: STATE may go among the final round\'s pages (ferry sends it once exported), not twice, and not after SWITCHOVER', () => {
  const early: Step[] = [
    ...handshake('precopy'),
    [S, run(0)], [S, roundEnd(0)], [D, { type: 'ACK', acked: 'MODULE', value: 10 }],
    [S, run(1)], [S, state], [S, run(1)], [S, pages(1)], [S, roundEnd(1)],
    [S, switchover(0)], [D, resumed], [D, complete], [S, ackComplete],
  ];
  assert.equal(play(early).src.phase, 'done');
  const upToState = early.slice(0, early.findIndex(([, f]) => f.type === 'STATE') + 1);
  refused(upToState, [S, state]);
  refused(early.slice(0, early.findIndex(([, f]) => f.type === 'SWITCHOVER') + 1), [S, run(2)]);
});

test('post-copy: push, demand requests and PUSH_DONE interleave', () => {
  const { src } = play([
    ...handshake('postcopy'),
    [S, state], [S, switchover(100)], [D, request(0)], [D, resumed],
    [S, pages(0)], [S, pages(0, true)], [D, request(5)], [S, pages(0, true)], [S, pages(5, true)], [S, pages(0)],
    [D, ping], [S, pong], [S, { type: 'PUSH_DONE', pagesSent: 100 }], [S, pages(5, true)],
    [D, complete], [S, ackComplete],
  ]);
  assert.equal(src.phase, 'done');
});

test('hybrid: rounds, then a post-copy phase', () => {
  const { src } = play([
    ...handshake('hybrid'),
    [S, pages(0)], [S, roundEnd(0)], [S, pages(1)], [S, roundEnd(1)],
    [S, state], [S, switchover(7)], [D, resumed], [D, request(1)], [S, pages(1, true)], [S, pages(0)],
    [S, { type: 'PUSH_DONE', pagesSent: 7 }], [D, complete], [S, ackComplete],
  ]);
  assert.equal(src.phase, 'done');
});

test('out-of-sequence frames are refused by the receiver and are bugs at the sender', () => {
  const pre = handshake('precopy');
  const post = handshake('postcopy');
  refused([], [S, pages(0)]);
  refused([], [D, hello()]);
  refused([[S, hello()]], [S, pages(0)]);
  refused([[S, hello()]], [S, hello()]);
  refused(pre, [S, roundEnd(1)]);
  refused([[S, hello()], [D, ack('precopy')], [S, mod(0, 4)]], [S, mod(5, 5)]);
  refused([[S, hello()], [D, ack('precopy')], [S, mod(0, 4)]], [S, state]);
  refused(pre, [S, switchover(0)]);
  refused([...pre, [S, state]], [S, switchover(3)]);
  refused([...pre, [S, state], [S, switchover(0)]], [D, request(0)]);
  refused([...pre, [S, state], [S, switchover(0)]], [S, pages(3)]);
  refused([...pre, [S, state], [S, switchover(0)]], [S, run(3)]);
  refused([...pre, [S, state], [S, switchover(0)]], [S, { type: 'CANCEL', reason: 'too late' }]);
  refused([...pre, [S, state], [S, switchover(0)]], [D, complete]);
  refused(pre, [D, { type: 'ACK', acked: 'ROUND_END', value: 0 }]);
  refused(post, [S, pages(0)]);
  refused(post, [S, run(0)]);
  refused(post, [S, roundEnd(0)]);
  refused([...post, [S, state], [S, switchover(9)]], [S, pages(0, true)]);
  refused([...post, [S, state], [S, switchover(9)], [D, request(3)]], [D, request(3)]);
  refused([...post, [S, state], [S, switchover(9)], [D, request(3)]], [S, pages(4, true)]);
  refused([...post, [S, state], [S, switchover(9)], [S, { type: 'PUSH_DONE', pagesSent: 9 }]], [S, pages(0)]);
  refused([...pre, [S, { type: 'ERROR', code: 'ERR_X', message: '' }]], [S, pages(0)]);
  refused(precopy, [S, ping]);
});

test('who owns the VM after a failure', () => {
  // Refused or cancelled before the switchover point: the source resumes.
  assert.equal(play([[S, hello()], [D, { type: 'HELLO_ACK', accepted: false, code: 'ERR_NO_CAPACITY', message: '' }]]).src.sourceOwnsVm, true);
  assert.equal(play([...handshake('hybrid'), [S, pages(0)], [D, { type: 'CANCEL', reason: 'drain' }]]).src.sourceOwnsVm, true);
  // The destination refuses the state instead of resuming: it never ran the guest.
  const afterSwitch: Step[] = [...handshake('precopy'), [S, state], [S, switchover(0)]];
  assert.equal(play(afterSwitch).src.sourceOwnsVm, false, 'in doubt while waiting for RESUMED');
  assert.equal(play([...afterSwitch, [D, { type: 'ERROR', code: 'ERR_STATE', message: '' }]]).src.sourceOwnsVm, true);
  // The source gives up after the switchover: still in doubt (the destination may have started).
  assert.equal(play([...afterSwitch, [S, { type: 'ERROR', code: 'ERR_X', message: '' }]]).src.sourceOwnsVm, false);
  // After RESUMED the destination owns it, whatever happens.
  assert.equal(play([...afterSwitch, [D, resumed], [S, { type: 'ERROR', code: 'ERR_X', message: '' }]]).src.sourceOwnsVm, false);
});
