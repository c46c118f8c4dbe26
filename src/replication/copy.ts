import type { Logger } from 'pino';
import { BufferPool } from '../lib/buffer-pool.js';
import { byteLength } from '../lib/byte-parts.js';
import { type Clock, Waker } from '../lib/clock.js';
import { FerryError, isFerryError } from '../lib/errors.js';
import { RateMeter, type RateLimiter } from '../lib/rate.js';
import type { PagedBitmap } from '../lib/paged-bitmap.js';
import type { PairRecord } from '../storage/replication-catalog.js';
import { ioBytesMax, type Extent } from '../storage/volume.js';
import type { RcpConnection } from '../transport/connection.js';
import { FrameType, type Frame } from '../transport/frame.js';
import { chunkExtentsMax, encodeChunkParts, type ChunkExtent } from './chunk.js';
import { Inbox } from './inbox.js';
import { CopyWindow, SessionRetries, copyAckTimeoutMs, copyRetransmitMs, copyStart, copyWindowPieces } from './ledger.js';
import { ReplFrame, copyFramePrefix, json, type CopyAckBody, type CopyDoneBody, type TargetPosition } from './protocol.js';

/** Data carried by one piece of a copy: larger than a delta-set chunk, it goes straight to the volume. */
export const copyPieceBytesMax = 4 * 1024 * 1024;
/** Piece buffers: those of the window being sent, and the next being read. */
const pieceBuffers = new BufferPool(copyPieceBytesMax, copyWindowPieces + 2);
const copyPersistMs = 1_000;
/** Bytes of allocation looked at per step when the copy searches for the next valid extent. */
const copyScanBytesMax = ioBytesMax;

/** What a copy reads: a volume image frozen at a point in time (a snapshot). */
export interface PointInTimeImage {
  blockStatus(offset: number, length: number): Extent[];
  readInto(buf: Uint8Array, offset: number): Promise<void>;
}

/**
 * One copy from a point-in-time image to the target's volume (E FIG. 11 for a new
 * remote copy, FIG. 28 steps 534 and 536-537 for a resync): every block, or only the
 * blocks of `blocks`, in block order. Runs on its own connection, concurrently with
 * the delta sets of the same pair (E FIG. 29, pipes 458 and 460).
 */
export interface CopyPlan {
  /** Numbers the copies of one pair; a target seeing a new id starts over. */
  copyId: number;
  image: PointInTimeImage;
  blockCount: number;
  blockBytes: number;
  /** The blocks to copy; absent: every block, holes as zero extents. */
  blocks?: PagedBitmap;
  /** The delta set stamped on the image: the target plays back from the next one. */
  stampedDeltaSet: number;
  /** The last copy before playback starts (a full copy in two steps sends two). */
  final: boolean;
}

export interface CopyPiece {
  /** Blocks [from, end) were handled; those in the plan are in `extents`. */
  from: number;
  end: number;
  extents: ChunkExtent[];
  data: Buffer;
  /** Blocks of the plan in this piece. */
  blocks: number;
  /** Gives the piece's buffer back for reuse; `data` must not be touched after. */
  release(): void;
}

/**
 * The next piece of a copy from `cursor`: the planned blocks' valid extents with their
 * data (copy by extent, E FIG. 8), holes as zero extents.
 */
export async function copyPiece(plan: CopyPlan, cursor: number): Promise<CopyPiece> {
  const bs = plan.blockBytes;
  const total = plan.blockCount;
  const dataBlocksMax = Math.max(1, Math.floor(copyPieceBytesMax / bs));
  const windowBlocksMax = Math.floor(copyScanBytesMax / bs);
  const extents: ChunkExtent[] = [];
  const reads: Promise<void>[] = [];
  // One buffer for the piece's data: each extent is read straight into its place.
  const buffer = dataBlocksMax * bs === pieceBuffers.bufferBytes ? pieceBuffers.take() : Buffer.allocUnsafe(dataBlocksMax * bs);
  let dataBlocks = 0;
  let blocks = 0;
  let at = cursor;
  const runs = plan.blocks ? plan.blocks.runs(cursor, total) : [[cursor, total - cursor] as [number, number]][Symbol.iterator]();
  let run = runs.next();
  while (!run.done && dataBlocks < dataBlocksMax && extents.length < chunkExtentsMax - 2) {
    const [runStart, runLength] = run.value;
    const runEnd = runStart + runLength;
    at = Math.max(at, runStart);
    if (at >= runEnd) {
      run = runs.next();
      continue;
    }
    const windowBlocks = Math.min(runEnd - at, windowBlocksMax);
    const allocated = plan.image.blockStatus(at * bs, windowBlocks * bs).find((e) => e.allocated);
    if (!allocated) {
      extents.push({ block: at, count: windowBlocks, zero: true });
      blocks += windowBlocks;
      at += windowBlocks;
      continue;
    }
    const s = Math.floor(allocated.offset / bs);
    const n = Math.min(Math.ceil((allocated.offset + allocated.length) / bs), runEnd) - s;
    if (s > at) {
      extents.push({ block: at, count: s - at, zero: true });
      blocks += s - at;
    }
    const take = Math.min(n, dataBlocksMax - dataBlocks);
    // The extents of a piece are read concurrently: scattered blocks cost one round trip.
    reads.push(plan.image.readInto(buffer.subarray(dataBlocks * bs, (dataBlocks + take) * bs), s * bs));
    extents.push({ block: s, count: take, zero: false });
    dataBlocks += take;
    blocks += take;
    at = s + take;
  }
  // A failed read leaves its buffer to the collector: another read may still be filling it.
  await Promise.all(reads);
  const end = run.done ? total : at;
  return { from: cursor, end, extents, data: buffer.subarray(0, dataBlocks * bs), blocks, release: pieceBuffers.releaser(buffer) };
}

export interface CopyRunnerDeps {
  pair: PairRecord;
  clock: Clock;
  log: Logger;
  /** Opens the copy connection to the target (handshake done) and returns its position. */
  openSession(pair: PairRecord): Promise<{ connection: RcpConnection; position: TargetPosition }>;
  plan(): Promise<CopyPlan>;
  /** Makes the pair record durable. */
  persist(): void;
  /** The pair's rate limit: each piece waits on it before it goes. */
  limiter: RateLimiter;
  countSent(bytes: number): void;
}

export interface CopyStats {
  connected: boolean;
  retries: number;
  rewinds: number;
  lastError: string;
  /** Sessions keep failing without progress (as many as suspend a pair's sender): why, for status; '' otherwise. */
  failing: string;
}

/** The span over which a copy's pace (for its ETA) is measured: a stall this long shows as no ETA. */
export const copyPaceWindowMs = 20_000;

/**
 * Drives one copy to the end over its own connection, reconnecting with backoff and
 * resuming from the target's cursor after any failure or restart of either side.
 */
export class CopyRunner {
  readonly stats: CopyStats = { connected: false, retries: 0, rewinds: 0, lastError: '', failing: '' };
  /** Payload bytes the target acknowledged: the copy's progress, resends not counted. */
  private readonly acknowledged: RateMeter;
  private closed = false;
  /** Aborted at close: ends a wait on the rate limit. */
  private readonly stopping = new AbortController();
  private readonly waker = new Waker();
  private connection: RcpConnection | undefined;
  private lastPersistMs = 0;

  constructor(private readonly deps: CopyRunnerDeps) {
    this.acknowledged = new RateMeter(deps.clock, copyPaceWindowMs);
  }

  /** Bytes per second the target has been acknowledging lately (0: none for a while). */
  get pace(): number {
    return this.acknowledged.rates().current;
  }

  /** Resolves true once the target has the whole copy, false if closed first. */
  async run(): Promise<boolean> {
    const retries = new SessionRetries();
    const plan = await this.deps.plan();
    const copy = this.deps.pair.initialCopy;
    copy.plannedBlocks = plan.blocks ? plan.blocks.count : plan.blockCount;
    this.deps.log.debug({ volume: this.deps.pair.volume, copyId: plan.copyId, blocks: copy.plannedBlocks }, 'copy planned');
    while (!this.closed) {
      try {
        const { connection, position } = await this.deps.openSession(this.deps.pair);
        this.connection = connection;
        this.stats.connected = true;
        this.deps.log.debug({ volume: this.deps.pair.volume, copyId: plan.copyId, targetCursor: position.copyCursorBlock }, 'copy session open');
        if (this.closed) break;
        const before = copy.cursorBlock;
        try {
          await this.session(connection, plan, position);
          return true;
        } finally {
          if (copy.cursorBlock > before) {
            retries.progressed();
            this.stats.failing = '';
          }
        }
      } catch (err) {
        if (this.closed) break;
        const { delayMs, suspend } = retries.failed();
        this.stats.retries++;
        this.stats.lastError = (err as Error).message;
        if (suspend) this.stats.failing = `the copy is not moving: ${this.stats.lastError}`;
        this.deps.log.warn({ volume: this.deps.pair.volume, err: (err as Error).message, failures: retries.failures }, 'copy session failed; retrying');
        await this.waker.wait(this.deps.clock, delayMs);
      } finally {
        this.stats.connected = false;
        this.connection?.destroy();
        this.connection = undefined;
      }
    }
    return false;
  }

  close(): void {
    this.closed = true;
    this.stopping.abort();
    this.waker.signal();
    this.connection?.destroy();
  }

  private async session(connection: RcpConnection, plan: CopyPlan, position: TargetPosition): Promise<void> {
    const copy = this.deps.pair.initialCopy;
    const generation = BigInt(this.deps.pair.generation);
    const inbox = new Inbox(connection);
    try {
      const start = copyStart(position, plan.copyId);
      if (start.done) return;
      const { from } = start;
      if (from !== copy.cursorBlock) {
        copy.cursorBlock = from;
        copy.copiedBlocks = plan.blocks ? countBelow(plan.blocks, from) : from;
      }
      const window = new CopyWindow(from, plan.blockCount, this.deps.clock.now());
      // Pieces sent and not yet acknowledged, in order: their bytes count once acknowledged.
      const unacknowledged: { end: number; bytes: number }[] = [];
      // The first persist comes a period into the session: a short copy (a resync's
      // scattered blocks) does not pay a catalog commit for its first acknowledgement.
      this.lastPersistMs = this.deps.clock.now();
      while (!window.complete) {
        while (window.wantsPiece) {
          const piece = await copyPiece(plan, window.cursor);
          const payload = [copyFramePrefix(plan.copyId, piece.from, piece.end), ...encodeChunkParts({ extents: piece.extents, data: piece.data })];
          const frameBytes = byteLength(payload);
          await this.deps.limiter.take(frameBytes, this.stopping.signal);
          connection.send(ReplFrame.CopyData, payload, { generation }, piece.release);
          this.deps.countSent(frameBytes);
          unacknowledged.push({ end: piece.end, bytes: piece.data.length });
          window.sent(piece.end, piece.blocks);
        }
        let frame: Frame;
        try {
          frame = await inbox.next(copyRetransmitMs);
        } catch (err) {
          if (!isFerryError(err, 'UNAVAILABLE') || connection.isClosed || !window.stillAlive(this.deps.clock.now())) throw err;
          // Silence: ask where the target stands; it answers with a rewinding CopyAck.
          connection.sendJson(ReplFrame.Heartbeat as number, { sourceNowMs: this.deps.clock.now(), dirtyBlocks: 0, deltaSetCreated: 0 }, { generation });
          continue;
        }
        if (frame.type !== ReplFrame.CopyAck) {
          unexpected(frame);
          continue;
        }
        const rewindsBefore = window.rewinds;
        copy.copiedBlocks = (copy.copiedBlocks ?? 0) + window.onAck(json<CopyAckBody>(frame), this.deps.clock.now());
        copy.cursorBlock = window.acked;
        const pending = unacknowledged.findIndex((p) => p.end > window.acked);
        const ackedBytes = unacknowledged.splice(0, pending < 0 ? unacknowledged.length : pending).reduce((n, p) => n + p.bytes, 0);
        if (ackedBytes > 0) {
          copy.bytes += ackedBytes;
          this.acknowledged.count(ackedBytes);
        }
        // A rewind sends the pieces after the acknowledged point again: they are counted then.
        if (window.rewinds > rewindsBefore) unacknowledged.length = 0;
        this.stats.rewinds += window.rewinds - rewindsBefore;
        if (this.deps.clock.now() - this.lastPersistMs >= copyPersistMs) {
          this.lastPersistMs = this.deps.clock.now();
          this.deps.persist();
        }
      }
      this.deps.log.debug({ volume: this.deps.pair.volume, copyId: plan.copyId }, 'copy: every piece acknowledged');
      await this.finish(connection, inbox, plan);
    } finally {
      inbox.close();
    }
  }

  /** "Start playback" from the stamped delta set (E FIG. 11 steps 355-357), or end a first step. */
  private async finish(connection: RcpConnection, inbox: Inbox, plan: CopyPlan): Promise<void> {
    const generation = BigInt(this.deps.pair.generation);
    const body: CopyDoneBody = { copyId: plan.copyId, stampedDeltaSet: plan.stampedDeltaSet, final: plan.final };
    const send = (): void => void connection.sendJson(ReplFrame.CopyDone as number, body, { generation });
    send();
    const sentAtMs = this.deps.clock.now();
    for (;;) {
      let frame: Frame;
      try {
        frame = await inbox.next(copyRetransmitMs);
      } catch (err) {
        if (!isFerryError(err, 'UNAVAILABLE') || connection.isClosed || this.deps.clock.now() - sentAtMs > copyAckTimeoutMs) throw err;
        send();
        continue;
      }
      if (frame.type === ReplFrame.CopyAck) {
        const ack = json<CopyAckBody>(frame);
        if (ack.done) return;
        // A rewind to the end answers a heartbeat sent before CopyDone: nothing is missing.
        if (ack.rewind && ack.cursorBlock < plan.blockCount) throw new FerryError('UNAVAILABLE', `target is at block ${ack.cursorBlock} of the copy, not at its end`);
        continue;
      }
      unexpected(frame);
    }
  }
}

function countBelow(bits: PagedBitmap, end: number): number {
  let n = 0;
  for (const [, length] of bits.runs(0, end)) n += length;
  return n;
}

function unexpected(frame: Frame): void {
  if (frame.type === FrameType.Pong) return;
  if (frame.type === FrameType.Error) {
    const body = json<{ code: string; message: string }>(frame);
    throw new FerryError(body.code === 'STALE_GENERATION' ? 'PROTOCOL_ERROR' : 'UNAVAILABLE', `target: ${body.code}: ${body.message}`);
  }
  throw new FerryError('PROTOCOL_ERROR', `unexpected frame type ${frame.type} on a copy session`);
}
