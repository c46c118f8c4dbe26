import type { PagedBitmap } from '../lib/paged-bitmap.js';
import { mkdir, readdir, unlink } from 'node:fs/promises';
import { statSync } from 'node:fs';
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { BufferPool } from '../lib/buffer-pool.js';
import { crashPoint } from '../lib/crash-point.js';
import { fsyncDir } from '../lib/durable.js';
import { FerryError, assert } from '../lib/errors.js';
import type { Catalog, SnapshotRecord } from '../storage/catalog.js';
import { ioBytesMax, type Change, type Extent, type Volume } from '../storage/volume.js';
import { volumeNamePattern, type VolumeStore } from '../storage/volume-store.js';
import { Gate } from './gate.js';
import { HolderIndex, blocksNeedingBeforeImage, blocksToMoveOnDelete, chunkRuns, deltaCandidates, snapshotsToUnload, type BitsView } from './maps.js';
import type { SaveEntry } from './save-volume.js';
import { SnapshotState, snapshotFiles } from './snapshot.js';

/** Snapshots one volume may hold (the queue of E FIG. 42 is bounded). */
export const snapshotsPerVolumeMax = 1024;
/** Largest piece of an image read, compared or written at once by delta and restore. */
export const extentBytesMax = 1024 * 1024;
/** Before-image batches from this size up are read into reused buffers. */
const beforeImagePooledBytesMin = 256 * 1024;
/** Reused before-image buffers: as large as a copy's piece, a few batches at once. */
const beforeImageBuffers = new BufferPool(4 * 1024 * 1024, 8);
/** Before-images moved per group commit when a snapshot is deleted. */
const moveBatchBlocksMax = 256;
/** Free attributes per snapshot, and their sizes. */
export const attrsCountMax = 64;
export const attrKeyBytesMax = 64;
export const attrValueBytesMax = 1024;
/** Maps of older snapshots not read for this long leave memory. */
export const snapshotIdleUnloadMs = 10 * 60 * 1000;
/** How often idle maps are looked for. */
const unloadCheckIntervalMs = 60 * 1000;
/** The name `diff`/`delta` accept for the volume as it is now. */
export const currentImageName = 'current';

const snapshotFilePattern = /^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.(?:save|map|valid)(?:\.tmp)?$/;
const attrKeyPattern = /^[A-Za-z0-9._:-]{1,64}$/;

export interface SnapshotInfo {
  volume: string;
  name: string;
  id: string;
  seq: number;
  createdAt: string;
  sizeBytes: number;
  blockBytes: number;
  attrs: Record<string, string>;
  /** ok; damaged (may have read through a snapshot deleted with force); corrupt (a file failed its checks). */
  state: 'ok' | 'damaged' | 'corrupt';
  /** Bytes of the save volume file. */
  saveBytes: number;
  /** Before-images held, when the maps are loaded. */
  savedBlocks?: number;
  failure?: { code: string; message: string };
}

/** One extent of a delta: `length` bytes at `offset` of the later image, with its data. */
export interface DeltaExtent {
  offset: number;
  length: number;
  data: Buffer;
}

/** A snapshot as a read-only block device (what the NBD server exports as VOL@SNAP). */
export interface SnapshotImage {
  readonly volume: string;
  readonly snapshot: string;
  readonly sizeBytes: number;
  readonly blockBytes: number;
  readonly readOnly: true;
  read(offset: number, length: number): Promise<Buffer>;
  readInto(buf: Uint8Array, offset: number): Promise<void>;
  /** Extents, each valid in the snapshot (allocated) or a hole reading as zeros. */
  blockStatus(offset: number, length: number): Extent[];
}

export interface RestoreResult {
  blocksWritten: number;
  blocksTrimmed: number;
}

class VolumeSnapshots {
  readonly queue: SnapshotState[] = [];
  readonly bySeq = new Map<number, SnapshotState>();
  readonly holders = new HolderIndex();
  readonly gate = new Gate();
  unhook: (() => void) | undefined;
  /** Every snapshot with seq >= this is loaded: reads check one number, not the queue. */
  loadedFromSeq = Number.POSITIVE_INFINITY;

  constructor(readonly name: string) {}

  newest(): SnapshotState | undefined {
    return this.queue[this.queue.length - 1];
  }
}

export function checkSnapshotName(name: unknown): string {
  if (typeof name !== 'string' || !volumeNamePattern.test(name) || name === '.' || name === '..' || name === currentImageName) {
    throw new FerryError('INVALID_NAME', `invalid snapshot name ${JSON.stringify(name)}: use 1-64 characters of A-Z a-z 0-9 . _ - (not "${currentImageName}")`);
  }
  return name;
}

/**
 * Splits an NBD export name: `VOL` is the volume, `VOL@SNAP` its snapshot (read-only).
 * Names cannot contain '@', so the split is unambiguous.
 */
export function parseExportName(exportName: string): { volume: string; snapshot?: string } {
  const at = exportName.indexOf('@');
  if (at < 0) return { volume: exportName };
  return { volume: exportName.slice(0, at), snapshot: exportName.slice(at + 1) };
}

function checkAttrs(attrs: Record<string, string | null>): void {
  if (typeof attrs !== 'object' || attrs === null || Array.isArray(attrs)) throw new FerryError('BAD_REQUEST', 'attributes must be an object of strings');
  for (const [k, v] of Object.entries(attrs)) {
    if (!attrKeyPattern.test(k)) throw new FerryError('BAD_REQUEST', `invalid attribute name ${JSON.stringify(k)}: 1-${attrKeyBytesMax} characters of A-Z a-z 0-9 . _ : -`);
    if (v !== null && (typeof v !== 'string' || Buffer.byteLength(v) > attrValueBytesMax)) {
      throw new FerryError('BAD_REQUEST', `attribute ${k} must be a string of at most ${attrValueBytesMax} bytes (or null to remove it)`);
    }
  }
}

/** Extents of [offset, offset+length) by the set bits of `bits` (block granularity). */
export function extentsOf(bits: BitsView, offset: number, length: number, blockBytes: number): Extent[] {
  const out: Extent[] = [];
  const end = offset + length;
  let cursor = offset;
  for (const [runStart, runLength] of bits.runs(Math.floor(offset / blockBytes), Math.ceil(end / blockBytes))) {
    const runOffset = Math.max(offset, runStart * blockBytes);
    const runEnd = Math.min(end, (runStart + runLength) * blockBytes);
    if (runOffset > cursor) out.push({ offset: cursor, length: runOffset - cursor, allocated: false });
    out.push({ offset: runOffset, length: runEnd - runOffset, allocated: true });
    cursor = runEnd;
  }
  if (cursor < end) out.push({ offset: cursor, length: end - cursor, allocated: false });
  return out;
}

/**
 * The snapshot facility of one site (SPEC C3, E FIG. 24–27, 34–35, 39–46): a queue of
 * snapshots per volume, each with a save volume of before-images, a bit map and a
 * block map of what it saved, and the volume's meta bit map as it was when taken.
 *
 * Write path (E FIG. 26, 41): a `beforeChange` hook on the volume runs with the
 * touched blocks locked; blocks valid in the newest snapshot's meta bit map and not
 * yet saved are read (whole blocks, even for a partial write), appended to its save
 * volume and fdatasynced — one group commit for the whole request — and only then
 * does the volume layer let the new data reach the file (SPEC §4 rule 3).
 *
 * Read path (E FIG. 27): block b of snapshot S is zeros if b was invalid when S was
 * taken; else the before-image of the oldest snapshot at or after S that saved b
 * (one lookup in the holder index); else the volume's current block.
 */
export class SnapshotManager {
  private readonly byVolume = new Map<string, VolumeSnapshots>();
  private closed = false;
  private unloadTimer: NodeJS.Timeout | undefined;
  private readonly nowMs: () => number = () => Date.now();

  constructor(
    private readonly catalog: Catalog,
    private readonly volumes: VolumeStore,
    readonly dir: string,
    private readonly log: Logger,
  ) {
    volumes.addUseCheck((name) => {
      const n = this.byVolume.get(name)?.queue.length ?? 0;
      return n > 0 ? `it has ${n} snapshot(s); delete them first` : undefined;
    });
  }

  /**
   * Removes files no catalog row names (a create or delete cut short by a crash),
   * builds the queues and loads the newest snapshot of each volume, then hooks the
   * volume's write path. Runs before any host or peer is let in.
   */
  async load(): Promise<void> {
    await mkdir(this.dir, { recursive: true });
    const records = this.catalog.listSnapshots();
    const ids = new Set(records.map((r) => r.id));
    for (const file of await readdir(this.dir)) {
      const id = snapshotFilePattern.exec(file)?.[1];
      if (id === undefined) this.log.warn({ file, dir: this.dir }, 'ignoring a file ferry did not create in the snapshots directory');
      else if (!ids.has(id) || file.endsWith('.tmp')) {
        this.log.warn({ file }, 'removing a snapshot file no catalog entry refers to (interrupted create, delete or checkpoint)');
        await unlink(join(this.dir, file));
      }
    }
    for (const record of records) {
      const vs = this.stateFor(record.volume);
      const state = new SnapshotState(record, snapshotFiles(this.dir, record.id), (s, block) => vs.holders.add(block, s.seq));
      vs.queue.push(state);
      vs.bySeq.set(record.seq, state);
    }
    for (const vs of this.byVolume.values()) {
      if (!this.volumes.has(vs.name)) {
        this.log.error({ volume: vs.name }, 'volume with snapshots is not available; its snapshots are not served');
        continue;
      }
      const volumeId = this.volumes.record(vs.name).id;
      for (const s of vs.queue) {
        if (s.record.volumeId !== volumeId) s.failure = new FerryError('SNAPSHOT_CORRUPT', `snapshot ${vs.name}@${s.name} belongs to another volume of that name`);
      }
      const newest = vs.newest() as SnapshotState;
      try {
        await newest.load();
      } catch (err) {
        this.log.error({ volume: vs.name, snapshot: newest.name, err: (err as Error).message }, 'newest snapshot is damaged: the volume refuses writes until it is deleted with --force');
      }
      this.hook(vs, this.volumes.get(vs.name));
    }
    this.unloadTimer = setInterval(() => {
      this.unloadIdle(snapshotIdleUnloadMs).catch((err: unknown) => this.log.error({ err }, 'unloading idle snapshot maps failed'));
    }, unloadCheckIntervalMs);
    this.unloadTimer.unref();
  }

  /**
   * Drops from memory the maps of older snapshots not read for `idleMs` (only a
   * prefix of each queue can go: see `snapshotsToUnload`). Returns how many left.
   */
  async unloadIdle(idleMs: number): Promise<number> {
    let unloaded = 0;
    for (const vs of this.byVolume.values()) {
      if (this.closed) break;
      await vs.gate.exclusive(async () => {
        const now = this.nowMs();
        const seqs = snapshotsToUnload(
          vs.queue.map((s) => ({ seq: s.seq, loaded: s.maps !== undefined, lastReadAtMs: s.lastReadAtMs })),
          now,
          idleMs,
        );
        for (const seq of seqs) {
          const s = vs.bySeq.get(seq) as SnapshotState;
          assert(s !== vs.newest(), 'the newest snapshot is never unloaded');
          for (const block of s.loaded.blockMap.keys()) vs.holders.remove(block, s.seq);
          await s.unload();
          vs.loadedFromSeq = Math.max(vs.loadedFromSeq, s.seq + 1);
          unloaded++;
        }
      });
    }
    return unloaded;
  }

  list(volume: string): SnapshotInfo[] {
    this.volumes.record(volume);
    return (this.byVolume.get(volume)?.queue ?? []).map((s) => this.info(s));
  }

  show(volume: string, snapshot: string): SnapshotInfo {
    return this.info(this.find(volume, snapshot).snap);
  }

  /** Snapshot count and save-volume bytes per volume (metrics). */
  stats(): { volume: string; snapshots: number; saveBytes: number }[] {
    return [...this.byVolume.values()].map((vs) => ({
      volume: vs.name,
      snapshots: vs.queue.length,
      saveBytes: vs.queue.reduce((sum, s) => sum + this.saveBytes(s), 0),
    }));
  }

  /**
   * Takes a snapshot. Order (each step durable before the next): the volume's
   * completed writes are flushed (and the previous newest snapshot's block map
   * checkpointed); the new snapshot's files (meta bit map, empty save volume, empty
   * block map) are written; the catalog row is inserted — the commit point. A crash
   * before the row leaves orphan files that the next start removes.
   */
  async create(volumeName: string, name?: string, attrs: Record<string, string> = {}): Promise<SnapshotInfo> {
    this.checkOpen();
    const volume = this.volumes.get(volumeName);
    const volumeRecord = this.volumes.record(volumeName);
    checkAttrs(attrs);
    if (Object.keys(attrs).length > attrsCountMax) throw new FerryError('BAD_REQUEST', `at most ${attrsCountMax} attributes`);
    if (name !== undefined) checkSnapshotName(name);
    const vs = this.stateFor(volumeName);
    return vs.gate.exclusive(() =>
        volume.exclusive(async () => {
          const seq = (vs.newest()?.seq ?? 0) + 1;
          const createdAt = new Date();
          const snapName = name ?? `snap-${seq}-${createdAt.toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z')}`;
          if (vs.queue.some((s) => s.name === snapName)) throw new FerryError('SNAPSHOT_EXISTS', `volume ${volumeName} already has a snapshot named ${snapName}`);
          if (vs.queue.length >= snapshotsPerVolumeMax) {
            throw new FerryError('SNAPSHOT_LIMIT', `volume ${volumeName} already has ${snapshotsPerVolumeMax} snapshots; delete some first`);
          }
          // The previous newest snapshot's checkpoint only shortens its tail scan at the
          // next start; it runs alongside the flush.
          const previous = vs.newest();
          await Promise.all([volume.flush(), previous?.maps ? previous.checkpoint() : undefined]);
          const record: SnapshotRecord = {
            volume: volumeName,
            volumeId: volumeRecord.id,
            name: snapName,
            id: randomUUID(),
            seq,
            sizeBytes: volume.sizeBytes,
            blockBytes: volume.blockBytes,
            createdAt: createdAt.toISOString(),
            state: 'ok',
            attrs: { ...attrs },
          };
          const files = snapshotFiles(this.dir, record.id);
          const state = await SnapshotState.createFiles(files, record, volume.allocation, (s, block) => vs.holders.add(block, s.seq));
          try {
            await fsyncDir(this.dir);
            this.catalog.insertSnapshot(record);
          } catch (err) {
            await state.removeFiles();
            throw err;
          }
          vs.queue.push(state);
          vs.bySeq.set(seq, state);
          this.hook(vs, volume);
          this.log.info({ volume: volumeName, snapshot: snapName, seq }, 'snapshot created');
          return this.info(state);
        }),
    );
  }

  /**
   * Deletes any snapshot of the queue. The before-images it holds that the next older
   * snapshot still needs are copied into that snapshot's save volume and its block map
   * checkpointed; then the catalog row goes (the commit point); then the files. A crash
   * before the row is removed leaves both snapshots exact (the older one merely holds
   * its own copy of some blocks); after it, the files are orphans removed at start.
   *
   * Host writes are held back only when the newest snapshot is deleted (they would
   * save into it otherwise). A corrupt snapshot can only be deleted with `force`: the older snapshots that read
   * through it are then marked damaged, since what they needed from it is lost.
   */
  async delete(volumeName: string, snapshotName: string, options: { force?: boolean } = {}): Promise<void> {
    this.checkOpen();
    const { vs, snap } = this.find(volumeName, snapshotName);
    const volume = this.volumes.get(volumeName);
    // Host writes only ever touch the newest snapshot: deleting an older one needs the
    // gate (no snapshot read sees the queue change) but need not hold the writes back.
    const holdWrites = <T>(fn: () => Promise<T>): Promise<T> => (vs.newest() === snap ? volume.exclusive(fn) : fn());
    await vs.gate.exclusive(() =>
      holdWrites(async () => {
        if (snap.deleted) throw new FerryError('SNAPSHOT_NOT_FOUND', `snapshot ${volumeName}@${snapshotName} not found`);
        const index = vs.queue.indexOf(snap);
        assert(index >= 0, `snapshot ${snapshotName} not in its queue`);
        let older = index > 0 ? vs.queue[index - 1] : undefined;
        const markDamaged = (upTo: number): void => {
          for (const s of vs.queue.slice(0, upTo)) {
            if (s.record.state === 'damaged') continue;
            s.record = { ...s.record, state: 'damaged' };
            this.catalog.updateSnapshot(s.record);
          }
        };
        try {
          await snap.load();
        } catch (err) {
          if (!options.force) {
            throw new FerryError(
              'SNAPSHOT_CORRUPT',
              `snapshot ${volumeName}@${snapshotName} is damaged (${(err as Error).message}); older snapshots may read through it, so deleting it needs --force and marks them damaged`,
            );
          }
          markDamaged(index);
          older = undefined;
        }
        if (older) {
          try {
            await older.load();
          } catch {
            // Already refused; nothing to keep for it. Make the loss visible.
            markDamaged(index);
            older = undefined;
          }
        }
        if (older && snap.maps) await this.moveBeforeImages(snap, older);
        this.catalog.deleteSnapshot(snap.record.id);
        vs.queue.splice(index, 1);
        vs.bySeq.delete(snap.seq);
        if (snap.maps) for (const block of snap.maps.blockMap.keys()) vs.holders.remove(block, snap.seq);
        await snap.removeFiles();
        this.unhookIfEmpty(vs);
        this.log.info({ volume: volumeName, snapshot: snapshotName }, 'snapshot deleted');
      }),
    );
  }

  /**
   * Makes the volume byte-identical to the snapshot. Only blocks that may differ are
   * looked at (saved by this snapshot or a later one, or of different validity), and
   * only those that do differ are written — through the volume's write path, so change
   * tracking and the newest snapshot's copy-on-first-write see every one of them.
   */
  async restore(volumeName: string, snapshotName: string): Promise<RestoreResult> {
    this.checkOpen();
    const { vs, snap } = this.find(volumeName, snapshotName);
    const volume = this.volumes.get(volumeName);
    const result = await vs.gate.shared(async () => {
      await this.ensureLoaded(vs, snap);
      const bb = volume.blockBytes;
      const valid = snap.loaded.valid;
      const candidates = deltaCandidates(
        snap.blockCount,
        vs.queue.filter((s) => s.seq >= snap.seq).map((s) => s.loaded.saved),
        valid,
        volume.allocation,
      );
      let blocksWritten = 0;
      let blocksTrimmed = 0;
      const want = Buffer.alloc(extentBytesMax);
      for (const [start, length] of chunkRuns(candidates.runs(), extentBytesMax / bb)) {
        const image = want.subarray(0, length * bb);
        await this.readBlocks(vs, snap, volume, start, length, image);
        const have = await volume.read(start * bb, length * bb);
        let run: { start: number; count: number; write: boolean } | undefined;
        const flush = async (): Promise<void> => {
          if (!run) return;
          const r = run;
          run = undefined;
          if (r.write) {
            await volume.write(r.start * bb, image.subarray((r.start - start) * bb, (r.start - start + r.count) * bb));
            blocksWritten += r.count;
          } else {
            await volume.trim(r.start * bb, r.count * bb);
            blocksTrimmed += r.count;
          }
        };
        for (let k = 0; k < length; k++) {
          const b = start + k;
          const same = image.subarray(k * bb, (k + 1) * bb).equals(have.subarray(k * bb, (k + 1) * bb));
          if (same) {
            await flush();
            continue;
          }
          const write = valid.get(b);
          if (run && run.write === write && run.start + run.count === b) run.count++;
          else {
            await flush();
            run = { start: b, count: 1, write };
          }
        }
        await flush();
        if (blocksWritten + blocksTrimmed > 0) crashPoint('restore.part-written');
      }
      await volume.flush();
      return { blocksWritten, blocksTrimmed };
    });
    this.log.info({ volume: volumeName, snapshot: snapshotName, ...result }, 'volume restored from snapshot');
    return result;
  }

  /**
   * Blocks that may differ from image `from` to image `to` (a later snapshot, or
   * `current`): every block written in between, and every block whose validity
   * changed. A superset of `delta`'s blocks, found from the maps alone (no data read).
   */
  async changedBlocks(volumeName: string, fromName: string, toName: string): Promise<PagedBitmap> {
    this.checkOpen();
    const { vs, snap: from } = this.find(volumeName, fromName);
    const to = toName === currentImageName ? undefined : this.find(volumeName, toName).snap;
    if (to && to.seq < from.seq) throw new FerryError('BAD_REQUEST', `snapshot ${toName} is older than ${fromName}; give the older one first`);
    const volume = this.volumes.get(volumeName);
    return vs.gate.shared(async () => {
      await this.ensureLoaded(vs, from);
      const between = vs.queue.filter((s) => s.seq >= from.seq && (to === undefined || s.seq < to.seq)).map((s) => s.loaded.saved);
      return deltaCandidates(from.blockCount, between, from.loaded.valid, to ? to.loaded.valid : volume.allocation);
    });
  }

  /**
   * Extents changed from image `from` to image `to` (a later snapshot, or `current`),
   * in block order, with `to`'s data (E FIG. 34–35, 39–40). Blocks invalid in `to` are
   * left out; blocks rewritten with identical bytes are left out.
   */
  async *delta(volumeName: string, fromName: string, toName: string): AsyncGenerator<DeltaExtent> {
    this.checkOpen();
    const { vs, snap: from } = this.find(volumeName, fromName);
    const to = toName === currentImageName ? undefined : this.find(volumeName, toName).snap;
    if (to && to.seq < from.seq) throw new FerryError('BAD_REQUEST', `snapshot ${toName} is older than ${fromName}; give the older one first`);
    const volume = this.volumes.get(volumeName);
    const bb = volume.blockBytes;
    const candidates = await vs.gate.shared(async () => {
      await this.ensureLoaded(vs, from);
      const between = vs.queue.filter((s) => s.seq >= from.seq && (to === undefined || s.seq < to.seq)).map((s) => s.loaded.saved);
      return deltaCandidates(from.blockCount, between, from.loaded.valid, to ? to.loaded.valid : volume.allocation);
    });
    // Runs are taken in batches of up to extentBytesMax: a batch of scattered single
    // blocks is read in parallel instead of one block after another.
    const batchBlocksMax = extentBytesMax / bb;
    let batch: [number, number][] = [];
    let batchBlocks = 0;
    const emit = async function* (this: SnapshotManager, runs: [number, number][]): AsyncGenerator<DeltaExtent> {
      const images = await vs.gate.shared(async () => {
        // Maps may have been unloaded between batches: load them again if so.
        await this.ensureLoaded(vs, from);
        return Promise.all(
          runs.map(async ([start, length]) => {
            const a = Buffer.alloc(length * bb);
            const b = Buffer.alloc(length * bb);
            await Promise.all([
              this.readBlocks(vs, from, volume, start, length, a),
              to ? this.readBlocks(vs, to, volume, start, length, b) : volume.readInto(b, start * bb),
            ]);
            return [a, b] as const;
          }),
        );
      });
      const validTo: BitsView | undefined = to ? to.validBits : volume.allocation;
      assert(validTo, `snapshot ${toName} has no meta bit map in memory`);
      for (let r = 0; r < runs.length; r++) {
        const [start, length] = runs[r] as [number, number];
        const [a, b] = images[r] as readonly [Buffer, Buffer];
        let runStart = -1;
        for (let k = 0; k <= length; k++) {
          const changed = k < length && validTo.get(start + k) && !a.subarray(k * bb, (k + 1) * bb).equals(b.subarray(k * bb, (k + 1) * bb));
          if (changed && runStart < 0) runStart = k;
          if (!changed && runStart >= 0) {
            yield { offset: (start + runStart) * bb, length: (k - runStart) * bb, data: b.subarray(runStart * bb, k * bb) };
            runStart = -1;
          }
        }
      }
    };
    for (const run of chunkRuns(candidates.runs(), batchBlocksMax)) {
      if (batchBlocks + run[1] > batchBlocksMax) {
        yield* emit.call(this, batch);
        batch = [];
        batchBlocks = 0;
      }
      batch.push(run);
      batchBlocks += run[1];
    }
    if (batch.length > 0) yield* emit.call(this, batch);
  }

  /** Reads `length` bytes of the snapshot image at `offset`. */
  async read(volumeName: string, snapshotName: string, offset: number, length: number): Promise<Buffer> {
    const buf = Buffer.alloc(length);
    await this.readInto(volumeName, snapshotName, buf, offset);
    return buf;
  }

  async readInto(volumeName: string, snapshotName: string, buf: Uint8Array, offset: number): Promise<void> {
    const { vs, snap } = this.find(volumeName, snapshotName);
    await this.readImage(vs, snap, buf, offset);
  }

  async blockStatus(volumeName: string, snapshotName: string, offset: number, length: number): Promise<Extent[]> {
    return (await this.image(volumeName, snapshotName)).blockStatus(offset, length);
  }

  /** The snapshot as a read-only device; its maps are loaded, so blockStatus is synchronous. */
  async image(volumeName: string, snapshotName: string): Promise<SnapshotImage> {
    this.checkOpen();
    const { vs, snap } = this.find(volumeName, snapshotName);
    await vs.gate.shared(() => this.ensureLoaded(vs, snap));
    return this.exportView(volumeName, snapshotName);
  }

  /**
   * The snapshot as a read-only device, synchronously (NBD option negotiation is
   * synchronous): reads load the maps on demand; allocation comes from the meta bit
   * map, which stays in memory, or is reported allocated when it is not (safe).
   */
  exportView(volumeName: string, snapshotName: string): SnapshotImage {
    this.checkOpen();
    const { vs, snap } = this.find(volumeName, snapshotName);
    const manager = this;
    return {
      volume: volumeName,
      snapshot: snapshotName,
      sizeBytes: snap.record.sizeBytes,
      blockBytes: snap.record.blockBytes,
      readOnly: true,
      async read(offset: number, length: number): Promise<Buffer> {
        const buf = Buffer.alloc(length);
        await manager.readImage(vs, snap, buf, offset);
        return buf;
      },
      readInto: (buf: Uint8Array, offset: number) => manager.readImage(vs, snap, buf, offset),
      blockStatus(offset: number, length: number): Extent[] {
        manager.checkRange(snap, offset, length);
        if (snap.deleted) throw new FerryError('SNAPSHOT_NOT_FOUND', `snapshot ${volumeName}@${snapshotName} was deleted`);
        const valid = snap.validBits;
        return valid ? extentsOf(valid, offset, length, snap.record.blockBytes) : [{ offset, length, allocated: true }];
      },
    };
  }

  /** Sets (string) or removes (null) free attributes, e.g. the last delta set played back. */
  setAttributes(volumeName: string, snapshotName: string, attrs: Record<string, string | null>): SnapshotInfo {
    this.checkOpen();
    checkAttrs(attrs);
    const { snap } = this.find(volumeName, snapshotName);
    const next: Record<string, string> = { ...snap.record.attrs };
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null) delete next[k];
      else next[k] = v;
    }
    if (Object.keys(next).length > attrsCountMax) throw new FerryError('BAD_REQUEST', `at most ${attrsCountMax} attributes per snapshot`);
    const record = { ...snap.record, attrs: next };
    this.catalog.updateSnapshot(record);
    snap.record = record;
    return this.info(snap);
  }

  /**
   * Checkpoints every loaded block map and closes the save volumes. Idempotent.
   * `checkpoint: false` leaves the maps as a crash would (tests use it to exercise the
   * save-volume tail scan at the next load).
   */
  async close(options: { checkpoint?: boolean } = {}): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.unloadTimer);
    for (const vs of this.byVolume.values()) {
      const run = async (): Promise<void> => {
        vs.unhook?.();
        vs.unhook = undefined;
        for (const s of vs.queue) {
          await s.close(options.checkpoint ?? true).catch((err: unknown) => this.log.error({ volume: vs.name, snapshot: s.name, err }, 'closing a snapshot failed'));
        }
      };
      await vs.gate.exclusive(async () => {
        const volume = this.volumes.has(vs.name) ? this.volumes.get(vs.name) : undefined;
        if (volume) await volume.exclusive(run).catch(run);
        else await run();
      });
    }
  }

  // ---- internals -------------------------------------------------------------

  private checkOpen(): void {
    if (this.closed) throw new FerryError('UNAVAILABLE', 'the snapshot facility is closed');
  }

  private stateFor(volume: string): VolumeSnapshots {
    let vs = this.byVolume.get(volume);
    if (!vs) {
      vs = new VolumeSnapshots(volume);
      this.byVolume.set(volume, vs);
    }
    return vs;
  }

  /** With no snapshot left, writes to the volume no longer pay for the hook. */
  private unhookIfEmpty(vs: VolumeSnapshots): void {
    if (vs.queue.length > 0) return;
    vs.unhook?.();
    vs.unhook = undefined;
  }

  private find(volume: string, snapshot: string): { vs: VolumeSnapshots; snap: SnapshotState } {
    this.volumes.record(volume);
    const vs = this.byVolume.get(volume);
    const snap = vs?.queue.find((s) => s.name === snapshot);
    if (!vs || !snap) throw new FerryError('SNAPSHOT_NOT_FOUND', `snapshot ${volume}@${snapshot} not found`);
    return { vs, snap };
  }

  private hook(vs: VolumeSnapshots, volume: Volume): void {
    if (vs.unhook) return;
    vs.unhook = volume.addHook({
      beforeChange: (v, change) => this.beforeChange(vs, v, [change]),
      beforeChanges: (v, changes) => this.beforeChange(vs, v, changes),
    });
  }

  /**
   * E FIG. 26 / 41: save the before-images of the newest snapshot, durably, before the
   * change; a batch of changes shares one group commit.
   */
  private async beforeChange(vs: VolumeSnapshots, volume: Volume, changes: readonly Change[]): Promise<void> {
    const newest = vs.newest();
    if (!newest) return;
    if (newest.failure) {
      throw new FerryError(
        'SNAPSHOT_CORRUPT',
        `volume ${vs.name} cannot be changed: its newest snapshot ${newest.name} is damaged (${newest.failure.message}); delete that snapshot with --force to write again`,
      );
    }
    const maps = newest.loaded;
    const runs = changes.flatMap((c) => blocksNeedingBeforeImage(maps.valid, maps.saved, c.firstBlock, c.blockCount));
    if (runs.length === 0) return;
    const bb = volume.blockBytes;
    const pieces = [...chunkRuns(runs, extentBytesMax / bb)];
    let bytes = 0;
    for (const [, length] of pieces) bytes += length * bb;
    // A bulk batch (a copy's piece, a delta set's chunk) reads its before-images into
    // one reused buffer: a buffer per run would be hundreds per batch for V8 to collect.
    const pooled = bytes >= beforeImagePooledBytesMin && bytes <= beforeImageBuffers.bufferBytes;
    const buffer = pooled ? beforeImageBuffers.take() : Buffer.allocUnsafe(bytes);
    const entries: SaveEntry[] = [];
    const reads: Promise<void>[] = [];
    let at = 0;
    for (const [start, length] of pieces) {
      // The reads of a batch run together; their order in the save volume does not matter.
      reads.push(volume.readInto(buffer.subarray(at, at + length * bb), start * bb));
      for (let k = 0; k < length; k++) entries.push({ block: start + k, data: buffer.subarray(at + k * bb, at + (k + 1) * bb) });
      at += length * bb;
    }
    // Every read has settled before the buffer can go back, whatever failed.
    const settled = await Promise.allSettled(reads);
    try {
      for (const r of settled) if (r.status === 'rejected') throw r.reason;
      await newest.addBeforeImages(entries);
    } finally {
      // The save volume is done with the data once the append settled.
      if (pooled) beforeImageBuffers.give(buffer);
    }
  }

  /** Loads the snapshot and every later one (a read may resolve to any of them). */
  private async ensureLoaded(vs: VolumeSnapshots, snap: SnapshotState): Promise<void> {
    if (snap.deleted) throw new FerryError('SNAPSHOT_NOT_FOUND', `snapshot ${vs.name}@${snap.name} was deleted`);
    if (snap.record.state === 'damaged') {
      throw new FerryError('SNAPSHOT_CORRUPT', `snapshot ${vs.name}@${snap.name} is damaged: a later snapshot it read through was deleted while corrupt`);
    }
    snap.lastReadAtMs = this.nowMs();
    if (snap.seq >= vs.loadedFromSeq) return;
    for (const s of vs.queue) {
      if (s.seq < snap.seq) continue;
      try {
        await s.load();
      } catch (err) {
        if (s === snap) throw err;
        throw new FerryError('SNAPSHOT_CORRUPT', `snapshot ${vs.name}@${snap.name} cannot be read: it reads through snapshot ${s.name}, which is damaged (${(err as Error).message})`);
      }
    }
    // Snapshots stay loaded and new ones are created loaded, so this only moves down.
    vs.loadedFromSeq = Math.min(vs.loadedFromSeq, snap.seq);
  }

  private checkRange(snap: SnapshotState, offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > snap.record.sizeBytes) {
      throw new FerryError('OUT_OF_RANGE', `range ${offset}+${length} is outside snapshot ${snap.record.volume}@${snap.name} (${snap.record.sizeBytes} bytes)`);
    }
    if (length > ioBytesMax) throw new FerryError('PAYLOAD_TOO_LARGE', `request of ${length} bytes exceeds the ${ioBytesMax}-byte maximum`);
  }

  private async readImage(vs: VolumeSnapshots, snap: SnapshotState, buf: Uint8Array, offset: number): Promise<void> {
    this.checkOpen();
    this.checkRange(snap, offset, buf.length);
    if (buf.length === 0) return;
    const bb = snap.record.blockBytes;
    const volume = this.volumes.get(vs.name);
    await vs.gate.shared(async () => {
      await this.ensureLoaded(vs, snap);
      const first = Math.floor(offset / bb);
      const end = Math.ceil((offset + buf.length) / bb);
      if (first * bb === offset && end * bb === offset + buf.length) {
        await this.readBlocks(vs, snap, volume, first, end - first, buf);
        return;
      }
      const whole = Buffer.alloc((end - first) * bb);
      await this.readBlocks(vs, snap, volume, first, end - first, whole);
      buf.set(whole.subarray(offset - first * bb, offset - first * bb + buf.length));
    });
  }

  /**
   * Reads whole blocks of a snapshot image into `out` (the caller holds the gate and
   * has loaded the snapshot and every later one). Blocks resolved to the volume are
   * looked up again after the read: a write that saved a before-image meanwhile may
   * have replaced the data read, and then the save volume has the right bytes.
   */
  private async readBlocks(vs: VolumeSnapshots, snap: SnapshotState, volume: Volume, first: number, count: number, out: Uint8Array): Promise<void> {
    const bb = snap.record.blockBytes;
    const valid = snap.loaded.valid;
    const fromVolume: [number, number][] = [];
    const reads: Promise<void>[] = [];
    const readSaved = (b: number, holderSeq: number): Promise<void> => {
      const holder = vs.bySeq.get(holderSeq);
      assert(holder?.maps, `holder ${holderSeq} of block ${b} is not loaded`);
      const record = holder.maps.blockMap.get(b);
      assert(record !== undefined, `holder ${holder.name} has no record for block ${b}`);
      return holder.maps.save.readRecord(record, b, out, (b - first) * bb);
    };
    for (let b = first; b < first + count; b++) {
      const at = (b - first) * bb;
      if (!valid.get(b)) {
        out.fill(0, at, at + bb);
        continue;
      }
      const holderSeq = vs.holders.firstAtOrAfter(b, snap.seq);
      if (holderSeq !== undefined) {
        reads.push(readSaved(b, holderSeq));
        continue;
      }
      const last = fromVolume[fromVolume.length - 1];
      if (last && last[0] + last[1] === b && (last[1] + 1) * bb <= extentBytesMax) last[1]++;
      else fromVolume.push([b, 1]);
    }
    for (const [start, length] of fromVolume) {
      reads.push(volume.readInto(out.subarray((start - first) * bb, (start - first + length) * bb), start * bb));
    }
    await Promise.all(reads);
    const again: Promise<void>[] = [];
    for (const [start, length] of fromVolume) {
      for (let b = start; b < start + length; b++) {
        const holderSeq = vs.holders.firstAtOrAfter(b, snap.seq);
        if (holderSeq !== undefined) again.push(readSaved(b, holderSeq));
      }
    }
    await Promise.all(again);
  }

  private async moveBeforeImages(snap: SnapshotState, older: SnapshotState): Promise<void> {
    const from = snap.loaded;
    const to = older.loaded;
    const bb = snap.record.blockBytes;
    const moves = blocksToMoveOnDelete(from.saved, to.valid, to.saved);
    for (let i = 0; i < moves.length; i += moveBatchBlocksMax) {
      const batch = moves.slice(i, i + moveBatchBlocksMax);
      const entries = await Promise.all(
        batch.map(async (block) => {
          const data = Buffer.alloc(bb);
          await from.save.readRecord(from.blockMap.get(block) as number, block, data);
          return { block, data };
        }),
      );
      await older.addBeforeImages(entries);
    }
    await older.checkpoint();
  }

  private saveBytes(s: SnapshotState): number {
    if (s.maps) return s.maps.save.sizeBytes;
    try {
      return statSync(s.files.save).size;
    } catch {
      return 0;
    }
  }

  private info(s: SnapshotState): SnapshotInfo {
    const r = s.record;
    return {
      volume: r.volume,
      name: r.name,
      id: r.id,
      seq: r.seq,
      createdAt: r.createdAt,
      sizeBytes: r.sizeBytes,
      blockBytes: r.blockBytes,
      attrs: r.attrs,
      state: s.failure ? 'corrupt' : r.state,
      saveBytes: this.saveBytes(s),
      ...(s.maps ? { savedBlocks: s.maps.blockMap.size } : {}),
      ...(s.failure ? { failure: { code: s.failure.code, message: s.failure.message } } : {}),
    };
  }
}
