import { open, type FileHandle } from 'node:fs/promises';
import { crc32c } from '../lib/checksum.js';
import { FerryError, assert } from '../lib/errors.js';

/**
 * The activity log (DRBD's proven answer to SPEC §4 rule 1): the set of "hot" extents
 * of a volume that may hold writes not yet recorded in the persisted dirty bitmap.
 * An extent becomes hot durably before any write to it can reach the disk; after a
 * crash every block of every hot extent is treated as dirty (a conservative superset).
 *
 * Durable form: two slots written alternately (STYLE 6), each a whole copy of the set
 * with a sequence number and a CRC32C; the intact slot with the higher sequence wins.
 *   slot: u32 magic "ACTL", u32 count, u64 sequence, u32 extents[count], u32 crc32c
 */
const slotMagic = 0x4c544341;
export const activityExtentsMaxDefault = 1024;

export interface ActivityLogStore {
  /** Writes both slots' bytes; `slot` is 0 or 1. Durable when the promise resolves. */
  writeSlot(slot: number, bytes: Buffer): Promise<void>;
  readSlots(): Promise<[Buffer | undefined, Buffer | undefined]>;
  close(): Promise<void>;
}

export class FileActivityLogStore implements ActivityLogStore {
  private constructor(
    private readonly fh: FileHandle,
    private readonly slotBytes: number,
  ) {}

  static async open(path: string, extentsMax: number): Promise<FileActivityLogStore> {
    const fh = await open(path, 'a+').then(async (h) => {
      await h.close();
      return open(path, 'r+');
    });
    return new FileActivityLogStore(fh, slotBytesFor(extentsMax));
  }

  async writeSlot(slot: number, bytes: Buffer): Promise<void> {
    assert(bytes.length <= this.slotBytes, 'activity log slot overflow');
    await this.fh.write(bytes, 0, bytes.length, slot * this.slotBytes);
    await this.fh.datasync();
  }

  async readSlots(): Promise<[Buffer | undefined, Buffer | undefined]> {
    const read = async (slot: number): Promise<Buffer | undefined> => {
      const buf = Buffer.alloc(this.slotBytes);
      const { bytesRead } = await this.fh.read(buf, 0, this.slotBytes, slot * this.slotBytes);
      return bytesRead > 0 ? buf.subarray(0, bytesRead) : undefined;
    };
    return [await read(0), await read(1)];
  }

  async close(): Promise<void> {
    await this.fh.close().catch(() => undefined);
  }
}

function slotBytesFor(extentsMax: number): number {
  return Math.ceil((20 + 4 * extentsMax) / 4096) * 4096;
}

function encodeSlot(sequence: number, extents: number[]): Buffer {
  const buf = Buffer.alloc(20 + 4 * extents.length);
  buf.writeUInt32LE(slotMagic, 0);
  buf.writeUInt32LE(extents.length, 4);
  buf.writeBigUInt64LE(BigInt(sequence), 8);
  extents.forEach((e, i) => buf.writeUInt32LE(e, 16 + 4 * i));
  buf.writeUInt32LE(crc32c(buf.subarray(0, 16 + 4 * extents.length)), 16 + 4 * extents.length);
  return buf;
}

function decodeSlot(buf: Buffer | undefined): { sequence: number; extents: number[] } | undefined {
  if (!buf || buf.length < 20 || buf.readUInt32LE(0) !== slotMagic) return undefined;
  const count = buf.readUInt32LE(4);
  if (20 + 4 * count > buf.length) return undefined;
  if (buf.readUInt32LE(16 + 4 * count) !== crc32c(buf.subarray(0, 16 + 4 * count))) return undefined;
  const extents: number[] = [];
  for (let i = 0; i < count; i++) extents.push(buf.readUInt32LE(16 + 4 * i));
  return { sequence: Number(buf.readBigUInt64LE(8)), extents };
}

/**
 * In-memory hot set plus its durable copy. `ensureHot` resolves only once every extent
 * asked for is in a durable slot. Extents are removed only through `cool` (the owner
 * has made their dirty bits durable elsewhere first) — removal is written together
 * with later additions, never ahead of the owner's own persistence.
 */
export class ActivityLog {
  private readonly hot = new Map<number, number>(); // extent -> version that added it
  private version = 0;
  private durableVersion = 0;
  private sequence = 0;
  private writing: Promise<void> | undefined;
  writes = 0;

  private constructor(
    private readonly store: ActivityLogStore,
    readonly extentsMax: number,
  ) {}

  /**
   * Loads the durable hot set (what was hot at the crash, if there was one). `damaged`:
   * something was written but neither slot is intact, so what was hot is not known and
   * the owner must treat every extent as hot. (One torn slot is normal: the write that
   * tore had not been let through yet, and the other slot holds the set before it.)
   */
  static async open(store: ActivityLogStore, extentsMax = activityExtentsMaxDefault): Promise<{ log: ActivityLog; recovered: number[]; damaged: boolean }> {
    const raw = await store.readSlots();
    const [a, b] = raw.map(decodeSlot);
    const best = a && b ? (a.sequence >= b.sequence ? a : b) : (a ?? b);
    const log = new ActivityLog(store, extentsMax);
    log.sequence = best?.sequence ?? 0;
    const recovered = best?.extents ?? [];
    for (const e of recovered) log.hot.set(e, 0);
    const damaged = best === undefined && raw.some((slot) => slot !== undefined && slot.some((byte) => byte !== 0));
    return { log, recovered, damaged };
  }

  get hotExtents(): number[] {
    return [...this.hot.keys()].sort((x, y) => x - y);
  }

  get size(): number {
    return this.hot.size;
  }

  isHot(extent: number): boolean {
    return this.hot.has(extent);
  }

  /** Makes the extents hot, durably. Fails with UNAVAILABLE if the set is full (the owner cools first). */
  async ensureHot(extents: Iterable<number>): Promise<void> {
    let need = 0;
    for (const e of extents) {
      const v = this.hot.get(e);
      if (v === undefined) {
        if (this.hot.size >= this.extentsMax) throw new FerryError('UNAVAILABLE', 'activity log is full');
        this.version++;
        this.hot.set(e, this.version);
        need = Math.max(need, this.version);
      } else {
        need = Math.max(need, v);
      }
    }
    while (this.durableVersion < need) await this.flush();
  }

  /** Removes extents whose dirty state is durable elsewhere; written with the next flush. */
  cool(extents: Iterable<number>): void {
    let removed = false;
    for (const e of extents) removed = this.hot.delete(e) || removed;
    if (removed) this.version++;
  }

  /** Writes the current set if it changed since the last durable write. */
  async flush(): Promise<void> {
    if (this.writing) {
      await this.writing;
      if (this.durableVersion < this.version) await this.flush();
      return;
    }
    if (this.durableVersion >= this.version) return;
    const target = this.version;
    this.writing = (async () => {
      this.sequence++;
      await this.store.writeSlot(this.sequence % 2, encodeSlot(this.sequence, this.hotExtents));
      this.writes++;
      this.durableVersion = target;
    })();
    try {
      await this.writing;
    } finally {
      this.writing = undefined;
    }
  }

  async close(): Promise<void> {
    await this.flush();
    await this.store.close();
  }
}
