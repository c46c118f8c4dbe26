import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { BitmapFile } from '../../src/storage/bitmap-file.js';
import { ActivityLog, FileActivityLogStore } from '../../src/tracking/activity-log.js';
import { ChangeLog } from '../../src/tracking/change-log.js';

const blockBytes = 8192;
const blocks = 4096;
const extentBytes = 64 * blockBytes; // 64 blocks per extent
const alExtents = 6; // tiny, so evictions happen
/** The change log's clock in these tests. */
let clockMs = 0;

async function openLog(dir: string, create: boolean, flushData: (al: ActivityLog) => Promise<void> = async () => undefined): Promise<{ log: ChangeLog; al: ActivityLog; stores: { close(): Promise<void> }[] }> {
  const path = join(dir, 'dirty.bitmap');
  const bitmap = create ? await BitmapFile.create(path, blocks) : (await BitmapFile.open(path, 'fill')).file;
  const store = await FileActivityLogStore.open(join(dir, 'al'), alExtents);
  const { log: al, recovered } = await ActivityLog.open(store, alExtents);
  const log = new ChangeLog(blockBytes, bitmap, al, () => flushData(al), { extentBytes, now: () => clockMs });
  await log.recover(recovered);
  return { log, al, stores: [bitmap, store] };
}

test('rule 1: after a crash at any point, every block marked since the last sealed delta set is still dirty', async () => {
  const op = fc.oneof(
    fc.record({ kind: fc.constant('mark' as const), first: fc.integer({ min: 0, max: blocks - 1 }), count: fc.integer({ min: 1, max: 100 }) }),
    fc.record({ kind: fc.constant('cut' as const) }),
    fc.record({ kind: fc.constant('seal' as const) }),
  );
  await fc.assert(
    fc.asyncProperty(fc.array(op, { minLength: 1, maxLength: 60 }), async (ops) => {
      const dir = await mkdtemp(join(tmpdir(), 'ferry-changelog-'));
      try {
        const { log } = await openLog(dir, true);
        const mustBeDirty = new Set<number>();
        let oldBlocks = new Set<number>();
        for (const o of ops) {
          if (o.kind === 'mark') {
            const count = Math.min(o.count, blocks - o.first);
            await log.mark(o.first, count);
            for (let b = o.first; b < o.first + count; b++) mustBeDirty.add(b);
          } else if (o.kind === 'cut' && !log.old) {
            const old = log.switchTables();
            oldBlocks = new Set<number>();
            for (const [s, n] of old.runs()) for (let b = s; b < s + n; b++) oldBlocks.add(b);
          } else if (o.kind === 'seal' && log.old) {
            // The delta set of the old table is durable: its blocks need no tracking,
            // unless they were marked again since the cut.
            log.old.clearAll();
            await log.sealed();
            const stillCurrent = new Set<number>();
            for (const [s, n] of log.current.runs()) for (let b = s; b < s + n; b++) stillCurrent.add(b);
            for (const b of oldBlocks) if (!stillCurrent.has(b)) mustBeDirty.delete(b);
            oldBlocks = new Set();
          }
        }
        // Crash: nothing is closed or flushed; reopen from what is in the files.
        const { log: recovered, stores } = await openLog(dir, false);
        for (const b of mustBeDirty) assert.ok(recovered.current.get(b), `block ${b} lost from tracking`);
        for (const s of stores) await s.close();
      } finally {
        await rm(dir, { recursive: true, force: true });
      }
    }),
    { numRuns: 60 },
  );
});

test('activity log: the newer intact slot wins; a torn newer slot falls back to the older one', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-al-'));
  try {
    const path = join(dir, 'al');
    const { log } = await ActivityLog.open(await FileActivityLogStore.open(path, 16), 16);
    await log.ensureHot([1, 2]);
    await log.ensureHot([3]);
    assert.deepEqual(log.hotExtents, [1, 2, 3]);
    await log.close();
    let reopened = await ActivityLog.open(await FileActivityLogStore.open(path, 16), 16);
    assert.deepEqual(reopened.recovered, [1, 2, 3]);
    await reopened.log.close();
    // Damage the newest slot (sequence 2 lives in slot 0): the older copy ([1, 2]) is used.
    const fh = await open(path, 'r+');
    await fh.write(Buffer.from([0xee]), 0, 1, 17);
    await fh.close();
    reopened = await ActivityLog.open(await FileActivityLogStore.open(path, 16), 16);
    assert.deepEqual(reopened.recovered, [1, 2]);
    assert.equal(reopened.damaged, false, 'one torn slot is normal');
    await reopened.log.close();
    // Both slots damaged: what was hot is not known, and the log says so (not "nothing").
    const both = await open(path, 'r+');
    await both.write(Buffer.from([0xee]), 0, 1, 4096 + 17);
    await both.write(Buffer.from([0xee]), 0, 1, 17);
    await both.close();
    reopened = await ActivityLog.open(await FileActivityLogStore.open(path, 16), 16);
    assert.deepEqual([reopened.recovered, reopened.damaged], [[], true]);
    // It works on: the next write makes an intact slot, and the next open trusts it.
    await reopened.log.ensureHot([7]);
    await reopened.log.close();
    reopened = await ActivityLog.open(await FileActivityLogStore.open(path, 16), 16);
    assert.deepEqual([reopened.recovered, reopened.damaged], [[7], false]);
    await reopened.log.close();
    // A log never written (a new pair) is not damaged.
    const fresh = await ActivityLog.open(await FileActivityLogStore.open(join(dir, 'new'), 16), 16);
    assert.deepEqual([fresh.recovered, fresh.damaged], [[], false]);
    await fresh.log.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('power loss: an extent leaves the activity log only once the volume is flushed, and a write during that flush keeps it', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-changelog-'));
  try {
    let hotAtFlush: number[] | undefined;
    let duringFlush: (() => Promise<void>) | undefined;
    const { log, al } = await openLog(dir, true, async (activity) => {
      hotAtFlush ??= [...activity.hotExtents];
      await duringFlush?.();
    });
    await log.mark(0, 1); // extent 0
    await log.mark(64, 1); // extent 1
    const old = log.switchTables();
    old.clearAll(); // the delta set of blocks 0 and 64 is built
    duringFlush = () => log.mark(65, 1); // a host write to extent 1 while the volume is flushed
    await log.sealed();
    assert.deepEqual(hotAtFlush, [0, 1], 'the extents were still tracked when the volume was flushed');
    assert.deepEqual(al.hotExtents, [1], 'extent 0 leaves after the flush; extent 1 stays for the write made during it');
    // Crash: block 65 is still tracked.
    const { log: recovered, stores } = await openLog(dir, false);
    assert.ok(recovered.current.get(65), 'the block written during the flush is lost from tracking');
    assert.ok(!recovered.current.get(0), 'the sealed block is no longer dirty');
    for (const s of stores) await s.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('the change log knows when the oldest write not yet in a delta set was made (lag runs from it)', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-changelog-'));
  try {
    clockMs = 1_000;
    const { log, stores } = await openLog(dir, true);
    assert.equal(log.oldestUnsentWriteMs, undefined, 'nothing written');
    clockMs = 5_000;
    await log.mark(10, 1);
    clockMs = 6_000;
    await log.mark(20, 1);
    assert.equal(log.oldestUnsentWriteMs, 5_000, 'the first write, not a later one');
    // The cut: the old table's writes stay the oldest until its delta set is sealed.
    log.switchTables();
    assert.equal(log.oldFirstWriteMs, 5_000);
    clockMs = 9_000;
    await log.mark(30, 1);
    assert.equal(log.firstWriteMs, 9_000);
    assert.equal(log.oldestUnsentWriteMs, 5_000);
    log.old!.clearAll();
    await log.sealed();
    assert.equal(log.oldestUnsentWriteMs, 9_000, 'sealed: the new table\'s first write');
    // A delta set that could not be built goes back with its time.
    log.switchTables();
    clockMs = 12_000;
    await log.mark(40, 1);
    await log.mergeOldBack();
    assert.equal(log.oldestUnsentWriteMs, 9_000);
    // After a restart, when the recovered blocks were written is not known: 0.
    for (const store of stores) await store.close();
    const reopened = await openLog(dir, false);
    assert.equal(reopened.log.oldestUnsentWriteMs, 0);
    for (const store of reopened.stores) await store.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('a grown volume: both tables and the persisted bitmap cover the new blocks; a crash after marking them recovers them', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-changelog-'));
  try {
    const { log, stores } = await openLog(dir, true);
    await log.mark(10, 5);
    log.switchTables();
    await log.mark(blocks - 2, 2);
    await log.grow(blocks * 2);
    assert.equal(log.blockCount, blocks * 2);
    assert.equal(log.old?.bitCount, blocks * 2);
    assert.equal(log.old?.count, 5, 'the old table keeps its blocks');
    await log.mark(blocks + 100, 3);
    await log.mark(blocks * 2 - 1, 1);
    // A crash: nothing closed; the files are read again as a restart would.
    for (const s of stores) await s.close();
    const reopened = await BitmapFile.open(join(dir, 'dirty.bitmap'), 'throw');
    assert.equal(reopened.file.bitmap.bitCount, blocks * 2);
    await reopened.file.close();
    const { log: after, stores: again } = await openLog(dir, false);
    for (const b of [10, blocks - 1, blocks + 100, blocks + 102, blocks * 2 - 1]) assert.ok(after.current.get(b), `block ${b} is still tracked`);
    for (const s of again) await s.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('a full disk at open: the blocks recovered stay hot in the activity log until the bitmap can be written, and a crash meanwhile recovers them again', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-changelog-'));
  try {
    // A crash with writes in two extents: they are hot in the activity log only.
    const first = await openLog(dir, true);
    await first.log.mark(10, 4);
    await first.log.mark(3 * 64 + 1, 2);
    for (const s of first.stores) await s.close();

    // Opened again on a full disk: persisting the recovered blocks fails for want of space.
    const path = join(dir, 'dirty.bitmap');
    const bitmap = (await BitmapFile.open(path, 'fill')).file;
    bitmap.sync = () => Promise.reject(Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' }));
    const store = await FileActivityLogStore.open(join(dir, 'al'), alExtents);
    const { log: al, recovered } = await ActivityLog.open(store, alExtents);
    assert.deepEqual(recovered, [0, 3]);
    const log = new ChangeLog(blockBytes, bitmap, al, async () => undefined, { extentBytes, now: () => clockMs });
    assert.equal(await log.recover(recovered), 128, 'both extents, whole, are dirty');
    assert.match(log.recoveryNotPersisted, /ENOSPC/);
    assert.deepEqual(al.hotExtents, [0, 3], 'they stay in the activity log');
    // A crash now, and an open with space: the blocks come back from the activity log,
    // the bitmap is written, and the activity log lets them go.
    await bitmap.close();
    await store.close();
    const again = await openLog(dir, false);
    assert.equal(again.log.current.count, 128);
    assert.equal(again.log.recoveryNotPersisted, '');
    assert.deepEqual(again.al.hotExtents, []);
    for (const s of again.stores) await s.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
