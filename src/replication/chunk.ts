import { FerryError } from '../lib/errors.js';

/**
 * A delta-set chunk: after-images of runs of blocks (E FIG. 9 "delta chunks"). The same
 * bytes are stored in the save volumes and carried in RCP frames.
 *
 *   u32 extent count, then per extent: u64 first block, u32 block count, u32 flags
 *   (bit 0: the run reads as zeros and carries no data), then the data of every
 *   non-zero extent in order.
 */
export interface ChunkExtent {
  block: number;
  count: number;
  zero: boolean;
}

export interface Chunk {
  extents: ChunkExtent[];
  /** Data of the non-zero extents, concatenated. */
  data: Buffer;
}

const extentBytes = 16;
/** Data carried by one chunk: big enough to stream well, small enough to retry cheaply. */
export const chunkDataBytesMax = 1024 * 1024;
export const chunkExtentsMax = 4096;
/** Room for the largest chunk's encoding (extent count and list, then its data). */
export const chunkBytesMax = 4 + chunkExtentsMax * extentBytes + chunkDataBytesMax;

export function encodeChunk(chunk: Chunk): Buffer {
  return Buffer.concat(encodeChunkParts(chunk));
}

/** The encoding as two parts, the extent list and the data (not copied): for sending. */
export function encodeChunkParts(chunk: Chunk): [Buffer, Buffer] {
  return [encodeExtentList(chunk.extents), chunk.data];
}

/** The first part of a chunk's encoding: the extent count and list. */
export function encodeExtentList(extents: readonly ChunkExtent[]): Buffer {
  const head = Buffer.allocUnsafe(4 + extents.length * extentBytes);
  head.writeUInt32LE(extents.length, 0);
  let at = 4;
  for (const e of extents) {
    head.writeBigUInt64LE(BigInt(e.block), at);
    head.writeUInt32LE(e.count, at + 8);
    head.writeUInt32LE(e.zero ? 1 : 0, at + 12);
    at += extentBytes;
  }
  return head;
}

/** Decodes and checks a chunk against the volume geometry; throws PROTOCOL_ERROR on anything off. */
export function decodeChunk(payload: Buffer, blockBytes: number, blockCount: number): Chunk {
  const bad = (why: string): FerryError => new FerryError('PROTOCOL_ERROR', `malformed chunk: ${why}`);
  if (payload.length < 4) throw bad('too short');
  const n = payload.readUInt32LE(0);
  if (n > chunkExtentsMax || 4 + n * extentBytes > payload.length) throw bad(`extent count ${n}`);
  const extents: ChunkExtent[] = [];
  let dataBytes = 0;
  for (let i = 0; i < n; i++) {
    const at = 4 + i * extentBytes;
    const block = Number(payload.readBigUInt64LE(at));
    const count = payload.readUInt32LE(at + 8);
    const flags = payload.readUInt32LE(at + 12);
    if (count === 0 || block + count > blockCount || (flags & ~1) !== 0) throw bad(`extent ${block}+${count} flags ${flags} outside a volume of ${blockCount} blocks`);
    const zero = (flags & 1) === 1;
    if (!zero) dataBytes += count * blockBytes;
    extents.push({ block, count, zero });
  }
  const data = payload.subarray(4 + n * extentBytes);
  if (data.length !== dataBytes) throw bad(`carries ${data.length} data bytes, extents need ${dataBytes}`);
  return { extents, data };
}

export function chunkBlockCount(chunk: Chunk): number {
  return chunk.extents.reduce((sum, e) => sum + e.count, 0);
}
