import { open, type FileHandle } from 'node:fs/promises';
import { crc32c } from '../lib/checksum.js';
import { writeAllv } from '../lib/byte-parts.js';
import { FerryError, assert, isNoSpace } from '../lib/errors.js';

/**
 * The save volume of one snapshot (E FIG. 24–26): an append-only file of before-images,
 * one fixed-size record per block, space allocated as needed (the file grows).
 *
 *   header (4096 bytes): magic "FRYSAVE1", u32 version, u32 blockBytes, u32 tag,
 *                        snapshot id (36 ASCII bytes), u32 crc32c(bytes 0..56)
 *   record i at 4096 + i * (32 + blockBytes):
 *     u32 magic "SVRC", u32 crc32c(header bytes 8..32), u32 index, u32 groupStart,
 *     u48 block + u16 0, u32 crc32c(data), u32 tag, then the block's bytes
 *
 * `tag` is the CRC32C of the snapshot id: a record copied from another file is refused.
 * Records are written in groups (group commit): one pwritev and one fdatasync for every
 * request waiting, then the group's records are handed to `onCommit` — the caller
 * updates its maps only then, so a map never names a record that is not durable.
 * A group is written only after the previous one is durable, which is what lets
 * `open` tell a torn last group (crash: dropped, its writes never happened) from a
 * damaged durable record (refused).
 */
const fileMagic = Buffer.from('FRYSAVE1', 'ascii');
export const saveVolumeFormatVersion = 1;
const fileHeaderBytes = 4096;
const recordHeaderBytes = 32;
const recordMagic = 0x43525653; // "SVRC"
/** Records written with one pwritev + fdatasync at most (8 MiB of 8 KiB blocks). */
export const saveGroupRecordsMax = 1024;
/** Records read at once while scanning a tail after a restart. */
const scanRecordsPerRead = 64;
/** A save volume never grows past this many records (u32 record numbers). */
export const saveRecordsMax = 0xffff_fff0;

export interface SaveEntry {
  block: number;
  data: Uint8Array;
}

interface Waiter {
  entries: SaveEntry[];
  resolve: () => void;
  reject: (err: unknown) => void;
}

export type CommitListener = (index: number, block: number) => void;

export class SaveVolume {
  private recordCountValue: number;
  private readonly queue: Waiter[] = [];
  private pumping = false;
  private failure: Error | undefined;
  private closed = false;
  onCommit: CommitListener = () => undefined;

  private constructor(
    readonly path: string,
    private readonly fh: FileHandle,
    readonly blockBytes: number,
    private readonly tag: number,
    recordCount: number,
  ) {
    this.recordCountValue = recordCount;
  }

  get recordCount(): number {
    return this.recordCountValue;
  }

  get recordBytes(): number {
    return recordHeaderBytes + this.blockBytes;
  }

  /** Bytes the file holds for its records (what the snapshot costs on disk). */
  get sizeBytes(): number {
    return fileHeaderBytes + this.recordCountValue * this.recordBytes;
  }

  static async create(path: string, snapshotId: string, blockBytes: number): Promise<SaveVolume> {
    const fh = await open(path, 'wx+', 0o600);
    try {
      await fh.write(encodeFileHeader(snapshotId, blockBytes), 0, fileHeaderBytes, 0);
      await fh.datasync();
    } catch (err) {
      await fh.close();
      throw err;
    }
    return new SaveVolume(path, fh, blockBytes, crc32c(snapshotId), 0);
  }

  /**
   * Opens the file; records before `trustedRecords` are known from the block map
   * checkpoint (each is checked when read); later ones are scanned and their data
   * checksums verified, each valid one reported to `onRecord`. A torn last group is
   * cut off; a bad record followed by a later durable group is corruption.
   */
  static async open(path: string, snapshotId: string, blockBytes: number, trustedRecords: number, onRecord: CommitListener): Promise<SaveVolume> {
    const fh = await open(path, 'r+');
    try {
      const header = Buffer.alloc(fileHeaderBytes);
      const { bytesRead } = await fh.read(header, 0, fileHeaderBytes, 0);
      decodeFileHeader(header.subarray(0, bytesRead), path, snapshotId, blockBytes);
      const tag = crc32c(snapshotId);
      const recordBytes = recordHeaderBytes + blockBytes;
      const size = (await fh.stat()).size;
      const present = Math.floor(Math.max(0, size - fileHeaderBytes) / recordBytes);
      if (present < trustedRecords) {
        throw new FerryError('SNAPSHOT_CORRUPT', `${path}: save volume holds ${present} records but its block map names ${trustedRecords}`);
      }
      let good = trustedRecords;
      let firstBad = -1;
      const buf = Buffer.alloc(recordBytes * scanRecordsPerRead);
      scan: for (let first = trustedRecords; first < present; first += scanRecordsPerRead) {
        const n = Math.min(scanRecordsPerRead, present - first);
        await readFully(fh, buf, n * recordBytes, fileHeaderBytes + first * recordBytes);
        for (let i = 0; i < n; i++) {
          const index = first + i;
          const rec = buf.subarray(i * recordBytes, (i + 1) * recordBytes);
          const parsed = checkRecord(rec, index, tag, blockBytes);
          if (!parsed) {
            // A crash leaves the unsynced last group short (SIGKILL: the file ends
            // early) or unwritten (power loss: zeros where the file grew). A record
            // that is present, not zero and still fails its checks was written —
            // damage, which is refused rather than guessed about.
            if (!isZero(rec)) throw new FerryError('SNAPSHOT_CORRUPT', `${path}: save-volume record ${index} is damaged`);
            firstBad = index;
            break scan;
          }
          onRecord(index, parsed.block);
          good = index + 1;
        }
      }
      if (firstBad >= 0) {
        // Any valid record after the bad one whose group started after it proves the
        // bad record was durable once (groups are written one after the other).
        for (let first = firstBad + 1; first < present; first += scanRecordsPerRead) {
          const n = Math.min(scanRecordsPerRead, present - first);
          await readFully(fh, buf, n * recordBytes, fileHeaderBytes + first * recordBytes);
          for (let i = 0; i < n; i++) {
            const parsed = checkRecord(buf.subarray(i * recordBytes, (i + 1) * recordBytes), first + i, tag, blockBytes);
            if (parsed && parsed.groupStart > firstBad) {
              throw new FerryError('SNAPSHOT_CORRUPT', `${path}: save-volume record ${firstBad} is damaged`);
            }
          }
        }
      }
      if (size !== fileHeaderBytes + good * recordBytes) {
        // The torn last group (or a partial record): its writes were never let through.
        await fh.truncate(fileHeaderBytes + good * recordBytes);
        await fh.datasync();
      }
      return new SaveVolume(path, fh, blockBytes, tag, good);
    } catch (err) {
      await fh.close();
      throw err;
    }
  }

  /**
   * Appends before-images; resolves once they are durable (fdatasync) and reported to
   * `onCommit`. Concurrent calls share one write and one fdatasync (group commit).
   */
  append(entries: SaveEntry[]): Promise<void> {
    if (entries.length === 0) return Promise.resolve();
    if (this.failure) return Promise.reject(this.failure);
    if (this.closed) return Promise.reject(new FerryError('UNAVAILABLE', `save volume ${this.path} is closed`));
    for (const e of entries) assert(e.data.length === this.blockBytes, `before-image of ${e.data.length} bytes, expected ${this.blockBytes}`);
    return new Promise<void>((resolve, reject) => {
      this.queue.push({ entries, resolve, reject });
      void this.pump();
    });
  }

  /** Reads record `index`, checking that it is the before-image of `block`, into `into` at `at`. */
  async readRecord(index: number, block: number, into: Uint8Array, at = 0): Promise<void> {
    // A block map never points outside its save volume.
    assert(Number.isInteger(index) && index >= 0 && index < this.recordCountValue, `save-volume record ${index} outside ${this.path} (${this.recordCountValue} records)`);
    // One readv: the header into a small buffer, the data straight into the caller's.
    const header = Buffer.allocUnsafe(recordHeaderBytes);
    const data = Buffer.from(into.buffer, into.byteOffset + at, this.blockBytes);
    const { bytesRead } = await this.fh.readv([header, data], fileHeaderBytes + index * this.recordBytes);
    if (
      bytesRead !== this.recordBytes ||
      header.readUInt32LE(0) !== recordMagic ||
      header.readUInt32LE(4) !== crc32c(header.subarray(8, recordHeaderBytes)) ||
      header.readUInt32LE(8) !== index ||
      header.readUInt32LE(28) !== this.tag ||
      header.readUIntLE(16, 6) !== block ||
      header.readUInt32LE(24) !== crc32c(data)
    ) {
      data.fill(0); // never leave unchecked bytes in the caller's buffer
      throw new FerryError('SNAPSHOT_CORRUPT', `${this.path}: save-volume record ${index} (block ${block}) failed its checksum`);
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    while (this.pumping || this.queue.length > 0) await new Promise((r) => setImmediate(r));
    await this.fh.close();
  }

  private async pump(): Promise<void> {
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (this.queue.length > 0) {
        const group: Waiter[] = [];
        let records = 0;
        while (this.queue.length > 0) {
          const next = this.queue[0] as Waiter;
          if (group.length > 0 && records + next.entries.length > saveGroupRecordsMax) break;
          group.push(next);
          records += next.entries.length;
          this.queue.shift();
        }
        try {
          if (this.failure) throw this.failure;
          const start = this.recordCountValue;
          if (start + records > saveRecordsMax) throw new FerryError('SNAPSHOT_LIMIT', `save volume ${this.path} is full (${saveRecordsMax} records)`);
          // Each record goes out as its header and the caller's data, without first being
          // copied into one buffer; the file gets the same bytes as from one write.
          const headers = Buffer.allocUnsafe(records * recordHeaderBytes);
          const parts: Buffer[] = [];
          const blocks: number[] = [];
          let i = 0;
          for (const w of group) {
            for (const e of w.entries) {
              const header = headers.subarray(i * recordHeaderBytes, (i + 1) * recordHeaderBytes);
              encodeRecordHeader(header, start + i, start, e.block, e.data, this.tag);
              parts.push(header, Buffer.from(e.data.buffer, e.data.byteOffset, e.data.length));
              blocks.push(e.block);
              i++;
            }
          }
          await writeAllv(this.fh, parts, fileHeaderBytes + start * this.recordBytes);
          // SPEC §4 rule 3: the before-images are durable before any caller lets the
          // new data reach the volume file.
          await this.fh.datasync();
          this.recordCountValue = start + records;
          blocks.forEach((block, k) => this.onCommit(start + k, block));
          for (const w of group) w.resolve();
        } catch (err) {
          for (const w of group) w.reject(err);
          // The group's writes wait for these records and fail with them. A group refused
          // for want of space is cut off the file (made durable, as `open` does with a
          // torn group), so appends work again once space is freed. Any other failure
          // leaves the tail unknown: further appends are refused (the volume's writes to
          // unsaved blocks fail) rather than risk a record that is not durable.
          if (!this.failure && !(isNoSpace(err) && (await this.cutTail()))) {
            this.failure = err instanceof Error ? err : new Error(String(err));
          }
        }
      }
    } finally {
      this.pumping = false;
    }
  }

  /** Cuts the file back to its durable records; false if that failed too. */
  private async cutTail(): Promise<boolean> {
    try {
      await this.fh.truncate(this.sizeBytes);
      await this.fh.datasync();
      return true;
    } catch {
      return false;
    }
  }
}

function encodeFileHeader(snapshotId: string, blockBytes: number): Buffer {
  const h = Buffer.alloc(fileHeaderBytes);
  fileMagic.copy(h, 0);
  h.writeUInt32LE(saveVolumeFormatVersion, 8);
  h.writeUInt32LE(blockBytes, 12);
  h.writeUInt32LE(crc32c(snapshotId), 16);
  h.write(snapshotId.padEnd(36, ' ').slice(0, 36), 20, 'ascii');
  h.writeUInt32LE(crc32c(h.subarray(0, 56)), 56);
  return h;
}

function decodeFileHeader(h: Buffer, path: string, snapshotId: string, blockBytes: number): void {
  if (h.length < 60 || !h.subarray(0, 8).equals(fileMagic)) throw new FerryError('SNAPSHOT_CORRUPT', `${path} is not a ferry save volume`);
  if (h.readUInt32LE(56) !== crc32c(h.subarray(0, 56))) throw new FerryError('SNAPSHOT_CORRUPT', `${path}: save-volume header failed its checksum`);
  const version = h.readUInt32LE(8);
  if (version !== saveVolumeFormatVersion) throw new FerryError('UNSUPPORTED_FORMAT', `${path}: save-volume format version ${version} is not supported`);
  if (h.readUInt32LE(12) !== blockBytes || h.readUInt32LE(16) !== crc32c(snapshotId)) {
    throw new FerryError('SNAPSHOT_CORRUPT', `${path}: save volume belongs to another snapshot or block size`);
  }
}

/** The record header of a before-image; the block's bytes follow it in the file. */
function encodeRecordHeader(header: Buffer, index: number, groupStart: number, block: number, data: Uint8Array, tag: number): void {
  header.writeUInt32LE(recordMagic, 0);
  header.writeUInt32LE(index, 8);
  header.writeUInt32LE(groupStart, 12);
  header.writeUIntLE(block, 16, 6);
  header.writeUInt16LE(0, 22);
  header.writeUInt32LE(crc32c(data), 24);
  header.writeUInt32LE(tag, 28);
  header.writeUInt32LE(crc32c(header.subarray(8, recordHeaderBytes)), 4);
}

function checkRecord(rec: Buffer, index: number, tag: number, blockBytes: number): { block: number; groupStart: number } | undefined {
  if (rec.length !== recordHeaderBytes + blockBytes || rec.readUInt32LE(0) !== recordMagic) return undefined;
  if (rec.readUInt32LE(4) !== crc32c(rec.subarray(8, recordHeaderBytes))) return undefined;
  if (rec.readUInt32LE(8) !== index || rec.readUInt32LE(28) !== tag) return undefined;
  if (rec.readUInt32LE(24) !== crc32c(rec.subarray(recordHeaderBytes))) return undefined;
  return { block: rec.readUIntLE(16, 6), groupStart: rec.readUInt32LE(12) };
}

function isZero(buf: Buffer): boolean {
  for (let i = 0; i < buf.length; i += 4096) {
    const piece = buf.subarray(i, Math.min(buf.length, i + 4096));
    if (!piece.equals(zeroPage.subarray(0, piece.length))) return false;
  }
  return true;
}

const zeroPage = Buffer.alloc(4096);

async function readFully(fh: FileHandle, buf: Buffer, length: number, position: number): Promise<void> {
  let done = 0;
  while (done < length) {
    const { bytesRead } = await fh.read(buf, done, length - done, position + done);
    if (bytesRead === 0) {
      buf.fill(0, done, length);
      return;
    }
    done += bytesRead;
  }
}
