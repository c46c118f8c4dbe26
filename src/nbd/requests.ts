import { ByteQueue } from './byte-queue.js';
import { cmd, cmdFlag, nbdErrno, requestHeaderBytes, requestMagic, type NbdErrno } from './protocol.js';

export interface NbdRequest {
  flags: number;
  type: number;
  cookie: bigint;
  /** Exact up to 2^53; larger offsets are past the end of any volume and are refused as such. */
  offset: number;
  length: number;
  /** The WRITE payload, complete, as the consecutive network chunks it arrived in (not copied). */
  payload?: Buffer[];
}

export type ParsedRequest =
  | { kind: 'request'; request: NbdRequest }
  /** A WRITE longer than the payload limit; its payload has been read and dropped. */
  | { kind: 'oversized'; request: NbdRequest }
  /** The stream is not NBD requests any more; the only safe answer is a hard disconnect. */
  | { kind: 'bad-magic'; magic: number };

/**
 * Splits the transmission-phase byte stream into requests. A WRITE is returned only
 * when its whole payload has arrived, so a client that disconnects mid-request never
 * causes a partial write. Pure: no sockets, never throws on input.
 */
export class RequestParser {
  private skipping: NbdRequest | undefined;
  private skipLeft = 0;
  private header: NbdRequest | undefined;

  constructor(private readonly payloadBytesMax: number) {}

  /** Bytes the parser is waiting for before it can return the request it has started. */
  get awaitingBytes(): number {
    return this.skipping ? this.skipLeft : (this.header?.length ?? 0);
  }

  next(queue: ByteQueue): ParsedRequest | undefined {
    if (this.skipping) {
      this.skipLeft -= queue.skip(this.skipLeft);
      if (this.skipLeft > 0) return undefined;
      const request = this.skipping;
      this.skipping = undefined;
      return { kind: 'oversized', request };
    }
    let request = this.header;
    if (!request) {
      const h = queue.peek(requestHeaderBytes);
      if (!h) return undefined;
      const magic = h.readUInt32BE(0);
      if (magic !== requestMagic) return { kind: 'bad-magic', magic };
      const offset = h.readBigUInt64BE(16);
      request = {
        flags: h.readUInt16BE(4),
        type: h.readUInt16BE(6),
        cookie: h.readBigUInt64BE(8),
        offset: offset <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(offset) : Number.MAX_SAFE_INTEGER + 1,
        length: h.readUInt32BE(24),
      };
      queue.skip(requestHeaderBytes);
      // Only WRITE carries a payload (no extended headers are negotiated).
      if (request.type !== cmd.write) return { kind: 'request', request };
      if (request.length > this.payloadBytesMax) {
        this.skipping = request;
        this.skipLeft = request.length;
        return this.next(queue);
      }
      this.header = request;
    }
    const payload = queue.takeChunks(request.length);
    if (!payload) return undefined;
    this.header = undefined;
    request.payload = payload;
    return { kind: 'request', request };
  }
}

export interface RequestContext {
  sizeBytes: number;
  readOnly: boolean;
  structuredReplies: boolean;
  baseAllocation: boolean;
  payloadBytesMax: number;
}

export interface RequestError {
  errno: NbdErrno;
  message: string;
}

const flagsAllowed: Record<number, number> = {
  [cmd.read]: cmdFlag.fua | cmdFlag.df,
  [cmd.write]: cmdFlag.fua,
  [cmd.disc]: cmdFlag.fua,
  [cmd.flush]: cmdFlag.fua,
  [cmd.trim]: cmdFlag.fua,
  [cmd.cache]: cmdFlag.fua,
  [cmd.writeZeroes]: cmdFlag.fua | cmdFlag.noHole | cmdFlag.fastZero,
  [cmd.blockStatus]: cmdFlag.fua | cmdFlag.reqOne,
};

const commandNames: Record<number, string> = {
  [cmd.read]: 'READ',
  [cmd.write]: 'WRITE',
  [cmd.disc]: 'DISC',
  [cmd.flush]: 'FLUSH',
  [cmd.trim]: 'TRIM',
  [cmd.cache]: 'CACHE',
  [cmd.writeZeroes]: 'WRITE_ZEROES',
  [cmd.blockStatus]: 'BLOCK_STATUS',
};

export function commandName(type: number): string {
  return commandNames[type] ?? `command ${type}`;
}

/**
 * The error proto.md prescribes for a request, or undefined if it may run. EINVAL for
 * unknown commands and flags, EPERM for changes to a read-only export, ENOSPC for
 * changes past the end, EINVAL for other ranges past the end.
 */
export function checkRequest(r: NbdRequest, ctx: RequestContext): RequestError | undefined {
  const allowed = flagsAllowed[r.type];
  const name = commandName(r.type);
  if (allowed === undefined) return { errno: nbdErrno.EINVAL, message: `unknown or unsupported command ${r.type}` };
  if ((r.flags & ~allowed) !== 0) return { errno: nbdErrno.EINVAL, message: `flags 0x${r.flags.toString(16)} are not valid for ${name}` };
  if ((r.flags & cmdFlag.df) !== 0 && !ctx.structuredReplies) return { errno: nbdErrno.EINVAL, message: 'NBD_CMD_FLAG_DF needs structured replies' };
  const end = r.offset + r.length;
  const pastEnd = end > ctx.sizeBytes;
  const range = `offset ${r.offset} length ${r.length} is past the end of the export (${ctx.sizeBytes} bytes)`;
  switch (r.type) {
    case cmd.read:
      if (r.length > ctx.payloadBytesMax) return { errno: nbdErrno.EINVAL, message: `READ of ${r.length} bytes exceeds the ${ctx.payloadBytesMax}-byte maximum` };
      if (pastEnd) return { errno: nbdErrno.EINVAL, message: `READ ${range}` };
      return undefined;
    case cmd.write:
    case cmd.trim:
    case cmd.writeZeroes:
      if (ctx.readOnly) return { errno: nbdErrno.EPERM, message: `${name} refused: the export is read-only` };
      if (pastEnd) return { errno: nbdErrno.ENOSPC, message: `${name} ${range}` };
      return undefined;
    case cmd.flush:
    case cmd.disc:
      if (r.offset !== 0 || r.length !== 0) return { errno: nbdErrno.EINVAL, message: `${name} must have offset and length 0` };
      return undefined;
    case cmd.cache:
      if (pastEnd) return { errno: nbdErrno.EINVAL, message: `CACHE ${range}` };
      return undefined;
    case cmd.blockStatus:
      if (!ctx.baseAllocation) return { errno: nbdErrno.EINVAL, message: 'BLOCK_STATUS needs the base:allocation metadata context' };
      if (r.length === 0) return { errno: nbdErrno.EINVAL, message: 'BLOCK_STATUS of zero bytes' };
      if (pastEnd) return { errno: nbdErrno.EINVAL, message: `BLOCK_STATUS ${range}` };
      return undefined;
    default:
      return { errno: nbdErrno.EINVAL, message: `unsupported command ${r.type}` };
  }
}
