import { read as fsRead, write as fsWrite, writev as fsWritev } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { trim as punchHole } from 'fs-native-extensions';
import { byteLength, dropBytes } from '../lib/byte-parts.js';
import { runLimited } from '../lib/concurrency.js';
import { FerryError, assert } from '../lib/errors.js';
import { RangeLock } from '../lib/range-lock.js';
import { BitmapFile, type BitmapLoadReport } from './bitmap-file.js';

export type ChangeKind = 'write' | 'zero' | 'trim';

/** A change about to be made to a volume, in bytes; `blocks` is the block range it touches. */
export interface Change {
  kind: ChangeKind;
  offset: number;
  length: number;
  firstBlock: number;
  blockCount: number;
}

/**
 * Layers above storage (change tracking, snapshot copy-on-write, synchronous
 * replication) hook the write path here, in one place, for every writer: NBD, the API,
 * restore, playback. `beforeChange` runs while the blocks are locked and before the
 * data can reach the file (activity log, before-images); `afterChange` runs after the
 * data is written and before the writer is answered (e.g. waiting for a remote copy).
 */
export interface WriteHook {
  beforeChange?(volume: Volume, change: Change): Promise<void> | void;
  /**
   * The same for a batch of disjoint changes made together (`writeMany`), so that a
   * hook can do its work once for all of them (one group commit of before-images);
   * hooks without it get `beforeChange` for each change.
   */
  beforeChanges?(volume: Volume, changes: readonly Change[]): Promise<void> | void;
  afterChange?(volume: Volume, change: Change): Promise<void> | void;
}

/** One write of a batch given to `writeMany`. */
export interface BatchWrite {
  offset: number;
  data: Uint8Array;
}

export interface Extent {
  offset: number;
  length: number;
  /** false: a hole that reads as zeros. */
  allocated: boolean;
}

export interface WriteOptions {
  /** Force unit access: the data is durable when the call returns. */
  fua?: boolean;
}

export interface ZeroOptions extends WriteOptions {
  /** Leave whole blocks allocated (write zeros) instead of punching holes. */
  noHole?: boolean;
}

/** The largest single request the I/O path accepts; larger ones are split by the caller. */
export const ioBytesMax = 64 * 1024 * 1024;

/**
 * A volume's data file plus its allocation map (which blocks may hold data: the meta
 * bit map of E FIG. 42). Offsets are bytes; every request is bounds-checked. Requests
 * on disjoint blocks run concurrently (positioned I/O, one syscall per request);
 * requests on overlapping blocks are serialised so hooks see a clean order.
 *
 * Allocation bits are written before the data they cover can reach the file, so after
 * a crash the map is a superset of the blocks that hold data; that is all BLOCK_STATUS
 * and snapshots need.
 */
export class Volume {
  private readonly hooks: WriteHook[] = [];
  private readonly locks = new RangeLock();
  private sizeBytesValue: number;
  private closed = false;
  /** Set while writes are paused (a consistency point is being taken). */
  private paused: Promise<void> | undefined;
  /** Positioned reads and writes running on the raw descriptor; close waits for them. */
  private rawOps = 0;
  private rawIdle: (() => void) | undefined;

  private constructor(
    readonly name: string,
    readonly path: string,
    readonly blockBytes: number,
    sizeBytes: number,
    private readonly fh: FileHandle,
    private readonly alloc: BitmapFile,
    readonly loadReport: BitmapLoadReport,
  ) {
    this.sizeBytesValue = sizeBytes;
  }

  static async create(name: string, path: string, allocPath: string, sizeBytes: number, blockBytes: number): Promise<Volume> {
    checkGeometry(sizeBytes, blockBytes);
    const fh = await open(path, 'wx+', 0o600);
    try {
      await fh.truncate(sizeBytes);
      await fh.datasync();
      const alloc = await BitmapFile.create(allocPath, sizeBytes / blockBytes);
      return new Volume(name, path, blockBytes, sizeBytes, fh, alloc, { corruptPages: [] });
    } catch (err) {
      await fh.close();
      throw err;
    }
  }

  static async open(name: string, path: string, allocPath: string, sizeBytes: number, blockBytes: number): Promise<Volume> {
    checkGeometry(sizeBytes, blockBytes);
    const fh = await open(path, 'r+');
    try {
      const stat = await fh.stat();
      if (stat.size !== sizeBytes) {
        // A resize interrupted between the file and the catalog: the catalog decides.
        await fh.truncate(sizeBytes);
      }
      // A damaged map reads as "every block allocated": reads then come from the file itself.
      const { file: alloc, report } = await BitmapFile.open(allocPath, 'fill', sizeBytes / blockBytes);
      if (alloc.bitmap.bitCount !== sizeBytes / blockBytes) await alloc.resize(sizeBytes / blockBytes);
      return new Volume(name, path, blockBytes, sizeBytes, fh, alloc, report);
    } catch (err) {
      await fh.close();
      throw err;
    }
  }

  get sizeBytes(): number {
    return this.sizeBytesValue;
  }

  get blockCount(): number {
    return this.sizeBytesValue / this.blockBytes;
  }

  /** Blocks that may hold data. */
  get allocatedBlocks(): number {
    return this.alloc.bitmap.count;
  }

  /** The allocation (meta) bit map. Read-only for callers. */
  get allocation(): {
    get(block: number): boolean;
    runs(start?: number, end?: number): Generator<[number, number]>;
    page(index: number): Uint8Array | undefined;
    readonly pageCount: number;
    readonly count: number;
  } {
    return this.alloc.bitmap;
  }

  addHook(hook: WriteHook): () => void {
    this.hooks.push(hook);
    return () => {
      const i = this.hooks.indexOf(hook);
      if (i >= 0) this.hooks.splice(i, 1);
    };
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(length);
    await this.readInto(buf, offset);
    return buf;
  }

  /** Fills `buf` from `offset`. Holes read as zeros (the file is sparse). */
  async readInto(buf: Uint8Array, offset: number): Promise<void> {
    this.checkRange(offset, buf.length);
    let done = 0;
    while (done < buf.length) {
      const bytesRead = await this.rawIo(fsRead, buf, done, buf.length - done, offset + done);
      if (bytesRead === 0) {
        buf.fill(0, done);
        break;
      }
      done += bytesRead;
    }
  }

  /**
   * Writes `data` at `offset`. The data may be given as consecutive pieces (e.g. the
   * network chunks an NBD payload arrived in): they are written with one pwritev,
   * without first being copied into one buffer.
   */
  async write(offset: number, data: Uint8Array | readonly Uint8Array[], options: WriteOptions = {}): Promise<void> {
    const pieces = data instanceof Uint8Array ? [data] : data;
    const length = byteLength(pieces);
    await this.change('write', offset, length, async (change) => {
      await this.markAllocated(change);
      if (pieces.length === 1) {
        const one = pieces[0] as Uint8Array;
        for (let done = 0; done < length; ) done += await this.rawIo(fsWrite, one, done, length - done, offset + done);
      } else {
        let rest = pieces;
        for (let done = 0; done < length; ) {
          const n = await this.rawWritev(rest, offset + done);
          done += n;
          if (done < length) rest = dropBytes(rest, n);
        }
      }
      if (options.fua) await this.flush();
    });
  }

  /**
   * Writes disjoint, block-aligned ranges as one batch (a copy's piece, a delta set's
   * chunk): all their blocks are locked together, each hook's before-work is done once
   * for the batch, then the data writes run `concurrency` at a time. Every write has
   * settled before an error is raised.
   */
  async writeMany(writes: readonly BatchWrite[], concurrency = 32): Promise<void> {
    if (writes.length === 0) return;
    const bs = this.blockBytes;
    const changes: Change[] = writes.map((w) => {
      this.checkRange(w.offset, w.data.length);
      assert(w.offset % bs === 0 && w.data.length % bs === 0 && w.data.length > 0, `batch write ${w.offset}+${w.data.length} is not whole blocks`);
      return { kind: 'write', offset: w.offset, length: w.data.length, firstBlock: w.offset / bs, blockCount: w.data.length / bs };
    });
    const order = changes.map((_, i) => i).sort((a, b) => (changes[a] as Change).firstBlock - (changes[b] as Change).firstBlock);
    for (let k = 1; k < order.length; k++) {
      const prev = changes[order[k - 1] as number] as Change;
      const next = changes[order[k] as number] as Change;
      assert(prev.firstBlock + prev.blockCount <= next.firstBlock, `batch writes overlap at block ${next.firstBlock}`);
    }
    while (this.paused) await this.paused;
    // One lock over the batch's span: a batch comes from a bulk applier (a copy's
    // piece, a delta set's chunk) on a volume hosts do not write, and a lock per range
    // would cost a scan of every lock held for each of its hundreds of ranges.
    const first = changes[order[0] as number] as Change;
    const last = changes[order[order.length - 1] as number] as Change;
    const release = await this.locks.acquire(first.firstBlock, last.firstBlock + last.blockCount);
    try {
      this.checkOpen();
      for (const hook of this.hooks) {
        if (hook.beforeChanges) await hook.beforeChanges(this, changes);
        else if (hook.beforeChange) for (const c of changes) await hook.beforeChange(this, c);
      }
      let newlyAllocated = 0;
      for (const c of changes) newlyAllocated += this.alloc.bitmap.setRange(c.firstBlock, c.blockCount);
      if (newlyAllocated > 0) await this.alloc.writeDirty();
      await runLimited(writes, concurrency, async ({ offset, data }) => {
        for (let done = 0; done < data.length; ) done += await this.rawIo(fsWrite, data, done, data.length - done, offset + done);
      });
      for (const hook of this.hooks) if (hook.afterChange) for (const c of changes) await hook.afterChange(this, c);
    } finally {
      release();
    }
  }

  /** Makes the range read as zeros; whole blocks become holes unless `noHole`. */
  async writeZeroes(offset: number, length: number, options: ZeroOptions = {}): Promise<void> {
    await this.change('zero', offset, length, async (change) => {
      if (options.noHole) {
        await this.markAllocated(change);
        await this.writeZeroBytes(offset, length);
      } else {
        await this.zeroAndRelease(change);
      }
      if (options.fua) await this.flush();
    });
  }

  /**
   * Discards whole blocks inside the range (they become holes reading as zeros);
   * partial blocks at either end are left as they are, as NBD allows for TRIM.
   */
  async trim(offset: number, length: number): Promise<void> {
    const first = Math.ceil(offset / this.blockBytes) * this.blockBytes;
    const end = Math.floor((offset + length) / this.blockBytes) * this.blockBytes;
    this.checkRange(offset, length);
    if (end <= first) return;
    await this.change('trim', first, end - first, (change) => this.zeroAndRelease(change));
  }

  /** Makes every completed write durable: allocation map first, then the data. */
  async flush(): Promise<void> {
    this.checkOpen();
    await this.alloc.sync();
    await this.fh.datasync();
  }

  /** Extents of the range, merged, each either allocated or a hole (block granularity). */
  blockStatus(offset: number, length: number): Extent[] {
    this.checkRange(offset, length);
    const out: Extent[] = [];
    const end = offset + length;
    const firstBlock = Math.floor(offset / this.blockBytes);
    const endBlock = Math.ceil(end / this.blockBytes);
    let cursor = offset;
    for (const [runStart, runLength] of this.alloc.bitmap.runs(firstBlock, endBlock)) {
      const runOffset = Math.max(offset, runStart * this.blockBytes);
      const runEnd = Math.min(end, (runStart + runLength) * this.blockBytes);
      if (runOffset > cursor) out.push({ offset: cursor, length: runOffset - cursor, allocated: false });
      out.push({ offset: runOffset, length: runEnd - runOffset, allocated: true });
      cursor = runEnd;
    }
    if (cursor < end) out.push({ offset: cursor, length: end - cursor, allocated: false });
    return out;
  }

  /** Grows or shrinks the volume. Shrinking drops the data past the new end. */
  async resize(sizeBytes: number): Promise<void> {
    checkGeometry(sizeBytes, this.blockBytes);
    const release = await this.locks.acquire(0, Number.MAX_SAFE_INTEGER);
    try {
      await this.fh.truncate(sizeBytes);
      await this.fh.datasync();
      await this.alloc.resize(sizeBytes / this.blockBytes);
      this.sizeBytesValue = sizeBytes;
    } finally {
      release();
    }
  }

  /**
   * Runs `fn` with every block locked: no change is in flight and none can start until
   * it returns. Snapshot creation and deletion use it so that no write straddles them.
   */
  async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    this.checkOpen();
    const release = await this.locks.acquire(0, Number.MAX_SAFE_INTEGER);
    try {
      this.checkOpen();
      return await fn();
    } finally {
      release();
    }
  }

  /** Waits for requests in flight, persists the allocation map and closes. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.locks.drain();
    // Reads take no lock; the descriptor must not be closed (and its number reused) under them.
    if (this.rawOps > 0) await new Promise<void>((resolve) => (this.rawIdle = resolve));
    try {
      await this.alloc.sync();
      await this.fh.datasync();
    } finally {
      await this.alloc.close();
      await this.fh.close();
    }
  }

  /**
   * pread / pwrite through the callback API on the descriptor: several times cheaper per
   * call than FileHandle's promise API, which matters at tens of thousands of NBD
   * requests a second. Counted so that `close` waits for them.
   */
  private rawIo(
    op: (fd: number, buf: Uint8Array, off: number, len: number, pos: number, cb: (err: NodeJS.ErrnoException | null, n: number) => void) => void,
    buf: Uint8Array,
    off: number,
    len: number,
    pos: number,
  ): Promise<number> {
    this.rawOps++;
    return new Promise((resolve, reject) => {
      op(this.fh.fd, buf, off, len, pos, (err, n) => {
        if (--this.rawOps === 0 && this.rawIdle) this.rawIdle();
        if (err) reject(err);
        else resolve(n);
      });
    });
  }

  private rawWritev(buffers: readonly Uint8Array[], pos: number): Promise<number> {
    this.rawOps++;
    return new Promise((resolve, reject) => {
      fsWritev(this.fh.fd, buffers as NodeJS.ArrayBufferView[], pos, (err, n) => {
        if (--this.rawOps === 0 && this.rawIdle) this.rawIdle();
        if (err) reject(err);
        else resolve(n);
      });
    });
  }

  private checkOpen(): void {
    if (this.closed) throw new FerryError('UNAVAILABLE', `volume ${this.name} is closed`);
  }

  private checkRange(offset: number, length: number): void {
    this.checkOpen();
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new FerryError('OUT_OF_RANGE', `invalid range offset ${offset} length ${length}`);
    }
    if (offset + length > this.sizeBytesValue) {
      throw new FerryError('OUT_OF_RANGE', `range ${offset}+${length} is past the end of volume ${this.name} (${this.sizeBytesValue} bytes)`, {
        offset,
        length,
        sizeBytes: this.sizeBytesValue,
      });
    }
    if (length > ioBytesMax) {
      throw new FerryError('PAYLOAD_TOO_LARGE', `request of ${length} bytes exceeds the ${ioBytesMax}-byte maximum`);
    }
  }

  /**
   * Pauses changes: waits until every change in flight has finished (its hooks
   * included) and holds new ones until the returned function is called. This is the
   * brief pause at a consistency point (E FIG. 10 steps 347-351): the image is
   * exactly the set of completed writes, and no write is half-recorded.
   */
  async quiesce(): Promise<() => void> {
    while (this.paused) await this.paused;
    let resume!: () => void;
    this.paused = new Promise<void>((resolve) => (resume = resolve));
    await this.locks.drain();
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this.paused = undefined;
      resume();
    };
  }

  /**
   * Runs `fn` with blocks [firstBlock, firstBlock + count) locked against changes, so a
   * background reader (a delta-set copier) sees each block either before or after a
   * write, never during one, and never overtakes a write's hooks.
   */
  async withBlocksLocked<T>(firstBlock: number, count: number, fn: () => Promise<T>): Promise<T> {
    const release = await this.locks.acquire(firstBlock, firstBlock + count);
    try {
      this.checkOpen();
      return await fn();
    } finally {
      release();
    }
  }

  private async change(kind: ChangeKind, offset: number, length: number, apply: (change: Change) => Promise<void>): Promise<void> {
    this.checkRange(offset, length);
    if (length === 0) return;
    while (this.paused) await this.paused;
    const firstBlock = Math.floor(offset / this.blockBytes);
    const endBlock = Math.ceil((offset + length) / this.blockBytes);
    const change: Change = { kind, offset, length, firstBlock, blockCount: endBlock - firstBlock };
    const release = await this.locks.acquire(firstBlock, endBlock);
    try {
      this.checkOpen();
      for (const hook of this.hooks) await hook.beforeChange?.(this, change);
      await apply(change);
      for (const hook of this.hooks) await hook.afterChange?.(this, change);
    } finally {
      release();
    }
  }

  private async markAllocated(change: Change): Promise<void> {
    if (this.alloc.bitmap.setRange(change.firstBlock, change.blockCount) > 0) await this.alloc.writeDirty();
  }

  /** Zeros partial blocks at the ends, punches holes for whole blocks and releases them. */
  private async zeroAndRelease(change: Change): Promise<void> {
    const { offset, length } = change;
    const end = offset + length;
    const wholeStart = Math.ceil(offset / this.blockBytes) * this.blockBytes;
    const wholeEnd = Math.floor(end / this.blockBytes) * this.blockBytes;
    if (wholeEnd <= wholeStart) {
      if (this.alloc.bitmap.anySet(change.firstBlock, change.blockCount)) await this.writeZeroBytes(offset, length);
      return;
    }
    if (wholeStart > offset) await this.writeZeroBytes(offset, wholeStart - offset);
    if (end > wholeEnd) await this.writeZeroBytes(wholeEnd, end - wholeEnd);
    await punchHole(this.fh.fd, wholeStart, wholeEnd - wholeStart);
    // Bits are cleared after the hole exists: a crash in between leaves a set bit over
    // zeros, which is the safe direction.
    const firstWhole = wholeStart / this.blockBytes;
    if (this.alloc.bitmap.clearRange(firstWhole, (wholeEnd - wholeStart) / this.blockBytes) > 0) await this.alloc.writeDirty();
  }

  private async writeZeroBytes(offset: number, length: number): Promise<void> {
    const chunkBytes = Math.min(length, 1024 * 1024);
    const zeros = Buffer.alloc(chunkBytes);
    for (let done = 0; done < length; ) {
      const n = Math.min(chunkBytes, length - done);
      const { bytesWritten } = await this.fh.write(zeros, 0, n, offset + done);
      done += bytesWritten;
    }
  }
}

function checkGeometry(sizeBytes: number, blockBytes: number): void {
  assert(Number.isInteger(Math.log2(blockBytes)) && blockBytes >= 512, `block size ${blockBytes} must be a power of two >= 512`);
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % blockBytes !== 0) {
    throw new FerryError('INVALID_SIZE', `volume size ${sizeBytes} must be a positive multiple of the block size ${blockBytes}`);
  }
}
