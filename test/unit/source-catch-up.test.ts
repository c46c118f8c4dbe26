import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { RateLimiter } from '../../src/lib/rate.js';
import { systemClock } from '../../src/lib/clock.js';
import { FerryError } from '../../src/lib/errors.js';
import type { PagedBitmap } from '../../src/lib/paged-bitmap.js';
import { BitmapFile } from '../../src/storage/bitmap-file.js';
import type { PairRecord } from '../../src/storage/replication-catalog.js';
import { ActivityLog, FileActivityLogStore } from '../../src/tracking/activity-log.js';
import { ChangeLog } from '../../src/tracking/change-log.js';
import { SourceReplicator } from '../../src/replication/source.js';
import { cutRetryDelayMsMin } from '../../src/replication/triggers.js';
import { openPairEnv, type PairEnv } from '../helpers/pair-env.js';

const bb = 4096;
const blocks = 1024;

/**
 * A source whose target is away, with the given save volume. A catch-up runs
 * `beforeRecord` (which may hold it, or fail it), then is recorded in the pair.
 */
async function sourceWithoutTarget(saveVolumeBytes: number, beforeRecord: () => Promise<void>, maxRateBytes = 0): Promise<{ env: PairEnv; source: SourceReplicator }> {
  const env = await openPairEnv({ role: 'source', blockBytes: bb, blocks, copyDone: true, pair: { intervalMs: 3_600_000, highWaterBytes: 1 << 30, saveVolumeBytes } });
  const { dir, volume, replication, pair, journal } = env;
  const bitmap = await BitmapFile.create(join(dir, 'dirty.bitmap'), blocks);
  const { log: al } = await ActivityLog.open(await FileActivityLogStore.open(join(dir, 'activity.log'), 64));
  const changeLog = new ChangeLog(bb, bitmap, al, () => volume.flush());
  const source = new SourceReplicator({
    volume,
    pair,
    catalog: replication,
    changeLog,
    journal,
    clock: systemClock,
    log: env.log,
    copyPlan: () => Promise.reject(new FerryError('UNAVAILABLE', 'no copy in this test')),
    copied: async () => undefined,
    catchUp: async (p: PairRecord, backlog: PagedBitmap) => {
      await beforeRecord();
      p.initialCopy = { ...p.initialCopy, cursorBlock: 0, stampedDeltaSet: p.deltaSetCreated, plannedBlocks: backlog.count, copiedBlocks: 0, catchUp: true, copyId: 2 };
      delete p.initialCopy.doneAt;
      replication.putPair(p);
    },
    fenced: () => undefined,
    openSession: () => Promise.reject(new FerryError('UNAVAILABLE', 'the target is away in this test')),
    limiter: new RateLimiter(systemClock, maxRateBytes),
  });
  return { env, source };
}

/**
 * Rule 8 at the source: a backlog larger than the save volume becomes a catch-up copy.
 * Between the switch of the change log's tables and the copy's record, its blocks are
 * in neither; nothing may take them for shipped meanwhile.
 */
test('while a catch-up copy is being recorded its blocks still count: a cut on demand waits for it, a drain does not see an empty backlog', async () => {
  let recording: () => void = () => undefined;
  const recorded = new Promise<void>((resolve) => (recording = resolve));
  let release: () => void = () => undefined;
  const released = new Promise<void>((resolve) => (release = resolve));
  const { env, source } = await sourceWithoutTarget(256 * 1024, async () => {
    recording();
    await released;
  });
  const { volume, pair } = env;
  const changeLog = source.changeLog;
  try {
    source.start();
    // 1 MiB written: more than the whole 256 KiB save volume can hold as one delta set.
    const written = 256;
    await volume.write(0, randomBytes(written * bb));
    assert.equal(source.outstandingBlocks(), written);
    let cutDone = false;
    const cut = source.cutNow().then((n) => {
      cutDone = true;
      return n;
    });
    await recorded;
    // The tables have switched; the copy is not recorded yet.
    assert.equal(changeLog.current.count, 0);
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.equal(cutDone, false, 'the cut on demand returned before the catch-up was recorded');
    assert.equal(source.outstandingBlocks(), written, 'the backlog being recorded is outstanding');
    assert.equal(source.dirtyBlocks, written);
    release();
    assert.equal(await cut, 0, 'no delta set was cut: the backlog went as a copy');
    assert.equal(pair.initialCopy.catchUp, true);
    assert.equal(source.dirtyBlocks, 0);
    assert.equal(source.outstandingBlocks(), written, 'the catch-up copy holds the backlog now');
  } finally {
    release();
    await source.close();
    await env.close();
  }
});

test('a delta set or a catch-up that could not be started is reported until its blocks go as a catch-up copy', async () => {
  let catchUpRefusals = 1;
  const { env, source } = await sourceWithoutTarget(2 * 1024 * 1024, async () => {
    // Its snapshot cannot be taken the first time, as on a full disk.
    if (catchUpRefusals-- > 0) throw Object.assign(new Error('ENOSPC: no space left on device, open'), { code: 'ENOSPC' });
  });
  const { volume, pair, journal } = env;
  // The save volume's file refuses the first delta set, for the same reason.
  const write = journal.write.bind(journal);
  let refusals = 1;
  journal.write = (...args: Parameters<typeof write>) => {
    if (refusals-- > 0) return Promise.reject(Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' }));
    return write(...args);
  };
  try {
    source.start();
    await volume.write(0, randomBytes(16 * bb));
    await assert.rejects(source.cutNow(), /a delta set could not be created .*ENOSPC/);
    assert.match(source.stats.failing, /ENOSPC/);
    // More writes: the backlog (the whole 4 MiB volume) outgrows the 2 MiB save volume and goes as a copy.
    await volume.write(0, randomBytes(blocks * bb));
    await assert.rejects(source.cutNow(), /a catch-up copy could not be started \(its blocks stay tracked\): ENOSPC/);
    assert.equal(source.dirtyBlocks, blocks, 'every block is still tracked');
    assert.equal(await source.cutNow(), 0);
    assert.equal(pair.initialCopy.catchUp, true);
    assert.equal(source.stats.failing, '', 'the failed cut is not reported any more');
  } finally {
    await source.close();
    await env.close();
  }
});

test('a catch-up that keeps failing (a full disk) is retried after growing delays, not every poll of the cutter; a demanded cut is tried at once', async () => {
  let attempts = 0;
  const { env, source } = await sourceWithoutTarget(256 * 1024, async () => {
    attempts++;
    throw Object.assign(new Error('ENOSPC: no space left on device, open'), { code: 'ENOSPC' });
  });
  try {
    source.start();
    // 1 MiB written: more than the 256 KiB save volume holds, so each cut is a catch-up.
    await env.volume.write(0, randomBytes(256 * bb));
    await assert.rejects(source.cutNow(), /a catch-up copy could not be started/);
    assert.equal(attempts, 1);
    // The cutter polls every 100 ms and the high-water mark is not reached; the failed
    // demand must not be tried again and again.
    await new Promise((resolve) => setTimeout(resolve, cutRetryDelayMsMin + 600));
    assert.equal(attempts, 2, 'one retry, after the first delay');
    await new Promise((resolve) => setTimeout(resolve, 1000));
    assert.equal(attempts, 2, 'the second delay is twice as long');
    await assert.rejects(source.cutNow(), /a catch-up copy could not be started/);
    assert.equal(attempts, 3, "the operator's demand is tried at once");
    assert.equal(source.dirtyBlocks, 256, 'every block is still tracked');
  } finally {
    await source.close();
    await env.close();
  }
});

test('a wait for the other site to catch up that times out at a rate limit says so, and how to lift it', async () => {
  const { env, source } = await sourceWithoutTarget(2 * 1024 * 1024, async () => undefined, 1024 * 1024);
  try {
    source.start();
    await env.volume.write(0, randomBytes(16 * bb));
    await assert.rejects(source.drain({ withinBlocks: 0, playedBack: false, timeoutMs: 50 }), (err: Error) => {
      assert.match(err.message, /did not catch up within 0 s: 16 blocks outstanding.*the pair's rate limit \(1M\/s\) holds it back: run it again, or lift the limit with "ferry replicate set \S+ --max-rate 0"/);
      return true;
    });
  } finally {
    await source.close();
    await env.close();
  }
});
