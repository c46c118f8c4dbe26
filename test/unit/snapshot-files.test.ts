import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, mkdir, open, readdir, rm, stat, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { pino } from 'pino';
import { isFerryError, isNoSpace } from '../../src/lib/errors.js';
import { PagedBitmap } from '../../src/lib/paged-bitmap.js';
import { Catalog } from '../../src/storage/catalog.js';
import { VolumeStore } from '../../src/storage/volume-store.js';
import { SnapshotManager, parseExportName } from '../../src/snapshot/manager.js';
import { SaveVolume } from '../../src/snapshot/save-volume.js';
import { HolderIndex, blocksNeedingBeforeImage, blocksToMoveOnDelete, deltaCandidates, snapshotsToUnload } from '../../src/snapshot/maps.js';

const execFileP = promisify(execFile);
const log = pino({ level: 'silent' });
const baseDir = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
const bb = 4096;

async function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(baseDir, 'ferry-snapfiles-'));
  try {
    await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

async function flip(path: string, position: number): Promise<void> {
  const fh = await open(path, 'r+');
  const b = Buffer.alloc(1);
  await fh.read(b, 0, 1, position);
  b[0] = (b[0] as number) ^ 0x10;
  await fh.write(b, 0, 1, position);
  await fh.close();
}

class Env {
  catalog!: Catalog;
  store!: VolumeStore;
  snaps!: SnapshotManager;
  constructor(readonly dir: string) {}
  async open(): Promise<this> {
    await mkdir(join(this.dir, 'volumes'), { recursive: true });
    this.catalog = new Catalog(join(this.dir, 'catalog.db'));
    this.store = new VolumeStore(this.catalog, join(this.dir, 'volumes'), bb, log);
    await this.store.load();
    this.snaps = new SnapshotManager(this.catalog, this.store, join(this.dir, 'snapshots'), log);
    await this.snaps.load();
    return this;
  }
  async close(checkpoint = true): Promise<void> {
    await this.snaps.close({ checkpoint });
    await this.store.close();
    this.catalog.close();
  }
  async fileOf(snapshot: string, ext: string): Promise<string> {
    const id = this.snaps.show('v', snapshot).id;
    return join(this.dir, 'snapshots', `${id}.${ext}`);
  }
}

test('export names: VOL and VOL@SNAP', () => {
  assert.deepEqual(parseExportName('db1'), { volume: 'db1' });
  assert.deepEqual(parseExportName('db1@nightly-3'), { volume: 'db1', snapshot: 'nightly-3' });
});

test('holder index answers the first holder at or after a snapshot', () => {
  const h = new HolderIndex();
  h.add(7, 5);
  h.add(7, 2);
  h.add(7, 9);
  assert.equal(h.firstAtOrAfter(7, 1), 2);
  assert.equal(h.firstAtOrAfter(7, 3), 5);
  assert.equal(h.firstAtOrAfter(7, 9), 9);
  assert.equal(h.firstAtOrAfter(7, 10), undefined);
  assert.equal(h.firstAtOrAfter(8, 0), undefined);
  h.remove(7, 5);
  assert.equal(h.firstAtOrAfter(7, 3), 9);
  h.remove(7, 2);
  h.remove(7, 9);
  assert.equal(h.size, 0);
});

test('decision functions: before-images only for valid unsaved blocks; moves on delete; delta candidates', () => {
  const valid = new PagedBitmap(100);
  valid.setRange(10, 20);
  const saved = new PagedBitmap(100);
  saved.setRange(15, 2);
  assert.deepEqual(blocksNeedingBeforeImage(valid, saved, 0, 40), [[10, 5], [17, 13]]);
  assert.deepEqual(blocksNeedingBeforeImage(valid, saved, 15, 2), []);
  const savedJ = new PagedBitmap(100);
  savedJ.setRange(5, 20);
  assert.deepEqual(blocksToMoveOnDelete(savedJ, valid, saved), [10, 11, 12, 13, 14, 17, 18, 19, 20, 21, 22, 23, 24]);
  const validM = valid.clone();
  validM.set(60);
  validM.clear(10);
  assert.deepEqual([...deltaCandidates(100, [saved], valid, validM).runs()], [[10, 1], [15, 2], [60, 1]]);
});

test('only a prefix of the queue older than the oldest recent read leaves memory, never the newest', () => {
  const q = (reads: number[]) => reads.map((lastReadAtMs, i) => ({ seq: i + 1, loaded: true, lastReadAtMs }));
  assert.deepEqual(snapshotsToUnload(q([0, 0, 0, 0]), 1000, 100), [1, 2, 3]);
  assert.deepEqual(snapshotsToUnload(q([0, 950, 0, 0]), 1000, 100), [1]);
  assert.deepEqual(snapshotsToUnload(q([990, 0, 0, 0]), 1000, 100), []);
  assert.deepEqual(snapshotsToUnload([{ seq: 5, loaded: true, lastReadAtMs: 0 }], 1000, 100), []);
  assert.deepEqual(snapshotsToUnload([], 1000, 100), []);
});

test('save volume: a group refused for want of space is cut off the file and appends work once space is freed', async () => {
  await withDir(async (dir) => {
    const path = join(dir, 'x.save');
    const id = '00000000-0000-4000-8000-000000000001';
    const recordBytes = 32 + bb;
    const sv = await SaveVolume.create(path, id, bb);
    const committed: number[] = [];
    sv.onCommit = (_i, block) => committed.push(block);
    await sv.append([{ block: 1, data: Buffer.alloc(bb, 1) }, { block: 2, data: Buffer.alloc(bb, 2) }]);
    // This process may not write past three records' worth (RLIMIT_FSIZE: EFBIG, as on a
    // full disk): the next group of two is written in part, then refused.
    await execFileP('prlimit', ['--pid', String(process.pid), `--fsize=${4096 + 3 * recordBytes + 100}:unlimited`]);
    try {
      await assert.rejects(sv.append([{ block: 5, data: Buffer.alloc(bb, 5) }, { block: 6, data: Buffer.alloc(bb, 6) }]), (err) => isNoSpace(err));
    } finally {
      await execFileP('prlimit', ['--pid', String(process.pid), '--fsize=unlimited:unlimited']);
    }
    assert.equal(sv.recordCount, 2);
    assert.deepEqual(committed, [1, 2]);
    assert.equal((await stat(path)).size, 4096 + 2 * recordBytes, 'the refused group is cut off');
    // Space is back: the next append is written where the refused group was.
    await sv.append([{ block: 6, data: Buffer.alloc(bb, 6) }]);
    assert.deepEqual(committed, [1, 2, 6]);
    await sv.close();
    const seen: number[] = [];
    const reopened = await SaveVolume.open(path, id, bb, 0, (_i, block) => seen.push(block));
    assert.deepEqual(seen, [1, 2, 6]);
    const out = Buffer.alloc(bb);
    await reopened.readRecord(2, 6, out);
    assert.ok(out.every((x) => x === 6));
    await reopened.close();
  });
});

test('save volume: a torn last group is dropped, a damaged durable record is refused', async () => {
  await withDir(async (dir) => {
    const path = join(dir, 'x.save');
    const id = '00000000-0000-4000-8000-000000000001';
    const sv = await SaveVolume.create(path, id, bb);
    await sv.append([{ block: 3, data: Buffer.alloc(bb, 3) }, { block: 4, data: Buffer.alloc(bb, 4) }]);
    await sv.append([{ block: 9, data: Buffer.alloc(bb, 9) }, { block: 10, data: Buffer.alloc(bb, 10) }]);
    await sv.close();
    const recordBytes = 32 + bb;
    // Torn last group: record 3 (second of the group starting at 2) is cut short.
    await truncate(path, 4096 + 3 * recordBytes + 100);
    const seen: number[] = [];
    const reopened = await SaveVolume.open(path, id, bb, 0, (_i, block) => seen.push(block));
    assert.deepEqual(seen, [3, 4, 9]);
    assert.equal(reopened.recordCount, 3);
    assert.equal((await stat(path)).size, 4096 + 3 * recordBytes, 'the torn tail is cut off');
    const out = Buffer.alloc(bb);
    await reopened.readRecord(2, 9, out);
    assert.ok(out.every((x) => x === 9));
    await reopened.close();
    // A damaged record followed by a later group: corruption, refused.
    await flip(path, 4096 + 1 * recordBytes + 32 + 17);
    await assert.rejects(SaveVolume.open(path, id, bb, 0, () => undefined), (err) => isFerryError(err, 'SNAPSHOT_CORRUPT'));
    // Read through a checkpoint that trusts it: the record's checksum refuses it.
    const trusted = await SaveVolume.open(path, id, bb, 3, () => undefined);
    await assert.rejects(trusted.readRecord(1, 4, out), (err) => isFerryError(err, 'SNAPSHOT_CORRUPT'));
    await trusted.close();
    // In the last group: a damaged (non-zero) record is refused; a zeroed one (power
    // loss before the group's fdatasync) is a torn tail and cut off.
    await flip(path, 4096 + 1 * recordBytes + 32 + 17); // repair record 1
    await flip(path, 4096 + 2 * recordBytes + 32 + 17);
    await assert.rejects(SaveVolume.open(path, id, bb, 0, () => undefined), (err) => isFerryError(err, 'SNAPSHOT_CORRUPT'));
    const zfh = await open(path, 'r+');
    await zfh.write(Buffer.alloc(recordBytes), 0, recordBytes, 4096 + 2 * recordBytes);
    await zfh.close();
    const cut = await SaveVolume.open(path, id, bb, 0, () => undefined);
    assert.equal(cut.recordCount, 2);
    await cut.close();
    // A save volume of another snapshot is refused.
    await assert.rejects(SaveVolume.open(path, '00000000-0000-4000-8000-000000000002', bb, 0, () => undefined), (err) => isFerryError(err, 'SNAPSHOT_CORRUPT'));
  });
});

test('a damaged block map, meta bit map or save-volume record makes the site refuse that snapshot, not serve wrong data', async () => {
  for (const target of ['map', 'valid', 'save'] as const) {
    await withDir(async (dir) => {
      let env = await new Env(dir).open();
      await env.store.create('v', 64 * bb);
      const v = env.store.get('v');
      await v.write(0, Buffer.alloc(8 * bb, 0xaa));
      await env.snaps.create('v', 'old');
      await env.snaps.create('v', 'bad');
      await v.write(0, Buffer.alloc(4 * bb, 0xbb));
      await v.write(0, Buffer.alloc(2 * bb, 0xcc));
      const bad = await env.snaps.read('v', 'bad', 0, 8 * bb);
      assert.ok(bad.every((x) => x === 0xaa));
      await env.snaps.create('v', 'new');
      const path = await env.fileOf('bad', target);
      await env.close();
      // 'bad' holds before-images of blocks 0-3 (0xaa); 'old'
      // saved nothing and reads blocks 0-3 through 'bad'.
      await flip(path, target === 'map' ? 41 : target === 'valid' ? 4096 + 16 : 4096 + 32 + 5);
      env = await new Env(dir).open();
      const refused = (err: unknown): boolean => isFerryError(err, 'SNAPSHOT_CORRUPT');
      await assert.rejects(env.snaps.read('v', 'bad', 0, bb), refused);
      // 'old' reads through 'bad': refused too (it would be wrong otherwise).
      await assert.rejects(env.snaps.read('v', 'old', 0, 8 * bb), refused);
      // The newest snapshot and the volume are unaffected.
      assert.ok((await env.snaps.read('v', 'new', 0, 2 * bb)).every((x) => x === 0xcc));
      assert.ok((await env.store.get('v').read(0, 2 * bb)).every((x) => x === 0xcc));
      assert.equal(env.snaps.list('v').find((s) => s.name === 'bad')?.state, target === 'save' ? 'ok' : 'corrupt');
      // Deleting it needs force, and marks the older snapshot damaged.
      await assert.rejects(env.snaps.delete('v', 'bad'), refused);
      if (target !== 'save') {
        await env.snaps.delete('v', 'bad', { force: true });
        assert.equal(env.snaps.list('v').find((s) => s.name === 'old')?.state, 'damaged');
        await assert.rejects(env.snaps.read('v', 'old', 0, bb), refused);
      }
      await env.close();
    });
  }
});

test('a crash between files and catalog row leaves orphans that the next start removes; tails are rescanned', async () => {
  await withDir(async (dir) => {
    let env = await new Env(dir).open();
    await env.store.create('v', 32 * bb);
    const v = env.store.get('v');
    await v.write(0, Buffer.alloc(32 * bb, 1));
    await env.snaps.create('v', 'a');
    for (let i = 0; i < 32; i++) await v.write(i * bb + 100, Buffer.alloc(10, 2));
    const before = await env.snaps.read('v', 'a', 0, 32 * bb);
    await env.close(false);
    // An orphan, as a crash during create would leave.
    await (await open(join(dir, 'snapshots', '11111111-2222-4333-8444-555555555555.save'), 'w')).close();
    env = await new Env(dir).open();
    assert.deepEqual(await env.snaps.read('v', 'a', 0, 32 * bb), before);
    assert.equal(env.snaps.show('v', 'a').savedBlocks, 32, 'before-images after the checkpoint were found by the tail scan');
    assert.ok(!(await readdir(join(dir, 'snapshots'))).some((f) => f.startsWith('11111111')));
    await env.close();
  });
});

test('restore writes every differing block through the volume write path (what change tracking sees), and nothing else', async () => {
  await withDir(async (dir) => {
    const env = await new Env(dir).open();
    await env.store.create('v', 64 * bb);
    const v = env.store.get('v');
    await v.write(0, Buffer.alloc(16 * bb, 1));
    await env.snaps.create('v', 'p');
    await v.write(3 * bb + 10, Buffer.alloc(2 * bb, 2)); // blocks 3-5
    await v.write(40 * bb, Buffer.alloc(bb, 3)); // block 40, invalid in p
    await v.write(7 * bb, Buffer.alloc(bb, 1)); // block 7 rewritten with the same bytes
    await v.trim(10 * bb, 2 * bb); // blocks 10-11 trimmed
    const seen = new Map<number, string>();
    const unhook = v.addHook({
      beforeChange: (_vol, change) => {
        for (let b = change.firstBlock; b < change.firstBlock + change.blockCount; b++) seen.set(b, change.kind);
      },
    });
    const r = await env.snaps.restore('v', 'p');
    unhook();
    assert.deepEqual(
      [...seen.entries()].sort((a, b) => a[0] - b[0]),
      [[3, 'write'], [4, 'write'], [5, 'write'], [10, 'write'], [11, 'write'], [40, 'trim']],
    );
    assert.deepEqual(r, { blocksWritten: 5, blocksTrimmed: 1 });
    assert.deepEqual(await v.read(0, 64 * bb), await env.snaps.read('v', 'p', 0, 64 * bb));
    await env.close();
  });
});

test('a snapshot read racing a first write to the same block returns the before-image', async () => {
  await withDir(async (dir) => {
    const env = await new Env(dir).open();
    await env.store.create('v', 16 * bb);
    const v = env.store.get('v');
    await v.write(0, Buffer.alloc(16 * bb, 1));
    await env.snaps.create('v', 's');
    // A slow disk read: the snapshot's read of the volume lands after the write below.
    const readInto = v.readInto.bind(v);
    let slowNext = false;
    v.readInto = async (buf: Uint8Array, offset: number): Promise<void> => {
      if (slowNext) {
        slowNext = false;
        await new Promise((r) => setTimeout(r, 50));
      }
      await readInto(buf, offset);
    };
    for (let b = 0; b < 12; b++) {
      slowNext = true;
      const reading = env.snaps.read('v', 's', b * bb, bb);
      await new Promise((r) => setTimeout(r, 5));
      await v.write(b * bb, Buffer.alloc(bb, 2));
      assert.ok((await reading).every((x) => x === 1), `block ${b} read as it was when the snapshot was taken`);
    }
    v.readInto = readInto;
    await env.close();
  });
});

test('a batch write saves every before-image it needs in one group commit, and the snapshot reads as it was', async () => {
  await withDir(async (dir) => {
    const env = await new Env(dir).open();
    await env.store.create('v', 256 * bb);
    const v = env.store.get('v');
    const original = Buffer.alloc(256 * bb);
    for (let b = 0; b < 200; b++) original.fill(b + 1, b * bb, (b + 1) * bb);
    await v.write(0, original.subarray(0, 200 * bb));
    await env.snaps.create('v', 's');
    await v.write(7 * bb, Buffer.alloc(bb, 0xee)); // saved already: the batch must not save it again
    const snap = env.snaps.show('v', 's');
    const saveFile = join(dir, 'snapshots', `${snap.id}.save`);
    const sizeBefore = (await stat(saveFile)).size;
    const blocks = [3, 7, 8, 9, 50, 120, 199, 230]; // 230 was a hole when the snapshot was taken
    await v.writeMany(blocks.map((b) => ({ offset: b * bb, data: Buffer.alloc(bb, 0xaa) })));
    const added = ((await stat(saveFile)).size - sizeBefore) / (bb + 32);
    assert.equal(added, 6, 'one record for each valid block not saved before (3, 8, 9, 50, 120, 199)');
    const image = await env.snaps.read('v', 's', 0, 256 * bb);
    assert.ok(image.equals(original), 'the snapshot reads exactly as the volume was');
    for (const b of blocks) assert.ok((await v.read(b * bb, bb)).every((x) => x === 0xaa));
    await env.close();
  });
});

test('64 snapshots with random writes between them, half deleted at random: every one reads exactly as it was', async () => {
  await withDir(async (dir) => {
    let env = await new Env(dir).open();
    const blocks = 64;
    await env.store.create('v', blocks * bb);
    const v = env.store.get('v');
    const shadow = Buffer.alloc(blocks * bb);
    const images = new Map<string, Buffer>();
    let x = 12345;
    const rand = (n: number): number => {
      x = (x * 1103515245 + 12345) & 0x7fffffff;
      return x % n;
    };
    for (let i = 0; i < 64; i++) {
      for (let k = 0; k < 8; k++) {
        const offset = rand(blocks * bb - 3000);
        const data = Buffer.alloc(1 + rand(3000), rand(256));
        await v.write(offset, data);
        data.copy(shadow, offset);
      }
      if (rand(5) === 0) {
        const b = rand(blocks - 2);
        await v.trim(b * bb, 2 * bb);
        shadow.fill(0, b * bb, (b + 2) * bb);
      }
      await env.snaps.create('v', `s${i}`);
      images.set(`s${i}`, Buffer.from(shadow));
    }
    const names = [...images.keys()];
    for (let i = 0; i < 32; i++) {
      const victim = names.splice(rand(names.length), 1)[0] as string;
      await env.snaps.delete('v', victim);
      images.delete(victim);
    }
    await env.close();
    env = await new Env(dir).open();
    for (const [name, image] of images) assert.ok((await env.snaps.read('v', name, 0, blocks * bb)).equals(image), `snapshot ${name}`);
    assert.ok((await env.store.get('v').read(0, blocks * bb)).equals(shadow));
    await env.close();
  });
});
