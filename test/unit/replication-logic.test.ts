import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { RingSpace } from '../../src/storage/journal.js';
import { DeltaSetTrigger, cutRetryDelayMsMax, cutRetryDelayMsMin } from '../../src/replication/triggers.js';
import { initialPairStatus, nextPairStatus, type PairEvent, type PairStatus } from '../../src/replication/pair-state.js';
import { decodeChunk, encodeChunk } from '../../src/replication/chunk.js';
import { isFerryError, FerryError } from '../../src/lib/errors.js';
import { infoView, pairStatusView, type LiveFigures } from '../../src/replication/status.js';
import type { DeltaSetRecord, PairRecord } from '../../src/storage/replication-catalog.js';

test('ring space never hands out overlapping or straddling space, and refuses when full', () => {
  fc.assert(
    fc.property(fc.array(fc.oneof(fc.record({ alloc: fc.integer({ min: 1, max: 12 }) }), fc.record({ free: fc.constant(true) })), { maxLength: 200 }), (ops) => {
      const capacity = 16 * 512;
      const ring = new RingSpace(capacity);
      const live: [number, number][] = [];
      for (const op of ops) {
        if ('alloc' in op) {
          const span = op.alloc * 512;
          const at = ring.allocate(span);
          if (at === undefined) {
            // Full: there really is no room before the tail, with the lap skip counted.
            const offset = ring.head % capacity;
            const need = offset + span > capacity ? capacity - offset + span : span;
            assert.ok(ring.usedBytes + need > capacity, `refused with ${ring.freeBytes} free for ${span}`);
            continue;
          }
          assert.ok((at % capacity) + span <= capacity, 'a record never straddles the end');
          for (const [s, e] of live) assert.ok(at >= e || at + span <= s, 'no overlap with live space');
          assert.ok(at + span - ring.tail <= capacity);
          live.push([at, at + span]);
        } else if (live.length > 0) {
          live.shift();
          ring.release(live[0]?.[0] ?? ring.head);
        }
      }
    }),
    { numRuns: 500 },
  );
});

test('delta-set triggers: interval, high water, on demand, and nothing to cut means no cut', () => {
  const t = new DeltaSetTrigger({ intervalMs: 1000, highWaterBytes: 100 }, 0);
  assert.equal(t.due(500, 10), undefined);
  assert.equal(t.due(999, 99), undefined);
  assert.equal(t.due(1000, 1), 'interval');
  t.rearm(1000);
  assert.equal(t.due(1200, 100), 'high-water');
  t.rearm(1200);
  assert.equal(t.due(2300, 0), undefined, 'an interval with nothing modified cuts nothing');
  assert.equal(t.due(2400, 5), undefined, 'and re-arms');
  assert.equal(t.due(3300, 5), 'interval');
  t.rearm(3300);
  t.demand();
  assert.equal(t.due(3301, 0), 'on-demand');
  t.rearm(3301);
  assert.equal(t.due(3302, 0), undefined);
});

test('a failed cut is retried after a delay that doubles with each failure in a row, up to a cap; a new demand is tried at once; a cut that goes through starts the delay over', () => {
  const t = new DeltaSetTrigger({ intervalMs: 1000, highWaterBytes: 100 }, 0);
  t.demand();
  assert.equal(t.due(0, 0), 'on-demand');
  assert.equal(t.failed(0), cutRetryDelayMsMin);
  assert.equal(t.due(100, 500), undefined, 'demanded and past the high-water mark, but within the delay');
  assert.equal(t.due(cutRetryDelayMsMin, 0), 'on-demand', 'the demand still stands after the delay');
  const delays = [t.failed(cutRetryDelayMsMin)];
  for (let i = 0; i < 8; i++) delays.push(t.failed(0));
  assert.deepEqual(delays.slice(0, 3), [2, 4, 8].map((k) => k * cutRetryDelayMsMin));
  assert.equal(Math.max(...delays), cutRetryDelayMsMax);
  assert.equal(t.due(cutRetryDelayMsMax - 1, 500), undefined);
  assert.equal(t.due(cutRetryDelayMsMax, 500), 'on-demand');
  t.failed(0);
  t.demand();
  assert.equal(t.due(1, 0), 'on-demand', "a new demand (the operator's) does not wait");
  t.rearm(1);
  t.failed(1);
  assert.equal(t.due(2000, 500), undefined);
  t.succeeded();
  assert.equal(t.due(2000, 500), 'high-water');
  assert.equal(t.failed(2000), cutRetryDelayMsMin, 'the delay starts over');
});

test('pair states follow the documented machine and refuse the rest', () => {
  const run = (events: PairEvent[]): PairStatus => events.reduce(nextPairStatus, initialPairStatus);
  assert.equal(run([{ type: 'start' }]).state, 'initial-copying');
  assert.equal(run([{ type: 'start' }, { type: 'copied' }]).state, 'duplex');
  const cmd = run([{ type: 'start' }, { type: 'copied' }, { type: 'suspend' }, { type: 'drained' }]);
  assert.deepEqual([cmd.state, cmd.cause], ['suspended', 'command']);
  const failed = run([{ type: 'start' }, { type: 'copied' }, { type: 'failure', reason: 'link down' }]);
  assert.deepEqual([failed.state, failed.cause, failed.reason], ['suspended', 'failure', 'link down']);
  assert.equal(nextPairStatus(failed, { type: 'resume' }).state, 'duplex-pending');
  assert.equal(nextPairStatus(nextPairStatus(failed, { type: 'resume' }), { type: 'caught-up' }).state, 'duplex');
  const failedDuringCopy = run([{ type: 'start' }, { type: 'failure', reason: 'x' }]);
  assert.equal(nextPairStatus(failedDuringCopy, { type: 'resume' }).state, 'initial-copying', 'an unfinished copy resumes as a copy');
  // A failure while suspended by command keeps the command (the operator's choice wins).
  assert.equal(nextPairStatus(cmd, { type: 'failure', reason: 'y' }).cause, 'command');
  for (const bad of [{ type: 'copied' }, { type: 'drained' }, { type: 'suspend' }, { type: 'failure', reason: 'z' }] as PairEvent[]) {
    assert.throws(() => nextPairStatus(initialPairStatus, bad), (err) => isFerryError(err, 'BAD_REQUEST'), bad.type);
  }
  assert.throws(() => run([{ type: 'start' }, { type: 'start' }]), (err) => isFerryError(err, 'BAD_REQUEST'));
  assert.equal(run([{ type: 'start' }, { type: 'copied' }, { type: 'stop' }]).state, 'simplex');
  // Rule 8: a backlog larger than the save volume is caught up by a copy.
  const catching = run([{ type: 'start' }, { type: 'copied' }, { type: 'catch-up' }]);
  assert.deepEqual([catching.state, catching.initialCopyDone], ['duplex-pending', true]);
  assert.match(catching.reason, /catching up/);
  assert.deepEqual(nextPairStatus(catching, { type: 'copied' }), { state: 'duplex', reason: '', initialCopyDone: true });
  const suspendedCatching = nextPairStatus(catching, { type: 'failure', reason: 'link down' });
  assert.equal(nextPairStatus(suspendedCatching, { type: 'copied' }).state, 'suspended', 'a copy finishing while suspended leaves it suspended');
  assert.equal(nextPairStatus(cmd, { type: 'catch-up' }).state, 'suspended');
  assert.throws(() => nextPairStatus(initialPairStatus, { type: 'catch-up' }), (err) => isFerryError(err, 'BAD_REQUEST'));
});

test('chunks round-trip, and malformed chunks are refused with a typed error', () => {
  const bs = 512;
  const data = Buffer.alloc(3 * bs, 9);
  const chunk = { extents: [{ block: 4, count: 2, zero: false }, { block: 10, count: 1000, zero: true }, { block: 2000, count: 1, zero: false }], data };
  const decoded = decodeChunk(encodeChunk(chunk), bs, 4096);
  assert.deepEqual(decoded.extents, chunk.extents);
  assert.deepEqual(decoded.data, data);
  assert.throws(() => decodeChunk(encodeChunk(chunk), bs, 2000), (e) => isFerryError(e, 'PROTOCOL_ERROR'), 'extent past the end');
  assert.throws(() => decodeChunk(encodeChunk({ ...chunk, data: data.subarray(1) }), bs, 4096), (e) => isFerryError(e, 'PROTOCOL_ERROR'), 'short data');
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 300 }), (bytes) => {
      try {
        decodeChunk(Buffer.from(bytes), bs, 4096);
      } catch (err) {
        assert.ok(err instanceof FerryError);
      }
    }),
    { numRuns: 2000 },
  );
});

/** A duplex async source pair of volume v with a complete initial copy; `counters` set its delta-set numbers. */
function sourcePair(counters: Partial<PairRecord>): PairRecord {
  return {
    volume: 'v', pairId: 'p', role: 'source', mode: 'async', peerUrl: 'http://b', peerSiteId: 'b', peerSiteName: 'b', peerVolume: 'v',
    state: 'duplex', stateReason: '', generation: 1, intervalMs: 5000, highWaterBytes: 64 << 20, saveVolumeBytes: 1 << 30, createdAt: '2026-01-01T00:00:00.000Z',
    initialCopy: { cursorBlock: 10, totalBlocks: 10, stampedDeltaSet: 0, startedAt: '2026-01-01T00:00:00.000Z', doneAt: '2026-01-01T00:00:01.000Z', bytes: 0 },
    deltaSetCreated: 0, deltaSetSent: 0, deltaSetAcked: 0, deltaSetReceived: 0, deltaSetPlayedBack: 0, bytesSent: 0, bytesReceived: 0, paused: false, playedBackCutMs: 0,
    ...counters,
  };
}

/** A connected pair's live figures with nothing dirty, at `nowMs` on both clocks. */
function liveFigures(f: { nowMs: number; currentDeltaSet: number; dirtyBlocks?: number; oldestUnsentWriteMs?: number | undefined }): LiveFigures {
  return {
    nowMs: f.nowMs, sourceHeardMs: undefined, dirtyBlocks: f.dirtyBlocks ?? 0, oldestUnsentWriteMs: f.oldestUnsentWriteMs, sourceNowMs: f.nowMs, rates: { current: 0, average: 0 }, copyPace: 0, throttled: false,
    saveVolume: { usedBytes: 0, capacityBytes: 1, full: false }, connected: true, retries: 0, corruptFrames: 0, ioErrors: 0, lastError: '', failing: '', notice: '', currentDeltaSet: f.currentDeltaSet, currentChunk: 0,
  };
}

test('ferry info tells when building a delta set takes longer than the interval (the next cut waits)', () => {
  const pair = sourcePair({ deltaSetCreated: 2, deltaSetSent: 2, deltaSetAcked: 1, deltaSetReceived: 0, deltaSetPlayedBack: 1, playedBackCutMs: 10_000 });
  const row = (n: number, createdAtMs: number, sealedAtMs: number): DeltaSetRecord => ({
    volume: 'v', generation: 1, n, state: 'acked', startLsn: 0, endLsn: 0, chunks: 1, blocks: 100 * n, dataBytes: 0, dataCrc: 0, createdAtMs, previousCutMs: createdAtMs - 5000, sealedAtMs,
  });
  const live = liveFigures({ nowMs: 30_000, currentDeltaSet: 2 });
  const quick = infoView(pair, [row(1, 10_000, 10_400), row(2, 15_000, 16_000)], live);
  assert.deepEqual(quick.lastBuild, { deltaSet: 2, blocks: 200, buildMs: 1000, slowerThanInterval: false });
  assert.deepEqual(quick.outstanding.map((d) => d.buildMs), [1000]);
  const slow = infoView(pair, [row(1, 10_000, 10_400), row(2, 15_000, 22_500)], live);
  assert.deepEqual(slow.lastBuild, { deltaSet: 2, blocks: 200, buildMs: 7500, slowerThanInterval: true });
  // A target builds nothing: no build figures.
  assert.equal(infoView({ ...pair, role: 'target' }, [row(1, 10_000, 10_400)], live).lastBuild, null);
});

test('ferry info says where each outstanding delta set spent its time: build, send, queue, playback', () => {
  const pair = sourcePair({ deltaSetCreated: 3, deltaSetSent: 3, deltaSetAcked: 2, deltaSetReceived: 2, deltaSetPlayedBack: 0, playedBackCutMs: 5_000 });
  const base = (n: number): DeltaSetRecord => ({
    volume: 'v', generation: 1, n, state: 'ready', startLsn: 0, endLsn: 0, chunks: 1, blocks: 10, dataBytes: 0, dataCrc: 0, createdAtMs: n * 5000, previousCutMs: (n - 1) * 5000, sealedAtMs: n * 5000 + 800,
  });
  const live = liveFigures({ nowMs: 30_000, currentDeltaSet: 3 });
  // Source: 1 and 2 acknowledged (2 waited behind 1), 3 not yet.
  const source = infoView(pair, [{ ...base(1), state: 'acked', ackedAtMs: 9_000 }, { ...base(2), state: 'acked', ackedAtMs: 14_000 }, base(3)], live);
  assert.deepEqual(source.outstanding.map((d) => [d.n, d.buildMs, d.sendMs, d.queuedMs]), [[1, 800, 3200, null], [2, 800, 3200, null], [3, 800, null, null]]);
  // Target: 1 played back after waiting 500 ms, 2 received and not started; nothing is built or sent here.
  const target = infoView({ ...pair, role: 'target' }, [
    { ...base(1), state: 'playing', receivedAtMs: 9_000, playbackStartedAtMs: 9_500 },
    { ...base(2), state: 'received', receivedAtMs: 14_000 },
  ], live);
  assert.deepEqual(target.outstanding.map((d) => [d.n, d.buildMs, d.sendMs, d.queuedMs]), [[1, null, null, 500], [2, null, null, null]]);
});

test('a target that cannot hear its source says so, and counts the silence as lag: writes may have been made there since', () => {
  const now = 1_000_000;
  const target = { ...sourcePair({ deltaSetCreated: 4, deltaSetReceived: 4, deltaSetPlayedBack: 4, playedBackCutMs: now - 30_000 }), role: 'target' as const };
  const heard = (sourceHeardMs: number | undefined, connected: boolean): LiveFigures => ({ ...liveFigures({ nowMs: now, currentDeltaSet: 4 }), sourceHeardMs, connected });
  // Connected and current: no lag however long ago the last cut; the last heartbeat is shown.
  const up = pairStatusView(target, [], heard(now - 400, true));
  assert.equal(up.lagSeconds, 0);
  assert.equal(up.reason, '');
  assert.equal(up.sourceLastHeard, new Date(now - 400).toISOString());
  // A session down for a moment (a reconnect) is not yet silence.
  assert.equal(pairStatusView(target, [], heard(now - 3_000, false)).lagSeconds, 0);
  // Silent for 2 minutes: lag is at least that, and the reason says since when.
  const silent = pairStatusView(target, [], heard(now - 120_000, false));
  assert.equal(silent.lagSeconds, 120);
  assert.equal(silent.state, 'duplex');
  assert.match(silent.reason, /^the source has not been heard from for 2m0s \(since .+\); writes made there since are not known here$/);
  // Lag already larger (delta sets received but not played back) stays as it is.
  const row: DeltaSetRecord = { volume: 'v', generation: 1, n: 5, state: 'received', startLsn: 0, endLsn: 0, chunks: 1, blocks: 5, dataBytes: 0, dataCrc: 0, createdAtMs: now - 20_000, previousCutMs: now - 30_000, sealedAtMs: now - 20_000, firstWriteMs: now - 25_000 };
  assert.equal(pairStatusView({ ...target, deltaSetReceived: 5 }, [row], heard(now - 10_000, false)).lagSeconds, 25);
  // Never heard from since the pair was made here: nothing to say yet; the source says nothing of this.
  assert.equal(pairStatusView(target, [], heard(undefined, false)).reason, '');
  assert.equal(pairStatusView(sourcePair({ deltaSetCreated: 4, deltaSetAcked: 4, deltaSetPlayedBack: 4 }), [], heard(undefined, false)).sourceLastHeard, null);
});

test('pair health: error when replication stopped unasked or something fails, warning when not protecting as set up', () => {
  const now = 1_000_000;
  const live = liveFigures({ nowMs: now, currentDeltaSet: 4 });
  const health = (pair: Partial<PairRecord>, figures: Partial<LiveFigures> = {}): string => pairStatusView(sourcePair({ deltaSetCreated: 4, deltaSetAcked: 4, deltaSetPlayedBack: 4, ...pair }), [], { ...live, ...figures }).health;
  const recovery = (phase: NonNullable<PairRecord['recovery']>['phase']): Partial<PairRecord> => ({ recovery: { phase, previousGeneration: 1, restartPoint: 3 } });
  assert.equal(health({}), 'ok');
  // Copies running as planned are fine; the rebuilt old source and a pair after a resync too.
  assert.equal(health({ state: 'initial-copying', initialCopy: { cursorBlock: 2, totalBlocks: 10, stampedDeltaSet: 0, startedAt: '2026-01-01T00:00:00.000Z', bytes: 0 } }), 'ok');
  assert.equal(health({ role: 'target', ...recovery('resync-target') }), 'ok');
  assert.equal(health({ state: 'duplex', ...recovery('resync') }), 'ok');
  assert.equal(health({ ...recovery('resynced') }), 'ok');
  // Stopped without being asked, or failing at this end: error.
  assert.equal(health({ state: 'suspended', stateReason: 'target unreachable' }), 'error');
  assert.equal(health({}, { failing: 'the save volume could not be written: EIO' }), 'error');
  assert.equal(health({ state: 'suspended', paused: true }, { failing: 'EIO' }), 'error');
  // Not protecting as set up: warning.
  assert.equal(health({ state: 'suspended', paused: true, stateReason: 'suspended by command' }), 'warning');
  assert.equal(health({ state: 'suspending', paused: true }), 'warning');
  assert.equal(health({}, { saveVolume: { usedBytes: 1, capacityBytes: 1, full: true } }), 'warning');
  assert.equal(health({ state: 'duplex-pending', initialCopy: { cursorBlock: 2, totalBlocks: 10, stampedDeltaSet: 0, startedAt: '2026-01-01T00:00:00.000Z', bytes: 0, catchUp: true } }), 'warning');
  assert.equal(health({ state: 'suspended', ...recovery('failed-over') }), 'warning');
  assert.equal(health({ state: 'suspended', ...recovery('fenced') }), 'warning');
  assert.equal(health({ ...recovery('resync-full') }), 'warning');
  assert.equal(health({ role: 'target' }, { connected: false, sourceHeardMs: now - 60_000 }), 'warning');
  assert.equal(health({}, { notice: 'a resize did not finish here' }), 'warning');
  assert.match(pairStatusView(sourcePair({}), [], { ...live, notice: 'a resize did not finish here' }).reason, /a resize did not finish here$/);
  // A full save volume is said in the reason, at either end.
  const full = { ...live, saveVolume: { usedBytes: 1, capacityBytes: 1, full: true } };
  assert.match(pairStatusView(sourcePair({}), [], full).reason, /^the save volume is full: changes wait in the change log/);
  assert.match(pairStatusView({ ...sourcePair({}), role: 'target' }, [], full).reason, /^the save volume is full: the source is held back until playback frees space$/);
});

test('lag runs from the first write the replica does not have, not from the last cut', () => {
  const hour = 3_600_000;
  const pair = sourcePair({ deltaSetCreated: 1, deltaSetSent: 1, deltaSetAcked: 1, deltaSetReceived: 0, deltaSetPlayedBack: 1, playedBackCutMs: 10_000 });
  const now = 10_000 + hour;
  const live = (oldestUnsentWriteMs: number | undefined, dirtyBlocks: number): LiveFigures => liveFigures({ nowMs: now, dirtyBlocks, oldestUnsentWriteMs, currentDeltaSet: 1 });
  const row = (n: number, createdAtMs: number, firstWriteMs?: number): DeltaSetRecord => ({
    volume: 'v', generation: 1, n, state: 'acked', startLsn: 0, endLsn: 0, chunks: 1, blocks: 5, dataBytes: 0, dataCrc: 0, createdAtMs, previousCutMs: 10_000, sealedAtMs: createdAtMs,
    ...(firstWriteMs !== undefined ? { firstWriteMs } : {}),
  });
  // In sync: no lag, however long ago the last cut.
  assert.equal(pairStatusView(pair, [], live(undefined, 0)).lagSeconds, 0);
  // Quiet for an hour, then a write 2 s ago: 2 s behind, not an hour.
  assert.equal(pairStatusView(pair, [], live(now - 2_000, 3)).lagSeconds, 2);
  // When the write was made is not known (after a restart): from the cut, as before.
  assert.equal(pairStatusView(pair, [], live(0, 3)).lagSeconds, hour / 1000);
  // A delta set not played back yet: from its first write; the unsent writes are newer.
  assert.equal(pairStatusView(pair, [row(2, now - 1_000, now - 4_000)], live(now - 500, 3)).lagSeconds, 4);
  assert.equal(pairStatusView(pair, [row(3, now - 500, now - 900), row(2, now - 1_000, now - 4_000)], live(undefined, 0)).lagSeconds, 4, 'the oldest delta set counts');
  assert.equal(pairStatusView(pair, [row(2, now - 1_000)], live(undefined, 0)).lagSeconds, hour / 1000, 'a delta set of unknown first write: from the cut');
  // Never earlier than the cut played back (a first write cannot precede it).
  assert.equal(pairStatusView(pair, [], live(5_000, 3)).lagSeconds, hour / 1000);
  // A catch-up copy is not an image until it is complete: from the cut.
  const catchingUp: PairRecord = { ...pair, initialCopy: { ...pair.initialCopy, catchUp: true } };
  assert.equal(pairStatusView(catchingUp, [], live(now - 2_000, 3)).lagSeconds, hour / 1000);
  // The target sees the same from what it received and what the source last said.
  const target: PairRecord = { ...pair, role: 'target', deltaSetReceived: 2 };
  assert.equal(pairStatusView(target, [row(2, now - 1_000, now - 4_000)], live(now - 500, 3)).lagSeconds, 4);
});
