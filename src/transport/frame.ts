import { BufferPool } from '../lib/buffer-pool.js';
import { byteLength } from '../lib/byte-parts.js';
import { crc32c, crc32cParts } from '../lib/checksum.js';
import { FerryError } from '../lib/errors.js';

/**
 * RCP/1.0 framing. After the 8-byte preamble `RCP/1.0\n` each side sends frames:
 *
 *   offset size
 *   0      4   magic 0x52435046 ("RCPF")
 *   4      2   type
 *   6      2   flags
 *   8      4   payload length
 *   12     4   reserved (0)
 *   16     8   generation (fences stale traffic, SPEC §4 rule 5)
 *   24     8   sequence (per connection and direction; acknowledgements name it)
 *   32     4   CRC32C of the payload
 *   36     4   CRC32C of bytes 0..35
 *   40     …   payload
 *
 * A header that fails its checksum means the stream can no longer be trusted and the
 * connection is closed; a payload that fails its checksum is reported with the intact
 * header so the receiver can refuse that one frame and ask for it again.
 */
export const rcpPreamble = Buffer.from('RCP/1.0\n', 'ascii');
export const rcpSignature = rcpPreamble.subarray(0, 7);
export const frameMagic = 0x52435046;
export const frameHeaderBytes = 40;
/** Largest payload a peer may send: a chunk of delta-set blocks plus its extent list. */
export const framePayloadBytesMax = 16 * 1024 * 1024 + 64 * 1024;

export enum FrameType {
  Hello = 1,
  HelloOk = 2,
  Error = 3,
  Ping = 4,
  Pong = 5,
}

export interface FrameHeader {
  type: number;
  flags: number;
  generation: bigint;
  sequence: bigint;
}

export interface Frame extends FrameHeader {
  payload: Buffer;
  /** The payload's CRC32C as checked on arrival (a receiver may derive the checksums of its parts from it). */
  payloadCrc?: number;
  /**
   * Present when the payload lives in a pooled buffer: whoever is last to use the
   * payload may call it once, after which the payload must not be touched. Not
   * calling it is always safe.
   */
  release?: () => void;
}

/** Payloads at least this large are gathered straight into a buffer of their own. */
const directPayloadBytesMin = 256 * 1024;
/**
 * Buffers for large payloads (a copy piece of 4 MiB with its extent list, a chunk of
 * 1 MiB), shared by the connections of the process.
 */
const payloadPool = new BufferPool(4 * 1024 * 1024 + 128 * 1024, 16);

export function encodeFrame(frame: { type: number; flags?: number; generation?: bigint; sequence?: bigint; payload?: Uint8Array }): Buffer {
  const payload = frame.payload ?? Buffer.alloc(0);
  const out = Buffer.allocUnsafe(frameHeaderBytes + payload.length);
  writeFrameHeader(out, frame, [payload]);
  out.set(payload, frameHeaderBytes);
  return out;
}

/**
 * The 40-byte header of a frame whose payload is `parts` in order, so that large
 * payloads (copy pieces, chunks) go to the socket as they are, without being joined.
 */
export function encodeFrameHeader(frame: { type: number; flags?: number; generation?: bigint; sequence?: bigint }, parts: readonly Uint8Array[], payloadCrc?: number): Buffer {
  const out = Buffer.allocUnsafe(frameHeaderBytes);
  writeFrameHeader(out, frame, parts, payloadCrc);
  return out;
}

/** `payloadCrc`, when given, is the parts' CRC32C as the caller knows it (from checksums it already holds). */
function writeFrameHeader(out: Buffer, frame: { type: number; flags?: number; generation?: bigint; sequence?: bigint }, parts: readonly Uint8Array[], payloadCrc?: number): void {
  const length = byteLength(parts);
  const crc = payloadCrc ?? crc32cParts(parts);
  if (length > framePayloadBytesMax) {
    throw new FerryError('PAYLOAD_TOO_LARGE', `frame payload of ${length} bytes exceeds ${framePayloadBytesMax}`);
  }
  out.writeUInt32BE(frameMagic, 0);
  out.writeUInt16BE(frame.type, 4);
  out.writeUInt16BE(frame.flags ?? 0, 6);
  out.writeUInt32BE(length, 8);
  out.writeUInt32BE(0, 12);
  out.writeBigUInt64BE(frame.generation ?? 0n, 16);
  out.writeBigUInt64BE(frame.sequence ?? 0n, 24);
  out.writeUInt32BE(crc, 32);
  out.writeUInt32BE(crc32c(out.subarray(0, 36)), 36);
}

export function encodeJsonFrame(type: FrameType, body: unknown, header: Partial<FrameHeader> = {}): Buffer {
  return encodeFrame({ ...header, type, payload: Buffer.from(JSON.stringify(body), 'utf8') });
}

export function decodeJsonPayload<T>(frame: Frame): T {
  try {
    return JSON.parse(frame.payload.toString('utf8')) as T;
  } catch {
    throw new FerryError('PROTOCOL_ERROR', `frame of type ${frame.type} carries a payload that is not JSON`);
  }
}

export type DecodedItem =
  | { kind: 'frame'; frame: Frame }
  | { kind: 'corrupt-payload'; header: FrameHeader; payloadBytes: number };

/**
 * Incremental decoder: push bytes as they arrive, take complete frames. Throws a
 * PROTOCOL_ERROR (bad magic, header checksum, oversized length) after which the
 * stream must be closed.
 */
export class FrameDecoder {
  private buffered: Buffer[] = [];
  private bufferedBytes = 0;
  /** A large payload being gathered: the bytes go straight into its buffer as they arrive. */
  private gathering: { header: FrameHeader; crc: number; length: number; buffer: Buffer; filled: number; pooled: boolean } | undefined;

  push(chunk: Buffer): DecodedItem[] {
    const out: DecodedItem[] = [];
    for (;;) {
      if (this.gathering) {
        const g = this.gathering;
        const n = Math.min(chunk.length, g.length - g.filled);
        chunk.copy(g.buffer, g.filled, 0, n);
        g.filled += n;
        chunk = chunk.subarray(n);
        if (g.filled < g.length) break;
        this.gathering = undefined;
        out.push(this.gathered(g.header, g.crc, g.buffer, g.length, g.pooled));
        continue;
      }
      if (chunk.length > 0) {
        this.buffered.push(chunk);
        this.bufferedBytes += chunk.length;
        chunk = chunk.subarray(chunk.length);
      }
      if (this.bufferedBytes < frameHeaderBytes) break;
      const head = this.peek(frameHeaderBytes);
      if (head.readUInt32BE(0) !== frameMagic) throw new FerryError('PROTOCOL_ERROR', 'frame does not start with the RCP frame magic');
      if (head.readUInt32BE(36) !== crc32c(head.subarray(0, 36))) throw new FerryError('CHECKSUM_MISMATCH', 'frame header failed its checksum');
      const length = head.readUInt32BE(8);
      if (length > framePayloadBytesMax) throw new FerryError('PROTOCOL_ERROR', `frame payload of ${length} bytes exceeds ${framePayloadBytesMax}`);
      const header = readHeader(head);
      if (length >= directPayloadBytesMin && this.bufferedBytes < frameHeaderBytes + length) {
        // Not all here yet: the rest is copied once, into the payload's own buffer.
        const pooled = length <= payloadPool.bufferBytes;
        const buffer = pooled ? payloadPool.take() : Buffer.allocUnsafe(length);
        this.gathering = { header, crc: head.readUInt32BE(32), length, buffer, filled: 0, pooled };
        chunk = this.take(this.bufferedBytes).subarray(frameHeaderBytes);
        continue;
      }
      if (this.bufferedBytes < frameHeaderBytes + length) break;
      const whole = this.take(frameHeaderBytes + length);
      const payload = whole.subarray(frameHeaderBytes);
      if (crc32c(payload) !== whole.readUInt32BE(32)) {
        out.push({ kind: 'corrupt-payload', header, payloadBytes: length });
      } else {
        out.push({ kind: 'frame', frame: { ...header, payload, payloadCrc: whole.readUInt32BE(32) } });
      }
    }
    return out;
  }

  get pendingBytes(): number {
    return this.bufferedBytes + (this.gathering?.filled ?? 0);
  }

  private gathered(header: FrameHeader, crc: number, buffer: Buffer, length: number, pooled: boolean): DecodedItem {
    const payload = buffer.subarray(0, length);
    if (crc32c(payload) !== crc) {
      if (pooled) payloadPool.give(buffer);
      return { kind: 'corrupt-payload', header, payloadBytes: length };
    }
    if (!pooled) return { kind: 'frame', frame: { ...header, payload, payloadCrc: crc } };
    return { kind: 'frame', frame: { ...header, payload, payloadCrc: crc, release: payloadPool.releaser(buffer) } };
  }

  private peek(n: number): Buffer {
    if ((this.buffered[0]?.length ?? 0) < n) this.buffered = [Buffer.concat(this.buffered)];
    return (this.buffered[0] as Buffer).subarray(0, n);
  }

  private take(n: number): Buffer {
    const all = this.buffered.length === 1 ? (this.buffered[0] as Buffer) : Buffer.concat(this.buffered);
    const taken = all.subarray(0, n);
    const rest = all.subarray(n);
    this.buffered = rest.length > 0 ? [rest] : [];
    this.bufferedBytes = rest.length;
    return taken;
  }
}

function readHeader(head: Buffer): FrameHeader {
  return {
    type: head.readUInt16BE(4),
    flags: head.readUInt16BE(6),
    generation: head.readBigUInt64BE(16),
    sequence: head.readBigUInt64BE(24),
  };
}
