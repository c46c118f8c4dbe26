import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BitmapFile } from '../../src/storage/bitmap-file.js';
import { JournalFile, RingSpace } from '../../src/storage/journal.js';
import { Volume } from '../../src/storage/volume.js';
import { ActivityLog, FileActivityLogStore } from '../../src/tracking/activity-log.js';
import { ChangeLog } from '../../src/tracking/change-log.js';
import { DeltaSetBuilder } from '../../src/replication/builder.js';
import { decodeChunk } from '../../src/replication/chunk.js';
import { PagedBitmap } from '../../src/lib/paged-bitmap.js';

const bs = 8192;
const blocks = 4096;
const saveBytes = 16 * 1024 * 1024;
/** Scattered blocks with data, a run of several, and one hole (never written). */
const dataBlocks = [3, 40, 41, 42, 100, 513, 1000, 2000, 2001, 3001, 3500, 4000];
const holeBlock = 700;

async function withVolume(fn: (dir: string, volume: Volume) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-builder-'));
  const volume = await Volume.create('v', join(dir, 'v.img'), join(dir, 'v.alloc'), blocks * bs, bs);
  try {
    for (const b of dataBlocks) await volume.write(b * bs, randomBytes(bs));
    await fn(dir, volume);
  } finally {
    await volume.close();
    await rm(dir, { recursive: true, force: true });
  }
}

test('a delta set that cannot be built leaves every block of its table tracked, those copied before the failure too', async () => {
  await withVolume(async (dir, volume) => {
    const bitmap = await BitmapFile.create(join(dir, 'dirty.bitmap'), blocks);
    const store = await FileActivityLogStore.open(join(dir, 'al'), 64);
    const { log: al } = await ActivityLog.open(store, 64);
    const log = new ChangeLog(bs, bitmap, al, async () => undefined);
    const journal = await JournalFile.open(join(dir, 'save'), saveBytes);
    try {
      for (const b of [...dataBlocks, holeBlock]) await log.mark(b, 1);
      const old = log.switchTables();
      const builder = new DeltaSetBuilder(volume, old, journal, new RingSpace(saveBytes), 1, 1);
      // The disk fails the fifth read: four runs (and the hole) are copied by then.
      const readInto = volume.readInto.bind(volume);
      let reads = 0;
      volume.readInto = async (buf, offset) => {
        if (++reads === 5) throw new Error('EIO (injected)');
        return readInto(buf, offset);
      };
      await assert.rejects(builder.copyAll(), /EIO/);
      volume.readInto = readInto;
      assert.equal(builder.copied.count, 7, 'blocks 3, 40-42, 100, 513 and the hole 700 were copied before the failure');
      assert.equal(old.count, dataBlocks.length - 6, 'the rest is still in the old table');
      await log.mergeOldBack(builder.copied);
      for (const b of [...dataBlocks, holeBlock]) assert.ok(log.current.get(b), `block ${b} left tracking with the dropped delta set`);
    } finally {
      await journal.close();
      await bitmap.close();
      await store.close();
    }
  });
});

test('runs close together are read in one go: the delta set holds exactly the old table\'s blocks, their data, and its holes as zero extents', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-builder-'));
  const volume = await Volume.create('v', join(dir, 'v.img'), join(dir, 'v.alloc'), blocks * bs, bs);
  const journal = await JournalFile.open(join(dir, 'save'), saveBytes);
  try {
    // Data in blocks 10-20 and 30; block 15 is a hole.
    for (const b of [10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 30]) await volume.write(b * bs, randomBytes(bs));
    const dirty = [10, 12, 13, 15, 17, 30];
    const old = new PagedBitmap(blocks);
    for (const b of dirty) old.set(b);
    const builder = new DeltaSetBuilder(volume, old, journal, new RingSpace(saveBytes), 1, 1);
    const readInto = volume.readInto.bind(volume);
    const reads: [number, number][] = [];
    volume.readInto = async (buf, offset) => {
      reads.push([offset / bs, buf.length / bs]);
      return readInto(buf, offset);
    };
    await builder.copyAll();
    volume.readInto = readInto;
    const built = await builder.finish();
    assert.deepEqual(reads, [[10, 8], [30, 1]], 'blocks 10-17 in one read (gaps of at most 64 KiB), block 30 alone');
    assert.equal(built.blocks, dirty.length);
    const seen = new Map<number, Buffer | 'zero'>();
    let lsn = built.startLsn;
    for (let index = 0; index < built.chunks; index++) {
      const record = await journal.read(lsn, { deltaSet: 1, index });
      const chunk = decodeChunk(record.payload, bs, blocks);
      let at = 0;
      for (const e of chunk.extents) {
        for (let k = 0; k < e.count; k++) {
          seen.set(e.block + k, e.zero ? 'zero' : Buffer.from(chunk.data.subarray(at, at + bs)));
          if (!e.zero) at += bs;
        }
      }
      lsn = record.nextLsn;
    }
    assert.deepEqual([...seen.keys()].sort((x, y) => x - y), dirty, 'the old table\'s blocks and no others');
    assert.equal(seen.get(15), 'zero', 'the hole is a zero extent');
    for (const b of dirty.filter((x) => x !== 15)) assert.ok((seen.get(b) as Buffer).equals(await volume.read(b * bs, bs)), `block ${b}`);
    assert.equal(old.count, 0);
    assert.equal(builder.copied.count, dirty.length);
  } finally {
    await journal.close();
    await volume.close();
    await rm(dir, { recursive: true, force: true });
  }
});
