import { crc32c, crc32cCombine } from '../lib/checksum.js';
import { FerryError, assert } from '../lib/errors.js';
import type { RingSpace } from '../storage/journal.js';
import { headerCrcFields, type AckBody, type CopyAckBody, type DeltaSetHeaderBody, type NackBody, type TargetPosition } from './protocol.js';

/**
 * Bookkeeping of the RCP data path (E FIG. 9, 11-17), pure: what the sender sends next
 * and what it makes of an answer, what the receiver makes of a chunk or a header,
 * which delta set plays back next, what each end may free; for copies, where a session
 * starts, the window of pieces and what the target makes of a piece or of CopyDone.
 * The replicators carry out what these decide over files and sockets; the simulator
 * (`test/sim/replication-sim.ts`) over an in-memory model with faults and crashes.
 */

/** Chunks sent and not yet acknowledged. */
export const sendWindowChunks = 8;
/** Silence after which the oldest unacknowledged frame is sent again. */
export const retransmitMs = 1_000;
/** How long without an acknowledgement before the connection counts as failed. */
export const ackTimeoutMs = 30_000;
/** Consecutive failed sessions before the pair reports Suspend (failure); it keeps retrying after that. */
export const sendRetriesMax = 3;
export const retryDelayMsMin = 200;
export const retryDelayMsMax = 5_000;

/** A delta set's row in a mailbox (either end), with where its records are in the save volume. */
export interface MailboxRow {
  generation: number;
  n: number;
  state: string;
  startLsn: number;
  endLsn: number;
}

// ---- source ------------------------------------------------------------------------

export type SendAction = { kind: 'chunk'; index: number } | { kind: 'header' };

/**
 * Where a session starts: the delta set after the last one the target holds whole,
 * from the first chunk it does not have (E FIG. 14: resume from the first
 * unacknowledged chunk, also after either side restarted).
 */
export function resumePoint(position: Pick<TargetPosition, 'generation' | 'deltaSetReceived' | 'chunksStored'>, pair: { generation: number; deltaSetCreated: number }): { next: number; fromChunk: number; received: number | undefined } {
  const sameGeneration = position.generation === pair.generation;
  if (sameGeneration && position.deltaSetReceived > pair.deltaSetCreated) {
    throw new FerryError('PROTOCOL_ERROR', `target claims delta set ${position.deltaSetReceived}, but only ${pair.deltaSetCreated} were cut`);
  }
  return { next: position.deltaSetReceived + 1, fromChunk: position.chunksStored, received: sameGeneration ? position.deltaSetReceived : undefined };
}

/**
 * The sender's view of one delta set in flight (E FIG. 12): chunks go out up to a
 * window, the header last once every chunk is stored; answers move the window, ask
 * for a chunk again, or seal it.
 */
export class DeltaSetWindow {
  /** Every chunk before this one is stored at the target. */
  acked: number;
  private nextToSend: number;
  private phase: 'chunks' | 'header' | 'sealed' = 'chunks';
  private progressAtMs: number;

  constructor(
    readonly n: number,
    readonly chunks: number,
    fromChunk: number,
    nowMs: number,
    private readonly windowChunks = sendWindowChunks,
  ) {
    this.acked = this.nextToSend = Math.max(0, fromChunk);
    this.progressAtMs = nowMs;
  }

  get sealed(): boolean {
    return this.phase === 'sealed';
  }

  /** What may go out now: chunks up to the window; the header once the target stores every chunk. */
  fill(nowMs: number): SendAction[] {
    if (this.phase !== 'chunks') return [];
    const out: SendAction[] = [];
    while (this.nextToSend < this.chunks && this.nextToSend - this.acked < this.windowChunks) out.push({ kind: 'chunk', index: this.nextToSend++ });
    if (this.acked >= this.chunks) {
      // E: the header goes last, so the receiver can check that everything it names arrived.
      this.phase = 'header';
      this.progressAtMs = nowMs;
      out.push({ kind: 'header' });
    }
    return out;
  }

  /** An acknowledgement: true if it is progress (chunks stored, or the delta set sealed). */
  onAck(ack: AckBody, nowMs: number): boolean {
    if (this.phase === 'chunks') {
      // A full target is alive: waiting for its playback is not a timeout.
      if (ack.full) this.progressAtMs = nowMs;
      if (ack.deltaSet !== this.n || ack.chunksStored <= this.acked) return false;
      this.acked = Math.min(ack.chunksStored, this.chunks);
      this.nextToSend = Math.max(this.nextToSend, this.acked);
      this.progressAtMs = nowMs;
      return true;
    }
    if (this.phase === 'header' && ack.deltaSet === this.n && ack.sealed) {
      this.phase = 'sealed';
      return true;
    }
    return false;
  }

  /** A refusal: what to send again. A header the target refuses with every chunk stored is an error. */
  onNack(nack: NackBody): SendAction[] {
    if (this.phase === 'chunks') {
      return nack.deltaSet === this.n && nack.index >= this.acked && nack.index < this.chunks ? [{ kind: 'chunk', index: nack.index }] : [];
    }
    if (this.phase === 'header') {
      if (nack.index < this.chunks) return [{ kind: 'chunk', index: nack.index }, { kind: 'header' }];
      throw new FerryError('PROTOCOL_ERROR', `target refused delta set ${this.n}: ${nack.reason}`);
    }
    return [];
  }

  /**
   * No answer for a while: a lost or damaged acknowledgement shows as silence, so the
   * oldest unacknowledged frame goes again (the target answers a duplicate with a fresh
   * acknowledgement). Undefined once nothing has moved for `ackTimeoutMs`: the session
   * has failed.
   */
  onSilence(nowMs: number): SendAction[] | undefined {
    if (nowMs - this.progressAtMs > ackTimeoutMs) return undefined;
    if (this.phase === 'chunks') return this.acked < this.chunks ? [{ kind: 'chunk', index: this.acked }] : [];
    return this.phase === 'header' ? [{ kind: 'header' }] : [];
  }
}

/**
 * Retries of the send thread: exponential backoff between sessions, and Suspend
 * (failure) after `sendRetriesMax` in a row. Only a session that made progress clears
 * the count: one that connects and then fails the same way each time must still end
 * in Suspend (failure) with its reason.
 */
export class SessionRetries {
  failures = 0;

  /** A session ended without progress (or could not open): how long to wait, and whether to report Suspend (failure). */
  failed(): { delayMs: number; suspend: boolean } {
    this.failures++;
    return { delayMs: Math.min(retryDelayMsMax, retryDelayMsMin * 2 ** Math.min(this.failures, 6)), suspend: this.failures >= sendRetriesMax };
  }

  progressed(): void {
    this.failures = 0;
  }
}

/**
 * The mailbox row of delta set `next`, if it is ready. One the target needs that is no
 * longer there cannot be sent: the pair cannot go on without a copy.
 */
export function rowToSend<R extends Pick<MailboxRow, 'generation' | 'n'>>(rows: R[], pair: { generation: number; deltaSetCreated: number }, next: number): R | undefined {
  const row = rows.find((d) => d.generation === pair.generation && d.n === next);
  if (!row && next <= pair.deltaSetCreated) {
    throw new FerryError('CORRUPT_RECORD', `delta set ${next} is needed by the target but no longer in the save volume`);
  }
  return row;
}

/**
 * Frees acknowledged delta sets of the source's save volume, oldest first, until
 * `bytes` fit (rule 8); never one the target has not acknowledged. Returns the rows
 * to delete from the mailbox and whether the space is there now. `retained` is the
 * generation's rows in order.
 */
export function makeRoom<R extends Pick<MailboxRow, 'state' | 'startLsn'>>(ring: RingSpace, retained: R[], bytes: number): { fits: boolean; freed: R[] } {
  const freed: R[] = [];
  if (bytes > ring.capacityBytes) return { fits: false, freed };
  if (ring.peek(bytes) !== undefined) return { fits: true, freed };
  for (let i = 0; i < retained.length; i++) {
    const d = retained[i] as R;
    if (d.state !== 'acked') break;
    freed.push(d);
    ring.release(retained[i + 1]?.startLsn ?? ring.head);
    if (ring.peek(bytes) !== undefined) return { fits: true, freed };
  }
  return { fits: false, freed };
}

// ---- target ------------------------------------------------------------------------

/** A chunk stored in the target's save volume. */
export interface StoredChunk {
  lsn: number;
  blocks: number;
  dataBytes: number;
}

export type ChunkVerdict =
  /** Of a delta set already sealed here: acknowledge it as sealed again. */
  | { kind: 'already-sealed' }
  /** Not the chunk expected next: ask for that one. */
  | { kind: 'out-of-order'; reason: string }
  /** Stored already: acknowledge again (the acknowledgement was lost). */
  | { kind: 'duplicate' }
  /** The next chunk: store it durably, then `stored`. */
  | { kind: 'store' };

export type HeaderVerdict =
  /** The header itself is damaged: ask for it again. */
  | { kind: 'corrupt'; reason: string }
  | { kind: 'already-sealed' }
  /** Something it names has not arrived: ask for the first chunk missing. */
  | { kind: 'incomplete'; reason: string }
  /** Everything arrived and does not match the header: refuse the delta set. */
  | { kind: 'mismatch'; reason: string }
  /** Complete and matching: record it durably, then `sealed`, then acknowledge. */
  | { kind: 'seal'; blocks: number; dataBytes: number; startLsn: number | undefined };

/**
 * What the target holds of the delta set being received (E FIG. 9): chunks are taken
 * in order only, and a delta set is sealed only when everything its header names has
 * arrived and matches.
 */
export class ReceiveLedger {
  private chunks: StoredChunk[] = [];
  private dataCrc = 0;
  /** Save-volume space taken for chunks being written, not yet stored. */
  private readonly writing = new Set<number>();
  /**
   * Chunks written to the save volume, in order after the stored ones, waiting for the
   * sync that makes them durable (one sync for several: a group commit). They are not
   * stored, so not acknowledged, until then.
   */
  private unsynced: { chunk: StoredChunk; dataCrc: number }[] = [];

  /** `received`: the last delta set completely received and durable. */
  constructor(public received: number) {}

  /** The delta set being received. */
  get n(): number {
    return this.received + 1;
  }

  /** Chunks durable in the save volume: what an acknowledgement may say. */
  get chunksStored(): number {
    return this.chunks.length;
  }

  /** Chunks written, durable or waiting for their sync: the next chunk expected is this one. */
  get chunksWritten(): number {
    return this.chunks.length + this.unsynced.length;
  }

  /** Where the first stored chunk of the delta set being received starts. */
  get startLsn(): number | undefined {
    return this.chunks[0]?.lsn;
  }

  /**
   * The oldest save-volume position the delta set being received still needs: its
   * first stored chunk, or space taken for a chunk still being written. A playback
   * that ends meanwhile must not free it.
   */
  get heldFromLsn(): number | undefined {
    let held = this.chunks[0]?.lsn;
    for (const lsn of this.writing) held = held === undefined ? lsn : Math.min(held, lsn);
    return held;
  }

  /** Space at `lsn` is taken for the chunk the last `store` verdict was for. */
  writingAt(lsn: number): void {
    this.writing.add(lsn);
  }

  /** The write at `lsn` failed: the chunk is not stored (it will be sent again); the caller gives its space back. */
  abandon(lsn: number): void {
    this.writing.delete(lsn);
  }

  onChunk(deltaSet: number, index: number): ChunkVerdict {
    if (deltaSet <= this.received) return { kind: 'already-sealed' };
    if (deltaSet !== this.n) return { kind: 'out-of-order', reason: `expected delta set ${this.n}, got ${deltaSet}` };
    if (index < this.chunksWritten) return { kind: 'duplicate' };
    if (index > this.chunksWritten) return { kind: 'out-of-order', reason: `chunk ${index} arrived before chunk ${this.chunksWritten}` };
    return { kind: 'store' };
  }

  /** The chunk the last `store` verdict was for is durable; `dataCrc` is over its block data. */
  stored(chunk: StoredChunk, dataCrc: number): void {
    assert(this.unsynced.length === 0, 'a chunk stored while written chunks wait for their sync');
    this.writing.delete(chunk.lsn);
    this.chunks.push(chunk);
    this.dataCrc = crc32cCombine(this.dataCrc, dataCrc, chunk.dataBytes);
  }

  /** The chunk the last `store` verdict was for is written; it is stored at the next `synced`. Its space stays held. */
  written(chunk: StoredChunk, dataCrc: number): void {
    this.unsynced.push({ chunk, dataCrc });
  }

  /** The save volume was synced: every chunk written before is durable, in order. */
  synced(): void {
    const waiting = this.unsynced;
    this.unsynced = [];
    for (const { chunk, dataCrc } of waiting) {
      this.writing.delete(chunk.lsn);
      this.chunks.push(chunk);
      this.dataCrc = crc32cCombine(this.dataCrc, dataCrc, chunk.dataBytes);
    }
  }

  /**
   * The sync failed: no chunk written since the last one is known durable. They are
   * dropped (they will be sent again) and returned, oldest first, for the caller to
   * give their space back.
   */
  dropUnsynced(): StoredChunk[] {
    const dropped = this.unsynced.map((u) => u.chunk);
    this.unsynced = [];
    for (const c of dropped) this.writing.delete(c.lsn);
    return dropped;
  }

  onHeader(header: DeltaSetHeaderBody): HeaderVerdict {
    const { headerCrc, ...fields } = header;
    if (crc32c(headerCrcFields(fields)) !== headerCrc) return { kind: 'corrupt', reason: 'delta-set header failed its checksum' };
    if (header.deltaSet <= this.received) return { kind: 'already-sealed' };
    if (header.deltaSet !== this.n || this.chunks.length < header.chunkCount) {
      return { kind: 'incomplete', reason: `delta set ${header.deltaSet} incomplete: ${this.chunks.length} of ${header.chunkCount} chunks` };
    }
    const blocks = this.chunks.reduce((s, c) => s + c.blocks, 0);
    const dataBytes = this.chunks.reduce((s, c) => s + c.dataBytes, 0);
    if (this.chunks.length !== header.chunkCount || blocks !== header.blockCount || dataBytes !== header.dataBytes || this.dataCrc !== header.dataCrc) {
      return { kind: 'mismatch', reason: `delta set ${header.deltaSet} does not match its header (blocks ${blocks}/${header.blockCount}, data checksum); refusing it` };
    }
    return { kind: 'seal', blocks, dataBytes, startLsn: this.startLsn };
  }

  /** Delta set `n` is recorded as received: the next one starts empty. */
  sealed(n: number): void {
    assert(this.unsynced.length === 0, `delta set ${n} sealed while written chunks wait for their sync`);
    this.received = n;
    this.chunks = [];
    this.dataCrc = 0;
    this.writing.clear();
  }
}

/**
 * The delta set to play back next: the one after the last played, once received, and
 * not before the copy it was cut during is whole here (E FIG. 11); or one whose
 * playback was interrupted (by a crash, or an I/O error), to be redone.
 */
export function nextToPlay<R extends { n: number; state: string; afterCopy?: number }>(rows: R[], pair: { deltaSetPlayedBack: number; copyDone: boolean; copyId: number }): R | undefined {
  if (!pair.copyDone) return undefined;
  const candidate = rows.find((d) => d.n === pair.deltaSetPlayedBack + 1 && (d.state === 'received' || d.state === 'playing'));
  return candidate && (candidate.afterCopy === undefined || pair.copyId >= candidate.afterCopy) ? candidate : undefined;
}

/**
 * Where the target's save volume is free up to after a playback: the start of the
 * oldest delta set not yet played, else what the one being received holds
 * (`ReceiveLedger.heldFromLsn`), else everything.
 */
export function targetReleasePoint(ring: RingSpace, rows: Pick<MailboxRow, 'state' | 'startLsn'>[], receivingHeldFromLsn: number | undefined): number {
  const nextLive = rows.find((d) => d.state !== 'played');
  return Math.max(ring.tail, nextLive?.startLsn ?? receivingHeldFromLsn ?? ring.head);
}

// ---- copies (E FIG. 11, 28-29) -------------------------------------------------------

/** Copy pieces sent and not yet acknowledged. */
export const copyWindowPieces = 8;
/** Silence after which the copy asks the target where it stands. */
export const copyRetransmitMs = 1_000;
/** No progress for this long: the copy's connection counts as failed. */
export const copyAckTimeoutMs = 30_000;

/**
 * Where a copy session starts: nothing to do if the target has the whole copy; from
 * the target's cursor if it is in this copy; from the beginning if it has not seen it.
 */
export function copyStart(position: Pick<TargetPosition, 'copyId' | 'copyDone' | 'copyCursorBlock'>, copyId: number): { done: true } | { done: false; from: number } {
  if (position.copyId === copyId && position.copyDone) return { done: true };
  return { done: false, from: position.copyId === copyId ? position.copyCursorBlock : 0 };
}

/**
 * The sender's view of a copy in flight: pieces go out in block order up to a window;
 * the target's cursor moves it; a rewind (a piece lost or damaged) sends again from
 * the cursor.
 */
export class CopyWindow {
  /** Where the next piece starts. */
  cursor: number;
  /** Every block before this one is applied at the target. */
  acked: number;
  private readonly inFlight: { end: number; blocks: number }[] = [];
  private progressAtMs: number;
  rewinds = 0;

  constructor(
    from: number,
    readonly blockCount: number,
    nowMs: number,
    private readonly windowPieces = copyWindowPieces,
  ) {
    this.cursor = this.acked = from;
    this.progressAtMs = nowMs;
  }

  get complete(): boolean {
    return this.acked >= this.blockCount;
  }

  /** True while another piece may go out. */
  get wantsPiece(): boolean {
    return this.cursor < this.blockCount && this.inFlight.length < this.windowPieces;
  }

  /** A piece covering blocks [cursor, end), `blocks` of them planned, went out. */
  sent(end: number, blocks: number): void {
    this.inFlight.push({ end, blocks });
    this.cursor = end;
  }

  /** The target's cursor; returns the planned blocks it newly has (for progress). */
  onAck(ack: CopyAckBody, nowMs: number): number {
    let copied = 0;
    if (ack.cursorBlock > this.acked) {
      this.progressAtMs = nowMs;
      while (this.inFlight.length > 0 && (this.inFlight[0] as { end: number }).end <= ack.cursorBlock) copied += (this.inFlight.shift() as { blocks: number }).blocks;
      this.acked = ack.cursorBlock;
    }
    if (this.acked > this.cursor) {
      // The target is further than this session sent (it applied more before a reconnect).
      this.cursor = this.acked;
      this.inFlight.length = 0;
    }
    if (ack.rewind && ack.cursorBlock < this.cursor) {
      // A piece was lost or damaged on the way: send again from where the target is.
      this.rewinds++;
      this.cursor = this.acked;
      this.inFlight.length = 0;
    }
    return copied;
  }

  /** No answer for a while: false once nothing has moved for `copyAckTimeoutMs` (the session has failed). */
  stillAlive(nowMs: number): boolean {
    return nowMs - this.progressAtMs <= copyAckTimeoutMs;
  }
}

export type CopyPieceVerdict =
  /** The first piece of a newer copy: start it over (cursor 0), then apply. */
  | { kind: 'new-copy' }
  /** Apply it; the cursor moves past it once it and all before it are written. */
  | { kind: 'apply' }
  /** Out of order, a duplicate, of an older copy or malformed: answer with where the copy stands. */
  | { kind: 'rewind' };

/** What the target makes of a copy piece covering blocks [fromBlock, toBlock). */
export function judgeCopyPiece(
  piece: { copyId: number; fromBlock: number; toBlock: number; extents: readonly { block: number; count: number }[] },
  copy: { copyId: number; done: boolean; expectedBlock: number; blockCount: number },
): CopyPieceVerdict {
  if (piece.copyId > copy.copyId && piece.fromBlock === 0) return { kind: 'new-copy' };
  const outside = piece.extents.some((e) => e.block < piece.fromBlock || e.block + e.count > piece.toBlock);
  if (piece.copyId !== copy.copyId || copy.done || piece.fromBlock !== copy.expectedBlock || piece.toBlock <= piece.fromBlock || piece.toBlock > copy.blockCount || outside) {
    return { kind: 'rewind' };
  }
  return { kind: 'apply' };
}

export type CopyDoneVerdict =
  /** Not this copy, or not all of it applied: answer with where the copy stands. */
  | { kind: 'rewind' }
  /** The last copy is whole: flush, record it done (playback may start), then answer done. */
  | { kind: 'complete' }
  /** A first step of a copy in two, or a repeat: make the cursor durable, then answer done. */
  | { kind: 'acknowledge' };

export function judgeCopyDone(done: { copyId: number; final: boolean }, copy: { copyId: number; done: boolean; appliedBlock: number; blockCount: number }): CopyDoneVerdict {
  if (done.copyId !== copy.copyId || copy.appliedBlock < copy.blockCount) return { kind: 'rewind' };
  return !copy.done && done.final ? { kind: 'complete' } : { kind: 'acknowledge' };
}

/** Delta sets received lately whose block counts a target remembers (to match the source's heartbeats against). */
const recentDeltaSetsMax = 256;

/**
 * At the target: how many blocks written at the source are not here, as the source
 * last said (a heartbeat a second: blocks not yet in a delta set, and blocks of delta
 * sets not yet acknowledged) less the delta sets received since it acknowledged them.
 * Exact for writes made before the heartbeat; of writes made after it, nothing is known.
 */
export class UnreceivedBlocks {
  private atHeartbeat = 0;
  private receivedSince = 0;
  private readonly recent = new Map<number, number>();

  /** A heartbeat; `received` is the last delta set received here. */
  heard(hb: { dirtyBlocks: number; deltaSetAcked?: number | undefined; unackedBlocks?: number | undefined }, received: number): void {
    let here = 0;
    if (hb.deltaSetAcked !== undefined) for (const [n, blocks] of this.recent) if (n > hb.deltaSetAcked && n <= received) here += blocks;
    this.atHeartbeat = hb.dirtyBlocks + Math.max(0, (hb.unackedBlocks ?? 0) - here);
    this.receivedSince = 0;
  }

  /** Delta set `n` of `blocks` blocks was received whole. */
  received(n: number, blocks: number): void {
    this.receivedSince += blocks;
    this.recent.set(n, blocks);
    if (this.recent.size > recentDeltaSetsMax) this.recent.delete(this.recent.keys().next().value as number);
  }

  get blocks(): number {
    return Math.max(0, this.atHeartbeat - this.receivedSince);
  }
}
