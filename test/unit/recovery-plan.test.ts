import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { checkFailover, checkReverseResync, describeRecovery, planUndo, resyncCopied } from '../../src/recovery/plan.js';
import { isFerryError } from '../../src/lib/errors.js';
import type { PairRecord } from '../../src/storage/replication-catalog.js';

test('planUndo: every delta set after the restart point must be in the save volume, else a full copy', () => {
  assert.deepEqual(planUndo({ generation: 1, deltaSetCreated: 7 }, 1, 4, [5, 6, 7].map((n) => ({ generation: 1, n }))), { kind: 'delta-sets', deltaSets: [5, 6, 7] });
  assert.deepEqual(planUndo({ generation: 1, deltaSetCreated: 4 }, 1, 4, []), { kind: 'delta-sets', deltaSets: [] });
  const missing = planUndo({ generation: 1, deltaSetCreated: 7 }, 1, 4, [5, 7].map((n) => ({ generation: 1, n })));
  assert.equal(missing.kind, 'full-copy');
  assert.match(missing.kind === 'full-copy' ? missing.reason : '', /delta set 6/);
  // Rows of another generation do not count.
  assert.equal(planUndo({ generation: 1, deltaSetCreated: 5 }, 1, 4, [{ generation: 2, n: 5 }]).kind, 'full-copy');
  // A restart point newer than anything created, or another generation: the records were lost.
  assert.equal(planUndo({ generation: 1, deltaSetCreated: 3 }, 1, 4, []).kind, 'full-copy');
  assert.equal(planUndo({ generation: 2, deltaSetCreated: 9 }, 1, 4, []).kind, 'full-copy');
});

test('planUndo (property): delta sets are listed exactly when all of restart+1..created are present', () => {
  fc.assert(
    fc.property(fc.integer({ min: 0, max: 40 }), fc.integer({ min: 0, max: 40 }), fc.array(fc.integer({ min: 1, max: 45 }), { maxLength: 60 }), (restart, created, present) => {
      const rows = [...new Set(present)].map((n) => ({ generation: 3, n }));
      const plan = planUndo({ generation: 3, deltaSetCreated: created }, 3, restart, rows);
      const needed = Array.from({ length: Math.max(0, created - restart) }, (_, i) => restart + 1 + i);
      const complete = restart <= created && needed.every((n) => rows.some((r) => r.n === n));
      if (complete) assert.deepEqual(plan, { kind: 'delta-sets', deltaSets: needed });
      else assert.equal(plan.kind, 'full-copy');
    }),
    { numRuns: 500 },
  );
});

test('checkFailover: only a target holding a consistent image may take over; --sync not while a catch-up is applied', () => {
  const pair = (over: Omit<Partial<PairRecord>, 'initialCopy'> & { initialCopy?: Partial<PairRecord['initialCopy']> }): PairRecord =>
    ({ volume: 'v', role: 'target', deltaSetPlayedBack: 3, ...over, initialCopy: { cursorBlock: 0, totalBlocks: 8, stampedDeltaSet: 2, startedAt: '', bytes: 0, doneAt: 'x', ...over.initialCopy } }) as PairRecord;
  const refused = (p: PairRecord, mode: 'default' | 'now' | 'sync', pattern: RegExp): void => {
    assert.throws(() => checkFailover(p, mode), (err: Error) => isFerryError(err, 'BAD_REQUEST') && pattern.test(err.message));
  };
  for (const mode of ['default', 'now', 'sync'] as const) checkFailover(pair({}), mode);
  refused(pair({ role: 'source' }), 'default', /failover is run at the target/);
  refused(pair({ initialCopy: { doneAt: undefined } }), 'now', /no consistent image/);
  refused(pair({ deltaSetPlayedBack: 1 }), 'default', /no consistent image/);
  // A catch-up being applied: the image kept in its snapshot is consistent.
  const catchingUp = pair({ initialCopy: { doneAt: undefined, protectiveSnapshot: 'ferry-catch-up-g1-2' } });
  checkFailover(catchingUp, 'default');
  checkFailover(catchingUp, 'now');
  refused(catchingUp, 'sync', /cannot lose nothing/);
});

test('checkReverseResync: only an old source that failed over (or has not learnt of it yet) keeps its data; status names whose writes go', () => {
  const pair = (over: Partial<PairRecord>): PairRecord => ({ volume: 'v', role: 'source', peerSiteName: 'b', ...over }) as PairRecord;
  const refused = (p: PairRecord, pattern: RegExp): void => {
    assert.throws(() => checkReverseResync(p), (err: Error) => isFerryError(err, 'BAD_REQUEST') && pattern.test(err.message));
  };
  checkReverseResync(pair({ recovery: { phase: 'fenced', previousGeneration: 1, restartPoint: 0 } }));
  checkReverseResync(pair({}));
  refused(pair({ recovery: { phase: 'failed-over', previousGeneration: 1, restartPoint: 4 } }), /it is the source \(failed-over\); it is run at the old source/);
  refused(pair({ recovery: { phase: 'resync', previousGeneration: 1, restartPoint: 4 } }), /it is the source \(resync\)/);
  refused(pair({ role: 'target', recovery: { phase: 'resync-target', previousGeneration: 1, restartPoint: 4 } }), /being rebuilt by a resync from the other site already/);
  refused(pair({ role: 'target' }), /it is the target/);
  const reversing = pair({ recovery: { phase: 'resync', previousGeneration: 1, restartPoint: 4, reverse: true, resyncBlocks: 12, discardSnapshot: 'ferry-discarded-g3' } });
  assert.equal(describeRecovery(reversing), 'resync --reverse (the writes made at the other site since the failover are discarded, kept in its snapshot ferry-discarded-g3): copying 12 blocks that differ');
  assert.equal(describeRecovery(pair({ recovery: { phase: 'resync', previousGeneration: 1, restartPoint: 4, resyncBlocks: 12 } })), 'resync: copying 12 blocks that differ');
  assert.match(describeRecovery(pair({ recovery: { phase: 'fenced', previousGeneration: 1, restartPoint: 0, failedOverTo: 'b' } })), /or, to keep this copy's data instead, "ferry resync v --reverse" here/);
});

test('resyncCopied: only the intermediate copy finished, at the source, in a resync, leaves just the clean-up', () => {
  const done = { cursorBlock: 8, totalBlocks: 8, stampedDeltaSet: 2, startedAt: '', bytes: 0, doneAt: 'x', snapshot: 'ferry-resync-g3-2' };
  const pair = (over: Partial<PairRecord>): PairRecord =>
    ({ volume: 'v', role: 'source', generation: 3, recovery: { phase: 'resync', previousGeneration: 2, restartPoint: 4 }, initialCopy: done, ...over }) as PairRecord;
  assert.equal(resyncCopied(pair({})), true);
  // The copy still running, the first step of a full-copy resync, another generation's point, another phase or role: not done.
  const { doneAt: _running, ...running } = done;
  assert.equal(resyncCopied(pair({ initialCopy: running })), false);
  assert.equal(resyncCopied(pair({ initialCopy: { ...done, snapshot: 'ferry-resync-g3-1' } })), false);
  assert.equal(resyncCopied(pair({ generation: 4 })), false);
  assert.equal(resyncCopied(pair({ recovery: { phase: 'resynced', previousGeneration: 2, restartPoint: 4 } })), false);
  assert.equal(resyncCopied(pair({ role: 'target' })), false);
});
