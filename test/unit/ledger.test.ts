import { test } from 'node:test';
import assert from 'node:assert/strict';
import { crc32c } from '../../src/lib/checksum.js';
import { isFerryError } from '../../src/lib/errors.js';
import { RingSpace } from '../../src/storage/journal.js';
import {
  CopyWindow,
  DeltaSetWindow,
  ReceiveLedger,
  UnreceivedBlocks,
  ackTimeoutMs,
  copyStart,
  judgeCopyDone,
  judgeCopyPiece,
  makeRoom,
  nextToPlay,
  resumePoint,
  rowToSend,
  targetReleasePoint,
} from '../../src/replication/ledger.js';
import { headerCrcFields, type DeltaSetHeaderBody } from '../../src/replication/protocol.js';

const ack = (deltaSet: number, chunksStored: number, sealed = false, full = false) => ({ deltaSet, chunksStored, sealed, deltaSetPlayedBack: 0, full });

test('sender window: chunks up to the window, the header only once every chunk is stored, resends on refusal and silence, a timeout without progress', () => {
  const w = new DeltaSetWindow(5, 10, 2, 0, 3);
  assert.deepEqual(w.fill(0), [2, 3, 4].map((index) => ({ kind: 'chunk', index })), 'resumes from the first chunk the target lacks, three in flight');
  assert.deepEqual(w.fill(0), []);
  assert.equal(w.onAck(ack(4, 9), 10), false, 'an acknowledgement of another delta set moves nothing');
  assert.equal(w.onAck(ack(5, 4), 10), true);
  assert.deepEqual(w.fill(10), [5, 6].map((index) => ({ kind: 'chunk', index })));
  assert.deepEqual(w.onNack({ deltaSet: 5, index: 4, reason: 'damaged' }), [{ kind: 'chunk', index: 4 }]);
  assert.deepEqual(w.onNack({ deltaSet: 5, index: 1, reason: 'old' }), [], 'a refusal of a chunk already stored is stale');
  assert.deepEqual(w.onSilence(10 + ackTimeoutMs - 1), [{ kind: 'chunk', index: 4 }], 'silence: the oldest unacknowledged chunk again');
  assert.equal(w.onSilence(11 + ackTimeoutMs), undefined, 'no progress for the timeout: the session has failed');
  assert.equal(w.onAck(ack(5, 0, false, true), 20_000), false);
  assert.deepEqual(w.onSilence(20_000 + ackTimeoutMs - 1), [{ kind: 'chunk', index: 4 }], 'a full target is alive: its notices hold the timeout off');
  // The target already holds the whole delta set (sealed before a reconnect).
  assert.equal(w.onAck(ack(5, Number.MAX_SAFE_INTEGER, true), 20_001), true);
  assert.equal(w.acked, 10);
  assert.deepEqual(w.fill(20_001), [{ kind: 'header' }], 'no chunk past the end, then the header');
  assert.deepEqual(w.onNack({ deltaSet: 5, index: 7, reason: 'incomplete' }), [{ kind: 'chunk', index: 7 }, { kind: 'header' }]);
  assert.throws(() => w.onNack({ deltaSet: 5, index: 10, reason: 'mismatch' }), (err: Error) => isFerryError(err, 'PROTOCOL_ERROR'));
  assert.equal(w.onAck(ack(5, 10, false), 20_002), false, 'only a sealed acknowledgement ends it');
  assert.equal(w.onAck(ack(5, 10, true), 20_003), true);
  assert.ok(w.sealed);
});

function header(n: number, chunkCount: number, blockCount: number, dataBytes: number, dataCrc: number): DeltaSetHeaderBody {
  const fields = { deltaSet: n, chunkCount, blockCount, dataBytes, dataCrc, createdAtMs: 1, previousCutMs: 0 };
  return { ...fields, headerCrc: crc32c(headerCrcFields(fields)) };
}

test('receiver ledger: chunks in order only; a delta set is sealed only when all it names arrived and matches', () => {
  const l = new ReceiveLedger(3);
  assert.equal(l.n, 4);
  assert.deepEqual(l.onChunk(3, 0), { kind: 'already-sealed' });
  assert.equal(l.onChunk(5, 0).kind, 'out-of-order');
  assert.equal(l.onChunk(4, 1).kind, 'out-of-order');
  assert.deepEqual(l.onChunk(4, 0), { kind: 'store' });
  const a = Buffer.alloc(8, 1);
  const b = Buffer.alloc(8, 2);
  l.writingAt(1024);
  assert.equal(l.heldFromLsn, 1024, 'space being written is held');
  assert.equal(l.startLsn, undefined);
  l.stored({ lsn: 1024, blocks: 2, dataBytes: 8 }, crc32c(a));
  assert.deepEqual(l.onChunk(4, 0), { kind: 'duplicate' });
  const whole = crc32c(Buffer.concat([a, b]));
  assert.equal(l.onHeader(header(4, 2, 3, 16, whole)).kind, 'incomplete');
  const damaged = { ...header(4, 2, 3, 16, whole), blockCount: 4 };
  assert.equal(l.onHeader(damaged).kind, 'corrupt');
  assert.deepEqual(l.onChunk(4, 1), { kind: 'store' });
  l.writingAt(512);
  assert.equal(l.heldFromLsn, 512, 'the oldest of stored and being written');
  l.stored({ lsn: 512, blocks: 1, dataBytes: 8 }, crc32c(b));
  assert.equal(l.heldFromLsn, 1024);
  assert.equal(l.onHeader(header(4, 2, 3, 16, crc32c(a))).kind, 'mismatch', 'a data checksum that does not match');
  assert.equal(l.onHeader(header(4, 2, 4, 16, whole)).kind, 'mismatch', 'a block count that does not match');
  assert.deepEqual(l.onHeader(header(4, 2, 3, 16, whole)), { kind: 'seal', blocks: 3, dataBytes: 16, startLsn: 1024 });
  l.sealed(4);
  assert.equal(l.n, 5);
  assert.equal(l.chunksStored, 0);
  assert.equal(l.heldFromLsn, undefined);
  assert.deepEqual(l.onHeader(header(4, 2, 3, 16, whole)), { kind: 'already-sealed' });
});

test('receiver ledger, group commit: written chunks are taken in order but stored (acknowledged) only at the sync; a failed sync drops them', () => {
  const l = new ReceiveLedger(0);
  const data = [1, 2, 3].map((v) => Buffer.alloc(8, v));
  for (const [i, lsn] of [0, 512, 1024].entries()) {
    assert.deepEqual(l.onChunk(1, i), { kind: 'store' });
    l.writingAt(lsn);
    l.written({ lsn, blocks: 1, dataBytes: 8 }, crc32c(data[i] as Buffer));
  }
  assert.equal(l.chunksStored, 0, 'nothing is acknowledged before the sync');
  assert.equal(l.chunksWritten, 3);
  assert.deepEqual(l.onChunk(1, 2), { kind: 'duplicate' }, 'a written chunk sent again is not written twice');
  assert.equal(l.onChunk(1, 4).kind, 'out-of-order');
  assert.equal(l.heldFromLsn, 0, 'written chunks keep their space');
  const whole = crc32c(Buffer.concat(data));
  assert.equal(l.onHeader(header(1, 3, 3, 24, whole)).kind, 'incomplete', 'a delta set is not sealed on chunks not yet durable');
  l.synced();
  assert.equal(l.chunksStored, 3);
  assert.deepEqual(l.onHeader(header(1, 3, 3, 24, whole)), { kind: 'seal', blocks: 3, dataBytes: 24, startLsn: 0 });

  // A sync that fails: the chunks written since the last one are dropped, to be sent again.
  assert.deepEqual(l.onChunk(1, 3), { kind: 'store' });
  l.writingAt(1536);
  l.written({ lsn: 1536, blocks: 1, dataBytes: 8 }, crc32c(data[0] as Buffer));
  assert.deepEqual(l.dropUnsynced(), [{ lsn: 1536, blocks: 1, dataBytes: 8 }]);
  assert.equal(l.chunksWritten, 3);
  assert.deepEqual(l.onChunk(1, 3), { kind: 'store' }, 'the dropped chunk is expected again');
  assert.equal(l.heldFromLsn, 0);
  l.writingAt(1536);
  l.written({ lsn: 1536, blocks: 1, dataBytes: 8 }, crc32c(data[0] as Buffer));
  assert.throws(() => l.sealed(1), /wait for their sync/, 'never sealed over chunks not yet durable');
});

test('resume point, the row to send, what playback takes next, what may be freed at each end', () => {
  assert.deepEqual(resumePoint({ generation: 2, deltaSetReceived: 6, chunksStored: 3 }, { generation: 2, deltaSetCreated: 9 }), { next: 7, fromChunk: 3, received: 6 });
  assert.equal(resumePoint({ generation: 1, deltaSetReceived: 6, chunksStored: 0 }, { generation: 2, deltaSetCreated: 3 }).received, undefined, 'another generation holds nothing of ours');
  assert.throws(() => resumePoint({ generation: 2, deltaSetReceived: 10, chunksStored: 0 }, { generation: 2, deltaSetCreated: 9 }), (err: Error) => isFerryError(err, 'PROTOCOL_ERROR'));
  const rows = [5, 6].map((n) => ({ generation: 2, n }));
  assert.equal(rowToSend(rows, { generation: 2, deltaSetCreated: 6 }, 6)?.n, 6);
  assert.equal(rowToSend(rows, { generation: 2, deltaSetCreated: 6 }, 7), undefined, 'nothing cut yet: wait');
  assert.throws(() => rowToSend(rows, { generation: 2, deltaSetCreated: 6 }, 4), (err: Error) => isFerryError(err, 'CORRUPT_RECORD'));

  const played = [
    { n: 3, state: 'played' },
    { n: 4, state: 'received', afterCopy: 2 },
  ];
  assert.equal(nextToPlay(played, { deltaSetPlayedBack: 3, copyDone: false, copyId: 2 }), undefined, 'not before the copy is whole');
  assert.equal(nextToPlay(played, { deltaSetPlayedBack: 3, copyDone: true, copyId: 1 }), undefined, 'not before the copy it was cut during');
  assert.equal(nextToPlay(played, { deltaSetPlayedBack: 3, copyDone: true, copyId: 2 })?.n, 4);
  assert.equal(nextToPlay(played, { deltaSetPlayedBack: 2, copyDone: true, copyId: 2 }), undefined, 'in order only');

  // Source: acknowledged delta sets go, oldest first, only as far as needed; never an unacknowledged one.
  const ring = new RingSpace(4 * 512, 4 * 512, 0);
  const source = [
    { state: 'acked', startLsn: 0 },
    { state: 'acked', startLsn: 512 },
    { state: 'ready', startLsn: 1024 },
  ];
  assert.deepEqual(makeRoom(ring, source, 512), { fits: true, freed: [source[0]] });
  assert.equal(ring.tail, 512);
  assert.deepEqual(makeRoom(ring, source.slice(1), 2048), { fits: false, freed: [source[1]] });
  assert.equal(ring.tail, 1024, 'never past a delta set the target has not acknowledged');
  // Target: the oldest unplayed delta set, else what the one being received holds.
  const target = new RingSpace(8 * 512, 6 * 512, 512);
  assert.equal(targetReleasePoint(target, [{ state: 'played', startLsn: 512 }, { state: 'received', startLsn: 2048 }], 2560), 2048);
  assert.equal(targetReleasePoint(target, [{ state: 'played', startLsn: 512 }], 2560), 2560);
  assert.equal(targetReleasePoint(target, [{ state: 'played', startLsn: 512 }], undefined), 3072);
  // A chunk whose write failed gives its space back, so records stay one after another.
  const before = target.head;
  const at = target.allocate(512) as number;
  assert.throws(() => target.giveBack(at, 1024, before), /not the last allocation/);
  target.giveBack(at, 512, before);
  assert.equal(target.head, before);
  assert.equal(target.allocate(512), at, 'the next chunk goes where the failed one was to go');
  // A source delta set whose build failed gives back all its records at once.
  const source2 = new RingSpace(8 * 512, 2 * 512, 512);
  const headBefore = source2.head;
  source2.allocate(512);
  source2.allocate(1024);
  assert.throws(() => source2.rollBack(source2.head + 512), /past the head/);
  source2.rollBack(headBefore);
  assert.equal(source2.usedBytes, 512);
  assert.equal(source2.allocate(512), headBefore);
});

test('copies: where a session starts, the window of pieces with rewinds, what the target makes of a piece and of CopyDone', () => {
  assert.deepEqual(copyStart({ copyId: 2, copyDone: true, copyCursorBlock: 100 }, 2), { done: true });
  assert.deepEqual(copyStart({ copyId: 2, copyDone: false, copyCursorBlock: 40 }, 2), { done: false, from: 40 });
  assert.deepEqual(copyStart({ copyId: 1, copyDone: true, copyCursorBlock: 100 }, 2), { done: false, from: 0 }, 'a copy the target has not seen starts over');

  const w = new CopyWindow(40, 100, 0, 2);
  assert.ok(w.wantsPiece);
  w.sent(60, 20);
  w.sent(80, 5);
  assert.ok(!w.wantsPiece, 'two pieces in flight');
  assert.equal(w.onAck({ cursorBlock: 60 }, 1), 20, 'planned blocks newly at the target');
  assert.ok(w.wantsPiece);
  assert.equal(w.onAck({ cursorBlock: 60, rewind: true }, 2), 0);
  assert.equal(w.cursor, 60, 'a rewind sends again from the cursor');
  assert.equal(w.rewinds, 1);
  assert.equal(w.onAck({ cursorBlock: 90 }, 3), 0);
  assert.equal(w.cursor, 90, 'the target is further than this session sent');
  assert.ok(w.stillAlive(3 + 30_000));
  assert.ok(!w.stillAlive(4 + 30_000));
  w.sent(100, 3);
  w.onAck({ cursorBlock: 100 }, 5);
  assert.ok(w.complete);

  const copy = { copyId: 2, done: false, expectedBlock: 40, blockCount: 100 };
  const piece = (over: Partial<Parameters<typeof judgeCopyPiece>[0]>) => judgeCopyPiece({ copyId: 2, fromBlock: 40, toBlock: 60, extents: [{ block: 45, count: 5 }], ...over }, copy);
  assert.equal(piece({}).kind, 'apply');
  assert.equal(piece({ fromBlock: 60, toBlock: 80, extents: [] }).kind, 'rewind', 'out of order');
  assert.equal(piece({ extents: [{ block: 58, count: 5 }] }).kind, 'rewind', 'an extent outside its range');
  assert.equal(piece({ toBlock: 101 }).kind, 'rewind');
  assert.equal(piece({ copyId: 1 }).kind, 'rewind', 'an older copy');
  assert.equal(piece({ copyId: 3, fromBlock: 0, toBlock: 10, extents: [] }).kind, 'new-copy');
  assert.equal(judgeCopyPiece({ copyId: 2, fromBlock: 40, toBlock: 60, extents: [] }, { ...copy, done: true }).kind, 'rewind', 'a copy already whole');
  assert.equal(judgeCopyDone({ copyId: 2, final: true }, { copyId: 2, done: false, appliedBlock: 99, blockCount: 100 }).kind, 'rewind');
  assert.equal(judgeCopyDone({ copyId: 2, final: true }, { copyId: 2, done: false, appliedBlock: 100, blockCount: 100 }).kind, 'complete');
  assert.equal(judgeCopyDone({ copyId: 2, final: true }, { copyId: 2, done: true, appliedBlock: 100, blockCount: 100 }).kind, 'acknowledge', 'a repeat');
  assert.equal(judgeCopyDone({ copyId: 2, final: false }, { copyId: 2, done: false, appliedBlock: 100, blockCount: 100 }).kind, 'acknowledge', 'the first step of two');
  assert.equal(judgeCopyDone({ copyId: 1, final: true }, { copyId: 2, done: false, appliedBlock: 100, blockCount: 100 }).kind, 'rewind');
});

test('a target counts the blocks its source has that are not here, from heartbeats and the delta sets received since', () => {
  const u = new UnreceivedBlocks();
  assert.equal(u.blocks, 0);
  // 30 blocks not yet cut; delta sets 5 (10 blocks) and 6 (20 blocks) cut, not acknowledged.
  u.heard({ dirtyBlocks: 30, deltaSetAcked: 4, unackedBlocks: 30 }, 4);
  assert.equal(u.blocks, 60);
  // 5 arrives: its blocks are here.
  u.received(5, 10);
  assert.equal(u.blocks, 50);
  // The next heartbeat was sent before 5's acknowledgement reached the source: 5 is not counted twice.
  u.heard({ dirtyBlocks: 30, deltaSetAcked: 4, unackedBlocks: 30 }, 5);
  assert.equal(u.blocks, 50);
  // 6 arrives, then the 30 dirty blocks are cut into 7 and arrive too: nothing known is missing.
  u.received(6, 20);
  u.received(7, 30);
  assert.equal(u.blocks, 0);
  // A source that says nothing of its delta sets (an older one): only its dirty blocks.
  u.heard({ dirtyBlocks: 3 }, 7);
  assert.equal(u.blocks, 3);
  // Never below zero, whatever arrives.
  u.received(8, 100);
  assert.equal(u.blocks, 0);
});
