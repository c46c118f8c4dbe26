import type { Logger } from 'pino';
import { BufferPool } from '../lib/buffer-pool.js';
import { type Clock, Waker } from '../lib/clock.js';
import { RateMeter } from '../lib/rate.js';
import { crc32c, crc32cSuffix } from '../lib/checksum.js';
import { runLimited } from '../lib/concurrency.js';
import { FerryError, assert } from '../lib/errors.js';
import { JournalRecordType, RingSpace, recordSpanBytes, type JournalFile } from '../storage/journal.js';
import type { VolumeAccess } from '../storage/catalog.js';
import type { DeltaSetRecord, PairRecord, ReplicationCatalog } from '../storage/replication-catalog.js';
import type { BatchWrite, Extent, Volume } from '../storage/volume.js';
import type { RcpConnection } from '../transport/connection.js';
import { FrameType, type Frame } from '../transport/frame.js';
import { chunkBytesMax, decodeChunk, type Chunk } from './chunk.js';
import { Inbox } from './inbox.js';
import { ReceiveLedger, UnreceivedBlocks, judgeCopyDone, judgeCopyPiece, nextToPlay, targetReleasePoint } from './ledger.js';
import { copyPaceWindowMs, type PointInTimeImage } from './copy.js';
import {
  ReplFrame,
  decodeChunkFrame,
  decodeCopyFrame,
  json,
  policyFigure,
  rateLimitFigure,
  type AckBody,
  type ControlBody,
  type CopyDoneBody,
  type CopyAckBody,
  type DeltaSetHeaderBody,
  type HeartbeatBody,
  type NackBody,
  type TargetPosition,
} from './protocol.js';

/** A session with no frame for this long is considered dead (the source heartbeats every second). */
export const sessionIdleMs = 60_000;
/** How often a target waiting for save-volume space tells the source it is alive but full. */
export const fullNoticeMs = 500;
/** A playback that failed is tried again after this long. */
const playbackRetryMs = 5_000;
/** Played delta sets kept in the mailbox for `ferry info` history. */
const playedHistoryMax = 16;
/**
 * A copy's data is flushed in the background every this many bytes, so the disk writes
 * it back while the copy goes on and the flush that ends the copy finds little left.
 */
const copyFlushBytes = 8 * 1024 * 1024;
/**
 * The durable cursor (recorded after a flush) moves at most this often, and a slow
 * copy is flushed at least this often, so a restart resends little.
 */
const copyPersistMs = 1_000;
/**
 * Copy pieces written to the volume at once. Pieces cover disjoint block ranges, so
 * one can read its before-images (a snapshot's copy-on-write) while another commits
 * them or writes its data; the cursor still advances in order.
 */
const copyPiecesApplyingMax = 4;
/**
 * Chunks written to the save volume before one sync makes them all durable (a group
 * commit): while more chunks of the delta set are already queued, the target writes
 * them and syncs once. A chunk is acknowledged only after its sync.
 */
const chunksPerSyncMax = 8;
/** Buffers playback reads chunk records into, one at a time per replica. */
const playbackBuffers = new BufferPool(chunkBytesMax, 4);

/**
 * The pieces of one copy session being written, oldest first. The cursor (and its
 * acknowledgement) moves past a piece only when it and every piece before it are on
 * the volume; a failed piece stops the chain there.
 */
class CopyPipeline {
  /** Completions of the pieces in flight, oldest first. */
  private readonly pending: Promise<void>[] = [];
  private chain: Promise<void> = Promise.resolve();
  /** Where the next piece must start: past the pieces in flight. */
  nextBlock: number | undefined;

  get size(): number {
    return this.pending.length;
  }

  /** Queues a piece being applied; `complete` runs after it and all earlier ones succeeded. */
  add(applied: Promise<void>, toBlock: number, complete: () => Promise<void>): void {
    applied.catch(() => undefined);
    this.nextBlock = toBlock;
    const done = this.chain.then(() => applied).then(complete);
    this.chain = done;
    done.catch(() => undefined);
    this.pending.push(done);
    void done.finally(() => this.pending.shift()).catch(() => undefined);
  }

  /** Waits for the oldest piece; throws if it (or one before it) failed. */
  async oldest(): Promise<void> {
    await this.pending[0];
  }

  /** Waits until nothing is in flight; throws if a piece failed. */
  async settle(): Promise<void> {
    try {
      await this.chain;
    } finally {
      this.nextBlock = undefined;
    }
  }
}

interface OverlayEntry {
  lsn: number;
  /** Offset of the block's data in the record payload; -1: the block reads as zeros. */
  payloadOffset: number;
}

export interface TargetDeps {
  volume: Volume;
  pair: PairRecord;
  catalog: ReplicationCatalog;
  journal: JournalFile;
  clock: Clock;
  log: Logger;
  setAccess(access: VolumeAccess): Promise<unknown>;
  /**
   * Rule 8: keeps the replica's consistent image in snapshot `name` (taken now unless
   * it exists) and returns a view of it for readers while a catch-up is applied.
   */
  protect(name: string): Promise<PointInTimeImage>;
  /** Drops the protective snapshot once the catch-up is whole (nothing if it is gone). */
  unprotect(name: string): Promise<void>;
}

export interface TargetStats {
  corruptFramesRejected: number;
  staleFramesRefused: number;
  lastSourceNowMs: number;
  lastSourceHeardLocalMs: number;
  sourceDeltaSetCreated: number;
  /** The source's oldest write not yet in a delta set, as it last said (source clock, ms). */
  sourceOldestUnsentWriteMs: number | undefined;
  saveVolumeFull: boolean;
  connected: boolean;
  playing: number;
  /** I/O errors met here (storing a chunk, flushing a copy, playing back), and the last one, for status. */
  ioErrors: number;
  lastError: string;
  /** A storage failure not yet cleared by a success of the same kind ('' when none): shown with the state. */
  failing: { receive: string; playback: string; copy: string };
}

/** How long a snapshot of a replica waits for the playback in progress to finish. */
const boundaryWaitMs = 30_000;

/**
 * The target end of one pair (E FIG. 9): stores received chunks in its save volume,
 * checks each delta set against its header (sent last) before acknowledging it, and
 * plays delta sets back in order, all-or-nothing as seen by readers (an overlay of the
 * delta set under integration, E "block index") and after a crash (redo from the save
 * volume before anyone reads).
 */
export class TargetReplica {
  readonly stats: TargetStats = {
    corruptFramesRejected: 0,
    staleFramesRefused: 0,
    lastSourceNowMs: 0,
    lastSourceHeardLocalMs: 0,
    sourceDeltaSetCreated: 0,
    sourceOldestUnsentWriteMs: undefined,
    saveVolumeFull: false,
    connected: false,
    playing: 0,
    ioErrors: 0,
    lastError: '',
    failing: { receive: '', playback: '', copy: '' },
  };
  /** Blocks written at the source that are not here, as far as its heartbeats tell. */
  readonly unreceived = new UnreceivedBlocks();
  /** Delta-set chunks and copy pieces arriving. */
  private readonly received: RateMeter;
  private readonly copyWritten: RateMeter;
  private ring: RingSpace;
  private receiving: ReceiveLedger;
  /** Save-volume space of the chunks written and waiting for their sync, oldest first (given back if it fails). */
  private unsyncedSpace: { lsn: number; span: number; previousHead: number }[] = [];
  private overlay: Map<number, OverlayEntry> | undefined;
  /** Snapshots waiting for, or taken at, a delta-set boundary: no playback starts meanwhile. */
  private playbackHeld = 0;
  private readonly playbackWaker = new Waker();
  private readonly spaceWaker = new Waker();
  private session: RcpConnection | undefined;
  private copySession: RcpConnection | undefined;
  private closed = false;
  private playbackLoopDone: Promise<void> | undefined;
  private copyUnflushedBytes = 0;
  /**
   * Where the copy is applied to (in memory). The record's `cursorBlock` is the durable
   * cursor: it only moves past data the volume has flushed, so a crash of this machine
   * never leaves it claiming blocks that were lost with the page cache.
   */
  private copyApplied: number;
  private copyFlushing: Promise<void> | undefined;
  /**
   * A flush of the copy's data failed in this session. The kernel reports a failed
   * writeback once: a later flush may succeed although those blocks never reached the
   * disk. So nothing written since the last durable cursor counts as applied: the
   * session ends and the next resumes from that cursor, writing those blocks again.
   */
  private copyFlushFailed = false;
  private playbackFailedAtMs = Number.NEGATIVE_INFINITY;
  private copyFlushedAtMs = 0;
  private copyRecordedAtMs = 0;
  private copySessionDone: Promise<void> = Promise.resolve();
  private sessionDone: Promise<void> = Promise.resolve();
  /** While a catch-up is applied, hosts read the protected image instead of the volume. */
  private protective: PointInTimeImage | undefined;
  private hostsAllowed = false;

  private constructor(private readonly deps: TargetDeps) {
    this.received = new RateMeter(deps.clock);
    this.copyWritten = new RateMeter(deps.clock, copyPaceWindowMs);
    deps.pair.initialCopy.copyId ??= 1;
    this.copyApplied = deps.pair.initialCopy.cursorBlock;
    this.copyFlushedAtMs = this.copyRecordedAtMs = deps.clock.now();
    const rows = this.rows();
    const head = rows.reduce((h, d) => Math.max(h, d.endLsn), 0);
    const live = rows.filter((d) => d.state !== 'played');
    this.ring = new RingSpace(deps.pair.saveVolumeBytes, head, live[0]?.startLsn ?? head);
    this.receiving = new ReceiveLedger(deps.pair.deltaSetReceived);
  }

  /** Recovery: redo an interrupted playback, find chunks of a partly received delta set. */
  static async open(deps: TargetDeps): Promise<TargetReplica> {
    const t = new TargetReplica(deps);
    const interrupted = t.rows().find((d) => d.state === 'playing');
    if (interrupted) {
      deps.log.info({ volume: deps.pair.volume, deltaSet: interrupted.n }, 'redoing the playback interrupted by a crash');
      await t.playOne(interrupted);
    }
    await t.recoverReceiving();
    const name = deps.pair.initialCopy.protectiveSnapshot;
    if (name && !t.copyDone) {
      // A catch-up was being applied: readers get the protected image until it is whole.
      t.protective = await deps.protect(name);
    } else if (name) {
      await t.dropProtection();
    }
    return t;
  }

  get pair(): PairRecord {
    return this.deps.pair;
  }

  get saveVolume(): { usedBytes: number; capacityBytes: number } {
    return { usedBytes: this.ring.usedBytes, capacityBytes: this.ring.capacityBytes };
  }

  get copyDone(): boolean {
    return this.deps.pair.initialCopy.doneAt !== undefined;
  }

  /** The volume holds an image of the source at a delta-set boundary (no copy under way): `atBoundary` can take it. */
  get holdsImage(): boolean {
    return this.copyDone && this.deps.pair.deltaSetPlayedBack >= this.deps.pair.initialCopy.stampedDeltaSet;
  }

  position(): TargetPosition {
    const p = this.deps.pair;
    return {
      pairId: p.pairId,
      generation: p.generation,
      copyId: p.initialCopy.copyId ?? 1,
      copyCursorBlock: this.copyApplied,
      copyDone: this.copyDone,
      deltaSetReceived: p.deltaSetReceived,
      chunksStored: this.receiving.chunksStored,
      deltaSetPlayedBack: p.deltaSetPlayedBack,
      full: this.stats.saveVolumeFull,
      volumeBytes: this.deps.volume.sizeBytes,
    };
  }

  start(): void {
    this.playbackLoopDone = this.playbackLoop();
  }

  /** Reads the consistent image: the volume, with the delta set under integration laid over it. */
  async readInto(buf: Uint8Array, offset: number): Promise<void> {
    if (this.protective) return this.protective.readInto(buf, offset);
    await this.deps.volume.readInto(buf, offset);
    const overlay = this.overlay;
    if (!overlay) return;
    const bs = this.deps.volume.blockBytes;
    const first = Math.floor(offset / bs);
    const end = Math.ceil((offset + buf.length) / bs);
    const block = Buffer.allocUnsafe(bs);
    for (let b = first; b < end; b++) {
      const e = overlay.get(b);
      if (!e) continue;
      if (e.payloadOffset < 0) block.fill(0);
      else await this.deps.journal.readPayloadRange(e.lsn, e.payloadOffset, block, 0, bs);
      const from = Math.max(offset, b * bs);
      const to = Math.min(offset + buf.length, (b + 1) * bs);
      block.copy(buf, from - offset, from - b * bs, to - b * bs);
    }
  }

  /**
   * Allocation of the consistent image: while a delta set is under playback its blocks
   * may still be holes in the volume, so the range is reported allocated (safe: a
   * sparse-aware reader then reads it).
   */
  blockStatus(offset: number, length: number): Extent[] {
    if (this.protective) return this.protective.blockStatus(offset, length);
    return this.overlay ? [{ offset, length, allocated: true }] : this.deps.volume.blockStatus(offset, length);
  }

  /**
   * Serves one session from the source; a newer session replaces an older one. The
   * older one's frame in hand (a chunk being stored) is finished first: only then is
   * the position the new session resumes from true, and a chunk never stored twice.
   */
  async serve(connection: RcpConnection): Promise<void> {
    this.session?.destroy();
    this.session = connection;
    this.stats.connected = true;
    const previous = this.sessionDone;
    const done = (async () => {
      await previous;
      await this.runSession(
        connection,
        'replication session',
        // Rule 4: a damaged frame is refused, counted, and asked for again.
        () => this.nack(connection, this.receiving.chunksStored, 'frame failed its checksum'),
        (frame, inbox) => this.handle(connection, frame, inbox.nextQueuedType === ReplFrame.Chunk),
      );
      // Chunks written and not yet synced are made durable (or dropped) before the next session starts.
      await this.commitChunks(connection).catch(() => undefined);
    })();
    this.sessionDone = done.catch(() => undefined);
    try {
      await done;
    } finally {
      if (this.session === connection) {
        this.session = undefined;
        this.stats.connected = false;
      }
    }
  }

  /**
   * Serves the copy connection of the pair (E FIG. 29 pipe 458), alongside the delta
   * sets' connection; a newer copy session replaces an older one.
   */
  async serveCopy(connection: RcpConnection): Promise<void> {
    this.copySession?.destroy();
    this.copySession = connection;
    // The previous session's pieces are on the volume (or failed) before this one starts.
    const previous = this.copySessionDone;
    const pipeline = new CopyPipeline();
    const done = (async () => {
      await previous;
      try {
        await this.runSession(
          connection,
          'copy session',
          // Rule 4: a damaged piece is refused, counted, and sent again from the cursor.
          () => this.copyAck(connection, true),
          (frame) => this.handleCopy(connection, pipeline, frame),
        );
      } finally {
        await pipeline.settle().catch(() => undefined);
        if (this.copySession === connection) this.copySession = undefined;
        if (this.copyFlushFailed) {
          this.copyFlushFailed = false;
          this.copyApplied = this.deps.pair.initialCopy.cursorBlock;
          this.copyUnflushedBytes = 0;
          this.deps.log.warn({ volume: this.pair.volume, cursorBlock: this.copyApplied }, 'the copy resumes from its last durable point, after a failed flush');
        }
      }
    })();
    this.copySessionDone = done;
    await done;
  }

  /** Answers the open, then hands each frame to `handle`; frames of an older generation end the session (rule 5). */
  private async runSession(connection: RcpConnection, what: string, onCorrupt: () => void, handle: (frame: Frame, inbox: Inbox) => Promise<void>): Promise<void> {
    const inbox = new Inbox(connection);
    const generation = BigInt(this.deps.pair.generation);
    connection.on('corrupt', () => {
      this.stats.corruptFramesRejected++;
      onCorrupt();
    });
    connection.sendJson(ReplFrame.PairOpenOk as number, this.position(), { generation });
    try {
      while (!this.closed && !connection.isClosed) {
        const frame = await inbox.next(sessionIdleMs);
        if (frame.generation < generation) {
          this.stats.staleFramesRefused++;
          connection.sendError('STALE_GENERATION', `frame of generation ${frame.generation} refused; the pair is at generation ${generation}`, { generation });
          connection.close();
          return;
        }
        try {
          await handle(frame, inbox);
        } finally {
          frame.release?.();
        }
      }
    } catch (err) {
      if (!connection.isClosed) {
        this.deps.log.warn({ volume: this.pair.volume, err: (err as Error).message }, `${what} ended`);
        // The source reports why, instead of a connection that merely closed.
        const storage = (err as NodeJS.ErrnoException).code !== undefined && !(err instanceof FerryError) && this.stats.lastError.endsWith((err as Error).message);
        connection.sendError(err instanceof FerryError ? err.code : 'UNAVAILABLE', storage ? this.stats.lastError : (err as Error).message);
        connection.closeGracefully();
      }
    } finally {
      inbox.close();
      if (!connection.isClosed) connection.closeGracefully();
    }
  }

  private async handleCopy(connection: RcpConnection, pipeline: CopyPipeline, frame: Frame): Promise<void> {
    switch (frame.type) {
      case ReplFrame.CopyData: {
        this.deps.pair.bytesReceived += frame.payload.length;
        this.received.count(frame.payload.length);
        // The piece gives its payload's buffer back itself, once written.
        const release = frame.release;
        frame.release = undefined;
        return this.applyCopy(connection, pipeline, frame.payload, release ?? noop);
      }
      case ReplFrame.CopyDone: {
        const body = json<CopyDoneBody>(frame);
        if (!Number.isSafeInteger(body.stampedDeltaSet) || body.stampedDeltaSet < 0 || !Number.isSafeInteger(body.copyId)) {
          throw new FerryError('PROTOCOL_ERROR', 'CopyDone without a copy id or stamped delta set');
        }
        await pipeline.settle();
        return this.finishCopy(connection, body);
      }
      case ReplFrame.Heartbeat:
        // The source heard nothing for a while: say where the applied cursor is.
        await pipeline.settle();
        this.copyAck(connection, true);
        return;
      case FrameType.Ping:
        connection.sendJson(FrameType.Pong, {}, { sequence: frame.sequence });
        return;
      default:
        throw new FerryError('PROTOCOL_ERROR', `unexpected frame type ${frame.type} on a copy session`);
    }
  }

  /** `chunkQueued`: the frame after this one is already here and is a chunk. */
  private async handle(connection: RcpConnection, frame: Frame, chunkQueued: boolean): Promise<void> {
    if (frame.type === ReplFrame.Chunk) return this.storeChunk(connection, frame, chunkQueued);
    // Whatever the frame, the chunks written before it are made durable and acknowledged first.
    await this.commitChunks(connection);
    switch (frame.type) {
      case ReplFrame.DeltaSetHeader:
        return this.seal(connection, json<DeltaSetHeaderBody>(frame));
      case ReplFrame.Heartbeat: {
        const hb = json<HeartbeatBody>(frame);
        this.stats.lastSourceNowMs = hb.sourceNowMs;
        this.stats.lastSourceHeardLocalMs = this.deps.pair.sourceHeardAtMs = this.deps.clock.now();
        this.unreceived.heard(hb, this.deps.pair.deltaSetReceived);
        this.notePolicy(hb);
        this.stats.sourceDeltaSetCreated = hb.deltaSetCreated;
        this.stats.sourceOldestUnsentWriteMs = hb.oldestUnsentWriteMs;
        this.ack(connection, this.receiving.n, this.receiving.chunksStored, false);
        return;
      }
      case ReplFrame.Control: {
        const body = json<ControlBody>(frame);
        if (body.op === 'status') connection.sendJson(ReplFrame.ControlOk as number, this.position());
        return;
      }
      case FrameType.Ping:
        connection.sendJson(FrameType.Pong, {}, { sequence: frame.sequence });
        return;
      default:
        throw new FerryError('PROTOCOL_ERROR', `unexpected frame type ${frame.type} on a replication session`);
    }
  }

  // ---- initial copy -----------------------------------------------------------------

  private async applyCopy(connection: RcpConnection, pipeline: CopyPipeline, payload: Buffer, release: () => void): Promise<void> {
    let queued = false;
    try {
      queued = await this.queueCopyPiece(connection, pipeline, payload, release);
    } finally {
      if (!queued) release();
    }
    // A failed piece ends the session here (the source resumes from the cursor).
    if (pipeline.size >= copyPiecesApplyingMax) await pipeline.oldest();
  }

  /** Queues a piece to be written, or answers where the copy stands; true if queued (the piece then releases its payload). */
  private async queueCopyPiece(connection: RcpConnection, pipeline: CopyPipeline, payload: Buffer, release: () => void): Promise<boolean> {
    const { volume, pair } = this.deps;
    const { copyId, fromBlock, toBlock, chunkBytes } = decodeCopyFrame(payload);
    const chunk = decodeChunk(chunkBytes, volume.blockBytes, volume.blockCount);
    const piece = { copyId, fromBlock, toBlock, extents: chunk.extents };
    const judge = () => judgeCopyPiece(piece, { copyId: pair.initialCopy.copyId ?? 1, done: this.copyDone, expectedBlock: pipeline.nextBlock ?? this.copyApplied, blockCount: volume.blockCount });
    if (judge().kind === 'new-copy') {
      // A new copy (a resync's second step, or a catch-up): playback waits until it is done.
      await pipeline.settle();
      let protectiveSnapshot: string | undefined;
      if (this.copyDone) {
        // Rule 8: the replica held a consistent image; a catch-up is not atomic, so that
        // image is kept in a snapshot and served to readers until the copy is whole.
        protectiveSnapshot = `ferry-catch-up-g${pair.generation}-${copyId}`;
        // The source starts a catch-up only after the delta sets before it are played
        // back; a playback still finishing is let finish, so the image is whole.
        while (this.overlay && !this.closed) await this.deps.clock.sleep(10);
        this.protective = await this.deps.protect(protectiveSnapshot);
        this.deps.log.warn({ volume: pair.volume, copyId, snapshot: protectiveSnapshot, deltaSetPlayedBack: pair.deltaSetPlayedBack }, 'catch-up copy arriving: the consistent image is kept in a snapshot and served to readers until it is complete');
      }
      pair.initialCopy = {
        cursorBlock: 0,
        totalBlocks: volume.blockCount,
        stampedDeltaSet: 0,
        startedAt: new Date(this.deps.clock.now()).toISOString(),
        bytes: 0,
        copyId,
        ...(protectiveSnapshot ? { protectiveSnapshot } : {}),
      };
      this.copyApplied = 0;
      this.copyUnflushedBytes = 0;
      this.deps.catalog.putPair(pair);
    }
    if (judge().kind !== 'apply') {
      // Out of order after a lost piece (or a duplicate, or a piece of an older copy):
      // once the pieces in flight are written, say where we stand.
      await pipeline.settle();
      this.copyAck(connection, true);
      return false;
    }
    // Every write of the piece has settled before it gives its buffer back.
    const written = this.applyChunk(chunk).catch((err: Error) => {
      this.stats.ioErrors++;
      this.stats.lastError = this.stats.failing.copy = `the copy's blocks ${fromBlock}-${toBlock - 1} could not be written (they are sent again): ${err.message}`;
      throw err;
    });
    pipeline.add(written.finally(release), toBlock, async () => {
      this.stats.failing.copy = '';
      this.copyApplied = toBlock;
      pair.initialCopy.copiedBlocks = toBlock; // progress for status; the cursor is made durable below
      pair.initialCopy.totalBlocks = volume.blockCount;
      pair.initialCopy.bytes += chunk.data.length;
      this.copyWritten.count(chunk.data.length);
      this.copyUnflushedBytes += chunk.data.length + 1;
      const due = this.copyUnflushedBytes >= copyFlushBytes || this.deps.clock.now() - this.copyFlushedAtMs >= copyPersistMs;
      if (due && !this.copyFlushing) {
        // Made durable in the background: the pieces behind keep flowing meanwhile.
        this.copyFlushing = this.persistCopy()
          .catch((err: Error) => {
            this.stats.ioErrors++;
            this.stats.lastError = this.stats.failing.copy = `the copy's data could not be flushed (it is sent again from its last durable point): ${err.message}`;
            this.deps.log.error({ volume: pair.volume, err: err.message }, 'the copy\'s data could not be flushed: the session ends and the copy is sent again from its last durable point');
            connection.destroy();
          })
          .finally(() => (this.copyFlushing = undefined));
      }
      if (!connection.isClosed) this.copyAck(connection, false);
    });
    return true;
  }

  /**
   * Flushes the volume, then records the cursor as it was before the flush (once a
   * period, or always when `record`: a catalog commit per flush would stall the loop).
   */
  private async persistCopy(record = false): Promise<void> {
    const { pair } = this.deps;
    const copyId = pair.initialCopy.copyId;
    const upTo = this.copyApplied;
    this.copyUnflushedBytes = 0;
    this.copyFlushedAtMs = this.deps.clock.now();
    await this.flushCopy();
    if (pair.initialCopy.copyId !== copyId || upTo <= pair.initialCopy.cursorBlock) return;
    if (!record && this.deps.clock.now() - this.copyRecordedAtMs < copyPersistMs) return;
    this.copyRecordedAtMs = this.deps.clock.now();
    pair.initialCopy.cursorBlock = upTo;
    this.deps.catalog.putPair(pair);
  }

  private async flushCopy(): Promise<void> {
    try {
      await this.deps.volume.flush();
    } catch (err) {
      this.copyFlushFailed = true;
      throw err;
    }
  }

  /**
   * The copied image plus the delta sets up to the one stamped on the copy's snapshot
   * is the first consistent image; until then hosts get no access (raw).
   */
  private async openToHostsIfConsistent(): Promise<void> {
    const { pair } = this.deps;
    if (!this.copyDone || this.hostsAllowed || pair.deltaSetPlayedBack < pair.initialCopy.stampedDeltaSet) return;
    this.hostsAllowed = true;
    await this.deps.setAccess('read-only');
    if (pair.recovery?.phase === 'resync-target' && pair.stateReason !== '') {
      // Rebuilt: no longer "no host access until the resync is complete".
      pair.stateReason = '';
      this.deps.catalog.putPair(pair);
    }
    this.deps.log.info({ volume: pair.volume }, 'the replica holds a consistent image; read-only access for hosts');
  }

  private async finishCopy(connection: RcpConnection, done: CopyDoneBody): Promise<void> {
    const { pair, volume } = this.deps;
    const verdict = judgeCopyDone(done, { copyId: pair.initialCopy.copyId ?? 1, done: this.copyDone, appliedBlock: this.copyApplied, blockCount: volume.blockCount });
    if (verdict.kind === 'rewind') {
      this.copyAck(connection, true);
      return;
    }
    await this.copyFlushing;
    if (this.copyFlushFailed) throw new FerryError('UNAVAILABLE', 'a flush of the copy failed: it is sent again from its last durable point');
    if (verdict.kind === 'complete') {
      await this.flushCopy();
      pair.initialCopy.cursorBlock = volume.blockCount;
      pair.initialCopy.doneAt = new Date(this.deps.clock.now()).toISOString();
      pair.initialCopy.stampedDeltaSet = done.stampedDeltaSet;
      pair.state = 'duplex';
      this.deps.catalog.putPair(pair);
      // The volume now holds the source's image at the copy's snapshot: consistent.
      await this.dropProtection();
      await this.openToHostsIfConsistent();
      this.playbackWaker.signal();
    } else if (!done.final) {
      await this.persistCopy(true);
    }
    const body: CopyAckBody = { cursorBlock: volume.blockCount, done: true };
    connection.sendJson(ReplFrame.CopyAck as number, body, { generation: BigInt(pair.generation) });
  }

  /** Readers go back to the volume and the protective snapshot goes. */
  private async dropProtection(): Promise<void> {
    const { pair } = this.deps;
    const name = pair.initialCopy.protectiveSnapshot;
    this.protective = undefined;
    if (!name) return;
    await this.deps.unprotect(name);
    delete pair.initialCopy.protectiveSnapshot;
    this.deps.catalog.putPair(pair);
    this.deps.log.info({ volume: pair.volume, snapshot: name }, 'catch-up complete: the protective snapshot is dropped');
  }

  private copyAck(connection: RcpConnection, rewind: boolean): void {
    const body: CopyAckBody = { cursorBlock: this.copyApplied, ...(rewind ? { rewind } : {}) };
    connection.sendJson(ReplFrame.CopyAck as number, body, { generation: BigInt(this.deps.pair.generation) });
  }

  // ---- delta sets -------------------------------------------------------------------

  private async storeChunk(connection: RcpConnection, frame: Frame, chunkQueued: boolean): Promise<void> {
    const { volume, pair, journal } = this.deps;
    const { payload } = frame;
    const { deltaSet, index, chunkBytes } = decodeChunkFrame(payload);
    const verdict = this.receiving.onChunk(deltaSet, index);
    switch (verdict.kind) {
      case 'already-sealed':
        return this.ack(connection, deltaSet, Number.MAX_SAFE_INTEGER, true);
      case 'out-of-order':
        return this.nack(connection, this.receiving.chunksStored, verdict.reason);
      case 'duplicate':
        return this.ack(connection, deltaSet, this.receiving.chunksStored, false);
      case 'store':
        break;
    }
    const chunk = decodeChunk(chunkBytes, volume.blockBytes, volume.blockCount);
    // The record's and the delta set's checksums are taken out of the frame's, which
    // was checked on arrival: the chunk is not read again for them.
    const prefixBytes = payload.length - chunkBytes.length;
    const chunkCrc = crc32cSuffix(frame.payloadCrc ?? crc32c(payload), crc32c(payload.subarray(0, prefixBytes)), chunkBytes.length);
    const chunkDataCrc = crc32cSuffix(chunkCrc, crc32c(chunkBytes.subarray(0, chunkBytes.length - chunk.data.length)), chunk.data.length);
    // Written from the frame's payload as it is (no copy): it is not released before this returns.
    const encoded = journal.encodeParts({ type: JournalRecordType.Chunk, flags: 0, generation: pair.generation, deltaSet, index }, [chunkBytes], chunkCrc);
    const span = recordSpanBytes(chunkBytes.length);
    let previousHead = this.ring.head;
    let lsn = this.ring.allocate(span);
    while (lsn === undefined) {
      // Rule 8 at the target: a full save volume stops acknowledging (back-pressure)
      // until playback frees space; the source is told it is alive but full.
      if (span > this.ring.capacityBytes) throw new FerryError('UNAVAILABLE', 'a chunk is larger than the whole save volume');
      this.stats.saveVolumeFull = true;
      await this.commitChunks(connection);
      this.ack(connection, deltaSet, this.receiving.chunksStored, false);
      await this.spaceWaker.wait(this.deps.clock, fullNoticeMs);
      if (this.closed || connection.isClosed) return;
      previousHead = this.ring.head;
      lsn = this.ring.allocate(span);
    }
    this.stats.saveVolumeFull = false;
    // Held until stored: a playback ending meanwhile must not free this space.
    this.receiving.writingAt(lsn);
    try {
      await journal.write(lsn, encoded);
    } catch (err) {
      this.stats.ioErrors++;
      this.stats.lastError = this.stats.failing.receive = `chunk ${index} of delta set ${deltaSet} could not be stored in the save volume: ${(err as Error).message}`;
      // Chunks are written one at a time (a newer session waits for this one): this is
      // the last allocation, and its space goes back, so the delta set's records stay
      // one after another. The chunks written before it are synced when the session ends.
      this.receiving.abandon(lsn);
      this.ring.giveBack(lsn, span, previousHead);
      throw err;
    }
    this.receiving.written({ lsn, blocks: chunk.extents.reduce((s, e) => s + e.count, 0), dataBytes: chunk.data.length }, chunkDataCrc);
    this.unsyncedSpace.push({ lsn, span, previousHead });
    pair.bytesReceived += payload.length;
    this.received.count(payload.length);
    // The next chunk is already here: it is written before the sync that covers both.
    if (chunkQueued && this.unsyncedSpace.length < chunksPerSyncMax) return;
    await this.commitChunks(connection);
  }

  /**
   * One sync for the chunks written since the last: then they are stored, and
   * acknowledged. If it fails none of them is known durable: they are dropped, their
   * space goes back (they are the last allocations, one after another) and the source
   * sends them again.
   */
  private async commitChunks(connection: RcpConnection): Promise<void> {
    if (this.unsyncedSpace.length === 0) return;
    try {
      await this.deps.journal.sync();
    } catch (err) {
      const first = this.receiving.chunksStored;
      const last = this.receiving.chunksWritten - 1;
      this.receiving.dropUnsynced();
      for (const { lsn, span, previousHead } of this.unsyncedSpace.reverse()) this.ring.giveBack(lsn, span, previousHead);
      this.unsyncedSpace = [];
      this.stats.ioErrors++;
      this.stats.lastError = this.stats.failing.receive = `${last > first ? `chunks ${first}-${last}` : `chunk ${first}`} of delta set ${this.receiving.n} could not be stored in the save volume: ${(err as Error).message}`;
      throw err;
    }
    this.stats.failing.receive = '';
    this.receiving.synced();
    this.unsyncedSpace = [];
    if (!connection.isClosed) this.ack(connection, this.receiving.n, this.receiving.chunksStored, false);
  }

  private async seal(connection: RcpConnection, header: DeltaSetHeaderBody): Promise<void> {
    const { pair } = this.deps;
    const verdict = this.receiving.onHeader(header);
    switch (verdict.kind) {
      case 'corrupt':
        this.stats.corruptFramesRejected++;
        return this.nack(connection, this.receiving.chunksStored, verdict.reason);
      case 'already-sealed':
        return this.ack(connection, header.deltaSet, header.chunkCount, true);
      case 'incomplete':
        return this.nack(connection, this.receiving.chunksStored, verdict.reason);
      case 'mismatch':
        this.stats.corruptFramesRejected++;
        throw new FerryError('CHECKSUM_MISMATCH', verdict.reason);
      case 'seal':
        break;
    }
    const now = this.deps.clock.now();
    const record: DeltaSetRecord = {
      volume: pair.volume,
      generation: pair.generation,
      n: header.deltaSet,
      state: 'received',
      startLsn: verdict.startLsn ?? this.ring.head,
      endLsn: this.ring.head,
      chunks: header.chunkCount,
      blocks: verdict.blocks,
      dataBytes: verdict.dataBytes,
      dataCrc: header.dataCrc,
      createdAtMs: header.createdAtMs,
      previousCutMs: header.previousCutMs,
      sealedAtMs: now,
      receivedAtMs: now,
      ...(header.afterCopy !== undefined ? { afterCopy: header.afterCopy } : {}),
      ...(header.firstWriteMs ? { firstWriteMs: header.firstWriteMs } : {}),
    };
    this.deps.catalog.transaction(() => {
      this.deps.catalog.putDeltaSet(record);
      pair.deltaSetReceived = header.deltaSet;
      this.deps.catalog.putPair(pair);
    });
    this.receiving.sealed(header.deltaSet);
    this.unreceived.received(header.deltaSet, verdict.blocks);
    this.ack(connection, header.deltaSet, header.chunkCount, true);
    this.playbackWaker.signal();
  }

  /** The source's cut policy and rate limit, kept for a failover here (they may be changed there at any time). */
  private notePolicy(hb: HeartbeatBody): void {
    const { pair } = this.deps;
    const intervalMs = policyFigure(hb.intervalMs);
    const highWaterBytes = policyFigure(hb.highWaterBytes);
    const maxRateBytes = rateLimitFigure(hb.maxRateBytes) ?? pair.maxRateBytes ?? 0;
    if (intervalMs === 0 || highWaterBytes === 0) return;
    if (intervalMs === pair.intervalMs && highWaterBytes === pair.highWaterBytes && maxRateBytes === (pair.maxRateBytes ?? 0)) return;
    pair.intervalMs = intervalMs;
    pair.highWaterBytes = highWaterBytes;
    pair.maxRateBytes = maxRateBytes;
    this.deps.catalog.putPair(pair);
  }

  private ack(connection: RcpConnection, deltaSet: number, chunksStored: number, sealed: boolean): void {
    const body: AckBody = { deltaSet, chunksStored, sealed, deltaSetPlayedBack: this.deps.pair.deltaSetPlayedBack, full: this.stats.saveVolumeFull };
    connection.sendJson(ReplFrame.Ack as number, body, { generation: BigInt(this.deps.pair.generation) });
  }

  private nack(connection: RcpConnection, index: number, reason: string): void {
    const body: NackBody = { deltaSet: this.receiving.n, index, reason };
    connection.sendJson(ReplFrame.Nack as number, body, { generation: BigInt(this.deps.pair.generation) });
  }

  // ---- playback ---------------------------------------------------------------------

  private async playbackLoop(): Promise<void> {
    while (!this.closed) {
      // A snapshot of the replica is being taken at a delta-set boundary.
      if (this.playbackHeld > 0) {
        await this.playbackWaker.wait(this.deps.clock, 50);
        continue;
      }
      const next = this.playable();
      if (next) {
        try {
          await this.playOne(next);
          this.stats.failing.playback = '';
        } catch (err) {
          this.stats.ioErrors++;
          this.stats.lastError = this.stats.failing.playback = `playback of delta set ${next.n} failed (it is tried again; readers keep a consistent image): ${(err as Error).message}`;
          this.playbackFailedAtMs = this.deps.clock.now();
          this.deps.log.error({ err, volume: this.pair.volume, deltaSet: next.n }, 'playback failed; the replica keeps its last consistent image');
          await this.playbackWaker.wait(this.deps.clock, playbackRetryMs);
        }
        continue;
      }
      await this.playbackWaker.wait(this.deps.clock, 1000);
    }
  }

  /** Integrates one delta set (E FIG. 9 playback module), all-or-nothing. */
  private async playOne(ds: DeltaSetRecord): Promise<void> {
    const { volume, journal, catalog, pair } = this.deps;
    assert(ds.n === pair.deltaSetPlayedBack + 1, `playback of delta set ${ds.n} out of order (played ${pair.deltaSetPlayedBack})`);
    const startedAt = this.deps.clock.now();
    // 1. Index the delta set: from this moment readers see the image after it. Only
    // the positions are kept: a delta set may be far larger than memory.
    const records: number[] = [];
    const overlay = new Map<number, OverlayEntry>();
    let lsn = ds.startLsn;
    for (let index = 0; index < ds.chunks; index++) {
      const record = await journal.readNext(lsn, ds.endLsn, playbackBuffers, { type: JournalRecordType.Chunk, generation: ds.generation, deltaSet: ds.n, index });
      try {
        if (!record) {
          throw new FerryError('CORRUPT_RECORD', `save volume: chunk ${index} of delta set ${ds.n} is missing or damaged`);
        }
        const chunk = decodeChunk(record.payload, volume.blockBytes, volume.blockCount);
        let dataAt = record.payload.length - chunk.data.length;
        for (const e of chunk.extents) {
          for (let b = 0; b < e.count; b++) {
            overlay.set(e.block + b, { lsn: record.lsn, payloadOffset: e.zero ? -1 : dataAt + b * volume.blockBytes });
          }
          if (!e.zero) dataAt += e.count * volume.blockBytes;
        }
        records.push(record.lsn);
        lsn = record.nextLsn;
      } finally {
        record?.release?.();
      }
    }
    this.overlay = overlay;
    this.stats.playing = ds.n;
    try {
      // 2. Durable intent: a crash from here on redoes this delta set before anyone reads.
      catalog.putDeltaSet({ ...ds, state: 'playing', playbackStartedAtMs: startedAt });
      // 3. Write the after-images into the volume, then make them durable.
      for (const [index, at] of records.entries()) {
        const record = await journal.read(at, { type: JournalRecordType.Chunk, generation: ds.generation, deltaSet: ds.n, index }, playbackBuffers);
        try {
          await this.applyChunk(decodeChunk(record.payload, volume.blockBytes, volume.blockCount));
        } finally {
          // Every write of the chunk has settled (applyChunk waits for all before failing).
          record.release?.();
        }
      }
      await volume.flush();
      // 4. Done: the mailbox says so, the save-volume space is free, the overlay goes.
      const playbackMs = this.deps.clock.now() - startedAt;
      catalog.transaction(() => {
        catalog.putDeltaSet({ ...ds, state: 'played', playbackStartedAtMs: startedAt, playbackMs });
        pair.deltaSetPlayedBack = ds.n;
        pair.playedBackCutMs = ds.createdAtMs;
        catalog.putPair(pair);
        for (const old of this.rows().filter((d) => d.state === 'played' && d.n <= ds.n - playedHistoryMax)) catalog.deleteDeltaSet(old.volume, old.generation, old.n);
      });
      this.ring.release(targetReleasePoint(this.ring, this.rows(), this.receiving.heldFromLsn));
      this.spaceWaker.signal();
      this.overlay = undefined;
      await this.openToHostsIfConsistent();
    } finally {
      // A playback that failed (an I/O error) keeps its overlay: readers go on seeing the
      // whole delta set over a volume that holds part of it, until it is redone.
      this.stats.playing = 0;
    }
  }

  private async applyChunk(chunk: Chunk): Promise<void> {
    const { volume } = this.deps;
    const bs = volume.blockBytes;
    // The extents of a chunk are disjoint: the data goes in as one batch (one group
    // commit of before-images if the volume has snapshots), zero runs beside it. The
    // caller flushes after the last chunk, as before.
    const zeroBlocksMax = Math.floor((32 * 1024 * 1024) / bs);
    const writes: BatchWrite[] = [];
    const zeroes: [number, number][] = [];
    let dataAt = 0;
    for (const e of chunk.extents) {
      if (e.zero) {
        for (let done = 0; done < e.count; done += zeroBlocksMax) zeroes.push([(e.block + done) * bs, Math.min(e.count - done, zeroBlocksMax) * bs]);
      } else {
        writes.push({ offset: e.block * bs, data: chunk.data.subarray(dataAt, dataAt + e.count * bs) });
        dataAt += e.count * bs;
      }
    }
    // Every write has finished before an error is raised.
    const settled = await Promise.allSettled([volume.writeMany(writes), runLimited(zeroes, 16, ([offset, length]) => volume.writeZeroes(offset, length))]);
    for (const r of settled) if (r.status === 'rejected') throw r.reason;
  }

  private async recoverReceiving(): Promise<void> {
    const { journal, pair } = this.deps;
    const n = pair.deltaSetReceived + 1;
    let lsn = this.ring.head;
    for (let index = 0; ; index++) {
      const limit = this.ring.tail + this.ring.capacityBytes;
      const record = await journal.readNext(lsn, limit, undefined, { type: JournalRecordType.Chunk, generation: pair.generation, deltaSet: n, index });
      if (!record) break;
      const chunk = decodeChunk(record.payload, this.deps.volume.blockBytes, this.deps.volume.blockCount);
      this.ring.head = record.nextLsn;
      this.receiving.stored({ lsn: record.lsn, blocks: chunk.extents.reduce((s, e) => s + e.count, 0), dataBytes: chunk.data.length }, crc32c(chunk.data));
      lsn = record.nextLsn;
    }
    if (this.receiving.chunksStored > 0) this.deps.log.info({ volume: pair.volume, deltaSet: n, chunks: this.receiving.chunksStored }, 'resuming a partly received delta set');
  }

  private rows(): DeltaSetRecord[] {
    return this.deps.catalog.listDeltaSets(this.deps.pair.volume).filter((d) => d.generation === this.deps.pair.generation);
  }

  /** Waits for the playback in progress, then stops. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.session?.destroy();
    this.copySession?.destroy();
    this.playbackWaker.signal();
    this.spaceWaker.signal();
    await this.playbackLoopDone;
    // An orderly stop keeps the copy's place: the pieces written so far are flushed and
    // the cursor recorded, so the next start resumes here, not a second back.
    await this.copySessionDone.catch(() => undefined);
    await this.copyFlushing;
    if (!this.copyDone && this.copyApplied > this.deps.pair.initialCopy.cursorBlock) {
      await this.persistCopy(true).catch((err: Error) => this.deps.log.warn({ volume: this.pair.volume, err: err.message }, 'the copy\'s place could not be recorded at stop; it resumes from its last durable point'));
    }
    this.deps.catalog.putPair(this.deps.pair);
  }

  /** The delta set playback may take next, if any. */
  private playable(): DeltaSetRecord | undefined {
    const { pair } = this.deps;
    return nextToPlay(this.rows(), { deltaSetPlayedBack: pair.deltaSetPlayedBack, copyDone: this.copyDone, copyId: pair.initialCopy.copyId ?? 1 });
  }

  /**
   * Ends both sessions and plays back every delta set already received that can be
   * (failover, failback). One cut while a copy ran that this side never got whole
   * cannot be: it stays unplayed (`unplayedDeltaSets`). The caller keeps new sessions out.
   * Fails as soon as a playback attempt fails meanwhile, with the playback's reason.
   */
  async finishPlayback(timeoutMs: number): Promise<void> {
    this.session?.destroy();
    this.copySession?.destroy();
    const calledAt = this.deps.clock.now();
    const deadline = calledAt + timeoutMs;
    // An interrupted playback ('playing') is playable too: it is redone.
    while (!this.closed && this.playable() !== undefined) {
      // A playback that fails while the caller waits (a disk full or failing here) would
      // fail again and again: the caller hears of it now rather than at the deadline.
      if (this.playbackFailedAtMs >= calledAt) {
        throw new FerryError('UNAVAILABLE', this.stats.failing.playback || `playback of delta set ${this.pair.deltaSetPlayedBack + 1} failed`);
      }
      if (this.deps.clock.now() > deadline) {
        throw new FerryError('UNAVAILABLE', `playback of the received delta sets did not finish within ${Math.round(timeoutMs / 1000)} s${this.stats.lastError ? ` (${this.stats.lastError})` : ''}`);
      }
      // Wake the playback now, but not again and again after a failure (it retries every 5 s).
      if (this.deps.clock.now() - this.playbackFailedAtMs >= playbackRetryMs) this.playbackWaker.signal();
      await this.deps.clock.sleep(20);
    }
  }

  /**
   * Runs `take` while the volume holds exactly the image after the last delta set played
   * back (a snapshot of the replica, for a backup): the playback in progress finishes
   * first and none starts meanwhile. Refused while the replica holds no consistent image
   * (a copy under way), or when a playback keeps failing (the volume holds part of one).
   */
  async atBoundary<T>(take: (image: { deltaSet: number; sourceCutMs: number }) => Promise<T>, timeoutMs = boundaryWaitMs): Promise<T> {
    const { pair } = this.deps;
    const refuse = (why: string): never => {
      throw new FerryError('VOLUME_IN_USE', `volume ${pair.volume} is a replica of ${pair.peerSiteName}:${pair.peerVolume} and ${why}; nothing was taken`);
    };
    if (!this.holdsImage) {
      refuse(`holds no consistent image until its ${pair.initialCopy.protectiveSnapshot ? 'catch-up' : 'initial'} copy is complete (${this.pair.initialCopy.copiedBlocks ?? 0} of ${pair.initialCopy.plannedBlocks ?? pair.initialCopy.totalBlocks} blocks)`);
    }
    this.playbackHeld++;
    try {
      const deadline = this.deps.clock.now() + timeoutMs;
      while (this.overlay !== undefined) {
        if (this.closed) refuse('is closing');
        if (this.deps.clock.now() > deadline) refuse(`is in the middle of playing back delta set ${pair.deltaSetPlayedBack + 1}${this.stats.failing.playback ? `, which keeps failing (${this.stats.failing.playback})` : ''}`);
        await this.deps.clock.sleep(10);
      }
      return await take({ deltaSet: pair.deltaSetPlayedBack, sourceCutMs: pair.playedBackCutMs });
    } finally {
      this.playbackHeld--;
      this.playbackWaker.signal();
    }
  }

  /** Bytes per second received over the last 5 s, and since the first arrived. */
  rates(): { current: number; average: number } {
    return this.received.rates();
  }

  /** Bytes per second of a copy written here lately (0: none for a while). */
  get copyPace(): number {
    return this.copyWritten.rates().current;
  }

  /** Delta sets received and not played back. */
  unplayedDeltaSets(): number {
    return this.rows().filter((d) => d.state === 'received' || d.state === 'playing').length;
  }

  /** Ends the session (stop at the source): finishes the playback in progress first. */
  endSession(): void {
    this.session?.destroy();
  }
}

function noop(): void {}
