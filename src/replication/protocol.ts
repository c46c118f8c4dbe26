import { FerryError } from '../lib/errors.js';
import { decodeJsonPayload, type Frame } from '../transport/frame.js';

/**
 * RCP/1.0 frame types of replication (the handshake types 1-5 are transport's).
 * A session starts with PairCreate (set up a new pair at the target) or PairOpen
 * (resume an existing one); the target answers with its state so the source resumes
 * exactly where the target stands.
 */
export enum ReplFrame {
  PairCreate = 10,
  PairOpen = 11,
  PairOpenOk = 12,
  CopyData = 13,
  CopyAck = 14,
  CopyDone = 15,
  Chunk = 16,
  DeltaSetHeader = 17,
  Ack = 18,
  Nack = 19,
  Control = 20,
  ControlOk = 21,
  Heartbeat = 22,
  /** Disaster recovery between the two sites of a pair (fence, resync, reverse, takeover, standing). */
  RecoveryRequest = 23,
  RecoveryReply = 24,
  /** Binary continuation of a RecoveryReply (runs of blocks: u64 first, u32 count, u32 0). */
  RecoveryData = 25,
}

export interface PairCreateBody {
  pairId: string;
  sourceSiteId: string;
  sourceSiteName: string;
  sourceUrl: string;
  sourceVolume: string;
  targetVolume: string;
  sizeBytes: number;
  blockBytes: number;
  generation: number;
  mode: 'async' | 'sync';
  /** The source's save volume: the target's must hold any delta set the source can cut. */
  saveVolumeBytes: number;
  /** The target's save volume, if the operator chose it (at least `saveVolumeBytes`). */
  targetSaveVolumeBytes?: number;
  /** An existing target volume holding data may be overwritten by the initial copy. */
  overwrite?: boolean;
  /** The source's cut policy and rate limit: the target keeps them for when it takes over (failover). */
  intervalMs?: number;
  highWaterBytes?: number;
  maxRateBytes?: number;
}

/** A cut-policy figure a peer sent: a positive whole number, else 0 (not given; the site's default applies). */
export function policyFigure(v: unknown): number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v > 0 ? v : 0;
}

/** A rate limit a peer sent: bytes per second, 0 for none; undefined if not given (a site that has none to tell). */
export function rateLimitFigure(v: unknown): number | undefined {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0 ? v : undefined;
}

export interface PairOpenBody {
  pairId: string;
  targetVolume: string;
  generation: number;
  /** Which of the pair's two connections this is: delta sets (default) or the copy. */
  channel?: 'deltas' | 'copy';
  /** Where the source is reached now (it may have moved since the pair was made). */
  sourceUrl?: string;
  /** Not a session: the source grows the volume to this size, the target first. */
  resizeBytes?: number;
}

/** The target's position: everything the source needs to resume. */
export interface TargetPosition {
  pairId: string;
  generation: number;
  /** The copy the target has seen last (0: none) and where it stands in it. */
  copyId: number;
  copyCursorBlock: number;
  copyDone: boolean;
  /** Last delta set completely received and stored. */
  deltaSetReceived: number;
  /** Chunks of delta set `deltaSetReceived + 1` already stored (resume from the next). */
  chunksStored: number;
  deltaSetPlayedBack: number;
  /** The target's save volume cannot take more now (flow control). */
  full: boolean;
  /** The target volume's size: larger than the source's when a resize did not finish. */
  volumeBytes?: number;
}

export interface DeltaSetHeaderBody {
  deltaSet: number;
  chunkCount: number;
  blockCount: number;
  dataBytes: number;
  /** CRC32C over the data of all chunks in chunk order. */
  dataCrc: number;
  createdAtMs: number;
  previousCutMs: number;
  /** Cut while this copy ran: played back only once the target has the whole copy. */
  afterCopy?: number;
  /** Source clock, ms: its first write (0: not known, as old as `previousCutMs`). */
  firstWriteMs?: number;
  /** CRC32C over the fields above, in this order, as JSON. */
  headerCrc: number;
}

export interface AckBody {
  deltaSet: number;
  chunksStored: number;
  sealed: boolean;
  deltaSetPlayedBack: number;
  full: boolean;
}

export interface NackBody {
  deltaSet: number;
  index: number;
  reason: string;
}

export interface CopyAckBody {
  /** Every block before this one is applied at the target. */
  cursorBlock: number;
  /** The target lost or refused a piece: send again from `cursorBlock`. */
  rewind?: boolean;
  /** The copy is complete and playback may start (answer to CopyDone). */
  done?: boolean;
}

export interface CopyDoneBody {
  copyId: number;
  stampedDeltaSet: number;
  /** The last copy before playback (the first step of a two-step full copy is not). */
  final: boolean;
}

export interface ControlBody {
  op: 'stop' | 'status';
}

export interface HeartbeatBody {
  sourceNowMs: number;
  dirtyBlocks: number;
  deltaSetCreated: number;
  /** Source clock, ms: the oldest write not yet in a delta set (0: not known), if any. */
  oldestUnsentWriteMs?: number;
  /** The last delta set the target acknowledged, and the blocks of those cut after it. */
  deltaSetAcked?: number;
  unackedBlocks?: number;
  /** The source's cut policy and rate limit now (the target keeps them for a failover). */
  intervalMs?: number;
  highWaterBytes?: number;
  maxRateBytes?: number;
}

export function headerCrcFields(h: Omit<DeltaSetHeaderBody, 'headerCrc'>): string {
  return JSON.stringify([h.deltaSet, h.chunkCount, h.blockCount, h.dataBytes, h.dataCrc, h.createdAtMs, h.previousCutMs, h.afterCopy ?? 0, h.firstWriteMs ?? 0]);
}

/** Chunk frame payload: u64 delta set, u32 chunk index, u32 0, then the chunk encoding. */
export const chunkFramePrefixBytes = 16;

export function encodeChunkFrame(deltaSet: number, index: number, chunkBytes: Buffer): Buffer {
  return Buffer.concat(encodeChunkFrameParts(deltaSet, index, chunkBytes));
}

/** The chunk frame's payload as its prefix and the chunk (not copied): for sending. */
export function encodeChunkFrameParts(deltaSet: number, index: number, chunkBytes: Buffer): [Buffer, Buffer] {
  const prefix = Buffer.alloc(chunkFramePrefixBytes);
  prefix.writeBigUInt64LE(BigInt(deltaSet), 0);
  prefix.writeUInt32LE(index, 8);
  return [prefix, chunkBytes];
}

export function decodeChunkFrame(payload: Buffer): { deltaSet: number; index: number; chunkBytes: Buffer } {
  if (payload.length < chunkFramePrefixBytes) throw new FerryError('PROTOCOL_ERROR', 'chunk frame too short');
  return { deltaSet: Number(payload.readBigUInt64LE(0)), index: payload.readUInt32LE(8), chunkBytes: payload.subarray(chunkFramePrefixBytes) };
}

/**
 * Copy frame payload: u32 copy id, u32 0, u64 first block of the piece, u64 first block
 * after it, then the chunk encoding (the piece's planned blocks in [from, to)).
 */
/** The first part of a copy frame's payload; the chunk's parts follow it. */
export function copyFramePrefix(copyId: number, fromBlock: number, toBlock: number): Buffer {
  const prefix = Buffer.alloc(24);
  prefix.writeUInt32LE(copyId, 0);
  prefix.writeBigUInt64LE(BigInt(fromBlock), 8);
  prefix.writeBigUInt64LE(BigInt(toBlock), 16);
  return prefix;
}

export function decodeCopyFrame(payload: Buffer): { copyId: number; fromBlock: number; toBlock: number; chunkBytes: Buffer } {
  if (payload.length < 24) throw new FerryError('PROTOCOL_ERROR', 'copy frame too short');
  return { copyId: payload.readUInt32LE(0), fromBlock: Number(payload.readBigUInt64LE(8)), toBlock: Number(payload.readBigUInt64LE(16)), chunkBytes: payload.subarray(24) };
}

export function json<T>(frame: Frame): T {
  return decodeJsonPayload<T>(frame);
}
