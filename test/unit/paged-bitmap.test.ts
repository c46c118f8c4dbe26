import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { PagedBitmap, bitsPerPage } from '../../src/lib/paged-bitmap.js';

/** Runs of set bits in a plain boolean array, the model the bitmap is checked against. */
function modelRuns(model: boolean[], start: number, end: number): [number, number][] {
  const out: [number, number][] = [];
  let runStart = -1;
  for (let i = start; i < end; i++) {
    if (model[i] && runStart < 0) runStart = i;
    if (!model[i] && runStart >= 0) {
      out.push([runStart, i - runStart]);
      runStart = -1;
    }
  }
  if (runStart >= 0) out.push([runStart, end - runStart]);
  return out;
}

test('paged bitmap agrees with a boolean-array model under random range operations', () => {
  const size = bitsPerPage * 3 + 77;
  const op = fc.record({
    set: fc.boolean(),
    start: fc.integer({ min: 0, max: size - 1 }),
    count: fc.integer({ min: 1, max: bitsPerPage + 100 }),
  });
  fc.assert(
    fc.property(fc.array(op, { maxLength: 40 }), fc.integer({ min: 0, max: size - 1 }), fc.integer({ min: 1, max: size }), (ops, qStart, qLen) => {
      const bitmap = new PagedBitmap(size);
      const model = new Array<boolean>(size).fill(false);
      for (const o of ops) {
        const count = Math.min(o.count, size - o.start);
        let expectChanged = 0;
        for (let i = o.start; i < o.start + count; i++) {
          if (model[i] !== o.set) expectChanged++;
          model[i] = o.set;
        }
        const changed = o.set ? bitmap.setRange(o.start, count) : bitmap.clearRange(o.start, count);
        assert.equal(changed, expectChanged);
      }
      assert.equal(bitmap.count, model.filter(Boolean).length);
      const qEnd = Math.min(size, qStart + qLen);
      assert.deepEqual([...bitmap.runs(qStart, qEnd)], modelRuns(model, qStart, qEnd));
      for (let i = 0; i < size; i += 997) assert.equal(bitmap.get(i), model[i]);
    }),
    { numRuns: 200 },
  );
});

test('untouched pages cost nothing; clearing a page frees it', () => {
  const bitmap = new PagedBitmap(2 ** 27); // 1 TiB of 8 KiB blocks
  assert.equal(bitmap.residentPages, 0);
  bitmap.setRange(5 * bitsPerPage + 3, 10);
  assert.equal(bitmap.residentPages, 1);
  bitmap.clearRange(5 * bitsPerPage, bitsPerPage);
  assert.equal(bitmap.residentPages, 0);
  assert.equal(bitmap.count, 0);
});

test('dirty pages are reported once', () => {
  const bitmap = new PagedBitmap(bitsPerPage * 4);
  bitmap.set(1);
  bitmap.set(bitsPerPage * 3);
  assert.deepEqual(bitmap.takeDirtyPages(), [0, 3]);
  assert.deepEqual(bitmap.takeDirtyPages(), []);
  bitmap.set(1); // already set: not dirty
  assert.deepEqual(bitmap.takeDirtyPages(), []);
});
