import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { planUndo } from '../../src/recovery/plan.js';

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
