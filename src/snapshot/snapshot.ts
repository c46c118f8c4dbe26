import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { crc32c } from '../lib/checksum.js';
import { writeFileAtomic, unlinkIfExists } from '../lib/durable.js';
import { FerryError, assert, isFerryError } from '../lib/errors.js';
import { PagedBitmap } from '../lib/paged-bitmap.js';
import { BitmapFile } from '../storage/bitmap-file.js';
import type { SnapshotRecord } from '../storage/catalog.js';
import { decodeBlockMap, encodeBlockMap, type BitsView } from './maps.js';
import { SaveVolume, type SaveEntry } from './save-volume.js';

/** Records appended since the last block-map checkpoint that trigger a new one. */
export const checkpointRecordsMax = 16384;

export interface SnapshotFiles {
  /** Meta bit map as it was when the snapshot was taken (E FIG. 42): a BitmapFile. */
  valid: string;
  /** Block map checkpoint (E FIG. 44). */
  map: string;
  /** Save volume of before-images (E FIG. 24). */
  save: string;
}

export function snapshotFiles(dir: string, id: string): SnapshotFiles {
  return { valid: join(dir, `${id}.valid`), map: join(dir, `${id}.map`), save: join(dir, `${id}.save`) };
}

/** The maps of a loaded snapshot. The bit map (FIG. 43) and block map (FIG. 44) hold the same set. */
export interface SnapshotMaps {
  valid: PagedBitmap;
  saved: PagedBitmap;
  blockMap: Map<number, number>;
  save: SaveVolume;
}

/** Called for each before-image that becomes durable in this snapshot (the manager's holder index). */
export type SavedListener = (snapshot: SnapshotState, block: number) => void;

/**
 * One snapshot of a volume: its catalog record, its files, and — once loaded — its
 * maps. The newest snapshot of each volume is always loaded (the write path needs
 * it); older ones load on first use (E FIG. 42: "staged from storage when needed").
 */
export class SnapshotState {
  maps: SnapshotMaps | undefined;
  failure: FerryError | undefined;
  deleted = false;
  /** When a read of this snapshot last needed its maps (ms, the manager's clock). */
  lastReadAtMs = 0;
  private keptValid: PagedBitmap | undefined;
  private loading: Promise<SnapshotMaps> | undefined;
  private checkpointedRecords = 0;
  private checkpointChain: Promise<void> = Promise.resolve();

  constructor(
    public record: SnapshotRecord,
    readonly files: SnapshotFiles,
    private readonly onSaved: SavedListener,
  ) {}

  get seq(): number {
    return this.record.seq;
  }

  get name(): string {
    return this.record.name;
  }

  get blockCount(): number {
    return this.record.sizeBytes / this.record.blockBytes;
  }

  get tag(): number {
    return crc32c(this.record.id);
  }

  /**
   * Writes the files of a new snapshot: the meta bit map copied from the volume's
   * allocation map, an empty save volume and an empty block map. All durable before
   * the caller commits the catalog row; until then they are orphans a restart removes.
   */
  static async createFiles(files: SnapshotFiles, record: SnapshotRecord, allocation: BitsView, onSaved: SavedListener): Promise<SnapshotState> {
    const blockCount = record.sizeBytes / record.blockBytes;
    const writeValid = async (): Promise<PagedBitmap> => {
      const validFile = await BitmapFile.create(files.valid, blockCount);
      try {
        for (const [start, length] of allocation.runs(0, blockCount)) validFile.bitmap.setRange(start, length);
        await validFile.sync();
        return validFile.bitmap;
      } finally {
        await validFile.close();
      }
    };
    // The three files are independent until the catalog row names them: write them at once.
    const [valid, save, map] = await Promise.allSettled([
      writeValid(),
      SaveVolume.create(files.save, record.id, record.blockBytes),
      writeFileAtomic(files.map, encodeBlockMap(crc32c(record.id), new Map(), 0)),
    ]);
    if (valid.status === 'rejected' || save.status === 'rejected' || map.status === 'rejected') {
      // None is left behind (a full disk refuses one of them, say): the create changed nothing.
      if (save.status === 'fulfilled') await save.value.close();
      await unlinkSnapshotFiles(files);
      throw ([valid, save, map].find((r) => r.status === 'rejected') as PromiseRejectedResult).reason;
    }
    const state = new SnapshotState(record, files, onSaved);
    state.install({ valid: valid.value, saved: new PagedBitmap(blockCount), blockMap: new Map(), save: save.value }, 0);
    return state;
  }

  /** Loads the maps (once); a damaged file makes the snapshot refused with SNAPSHOT_CORRUPT. */
  load(): Promise<SnapshotMaps> {
    if (this.deleted) return Promise.reject(new FerryError('SNAPSHOT_NOT_FOUND', `snapshot ${this.record.volume}@${this.name} was deleted`));
    if (this.failure) return Promise.reject(this.failure);
    if (this.maps) return Promise.resolve(this.maps);
    this.loading ??= this.loadFiles().then(
      ({ maps, trusted }) => {
        this.install(maps, trusted);
        return maps;
      },
      (err: unknown) => {
        this.failure = isFerryError(err, 'SNAPSHOT_CORRUPT') || isFerryError(err, 'UNSUPPORTED_FORMAT')
          ? err
          : new FerryError('SNAPSHOT_CORRUPT', `snapshot ${this.record.volume}@${this.name} cannot be loaded: ${(err as Error).message}`);
        this.loading = undefined;
        throw this.failure;
      },
    );
    return this.loading;
  }

  /** The maps, which must be loaded. */
  get loaded(): SnapshotMaps {
    if (this.failure) throw this.failure;
    assert(this.maps, `snapshot ${this.name} used before it was loaded`);
    return this.maps;
  }

  /** Appends before-images; they are in the maps when this resolves. */
  async addBeforeImages(entries: SaveEntry[]): Promise<void> {
    const maps = this.loaded;
    await maps.save.append(entries);
    if (maps.save.recordCount - this.checkpointedRecords >= checkpointRecordsMax) await this.checkpoint();
  }

  /** Writes the block map checkpoint if records were added since the last one. */
  checkpoint(): Promise<void> {
    const run = async (): Promise<void> => {
      const maps = this.maps;
      if (!maps || this.deleted) return;
      const count = maps.save.recordCount;
      if (count === this.checkpointedRecords) return;
      // Taken synchronously: the save volume adds records to the map in the same tick
      // as it counts them, so the map and the count agree here.
      const buf = encodeBlockMap(this.tag, maps.blockMap, count);
      await writeFileAtomic(this.files.map, buf);
      this.checkpointedRecords = Math.max(this.checkpointedRecords, count);
    };
    const next = this.checkpointChain.then(run, run);
    this.checkpointChain = next.catch(() => undefined);
    return next;
  }

  async close(checkpoint = true): Promise<void> {
    if (this.maps) {
      if (checkpoint && !this.failure) await this.checkpoint();
      await this.maps.save.close();
    }
  }

  /**
   * Drops the maps from memory (E FIG. 42: deallocated, staged again when needed).
   * The caller makes sure nothing uses them; the next `load` reads them back.
   */
  async unload(): Promise<void> {
    const maps = this.maps;
    if (!maps) return;
    await this.close();
    // The meta bit map stays: it costs what the volume's allocation map costs, and
    // block status of an exported snapshot is answered from it without I/O.
    this.keptValid = maps.valid;
    this.maps = undefined;
    this.loading = undefined;
  }

  /** The meta bit map, if it is in memory (loaded, or kept after an unload). */
  get validBits(): PagedBitmap | undefined {
    return this.maps?.valid ?? this.keptValid;
  }

  async removeFiles(): Promise<void> {
    this.deleted = true;
    if (this.maps) await this.maps.save.close();
    this.maps = undefined;
    await unlinkSnapshotFiles(this.files);
  }

  private install(maps: SnapshotMaps, checkpointed: number): void {
    this.maps = maps;
    this.checkpointedRecords = checkpointed;
    maps.save.onCommit = (index, block) => this.commit(maps, index, block);
    for (const block of maps.blockMap.keys()) this.onSaved(this, block);
  }

  private commit(maps: SnapshotMaps, index: number, block: number): void {
    assert(!maps.blockMap.has(block), `snapshot ${this.name} saved block ${block} twice`);
    maps.blockMap.set(block, index);
    maps.saved.set(block);
    this.onSaved(this, block);
  }

  private async loadFiles(): Promise<{ maps: SnapshotMaps; trusted: number }> {
    const what = `snapshot ${this.record.volume}@${this.name}`;
    const blockCount = this.blockCount;
    const { file: validFile } = await BitmapFile.open(this.files.valid, 'throw').catch((err: unknown) => {
      throw new FerryError('SNAPSHOT_CORRUPT', `${what}: meta bit map: ${(err as Error).message}`);
    });
    const valid = validFile.bitmap;
    await validFile.close();
    if (valid.bitCount !== blockCount) throw new FerryError('SNAPSHOT_CORRUPT', `${what}: meta bit map covers ${valid.bitCount} blocks, expected ${blockCount}`);
    const saved = new PagedBitmap(blockCount);
    const blockMap = new Map<number, number>();
    const onRecord = (index: number, block: number): void => {
      if (block >= blockCount || blockMap.has(block)) throw new FerryError('SNAPSHOT_CORRUPT', `${what}: save-volume record ${index} names block ${block} twice or out of range`);
      blockMap.set(block, index);
      saved.set(block);
    };
    let mapBytes: Buffer;
    try {
      mapBytes = await readFile(this.files.map);
    } catch (err) {
      throw new FerryError('SNAPSHOT_CORRUPT', `${what}: block map unreadable: ${(err as Error).message}`);
    }
    const trusted = decodeBlockMap(mapBytes, this.tag, blockCount, `${what} block map`, onRecord);
    const save = await SaveVolume.open(this.files.save, this.record.id, this.record.blockBytes, trusted, onRecord);
    return { maps: { valid, saved, blockMap, save }, trusted };
  }
}

/** Removes a snapshot's files, those a crash may have left half-written included. */
async function unlinkSnapshotFiles(files: SnapshotFiles): Promise<void> {
  for (const path of [files.save, files.map, files.valid, `${files.map}.tmp`]) await unlinkIfExists(path);
}
