import { assert, isFerryError, isNoSpace } from '../lib/errors.js';
import { PagedBitmap } from '../lib/paged-bitmap.js';
import type { BitmapFile } from '../storage/bitmap-file.js';
import type { ActivityLog } from './activity-log.js';

/** Blocks per activity-log extent: 4 MiB of 8 KiB blocks. */
export const extentBytesDefault = 4 * 1024 * 1024;

export interface ChangeLogOptions {
  /** Bytes per activity-log extent. */
  extentBytes?: number;
  /** The source's clock, ms: when the first write after a cut was made. */
  now?: () => number;
}

/** Copies blocks of the old table, as they are now, into the delta set being built. */
export type OldTableCopier = (firstBlock: number, blockCount: number) => Promise<void>;

/**
 * The change log of a replicated source (E FIG. 8, 10): a queue of two bit-map tables.
 * Host writes mark the new table; at a delta-set boundary the tables switch and the
 * old table's blocks are copied into the save volume in the background; a write to a
 * block still set in the old table first has that block copied (priority copy).
 *
 * Rule 1 (no acknowledged write lost from tracking): a write marks the new table, then
 * its activity-log extent is made hot durably, and only then may its data reach the
 * disk. The persisted bitmap plus the hot extents always cover every block written
 * since the last sealed delta set, so after a crash `open` recovers a superset.
 *
 * Under power loss too: a sealed delta set's blocks stop being tracked (in the
 * persisted bitmap, where an eviction may have put them, and in the activity log) only
 * once the volume's data is flushed. A block sent in a delta set and no longer tracked
 * must not go back to older contents on the source's disk, or the replica would hold
 * what the source lost and the pair would differ with nothing tracking it (DRBD
 * flushes its backing device before an activity-log transaction evicts extents, for
 * the same reason).
 */
export class ChangeLog {
  current: PagedBitmap;
  old: PagedBitmap | undefined;
  /** Bytes newly marked since the last switch (the high-water trigger reads it). */
  modifiedBytes = 0;
  /**
   * When the first write of the new table was made (source clock, ms): the replica is
   * exact up to that moment. 0 when not known (blocks recovered after a restart: their
   * writes may be as old as the last cut); undefined when nothing was written.
   */
  firstWriteMs: number | undefined;
  /** The same for the old table. */
  oldFirstWriteMs: number | undefined;
  /** Why the blocks recovered at open are not in the persisted bitmap yet ('' when they are). */
  recoveryNotPersisted = '';
  private copier: OldTableCopier | undefined;
  private evicting: Promise<void> | undefined;
  readonly extentBlocks: number;
  private readonly now: () => number;

  constructor(
    readonly blockBytes: number,
    private readonly persisted: BitmapFile,
    private readonly al: ActivityLog,
    /** Makes the volume's written data durable (its fdatasync). */
    private readonly flushData: () => Promise<void>,
    options: ChangeLogOptions = {},
  ) {
    this.extentBlocks = Math.max(1, Math.floor((options.extentBytes ?? extentBytesDefault) / blockBytes));
    this.now = options.now ?? Date.now;
    this.current = new PagedBitmap(persisted.bitmap.bitCount);
  }

  /**
   * When the oldest write not yet in a delta set was made (0: not known, see
   * `firstWriteMs`), or undefined if every write is in one.
   */
  get oldestUnsentWriteMs(): number | undefined {
    // The old table's delta set is not in the mailbox until it is built and sealed.
    if (this.old) return this.oldFirstWriteMs ?? 0;
    return this.current.count > 0 ? (this.firstWriteMs ?? 0) : undefined;
  }

  get blockCount(): number {
    return this.current.bitCount;
  }

  /**
   * Recovery after a start or a crash: the dirty set is the persisted bitmap plus every
   * block of every extent the activity log held hot. Made durable in the persisted
   * bitmap, after which the activity log can start empty. Returns the blocks recovered.
   */
  async recover(recoveredExtents: number[]): Promise<number> {
    const p = this.persisted.bitmap;
    for (const e of recoveredExtents) {
      const first = e * this.extentBlocks;
      if (first >= p.bitCount) continue;
      p.setRange(first, Math.min(this.extentBlocks, p.bitCount - first));
    }
    let durable = true;
    try {
      await this.persisted.sync();
    } catch (err) {
      // A full disk must not keep the site from starting: the extents stay hot in the
      // activity log, which records them durably already (rule 1), and the bitmap's
      // pages are written with the next persist, once there is space.
      if (!isNoSpace(err)) throw err;
      durable = false;
      this.recoveryNotPersisted = (err as Error).message;
    }
    this.current = p.clone();
    // When these blocks were written is not known: as long ago as the last cut.
    this.firstWriteMs = this.current.count > 0 ? 0 : undefined;
    if (durable) {
      this.al.cool(recoveredExtents);
      await this.al.flush();
    }
    return this.current.count;
  }

  /**
   * The volume grew by blocks never written: both tables and the persisted bitmap grow
   * with it, the new bits clear. The caller holds the volume quiesced.
   */
  async grow(blockCount: number): Promise<void> {
    if (blockCount <= this.current.bitCount) return;
    this.current.resize(blockCount);
    this.old?.resize(blockCount);
    await this.persisted.resize(blockCount);
  }

  /** Installs the copier the delta-set builder uses while an old table exists. */
  setCopier(copier: OldTableCopier | undefined): void {
    this.copier = copier;
  }

  /**
   * Called for every change before its data can reach the volume, with the change's
   * blocks locked. Resolves once the change is recorded durably (rule 1).
   */
  async mark(firstBlock: number, blockCount: number): Promise<void> {
    if (this.old && this.copier && this.old.anySet(firstBlock, blockCount)) {
      await this.copier(firstBlock, blockCount);
    }
    this.firstWriteMs ??= this.now();
    this.modifiedBytes += this.current.setRange(firstBlock, blockCount) * this.blockBytes;
    const extents: number[] = [];
    const firstExtent = Math.floor(firstBlock / this.extentBlocks);
    const lastExtent = Math.floor((firstBlock + blockCount - 1) / this.extentBlocks);
    for (let e = firstExtent; e <= lastExtent; e++) extents.push(e);
    for (;;) {
      try {
        await this.al.ensureHot(extents);
        return;
      } catch (err) {
        if (!isFerryError(err, 'UNAVAILABLE')) throw err;
        await this.evict(new Set(extents));
      }
    }
  }

  /**
   * The switch at a delta-set boundary. The caller holds the volume quiesced, so no
   * change is between its mark and its data write. Returns the old table.
   */
  switchTables(): PagedBitmap {
    assert(this.old === undefined, 'tables switched while the previous delta set is still being built');
    this.old = this.current;
    this.current = new PagedBitmap(this.old.bitCount);
    this.oldFirstWriteMs = this.firstWriteMs;
    this.firstWriteMs = undefined;
    this.modifiedBytes = 0;
    return this.old;
  }

  /**
   * The old table's delta set is durable in the save volume: its blocks no longer need
   * tracking. The persisted bitmap becomes the new table; extents with nothing dirty
   * leave the activity log.
   */
  async sealed(): Promise<void> {
    assert(this.old !== undefined && this.old.count === 0, 'delta set sealed before every block of the old table was copied');
    this.old = undefined;
    this.oldFirstWriteMs = undefined;
    // Power loss: the blocks about to leave tracking must be on disk first. A write
    // during the flush marks the new table, which is what gets persisted.
    await this.flushData();
    await this.persistCurrent();
  }

  /**
   * The old table's blocks are recorded durably elsewhere (a catch-up copy's bitmap):
   * they no longer need tracking here. No flush: the copy reads them from a snapshot,
   * and taking it flushed the volume.
   */
  async handOff(): Promise<void> {
    assert(this.old !== undefined, 'hand-off without an old table');
    this.old = undefined;
    this.oldFirstWriteMs = undefined;
    await this.persistCurrent();
  }

  /**
   * Abandons the old table by merging it back (its delta set could not be built), with
   * `copied`: the blocks already copied out of it into the delta set being dropped.
   */
  async mergeOldBack(copied?: PagedBitmap): Promise<void> {
    if (!this.old) return;
    this.current.or(this.old);
    if (copied) this.current.or(copied);
    // The old table's writes came first (an unknown time, 0, is the earliest).
    this.firstWriteMs = this.oldFirstWriteMs ?? this.firstWriteMs;
    this.old = undefined;
    this.oldFirstWriteMs = undefined;
    await this.persistCurrent();
  }

  /** Blocks dirty (not yet in a sealed delta set). */
  get dirtyBlocks(): number {
    return this.current.count + (this.old?.count ?? 0);
  }

  /**
   * Makes every dirty bit durable in the persisted bitmap (clean shutdown). No write can
   * come after, so the bitmap alone is exact: the activity log is emptied and the next
   * open (or a resync's undo list) sees exactly the blocks written, not whole extents.
   * No flush: every block still dirty is in the bitmap, and the others left tracking at
   * a seal, after one.
   */
  async close(): Promise<void> {
    if (this.old) this.current.or(this.old);
    await this.persistCurrent();
    this.al.cool([...this.al.hotExtents]);
    await this.al.flush();
  }

  private async persistCurrent(): Promise<void> {
    const p = this.persisted.bitmap;
    p.clearAll();
    p.or(this.current);
    if (this.old) p.or(this.old);
    await this.persisted.sync();
    const cold: number[] = [];
    for (const e of this.al.hotExtents) {
      const first = e * this.extentBlocks;
      const count = Math.min(this.extentBlocks, Math.max(0, this.current.bitCount - first));
      if (count === 0 || !this.current.anySet(first, count)) cold.push(e);
    }
    this.al.cool(cold);
    await this.al.flush();
  }

  /** The activity log is full: make some extents' bits durable, then let them go. */
  private async evict(keep: Set<number>): Promise<void> {
    if (this.evicting) return this.evicting;
    this.evicting = (async () => {
      const victims = this.al.hotExtents.filter((e) => !keep.has(e)).slice(0, Math.max(1, Math.floor(this.al.extentsMax / 8)));
      const p = this.persisted.bitmap;
      for (const e of victims) {
        const first = e * this.extentBlocks;
        const end = Math.min(first + this.extentBlocks, p.bitCount);
        for (const table of [this.current, this.old]) {
          if (!table) continue;
          for (const [s, n] of table.runs(first, end)) p.setRange(s, n);
        }
      }
      await this.persisted.sync();
      // A write may have marked a victim since its bits were copied: keep those.
      this.al.cool(victims.filter((e) => {
        const first = e * this.extentBlocks;
        const end = Math.min(first + this.extentBlocks, p.bitCount);
        for (const table of [this.current, this.old]) {
          if (!table) continue;
          for (const [s, n] of table.runs(first, end)) if (!p.allSet(s, n)) return false;
        }
        return true;
      }));
      await this.al.flush();
    })();
    try {
      await this.evicting;
    } finally {
      this.evicting = undefined;
    }
  }
}
