import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, open, stat, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { pino } from 'pino';
import { BitmapFile } from '../../src/storage/bitmap-file.js';
import { Volume } from '../../src/storage/volume.js';
import { Catalog } from '../../src/storage/catalog.js';
import { VolumeStore } from '../../src/storage/volume-store.js';
import { isFerryError } from '../../src/lib/errors.js';
import { runLimited } from '../../src/lib/concurrency.js';
import { bitsPerPage } from '../../src/lib/paged-bitmap.js';
import { JournalFile, JournalRecordType, RingSpace, journalRecordHeaderBytes, recordSpanBytes } from '../../src/storage/journal.js';
import { randomBytes } from 'node:crypto';
import { BufferPool } from '../../src/lib/buffer-pool.js';
import { SpaceReserve } from '../../src/storage/space-reserve.js';

const log = pino({ level: 'silent' });

async function tempDir(): Promise<string> {
  return mkdtemp(join(tmpdir(), 'ferry-unit-'));
}

test('bitmap file round-trips pages and refuses or fills damaged ones', async () => {
  const dir = await tempDir();
  try {
    const path = join(dir, 'b.bitmap');
    const f = await BitmapFile.create(path, bitsPerPage * 3);
    f.bitmap.setRange(10, 100);
    f.bitmap.set(bitsPerPage * 2 + 5);
    await f.sync();
    await f.close();

    const { file: again } = await BitmapFile.open(path, 'throw');
    assert.deepEqual([...again.bitmap.runs()], [[10, 100], [bitsPerPage * 2 + 5, 1]]);
    await again.close();

    // Flip one bit inside page 0's data.
    const fh = await open(path, 'r+');
    const b = Buffer.alloc(1);
    await fh.read(b, 0, 1, 4096 + 16 + 2);
    b[0] = (b[0] as number) ^ 0x40;
    await fh.write(b, 0, 1, 4096 + 16 + 2);
    await fh.close();

    await assert.rejects(BitmapFile.open(path, 'throw'), (err) => isFerryError(err, 'CORRUPT_FILE'));
    const { file: filled, report } = await BitmapFile.open(path, 'fill');
    assert.deepEqual(report.corruptPages, [0]);
    assert.equal(filled.bitmap.allSet(0, bitsPerPage), true, 'a damaged page is treated as all set (conservative)');
    assert.equal(filled.bitmap.get(bitsPerPage * 2 + 5), true);
    await filled.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('bitmap file with a damaged header is refused, or rebuilt with every bit set when its size is known (fill)', async () => {
  const dir = await tempDir();
  try {
    const path = join(dir, 'b.bitmap');
    await (await BitmapFile.create(path, 100)).close();
    const fh = await open(path, 'r+');
    await fh.write(Buffer.from([0xff]), 0, 1, 17);
    await fh.close();
    await assert.rejects(BitmapFile.open(path, 'fill'), (err) => isFerryError(err, 'CORRUPT_FILE'));
    await assert.rejects(BitmapFile.open(path, 'throw', 100), (err) => isFerryError(err, 'CORRUPT_FILE'));
    const { file, report } = await BitmapFile.open(path, 'fill', 100);
    assert.deepEqual([report.headerRebuilt, file.bitmap.count], [true, 100]);
    await file.close();
    // Rebuilt durably: it opens cleanly, every bit still set.
    const again = await BitmapFile.open(path, 'throw');
    assert.deepEqual([again.report.headerRebuilt, again.file.bitmap.count], [undefined, 100]);
    await again.file.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('volume I/O: odd offsets, bounds, zeroes, trim, block status, reopen', async () => {
  const dir = await tempDir();
  try {
    const bs = 8192;
    const v = await Volume.create('v', join(dir, 'v.img'), join(dir, 'v.alloc'), 64 * bs, bs);
    const data = Buffer.alloc(3 * bs + 123, 0xab);
    await v.write(bs * 2 + 7, data);
    assert.deepEqual(await v.read(bs * 2 + 7, data.length), data);
    assert.equal((await v.read(0, 16)).every((x) => x === 0), true);
    assert.deepEqual(v.blockStatus(0, 64 * bs), [
      { offset: 0, length: 2 * bs, allocated: false },
      { offset: 2 * bs, length: 4 * bs, allocated: true },
      { offset: 6 * bs, length: 58 * bs, allocated: false },
    ]);

    await assert.rejects(v.read(63 * bs, bs + 1), (err) => isFerryError(err, 'OUT_OF_RANGE'));
    await assert.rejects(v.write(64 * bs, Buffer.alloc(1)), (err) => isFerryError(err, 'OUT_OF_RANGE'));
    await assert.rejects(v.write(-1, Buffer.alloc(1)), (err) => isFerryError(err, 'OUT_OF_RANGE'));

    // Zero a range spanning a partial block: partial part becomes zeros, whole blocks holes.
    await v.writeZeroes(bs * 3 - 10, bs + 20);
    const after = await v.read(bs * 2 + 7, data.length);
    const expected = Buffer.from(data);
    expected.fill(0, bs * 3 - 10 - (bs * 2 + 7), bs * 4 + 10 - (bs * 2 + 7));
    assert.deepEqual(after, expected);
    assert.equal(v.allocation.get(3), false, 'the whole block inside the zeroed range is a hole');

    // Trim leaves partial blocks alone and releases whole ones.
    await v.trim(bs * 4 + 1, bs * 2 - 2);
    assert.equal(v.allocation.get(4), true);
    assert.equal(v.allocation.get(5), true);
    await v.trim(bs * 4, bs * 2);
    assert.equal(v.allocation.get(4), false);
    assert.equal(v.allocation.get(5), false);
    assert.equal((await v.read(bs * 4, bs * 2)).every((x) => x === 0), true);

    await v.flush();
    const before = await v.read(0, 64 * bs);
    await v.close();
    await v.close(); // idempotent
    const reopened = await Volume.open('v', join(dir, 'v.img'), join(dir, 'v.alloc'), 64 * bs, bs);
    assert.deepEqual(await reopened.read(0, 64 * bs), before);
    assert.equal(reopened.allocation.get(2), true);
    await reopened.close();
    // A damaged allocation map's header: the volume opens with every block allocated, its data intact.
    const fh = await open(join(dir, 'v.alloc'), 'r+');
    await fh.write(Buffer.from([0xff]), 0, 1, 17);
    await fh.close();
    const damaged = await Volume.open('v', join(dir, 'v.img'), join(dir, 'v.alloc'), 64 * bs, bs);
    assert.equal(damaged.loadReport.headerRebuilt, true);
    assert.equal(damaged.allocation.count, 64);
    assert.deepEqual(await damaged.read(0, 64 * bs), before);
    await damaged.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('a 1 TiB sparse volume is cheap to create and its map stays small', async () => {
  const dir = await tempDir();
  try {
    const v = await Volume.create('big', join(dir, 'big.img'), join(dir, 'big.alloc'), 1024 ** 4, 8192);
    await v.write(1024 ** 4 - 8192, Buffer.alloc(8192, 1));
    await v.write(0, Buffer.alloc(8192, 2));
    await v.flush();
    assert.equal(v.allocatedBlocks, 2);
    const img = await stat(join(dir, 'big.img'));
    assert.equal(img.size, 1024 ** 4);
    assert.ok(img.blocks * 512 < 1024 * 1024, 'data file stays sparse');
    await v.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('write hooks run before the data reaches the file, in order', async () => {
  const dir = await tempDir();
  try {
    const v = await Volume.create('h', join(dir, 'h.img'), join(dir, 'h.alloc'), 16 * 8192, 8192);
    const seen: string[] = [];
    v.addHook({
      beforeChange: async (vol, change) => {
        const current = await vol.read(change.offset, 1);
        seen.push(`before ${change.kind} ${change.firstBlock}+${change.blockCount} old=${current[0]}`);
      },
      afterChange: (_vol, change) => {
        seen.push(`after ${change.kind}`);
      },
    });
    await v.write(8192, Buffer.alloc(8192, 9));
    await v.write(8192, Buffer.alloc(100, 7));
    assert.deepEqual(seen, ['before write 1+1 old=0', 'after write', 'before write 1+1 old=9', 'after write']);
    await v.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('a batch write locks its span, gives batch hooks every change at once and the rest one by one', async () => {
  const dir = await tempDir();
  try {
    const bs = 8192;
    const v = await Volume.create('b', join(dir, 'b.img'), join(dir, 'b.alloc'), 64 * bs, bs);
    const batches: string[][] = [];
    const singles: string[] = [];
    const after: number[] = [];
    v.addHook({
      beforeChanges: async (vol, changes) => {
        // The old data is still there when the hook runs.
        const old = await Promise.all(changes.map((c) => vol.read(c.offset, 1)));
        batches.push(changes.map((c, i) => `${c.firstBlock}+${c.blockCount} old=${(old[i] as Buffer)[0]}`));
      },
      afterChange: (_vol, change) => void after.push(change.firstBlock),
    });
    v.addHook({ beforeChange: (_vol, change) => void singles.push(`${change.firstBlock}+${change.blockCount}`) });
    await v.write(40 * bs, Buffer.alloc(bs, 5));
    await v.writeMany([
      { offset: 40 * bs, data: Buffer.alloc(2 * bs, 8) },
      { offset: 3 * bs, data: Buffer.alloc(bs, 7) },
      { offset: 20 * bs, data: Buffer.alloc(3 * bs, 6) },
    ]);
    assert.deepEqual(batches.at(-1), ['40+2 old=5', '3+1 old=0', '20+3 old=0']);
    assert.deepEqual(singles, ['40+1', '40+2', '3+1', '20+3'], 'a hook without beforeChanges sees each change');
    assert.deepEqual(after.slice(-3), [40, 3, 20]);
    assert.ok((await v.read(3 * bs, bs)).every((x) => x === 7));
    assert.ok((await v.read(20 * bs, 3 * bs)).every((x) => x === 6));
    assert.ok((await v.read(40 * bs, 2 * bs)).every((x) => x === 8));
    assert.deepEqual([...v.allocation.runs()], [[3, 1], [20, 3], [40, 2]]);

    // A single write inside the span waits for the batch; one outside does not.
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const order: string[] = [];
    const holdHook = v.addHook({ beforeChanges: () => gate });
    const batch = v.writeMany([{ offset: 10 * bs, data: Buffer.alloc(bs, 1) }, { offset: 12 * bs, data: Buffer.alloc(bs, 1) }]).then(() => order.push('batch'));
    await new Promise((r) => setTimeout(r, 10));
    const inside = v.write(11 * bs, Buffer.alloc(bs, 2)).then(() => order.push('inside'));
    const outside = v.write(30 * bs, Buffer.alloc(bs, 3)).then(() => order.push('outside'));
    await outside;
    assert.deepEqual(order, ['outside']);
    release();
    await Promise.all([batch, inside]);
    assert.deepEqual(order, ['outside', 'batch', 'inside']);
    holdHook();

    // Bad batches change nothing.
    const before = await v.read(0, 64 * bs);
    await assert.rejects(v.writeMany([{ offset: 5 * bs, data: Buffer.alloc(2 * bs) }, { offset: 6 * bs, data: Buffer.alloc(bs) }]), /overlap/);
    await assert.rejects(v.writeMany([{ offset: 100, data: Buffer.alloc(bs) }]), /whole blocks/);
    await assert.rejects(v.writeMany([{ offset: 63 * bs, data: Buffer.alloc(2 * bs) }]), (err) => isFerryError(err, 'OUT_OF_RANGE'));
    assert.ok((await v.read(0, 64 * bs)).equals(before));
    await v.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('runLimited keeps at most the limit in flight and settles every started call before failing', async () => {
  let inFlight = 0;
  let most = 0;
  const started: number[] = [];
  const finished: number[] = [];
  const work = async (n: number): Promise<void> => {
    started.push(n);
    inFlight++;
    most = Math.max(most, inFlight);
    await new Promise((r) => setTimeout(r, n === 2 ? 5 : 20));
    inFlight--;
    finished.push(n);
    if (n === 2) throw new Error('two failed');
  };
  await assert.rejects(runLimited([0, 1, 2, 3, 4, 5, 6, 7], 3, work), /two failed/);
  assert.equal(most, 3);
  assert.equal(inFlight, 0, 'nothing still running when the error is raised');
  assert.deepEqual(started.sort(), finished.sort());
  assert.ok(started.length < 8, 'no new call starts after a failure');
  await runLimited([], 4, work);
});

test('catalog rows are checksummed: a tampered row is refused', async () => {
  const dir = await tempDir();
  try {
    const path = join(dir, 'catalog.db');
    const catalog = new Catalog(path);
    const volumesDir = join(dir, 'volumes');
    await (await import('node:fs/promises')).mkdir(volumesDir);
    const store = new VolumeStore(catalog, volumesDir, 8192, log);
    await store.load();
    await store.create('vol1', 1024 * 1024);
    await store.close();
    catalog.close();

    const raw = new Database(path);
    raw.prepare("UPDATE volumes SET size_bytes = size_bytes * 2 WHERE name = 'vol1'").run();
    raw.close();

    const reopened = new Catalog(path);
    assert.throws(() => reopened.getVolume('vol1'), (err) => isFerryError(err, 'CORRUPT_RECORD'));
    reopened.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('volume store validates names and sizes and cleans orphan files', async () => {
  const dir = await tempDir();
  try {
    const catalog = new Catalog(join(dir, 'catalog.db'));
    const volumesDir = join(dir, 'volumes');
    await (await import('node:fs/promises')).mkdir(volumesDir);
    const store = new VolumeStore(catalog, volumesDir, 8192, log);
    await store.load();
    for (const name of ['', 'a/b', '..', 'x'.repeat(65), 'sp ace', 'snap@1']) {
      await assert.rejects(store.create(name, 8192), (err) => isFerryError(err, 'INVALID_NAME'), name);
    }
    for (const size of [0, 100, 8193, -8192]) {
      await assert.rejects(store.create('ok', size), (err) => isFerryError(err, 'INVALID_SIZE'), String(size));
    }
    await store.create('ok', 8192 * 4);
    await assert.rejects(store.create('ok', 8192), (err) => isFerryError(err, 'VOLUME_EXISTS'));
    await assert.rejects(store.resize('ok', 8192), (err) => isFerryError(err, 'SHRINK_REFUSED'));
    store.addUseCheck((n) => (n === 'ok' ? 'it is the source of a pair' : undefined));
    await assert.rejects(store.delete('ok'), (err) => isFerryError(err, 'VOLUME_IN_USE'));
    await store.close();

    // An orphan left by an interrupted create is removed at the next load.
    const orphan = '0f0e0d0c-0b0a-4909-8807-060504030201.img';
    await (await open(join(volumesDir, orphan), 'w')).close();
    await (await open(join(volumesDir, 'notes.txt'), 'w')).close();
    const store2 = new VolumeStore(catalog, volumesDir, 8192, log);
    await store2.load();
    const files = await (await import('node:fs/promises')).readdir(volumesDir);
    assert.equal(files.includes(orphan), false);
    assert.equal(files.includes('notes.txt'), true, 'files ferry did not make are left alone');
    assert.equal(store2.list().length, 1);
    await store2.close();
    catalog.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('save-volume records written whole or from their parts read back the same; damage is refused', async () => {
  const dir = await tempDir();
  try {
    const journal = await JournalFile.open(join(dir, 'save.journal'), 64 * 1024 * 1024);
    try {
      const header = { type: JournalRecordType.Chunk, flags: 0, generation: 3, deltaSet: 7, index: 0 };
      // More parts than one writev takes (IOV_MAX 1024), of odd sizes.
      const parts = Array.from({ length: 1500 }, (_, i) => randomBytes(1 + ((i * 7919) % 5000)));
      const payload = Buffer.concat(parts);
      const whole = journal.encode(header, payload);
      const fromParts = journal.encodeParts(header, parts);
      assert.deepEqual(Buffer.concat(fromParts), whole, 'the same bytes either way');
      assert.equal(whole.length, recordSpanBytes(payload.length));
      await journal.write(0, fromParts);
      await journal.write(whole.length, journal.encode({ ...header, index: 1 }, payload));
      await journal.sync();
      const pool = new BufferPool(8 * 1024 * 1024, 2);
      for (const [lsn, index] of [[0, 0], [whole.length, 1]] as const) {
        const record = await journal.read(lsn, { ...header, index });
        assert.ok(record.payload.equals(payload), `record ${index}`);
        assert.equal(record.nextLsn, lsn + whole.length);
        // Read into a pooled buffer: the same payload, and the buffer comes back once released.
        const pooled = await journal.read(lsn, { ...header, index }, pool);
        assert.ok(pooled.payload.equals(payload));
        assert.equal(pool.kept, 0);
        pooled.release?.();
        pooled.release?.();
        assert.equal(pool.kept, 1);
      }
      // A record that is not the one expected gives its pooled buffer back as it is refused.
      await assert.rejects(journal.read(0, { ...header, index: 5 }, pool), (err) => isFerryError(err, 'CORRUPT_RECORD'));
      assert.equal(pool.kept, 1);
      // One flipped payload byte on disk: the record is refused, not read wrong.
      const fh = await open(journal.path, 'r+');
      const at = journalRecordHeaderBytes + 123_456;
      const byte = Buffer.alloc(1);
      await fh.read(byte, 0, 1, at);
      byte[0] = (byte[0] as number) ^ 0x20;
      await fh.write(byte, 0, 1, at);
      await fh.close();
      await assert.rejects(journal.read(0), (err) => isFerryError(err, 'CORRUPT_RECORD'));
    } finally {
      await journal.close();
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('a header walk finds records by header alone, and past a lap skip over a stale intact record', async () => {
  const dir = await tempDir();
  try {
    const capacity = 64 * 1024;
    const journal = await JournalFile.open(join(dir, 'save.journal'), capacity);
    const ring = new RingSpace(capacity);
    try {
      const append = async (deltaSet: number, index: number, spanBytes: number): Promise<number> => {
        const record = journal.encode({ type: JournalRecordType.Chunk, flags: 0, generation: 1, deltaSet, index }, randomBytes(spanBytes - journalRecordHeaderBytes));
        assert.equal(record.length, spanBytes);
        ring.release(ring.head);
        const lsn = ring.allocate(record.length) as number;
        await journal.write(lsn, record);
        return lsn;
      };
      // Lap 0: delta set 1 in eight records of 8 KiB.
      for (let index = 0; index < 8; index++) await append(1, index, 8 * 1024);
      // Lap 1: delta set 2 in records of 24 KiB: two fit, the third would cross the end
      // of the lap at 48 KiB and goes to the start of the next (over the first, released);
      // at 48 KiB, delta set 1's seventh record is still whole.
      const lsns: number[] = [];
      for (let index = 0; index < 3; index++) lsns.push(await append(2, index, 24 * 1024));
      assert.deepEqual(lsns, [capacity, capacity + 24 * 1024, 2 * capacity]);
      const stale = await journal.readHeader(capacity + 48 * 1024);
      assert.deepEqual([stale?.deltaSet, stale?.index], [1, 6], 'an intact record of an older delta set is where the walk arrives');
      let lsn = lsns[1]!;
      for (let index = 1; index < 3; index++) {
        const header = await journal.findHeader(lsn, ring.head, { type: JournalRecordType.Chunk, generation: 1, deltaSet: 2, index });
        assert.equal(header?.lsn, lsns[index], `chunk ${index}`);
        lsn = header!.nextLsn;
      }
      assert.equal(await journal.findHeader(lsn, ring.head, { deltaSet: 2, index: 3 }), undefined, 'nothing past the end');
      // Whole records the same way: told which record comes next, the stale one is passed over.
      const skipFrom = lsns[1]! + 24 * 1024;
      assert.equal((await journal.readNext(skipFrom, ring.head))?.deltaSet, 1, 'without an expectation, the stale record is what is there');
      const next = await journal.readNext(skipFrom, ring.head, undefined, { type: JournalRecordType.Chunk, generation: 1, deltaSet: 2, index: 2 });
      assert.deepEqual([next?.lsn, next?.deltaSet, next?.index], [2 * capacity, 2, 2]);
      // A damaged header is no header.
      const fh = await open(journal.path, 'r+');
      await fh.write(Buffer.from([0xff]), 0, 1, (lsns[1]! % capacity) + 20);
      await fh.close();
      assert.equal(await journal.readHeader(lsns[1]!), undefined);
      assert.equal(await journal.findHeader(lsns[1]!, ring.head, { deltaSet: 2, index: 1 }), undefined);
    } finally {
      await journal.close();
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('space reserve: taken in full when there is room beside it, given back only when the file system is nearly full, taken again later; a reserve cut short by a full disk keeps what it wrote', async () => {
  const dir = await tempDir();
  const path = join(dir, 'reserve');
  const size = 4 * 1024 * 1024;
  let availableBytes = 100 * 1024 * 1024;
  const reserve = new SpaceReserve(path, async () => ({ sizeBytes: 1 << 30, availableBytes }), size);
  try {
    await reserve.open();
    assert.equal(reserve.heldBytes, size);
    assert.equal((await stat(path)).size, size);
    assert.equal((await stat(path)).blocks * 512 >= size, true, 'its blocks are allocated, not a hole');
    assert.equal(await reserve.releaseIfFull(), 0, 'room left: kept');
    availableBytes = size - 1;
    assert.equal(await reserve.releaseIfFull(), size);
    assert.equal(reserve.heldBytes, 0);
    await assert.rejects(stat(path), /ENOENT/);
    assert.equal(await reserve.releaseIfFull(), 0, 'nothing left to give back');
    availableBytes = 2 * size - 1;
    assert.equal(await reserve.replenish(), false, 'not taken while it would leave less than its size free');
    await assert.rejects(stat(path), /ENOENT/);
    availableBytes = 2 * size;
    assert.equal(await reserve.replenish(), true);
    assert.equal((await stat(path)).size, size);

    // A site that finds part of a reserve (a disk that filled while it was written) keeps it and completes it.
    await truncate(path, size / 4);
    const again = new SpaceReserve(path, async () => ({ sizeBytes: 1 << 30, availableBytes: size }), size);
    await again.open();
    assert.equal(again.heldBytes, size / 4, 'no room: what is there is held');
    const roomy = new SpaceReserve(path, async () => ({ sizeBytes: 1 << 30, availableBytes: 100 * size }), size);
    await roomy.open();
    assert.equal(roomy.heldBytes, size);
    assert.equal((await stat(path)).size, size);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
