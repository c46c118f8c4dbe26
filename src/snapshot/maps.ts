import { crc32c } from '../lib/checksum.js';
import { FerryError, assert } from '../lib/errors.js';
import { PagedBitmap, bitmapPageBytes, bitsPerPage } from '../lib/paged-bitmap.js';

/**
 * Block map checkpoint of one snapshot (E FIG. 44): which block each save-volume record
 * holds, for records [0, recordCount). The map in memory is a hash map block → record
 * (a JS Map: the hash table and hash lists of FIG. 44); on disk it is the list of blocks
 * in record order, written whole with temp + fsync + rename. Records appended after
 * the checkpoint are found by scanning the save volume's tail at open.
 *
 *   header (40 bytes): magic "FRYSMAP1", u32 version, u32 tag, u48 recordCount + u16 0,
 *                      u32 entryBytes (6), u32 0, u32 crc32c(body), u32 crc32c(bytes 0..36)
 *   body: recordCount × u48 block
 */
const mapMagic = Buffer.from('FRYSMAP1', 'ascii');
export const blockMapFormatVersion = 1;
const mapHeaderBytes = 40;
const entryBytes = 6;

export function encodeBlockMap(tag: number, blockMap: Map<number, number>, recordCount: number): Buffer {
  assert(blockMap.size === recordCount, `block map has ${blockMap.size} entries for ${recordCount} records`);
  const buf = Buffer.alloc(mapHeaderBytes + recordCount * entryBytes);
  for (const [block, record] of blockMap) {
    assert(record >= 0 && record < recordCount, `block map entry ${block} → ${record} outside ${recordCount} records`);
    buf.writeUIntLE(block, mapHeaderBytes + record * entryBytes, entryBytes);
  }
  mapMagic.copy(buf, 0);
  buf.writeUInt32LE(blockMapFormatVersion, 8);
  buf.writeUInt32LE(tag, 12);
  buf.writeUIntLE(recordCount, 16, 6);
  buf.writeUInt32LE(entryBytes, 24);
  buf.writeUInt32LE(crc32c(buf.subarray(mapHeaderBytes)), 32);
  buf.writeUInt32LE(crc32c(buf.subarray(0, 36)), 36);
  return buf;
}

/** Decodes a checkpoint, calling `onRecord(index, block)` for each entry. */
export function decodeBlockMap(buf: Buffer, tag: number, blockCount: number, what: string, onRecord: (index: number, block: number) => void): number {
  if (buf.length < mapHeaderBytes || !buf.subarray(0, 8).equals(mapMagic)) throw new FerryError('SNAPSHOT_CORRUPT', `${what} is not a ferry block map`);
  if (buf.readUInt32LE(36) !== crc32c(buf.subarray(0, 36))) throw new FerryError('SNAPSHOT_CORRUPT', `${what}: block map header failed its checksum`);
  const version = buf.readUInt32LE(8);
  if (version !== blockMapFormatVersion) throw new FerryError('UNSUPPORTED_FORMAT', `${what}: block map format version ${version} is not supported`);
  const recordCount = buf.readUIntLE(16, 6);
  if (buf.readUInt32LE(12) !== tag || buf.readUInt32LE(24) !== entryBytes || buf.length !== mapHeaderBytes + recordCount * entryBytes) {
    throw new FerryError('SNAPSHOT_CORRUPT', `${what}: block map belongs to another snapshot or is truncated`);
  }
  if (buf.readUInt32LE(32) !== crc32c(buf.subarray(mapHeaderBytes))) throw new FerryError('SNAPSHOT_CORRUPT', `${what}: block map failed its checksum`);
  for (let i = 0; i < recordCount; i++) {
    const block = buf.readUIntLE(mapHeaderBytes + i * entryBytes, entryBytes);
    if (block >= blockCount) throw new FerryError('SNAPSHOT_CORRUPT', `${what}: block map names block ${block} past the volume's ${blockCount}`);
    onRecord(i, block);
  }
  return recordCount;
}

/**
 * For each block, the snapshots (by seq, ascending) whose save volume holds a
 * before-image of it. A snapshot S reads block b from the first holder at or after S
 * (E FIG. 27's walk, answered by one binary search instead of one lookup per younger
 * snapshot), or from the volume when there is none. A single holder — the common
 * case — is stored as a number to keep the index small.
 */
export class HolderIndex {
  private readonly holders = new Map<number, number | number[]>();

  get size(): number {
    return this.holders.size;
  }

  add(block: number, seq: number): void {
    const cur = this.holders.get(block);
    if (cur === undefined) {
      this.holders.set(block, seq);
      return;
    }
    const list = typeof cur === 'number' ? [cur] : cur;
    const at = lowerBound(list, seq);
    if (list[at] === seq) return;
    list.splice(at, 0, seq);
    if (typeof cur === 'number') this.holders.set(block, list);
  }

  remove(block: number, seq: number): void {
    const cur = this.holders.get(block);
    if (cur === undefined) return;
    if (typeof cur === 'number') {
      if (cur === seq) this.holders.delete(block);
      return;
    }
    const at = lowerBound(cur, seq);
    if (cur[at] !== seq) return;
    cur.splice(at, 1);
    if (cur.length === 1) this.holders.set(block, cur[0] as number);
    else if (cur.length === 0) this.holders.delete(block);
  }

  /** The oldest holder of `block` with seq >= `seq`, if any. */
  firstAtOrAfter(block: number, seq: number): number | undefined {
    const cur = this.holders.get(block);
    if (cur === undefined) return undefined;
    if (typeof cur === 'number') return cur >= seq ? cur : undefined;
    return cur[lowerBound(cur, seq)];
  }
}

function lowerBound(list: number[], value: number): number {
  let lo = 0;
  let hi = list.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if ((list[mid] as number) < value) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** The read-only face of a bitmap the decision functions need. */
export interface BitsView {
  get(bit: number): boolean;
  runs(start?: number, end?: number): Generator<[number, number]>;
}

/** A bitmap whose pages can be compared (PagedBitmap, or a volume's allocation map). */
export interface PagedBits extends BitsView {
  page(index: number): Uint8Array | undefined;
  readonly pageCount: number;
}

/**
 * E FIG. 41 with FIG. 42's meta bit map: the blocks of [first, first+count) that need a
 * before-image in the newest snapshot before they change — valid when the snapshot
 * was taken and not yet saved. Runs of [block, length].
 */
export function blocksNeedingBeforeImage(validAtSnapshot: BitsView, saved: BitsView, first: number, count: number): [number, number][] {
  const out: [number, number][] = [];
  for (const [start, length] of validAtSnapshot.runs(first, first + count)) {
    let runStart = -1;
    for (let b = start; b < start + length; b++) {
      if (!saved.get(b)) {
        if (runStart < 0) runStart = b;
      } else if (runStart >= 0) {
        out.push([runStart, b - runStart]);
        runStart = -1;
      }
    }
    if (runStart >= 0) out.push([runStart, start + length - runStart]);
  }
  return out;
}

/**
 * Deleting snapshot J: the before-images J holds that the next older snapshot I still
 * needs — blocks valid in I that I does not hold itself (I read them through J).
 */
export function blocksToMoveOnDelete(savedInJ: BitsView, validInI: BitsView, savedInI: BitsView): number[] {
  const out: number[] = [];
  for (const [start, length] of savedInJ.runs()) {
    for (let b = start; b < start + length; b++) if (validInI.get(b) && !savedInI.get(b)) out.push(b);
  }
  return out;
}

/**
 * Blocks that may differ between an older image L and a later image M (E FIG. 34–35,
 * 39–40): every block saved by a snapshot from L up to (not including) M — the first
 * write after each of them — plus every block whose validity differs. The caller
 * compares contents to drop blocks rewritten with the same bytes. The cost follows
 * the changed blocks: saved bitmaps are walked by runs, meta bit maps are compared
 * page by page and only differing pages bit by bit.
 */
export function deltaCandidates(blockCount: number, savedBetween: BitsView[], validL: PagedBits, validM: PagedBits): PagedBitmap {
  const out = new PagedBitmap(blockCount);
  for (const saved of savedBetween) for (const [start, length] of saved.runs()) out.setRange(start, length);
  const pages = Math.max(validL.pageCount, validM.pageCount);
  for (let p = 0; p < pages; p++) {
    const a = validL.page(p);
    const b = validM.page(p);
    if (a === b || (a && b && Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength)))) continue;
    for (let byte = 0; byte < bitmapPageBytes; byte++) {
      const x = ((a?.[byte] ?? 0) ^ (b?.[byte] ?? 0)) & 0xff;
      if (x === 0) continue;
      for (let bit = 0; bit < 8; bit++) {
        if (x & (1 << bit)) {
          const block = p * bitsPerPage + byte * 8 + bit;
          if (block < blockCount) out.set(block);
        }
      }
    }
  }
  return out;
}

/** Splits runs of blocks into pieces of at most `max` blocks, in order. */
export function* chunkRuns(runs: Iterable<[number, number]>, max: number): Generator<[number, number]> {
  for (const [start, length] of runs) {
    for (let s = start; s < start + length; s += max) yield [s, Math.min(max, start + length - s)];
  }
}

/**
 * Which loaded snapshots may leave memory (E FIG. 42): a read of snapshot S needs the
 * maps of S and of every later snapshot, so only a prefix of the queue can go — every
 * snapshot older than the oldest one read within `idleMs`, never the newest (the
 * write path needs it). `queue` is oldest first; returns the seqs to unload.
 */
export function snapshotsToUnload(queue: { seq: number; loaded: boolean; lastReadAtMs: number }[], nowMs: number, idleMs: number): number[] {
  if (queue.length === 0) return [];
  const newest = queue[queue.length - 1] as { seq: number };
  let keepFrom = newest.seq;
  for (const s of queue) {
    if (nowMs - s.lastReadAtMs < idleMs) {
      keepFrom = Math.min(keepFrom, s.seq);
      break;
    }
  }
  return queue.filter((s) => s.loaded && s.seq < keepFrom).map((s) => s.seq);
}
