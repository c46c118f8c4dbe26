import { BufferPool } from '../lib/buffer-pool.js';
import { byteLength } from '../lib/byte-parts.js';
import { crc32c, crc32cCombine, crc32cParts } from '../lib/checksum.js';
import { assert } from '../lib/errors.js';
import { PagedBitmap } from '../lib/paged-bitmap.js';
import { JournalRecordType, recordSpanBytes, type JournalFile, type RingSpace } from '../storage/journal.js';
import type { Volume } from '../storage/volume.js';
import { chunkDataBytesMax, chunkExtentsMax, encodeExtentList, type ChunkExtent } from './chunk.js';

/** Longest run of zero blocks one extent describes (it carries no data). */
const zeroExtentBlocksMax = 1 << 24;
/** Runs from this size up are read into reused buffers (sequential writes: a chunk's worth at a time). */
const pooledReadBytesMin = 256 * 1024;
/** Reused read buffers: a chunk's data, for the chunks being written and the one being filled. */
const readBuffers = new BufferPool(chunkDataBytesMax, 8);
/**
 * Runs of the old table at most this far apart are read together, in one read of their
 * span, the blocks between read and left out: after random writes most blocks of a
 * region can be dirty, and a read through the thread pool costs more than 64 KiB copied.
 */
const spanGapBytesMax = 64 * 1024;

/**
 * A buffer the builder read blocks into, shared by the chunks holding its parts: it
 * goes back to the pool once the builder is done with it and every such chunk is written.
 */
class SharedRead {
  private holders = 1;

  constructor(private readonly release: () => void) {}

  hold(): void {
    this.holders++;
  }

  drop(): void {
    if (--this.holders === 0) this.release();
  }
}

export interface BuiltDeltaSet {
  startLsn: number;
  endLsn: number;
  chunks: number;
  blocks: number;
  dataBytes: number;
  dataCrc: number;
}

/**
 * Space a delta set of `blocks` blocks can need in the save volume at most: data and
 * extent entries, a record header and alignment per chunk, one chunk flushed early by
 * each priority copy's extent limit, and one lap skip.
 */
export function deltaSetSpanBytesMax(blocks: number, blockBytes: number): number {
  const dataBytes = blocks * blockBytes;
  const records = Math.ceil(dataBytes / chunkDataBytesMax) + Math.ceil(blocks / chunkExtentsMax) + 1;
  return dataBytes + blocks * 16 + records * (recordSpanBytes(0) + 512) + recordSpanBytes(chunkDataBytesMax + chunkExtentsMax * 16);
}

/**
 * Copies the blocks of an old change-log table into a delta set in the save volume
 * (E FIG. 10 step 348): after-images in chunks, each block once. Blocks the volume
 * holds no data for become zero extents with no payload. Bits are cleared as blocks
 * are copied; the caller holds each block's lock while it is copied, so the image is
 * that of the cut.
 */
export class DeltaSetBuilder {
  private extents: ChunkExtent[] = [];
  private parts: Buffer[] = [];
  /** Reused buffers the parts of the chunk being filled are views of. */
  private shared = new Set<SharedRead>();
  private partBytes = 0;
  private chunkIndex = 0;
  private dataCrc = 0;
  private blocks = 0;
  private dataBytes = 0;
  private startLsn: number | undefined;
  private readonly writes: Promise<void>[] = [];
  /**
   * Blocks copied out of the old table (their bits cleared there). If the delta set
   * cannot be finished, they are tracked again with the rest (`ChangeLog.mergeOldBack`):
   * the delta set is dropped, and its blocks must not leave tracking with it.
   */
  readonly copied: PagedBitmap;

  constructor(
    private readonly volume: Volume,
    private readonly old: PagedBitmap,
    private readonly journal: JournalFile,
    private readonly ring: RingSpace,
    private readonly generation: number,
    readonly deltaSet: number,
  ) {
    this.copied = new PagedBitmap(old.bitCount);
  }

  /**
   * Copies every block still set in the old table, in block order, a chunk's span at a
   * time: a long run, or runs close together (`spanGapBytesMax`), read at once.
   */
  async copyAll(): Promise<void> {
    const bs = this.volume.blockBytes;
    const chunkBlocks = Math.max(1, Math.floor(chunkDataBytesMax / bs));
    const gapBlocks = Math.floor(spanGapBytesMax / bs);
    let cursor = 0;
    for (;;) {
      let start = -1;
      let end = 0;
      for (const [s, n] of this.old.runs(cursor)) {
        if (start < 0) {
          start = s;
          end = s + Math.min(n, chunkBlocks);
          if (n >= chunkBlocks) break;
          continue;
        }
        if (s - end > gapBlocks || s + n - start > chunkBlocks) break;
        end = s + n;
      }
      if (start < 0) break;
      await this.volume.withBlocksLocked(start, end - start, () => this.copyRange(start, end - start));
      cursor = end;
    }
  }

  /** Copies the blocks of [first, first+count) still set in the old table; the caller holds their lock. */
  async copyRange(first: number, count: number): Promise<void> {
    const runs = [...this.old.runs(first, first + count)];
    const bs = this.volume.blockBytes;
    const head = runs[0];
    const tail = runs[runs.length - 1];
    if (runs.length > 1 && head && tail && (tail[0] + tail[1] - head[0]) * bs <= readBuffers.bufferBytes) {
      await this.copySpan(runs, head[0], (tail[0] + tail[1] - head[0]) * bs);
      return;
    }
    for (const [s, n] of runs) {
      await this.takeRun(s, n, async (as, an) => {
        const bytes = an * bs;
        if (bytes < pooledReadBytesMin || bytes > readBuffers.bufferBytes) {
          this.addData(as, an, await this.volume.read(as * bs, bytes));
          return;
        }
        const buffer = readBuffers.take();
        const owner = new SharedRead(readBuffers.releaser(buffer));
        try {
          await this.volume.readInto(buffer.subarray(0, bytes), as * bs);
          this.addData(as, an, buffer.subarray(0, bytes), owner);
        } finally {
          // The builder's own hold: the read has settled, the chunks hold theirs.
          owner.drop();
        }
      });
    }
  }

  /** Copies several runs with one read of the span from the first to the end of the last. */
  private async copySpan(runs: readonly [number, number][], spanStart: number, spanBytes: number): Promise<void> {
    const bs = this.volume.blockBytes;
    const buffer = readBuffers.take();
    const owner = new SharedRead(readBuffers.releaser(buffer));
    try {
      await this.volume.readInto(buffer.subarray(0, spanBytes), spanStart * bs);
      for (const [s, n] of runs) {
        await this.takeRun(s, n, (as, an) => this.addData(as, an, buffer.subarray((as - spanStart) * bs, (as - spanStart + an) * bs), owner));
      }
    } finally {
      // The builder's own hold: the read has settled, the chunks hold theirs.
      owner.drop();
    }
  }

  /**
   * Puts run [s, s+n) of the old table into the delta set and takes it out of the table:
   * what the volume holds no data for as zero extents, the rest through `addAllocated`.
   */
  private async takeRun(s: number, n: number, addAllocated: (block: number, count: number) => Promise<void> | void): Promise<void> {
    let cursor = s;
    const end = s + n;
    for (const [as, an] of [...this.volume.allocation.runs(s, end)]) {
      if (as > cursor) this.addZero(cursor, as - cursor);
      await addAllocated(as, an);
      cursor = as + an;
    }
    if (cursor < end) this.addZero(cursor, end - cursor);
    this.old.clearRange(s, n);
    this.copied.setRange(s, n);
  }

  /** Writes the last chunk and makes the delta set durable in the save volume. */
  async finish(): Promise<BuiltDeltaSet> {
    assert(this.old.count === 0, `delta set ${this.deltaSet} finished with ${this.old.count} blocks not copied`);
    if (this.extents.length > 0) this.flushChunk();
    await Promise.all(this.writes);
    await this.journal.sync();
    const startLsn = this.startLsn ?? this.ring.head;
    return { startLsn, endLsn: this.ring.head, chunks: this.chunkIndex, blocks: this.blocks, dataBytes: this.dataBytes, dataCrc: this.dataCrc };
  }

  private addZero(block: number, count: number): void {
    for (let done = 0; done < count; ) {
      const n = Math.min(zeroExtentBlocksMax, count - done);
      this.extents.push({ block: block + done, count: n, zero: true });
      this.blocks += n;
      done += n;
      if (this.extents.length >= chunkExtentsMax) this.flushChunk();
    }
  }

  private addData(block: number, count: number, data: Buffer, owner?: SharedRead): void {
    const bs = this.volume.blockBytes;
    const perChunk = Math.max(1, Math.floor(chunkDataBytesMax / bs));
    for (let done = 0; done < count; ) {
      const room = Math.max(1, perChunk - Math.floor(this.partBytes / bs));
      const n = Math.min(room, count - done);
      this.extents.push({ block: block + done, count: n, zero: false });
      this.parts.push(data.subarray(done * bs, (done + n) * bs));
      if (owner && !this.shared.has(owner)) {
        owner.hold();
        this.shared.add(owner);
      }
      this.partBytes += n * bs;
      this.blocks += n;
      done += n;
      if (this.partBytes >= chunkDataBytesMax || this.extents.length >= chunkExtentsMax) this.flushChunk();
    }
  }

  /** Seals the chunk being filled into a journal record; synchronous up to the write. */
  private flushChunk(): void {
    // The record is written from its parts: the blocks read are not copied again.
    const extentList = encodeExtentList(this.extents);
    // The data is checksummed once: the delta set's and the record's checksums are
    // combined from it.
    const chunkDataCrc = crc32cParts(this.parts);
    this.dataCrc = crc32cCombine(this.dataCrc, chunkDataCrc, this.partBytes);
    const recordCrc = crc32cCombine(crc32c(extentList), chunkDataCrc, this.partBytes);
    this.dataBytes += this.partBytes;
    const encoded = this.journal.encodeParts({ type: JournalRecordType.Chunk, flags: 0, generation: this.generation, deltaSet: this.deltaSet, index: this.chunkIndex }, [extentList, ...this.parts], recordCrc);
    const lsn = this.ring.allocate(byteLength(encoded));
    // The cutter reserved the worst case before switching tables, so this cannot fail.
    assert(lsn !== undefined, `save volume out of space inside delta set ${this.deltaSet}`);
    this.startLsn ??= lsn;
    const shared = [...this.shared];
    const written = this.journal.write(lsn, encoded);
    // The read buffers go back once the record is written (or its write failed).
    void written.then(
      () => shared.forEach((o) => o.drop()),
      () => shared.forEach((o) => o.drop()),
    );
    this.writes.push(written);
    this.chunkIndex++;
    this.extents = [];
    this.parts = [];
    this.shared = new Set();
    this.partBytes = 0;
  }
}
