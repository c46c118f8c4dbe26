import { open, type FileHandle } from 'node:fs/promises';
import type { BufferPool } from '../lib/buffer-pool.js';
import { byteLength, writeAllv } from '../lib/byte-parts.js';
import { crc32c, crc32cParts } from '../lib/checksum.js';
import { FerryError, assert } from '../lib/errors.js';

/**
 * A save volume (E FIG. 4-5): a wrap-around journal file holding delta-set chunks.
 * Positions are logical byte numbers that only grow (`lsn`); the physical offset is
 * `lsn % capacity`. A record never straddles the end of the file: when it would, the
 * writer skips to the next lap. What is live (and so where the tail is) is decided
 * by the owner's mailbox, not by the journal, so the journal keeps no header state
 * that could disagree with it.
 *
 * Record: u32 magic "JREC", u16 type, u16 flags, u64 generation, u64 delta set,
 * u32 index, u32 payload bytes, u32 CRC32C(payload), u32 CRC32C(bytes 0..35),
 * payload, padding to `recordAlignBytes`.
 */
export const journalRecordMagic = 0x4a524543;
export const journalRecordHeaderBytes = 40;
export const recordAlignBytes = 512;

export enum JournalRecordType {
  Chunk = 1,
}

export interface JournalRecordHeader {
  type: JournalRecordType;
  flags: number;
  generation: number;
  deltaSet: number;
  index: number;
}

/** Where a record is: its header, its position and the position just past it. */
export interface JournalRecordPlace extends JournalRecordHeader {
  lsn: number;
  /** Logical position just past this record (its padding included). */
  nextLsn: number;
}

export interface JournalRecord extends JournalRecordPlace {
  payload: Buffer;
  /** The payload's CRC32C, checked when it was read. */
  crc: number;
  /** Present when the payload was read into a pooled buffer: gives it back (once; the payload must not be used after). */
  release?: () => void;
}

export function recordSpanBytes(payloadBytes: number): number {
  return Math.ceil((journalRecordHeaderBytes + payloadBytes) / recordAlignBytes) * recordAlignBytes;
}

/**
 * Pure space accounting of the ring: live bytes are [tail, head). `allocate` returns the
 * logical position for a record, or undefined when the ring is full (flow control,
 * SPEC §4 rule 8: the owner must wait or fall back, never overwrite live data).
 */
export class RingSpace {
  constructor(
    readonly capacityBytes: number,
    public head = 0,
    public tail = 0,
  ) {
    assert(capacityBytes > 0 && capacityBytes % recordAlignBytes === 0, `ring capacity ${capacityBytes} must be a positive multiple of ${recordAlignBytes}`);
    assert(tail <= head && head - tail <= capacityBytes, `ring positions tail ${tail} head ${head} inconsistent`);
  }

  get usedBytes(): number {
    return this.head - this.tail;
  }

  get freeBytes(): number {
    return this.capacityBytes - this.usedBytes;
  }

  /** Where a record of `spanBytes` would go, without taking it. */
  peek(spanBytes: number): number | undefined {
    if (spanBytes > this.capacityBytes) return undefined;
    let at = this.head;
    const offset = at % this.capacityBytes;
    if (offset + spanBytes > this.capacityBytes) at += this.capacityBytes - offset;
    // With nothing live, the skipped end of the lap holds nothing either: the tail moves with it.
    const tail = this.usedBytes === 0 ? at : this.tail;
    return at + spanBytes - tail <= this.capacityBytes ? at : undefined;
  }

  allocate(spanBytes: number): number | undefined {
    const at = this.peek(spanBytes);
    if (at !== undefined) {
      if (this.usedBytes === 0) this.tail = at;
      this.head = at + spanBytes;
    }
    return at;
  }

  /** Frees everything before `lsn` (the start of the oldest record still needed). */
  release(lsn: number): void {
    assert(lsn >= this.tail && lsn <= this.head, `ring release to ${lsn} outside [${this.tail}, ${this.head}]`);
    this.tail = lsn;
  }

  /**
   * Gives back the space of the last allocation (at `at`, `spanBytes` long, made when
   * the head was `previousHead`): its record was never written. Readers walk records
   * one after another, so a hole left in the middle would end the walk there.
   */
  giveBack(at: number, spanBytes: number, previousHead: number): void {
    assert(this.head === at + spanBytes, `ring give-back of ${at}+${spanBytes}: it is not the last allocation (head ${this.head})`);
    this.head = Math.max(previousHead, this.tail);
  }

  /** Gives back every allocation made since the head was `previousHead` (records abandoned together). */
  rollBack(previousHead: number): void {
    assert(previousHead <= this.head, `ring roll-back to ${previousHead} past the head ${this.head}`);
    this.head = Math.max(previousHead, this.tail);
  }
}

export class JournalFile {
  private constructor(
    readonly path: string,
    private readonly fh: FileHandle,
    readonly capacityBytes: number,
  ) {}

  static async open(path: string, capacityBytes: number): Promise<JournalFile> {
    const fh = await open(path, 'a+').then(async (h) => {
      await h.close();
      return open(path, 'r+');
    });
    const stat = await fh.stat();
    if (stat.size !== capacityBytes) await fh.truncate(capacityBytes);
    return new JournalFile(path, fh, capacityBytes);
  }

  encode(header: JournalRecordHeader, payload: Uint8Array): Buffer {
    return Buffer.concat(this.encodeParts(header, [payload]));
  }

  /**
   * A record whose payload is `parts` in order, as the parts to write: the record
   * header, the parts themselves (not copied) and the padding to the record's span.
   */
  encodeParts(header: JournalRecordHeader, parts: readonly Uint8Array[], payloadCrc?: number): Buffer[] {
    const length = byteLength(parts);
    // Given when the caller already holds the parts' checksum (it is not computed again).
    const crc = payloadCrc ?? crc32cParts(parts);
    const head = Buffer.alloc(journalRecordHeaderBytes);
    head.writeUInt32LE(journalRecordMagic, 0);
    head.writeUInt16LE(header.type, 4);
    head.writeUInt16LE(header.flags, 6);
    head.writeBigUInt64LE(BigInt(header.generation), 8);
    head.writeBigUInt64LE(BigInt(header.deltaSet), 16);
    head.writeUInt32LE(header.index, 24);
    head.writeUInt32LE(length, 28);
    head.writeUInt32LE(crc, 32);
    head.writeUInt32LE(crc32c(head.subarray(0, 36)), 36);
    const padding = recordSpanBytes(length) - journalRecordHeaderBytes - length;
    return [head, ...parts.map((p) => (Buffer.isBuffer(p) ? p : Buffer.from(p.buffer, p.byteOffset, p.length))), ...(padding > 0 ? [Buffer.alloc(padding)] : [])];
  }

  /** Writes an encoded record (whole, or as its parts) at a position the ring allocated. Not durable until `sync`. */
  async write(lsn: number, encoded: Buffer | readonly Buffer[]): Promise<void> {
    const offset = lsn % this.capacityBytes;
    const parts = (Buffer.isBuffer(encoded) ? [encoded] : encoded).filter((b) => b.length > 0);
    assert(offset + byteLength(parts) <= this.capacityBytes, `journal record at ${lsn} straddles the end`);
    await writeAllv(this.fh, parts, offset);
  }

  async sync(): Promise<void> {
    await this.fh.datasync();
  }

  /**
   * The header of the record at `lsn` (checked, its payload neither read nor checked:
   * a walk that only needs where the records are), or undefined if there is no intact
   * header there.
   */
  async readHeader(lsn: number): Promise<JournalRecordPlace | undefined> {
    const head = await this.readHead(lsn);
    return head.ok ? head.place : undefined;
  }

  /**
   * The header of the record `expect` names, at `lsn` or, when the writer skipped to the
   * next lap there, at the start of the next lap; undefined if it is at neither.
   */
  async findHeader(lsn: number, limitLsn: number, expect: Partial<JournalRecordHeader>): Promise<JournalRecordPlace | undefined> {
    for (const at of this.placesOfNext(lsn, limitLsn)) {
      const header = await this.readHeader(at);
      if (header && Object.entries(expect).every(([key, value]) => header[key as keyof JournalRecordHeader] === value)) return header;
    }
    return undefined;
  }

  /**
   * Reads the record at `lsn`; throws CORRUPT_RECORD if it is not an intact record
   * (what a torn or overwritten record looks like). `expect` checks its identity.
   */
  async read(lsn: number, expect?: Partial<JournalRecordHeader>, pool?: BufferPool): Promise<JournalRecord> {
    const bad = (why: string): FerryError => new FerryError('CORRUPT_RECORD', `save volume ${this.path}: record at ${lsn} ${why}`);
    const head = await this.readHead(lsn);
    if (!head.ok) throw bad(head.why);
    const { place, payloadBytes, crc } = head;
    const pooled = pool !== undefined && payloadBytes <= pool.bufferBytes ? pool.take() : undefined;
    const payload = pooled ? pooled.subarray(0, payloadBytes) : Buffer.allocUnsafe(payloadBytes);
    const release = pool && pooled ? pool.releaser(pooled) : undefined;
    const got = (await this.fh.read(payload, 0, payloadBytes, (lsn % this.capacityBytes) + journalRecordHeaderBytes)).bytesRead;
    if (got < payloadBytes || crc32c(payload) !== crc) {
      release?.();
      throw bad('failed its data checksum');
    }
    const record: JournalRecord = { ...place, payload, crc, ...(release ? { release } : {}) };
    if (expect) {
      for (const [key, value] of Object.entries(expect)) {
        if (record[key as keyof JournalRecordHeader] === value) continue;
        release?.();
        throw bad(`is not the expected record (${key} ${String(record[key as keyof JournalRecordHeader])} != ${String(value)})`);
      }
    }
    return record;
  }

  /**
   * Reads the record at `lsn` or, when the writer skipped to the next lap there, at the
   * start of the next lap. Returns undefined at the end of what was written. With
   * `expect`, a record there that is intact but not the one expected (an older lap's,
   * left where the writer skipped) counts as no record.
   */
  async readNext(lsn: number, limitLsn: number, pool?: BufferPool, expect?: Partial<JournalRecordHeader>): Promise<JournalRecord | undefined> {
    for (const at of this.placesOfNext(lsn, limitLsn)) {
      try {
        return await this.read(at, expect, pool);
      } catch {
        // Not there: perhaps the writer skipped to the next lap.
      }
    }
    return undefined;
  }

  /** Reads `length` bytes of the payload of the record at `lsn`, from `payloadOffset` (already verified). */
  async readPayloadRange(lsn: number, payloadOffset: number, buf: Uint8Array, bufOffset: number, length: number): Promise<void> {
    const at = (lsn % this.capacityBytes) + journalRecordHeaderBytes + payloadOffset;
    const { bytesRead } = await this.fh.read(buf, bufOffset, length, at);
    if (bytesRead !== length) throw new FerryError('CORRUPT_RECORD', `save volume ${this.path}: short read at ${lsn}`);
  }

  async close(): Promise<void> {
    await this.fh.close().catch(() => undefined);
  }

  /**
   * Where the record after `lsn` can be, before `limitLsn`: at `lsn`, or at the start of
   * the next lap if the writer skipped the end of this one (not when `lsn` starts a lap).
   */
  private placesOfNext(lsn: number, limitLsn: number): number[] {
    const offset = lsn % this.capacityBytes;
    return (offset === 0 ? [lsn] : [lsn, lsn + this.capacityBytes - offset]).filter((at) => at < limitLsn);
  }

  /** Reads and checks the header at `lsn` (magic, its own checksum, a length inside the file). */
  private async readHead(lsn: number): Promise<{ ok: true; place: JournalRecordPlace; payloadBytes: number; crc: number } | { ok: false; why: string }> {
    const offset = lsn % this.capacityBytes;
    const head = Buffer.alloc(journalRecordHeaderBytes);
    const { bytesRead } = await this.fh.read(head, 0, head.length, offset);
    if (bytesRead < head.length || head.readUInt32LE(0) !== journalRecordMagic) return { ok: false, why: 'is missing' };
    if (head.readUInt32LE(36) !== crc32c(head.subarray(0, 36))) return { ok: false, why: 'has a damaged header' };
    const payloadBytes = head.readUInt32LE(28);
    if (offset + journalRecordHeaderBytes + payloadBytes > this.capacityBytes) return { ok: false, why: 'claims a length past the end' };
    const place: JournalRecordPlace = {
      type: head.readUInt16LE(4),
      flags: head.readUInt16LE(6),
      generation: Number(head.readBigUInt64LE(8)),
      deltaSet: Number(head.readBigUInt64LE(16)),
      index: head.readUInt32LE(24),
      lsn,
      nextLsn: lsn + recordSpanBytes(payloadBytes),
    };
    return { ok: true, place, payloadBytes, crc: head.readUInt32LE(32) };
  }
}
