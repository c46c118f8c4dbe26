import { open, rm, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { fsyncDir } from '../lib/durable.js';
import { crc32c } from '../lib/checksum.js';
import { FerryError, assert } from '../lib/errors.js';
import { PagedBitmap, bitmapPageBytes } from '../lib/paged-bitmap.js';

/**
 * A PagedBitmap persisted in a file: a checksummed header, then one slot per page at
 * a fixed offset, each slot with its own magic, page index and CRC32C. Pages never
 * written stay holes in a sparse file, so the file costs what the bitmap costs.
 *
 *   header (4096 bytes): magic "FRYBMAP1", u32 version, u32 slotBytes, u64 bitCount, u32 crc32c(bytes 0..23)
 *   slot i at 4096 + i * 4112: u32 slotMagic, u32 page index, u32 crc32c(page), u32 0, page[4096]
 */
const fileMagic = Buffer.from('FRYBMAP1', 'ascii');
const formatVersion = 1;
const headerBytes = 4096;
const slotHeaderBytes = 16;
const slotBytes = slotHeaderBytes + bitmapPageBytes;
const slotMagic = 0x47504d42; // "BMPG"
const slotsPerRead = 256;

export type CorruptPagePolicy = 'throw' | 'fill';

export interface BitmapLoadReport {
  corruptPages: number[];
  /** The header was damaged and the map rebuilt with every bit set ('fill' with a known size). */
  headerRebuilt?: boolean;
}

/** Whether loading met any damage (then filled in); for the caller's log line. */
export function wasDamaged(report: BitmapLoadReport): boolean {
  return report.headerRebuilt === true || report.corruptPages.length > 0;
}

export class BitmapFile {
  private writeChain: Promise<void> = Promise.resolve();

  private constructor(
    readonly path: string,
    private readonly fh: FileHandle,
    readonly bitmap: PagedBitmap,
  ) {}

  static async create(path: string, bitCount: number): Promise<BitmapFile> {
    const fh = await open(path, 'wx+', 0o644);
    try {
      await fh.write(encodeHeader(bitCount), 0, headerBytes, 0);
      await fh.datasync();
    } catch (err) {
      await fh.close();
      throw err;
    }
    return new BitmapFile(path, fh, new PagedBitmap(bitCount));
  }

  /**
   * Opens and loads every page. A slot whose checksum fails is handled by `policy`:
   * 'throw' refuses the file; 'fill' sets every bit of that page (a conservative
   * superset, right for maps where a false "set" costs work but never data) and
   * reports it so the caller can log it.
   */
  static async open(path: string, policy: CorruptPagePolicy, expectedBitCount?: number): Promise<{ file: BitmapFile; report: BitmapLoadReport }> {
    const fh = await open(path, 'r+');
    try {
      const header = Buffer.alloc(headerBytes);
      const { bytesRead } = await fh.read(header, 0, headerBytes, 0);
      let bitCount: number;
      try {
        bitCount = decodeHeader(header.subarray(0, bytesRead), path);
      } catch (err) {
        // A damaged header loses where the pages are: with 'fill' and a known size the
        // map is rebuilt with every bit set, the conservative superset.
        if (policy !== 'fill' || expectedBitCount === undefined || (err as FerryError).code !== 'CORRUPT_FILE') throw err;
        return { file: await BitmapFile.rebuildFull(path, fh, expectedBitCount), report: { corruptPages: [], headerRebuilt: true } };
      }
      const bitmap = new PagedBitmap(bitCount);
      const corruptPages: number[] = [];
      const pageCount = bitmap.pageCount;
      const buf = Buffer.alloc(slotBytes * slotsPerRead);
      for (let first = 0; first < pageCount; first += slotsPerRead) {
        const n = Math.min(slotsPerRead, pageCount - first);
        const { bytesRead: got } = await fh.read(buf, 0, n * slotBytes, headerBytes + first * slotBytes);
        for (let i = 0; i < n; i++) {
          const index = first + i;
          const slot = buf.subarray(i * slotBytes, Math.min((i + 1) * slotBytes, got));
          if (slot.length < slotBytes || slot.readUInt32LE(0) === 0) {
            if (slot.length > 0 && !slot.every((b) => b === 0)) corruptPages.push(index);
            continue; // never written: all zero
          }
          const page = slot.subarray(slotHeaderBytes);
          if (slot.readUInt32LE(0) !== slotMagic || slot.readUInt32LE(4) !== index || slot.readUInt32LE(8) !== crc32c(page)) {
            corruptPages.push(index);
            continue;
          }
          bitmap.loadPage(index, page);
        }
      }
      if (corruptPages.length > 0 && policy === 'throw') {
        throw new FerryError('CORRUPT_FILE', `bitmap ${path} has ${corruptPages.length} damaged page(s), first ${corruptPages[0]}`);
      }
      const file = new BitmapFile(path, fh, bitmap);
      for (const index of corruptPages) {
        const start = index * bitmapPageBytes * 8;
        bitmap.setRange(start, Math.min(bitmapPageBytes * 8, bitCount - start));
      }
      if (corruptPages.length > 0) await file.writeDirty();
      return { file, report: { corruptPages } };
    } catch (err) {
      await fh.close();
      throw err;
    }
  }

  private static async rebuildFull(path: string, fh: FileHandle, bitCount: number): Promise<BitmapFile> {
    await fh.truncate(0);
    await fh.write(encodeHeader(bitCount), 0, headerBytes, 0);
    const bitmap = new PagedBitmap(bitCount);
    bitmap.setRange(0, bitCount);
    const file = new BitmapFile(path, fh, bitmap);
    await file.writeDirty();
    await fh.datasync();
    return file;
  }

  /** Writes every page changed since the last call (not yet fsynced). Calls are serialised. */
  writeDirty(): Promise<void> {
    const run = async (): Promise<void> => {
      const dirty = this.bitmap.takeDirtyPages();
      try {
        // Consecutive slots go out in one pwrite (a fresh map of a large volume has hundreds).
        for (let i = 0; i < dirty.length; ) {
          let n = 1;
          while (i + n < dirty.length && n < slotsPerRead && dirty[i + n] === (dirty[i] as number) + n) n++;
          await this.writeSlots(dirty[i] as number, n);
          i += n;
        }
      } catch (err) {
        for (const index of dirty) this.bitmap.markDirty(index);
        throw err;
      }
    };
    const next = this.writeChain.then(run, run);
    this.writeChain = next.catch(() => undefined);
    return next;
  }

  async sync(): Promise<void> {
    await this.writeDirty();
    await this.fh.datasync();
  }

  async resize(bitCount: number): Promise<void> {
    this.bitmap.resize(bitCount);
    await this.writeDirty();
    await this.fh.write(encodeHeader(bitCount), 0, headerBytes, 0);
    await this.fh.truncate(headerBytes + this.bitmap.pageCount * slotBytes);
    await this.fh.datasync();
  }

  async close(): Promise<void> {
    await this.writeChain;
    await this.fh.close();
  }

  private async writeSlots(first: number, count: number): Promise<void> {
    const buf = Buffer.alloc(count * slotBytes);
    for (let k = 0; k < count; k++) {
      const index = first + k;
      const slot = buf.subarray(k * slotBytes, (k + 1) * slotBytes);
      const page = this.bitmap.page(index) ?? new Uint8Array(bitmapPageBytes);
      slot.writeUInt32LE(slotMagic, 0);
      slot.writeUInt32LE(index, 4);
      Buffer.from(page.buffer, page.byteOffset, page.byteLength).copy(slot, slotHeaderBytes);
      slot.writeUInt32LE(crc32c(slot.subarray(slotHeaderBytes)), 8);
    }
    let done = 0;
    while (done < buf.length) {
      const { bytesWritten } = await this.fh.write(buf, done, buf.length - done, headerBytes + first * slotBytes + done);
      done += bytesWritten;
    }
  }
}

function encodeHeader(bitCount: number): Buffer {
  assert(Number.isSafeInteger(bitCount) && bitCount >= 0, `bitmap size ${bitCount}`);
  const header = Buffer.alloc(headerBytes);
  fileMagic.copy(header, 0);
  header.writeUInt32LE(formatVersion, 8);
  header.writeUInt32LE(slotBytes, 12);
  header.writeBigUInt64LE(BigInt(bitCount), 16);
  header.writeUInt32LE(crc32c(header.subarray(0, 24)), 24);
  return header;
}

function decodeHeader(header: Buffer, path: string): number {
  if (header.length < 28 || !header.subarray(0, 8).equals(fileMagic)) {
    throw new FerryError('CORRUPT_FILE', `${path} is not a ferry bitmap file`);
  }
  if (header.readUInt32LE(24) !== crc32c(header.subarray(0, 24))) {
    throw new FerryError('CORRUPT_FILE', `${path}: bitmap header failed its checksum`);
  }
  const version = header.readUInt32LE(8);
  if (version !== formatVersion || header.readUInt32LE(12) !== slotBytes) {
    throw new FerryError('UNSUPPORTED_FORMAT', `${path}: bitmap format version ${version} is not supported`);
  }
  return Number(header.readBigUInt64LE(16));
}

/** Writes `bits` as a new bitmap file at `path` (replacing any), durably, name included. */
export async function writeBitmapFile(path: string, bits: PagedBitmap): Promise<void> {
  await rm(path, { force: true });
  const file = await BitmapFile.create(path, bits.bitCount);
  try {
    file.bitmap.or(bits);
    await file.sync();
  } finally {
    await file.close();
  }
  await fsyncDir(dirname(path));
}

/**
 * Reads a bitmap where a set bit means "to be done" (a copy's plan, an undo list):
 * damage sets the bits it covers, a conservative superset (more work, nothing missed),
 * and the report says so.
 */
export async function readWorkBitmap(path: string, bitCount: number): Promise<{ bits: PagedBitmap; report: BitmapLoadReport }> {
  const { file, report } = await BitmapFile.open(path, 'fill', bitCount);
  try {
    return { bits: file.bitmap.clone(), report };
  } finally {
    await file.close();
  }
}
