/**
 * NBD wire constants and encoders (NetworkBlockDevice/nbd `doc/proto.md`). Everything
 * is big-endian. Only fixed newstyle negotiation is spoken; oldstyle is not.
 */

export const nbdMagic = 0x4e42444d41474943n; // "NBDMAGIC"
export const optionMagic = 0x49484156454f5054n; // "IHAVEOPT"
export const optionReplyMagic = 0x3e889045565a9n;
export const requestMagic = 0x25609513;
export const simpleReplyMagic = 0x67446698;
export const structuredReplyMagic = 0x668e33ef;

/** Handshake flags (server → client). */
export const handshakeFlag = { fixedNewstyle: 1 << 0, noZeroes: 1 << 1 } as const;
/** Client flags (client → server); any other bit makes the server close. */
export const clientFlag = { fixedNewstyle: 1 << 0, noZeroes: 1 << 1 } as const;
export const clientFlagsKnown = clientFlag.fixedNewstyle | clientFlag.noZeroes;

/** Transmission flags (per export). */
export const txFlag = {
  hasFlags: 1 << 0,
  readOnly: 1 << 1,
  sendFlush: 1 << 2,
  sendFua: 1 << 3,
  rotational: 1 << 4,
  sendTrim: 1 << 5,
  sendWriteZeroes: 1 << 6,
  sendDf: 1 << 7,
  canMultiConn: 1 << 8,
  sendResize: 1 << 9,
  sendCache: 1 << 10,
  sendFastZero: 1 << 11,
} as const;

export const opt = {
  exportName: 1,
  abort: 2,
  list: 3,
  peekExport: 4,
  startTls: 5,
  info: 6,
  go: 7,
  structuredReply: 8,
  listMetaContext: 9,
  setMetaContext: 10,
  extendedHeaders: 11,
} as const;

const repErr = (n: number): number => (0x80000000 | n) >>> 0;
export const rep = {
  ack: 1,
  server: 2,
  info: 3,
  metaContext: 4,
  errUnsup: repErr(1),
  errPolicy: repErr(2),
  errInvalid: repErr(3),
  errPlatform: repErr(4),
  errTlsReqd: repErr(5),
  errUnknown: repErr(6),
  errShutdown: repErr(7),
  errBlockSizeReqd: repErr(8),
  errTooBig: repErr(9),
} as const;

export const info = { export: 0, name: 1, description: 2, blockSize: 3 } as const;

export const cmd = {
  read: 0,
  write: 1,
  disc: 2,
  flush: 3,
  trim: 4,
  cache: 5,
  writeZeroes: 6,
  blockStatus: 7,
  resize: 8,
} as const;

export const cmdFlag = {
  fua: 1 << 0,
  noHole: 1 << 1,
  df: 1 << 2,
  reqOne: 1 << 3,
  fastZero: 1 << 4,
  payloadLen: 1 << 5,
} as const;

export const replyFlag = { done: 1 << 0 } as const;
export const replyType = {
  none: 0,
  offsetData: 1,
  offsetHole: 2,
  blockStatus: 5,
  error: (1 << 15) | 1,
  errorOffset: (1 << 15) | 2,
} as const;

/** Error values of the transmission phase (proto.md "Error values"). */
export const nbdErrno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;
export type NbdErrno = (typeof nbdErrno)[keyof typeof nbdErrno];

/** `base:allocation` status flags. */
export const stateFlag = { hole: 1 << 0, zero: 1 << 1 } as const;
export const baseAllocation = 'base:allocation';
/** The id the one metadata context ferry offers is given (any non-zero value would do). */
export const baseAllocationContextId = 1;

/** The spec's bound on strings (export names, messages): MUST be no longer than 4096 bytes. */
export const stringBytesMax = 4096;
export const requestHeaderBytes = 28;
export const simpleReplyHeaderBytes = 16;
export const structuredReplyHeaderBytes = 20;

// ---- encoders -----------------------------------------------------------------

/** NBDMAGIC, IHAVEOPT, handshake flags: the first 18 bytes the server sends. */
export function encodeGreeting(): Buffer {
  const b = Buffer.allocUnsafe(18);
  b.writeBigUInt64BE(nbdMagic, 0);
  b.writeBigUInt64BE(optionMagic, 8);
  b.writeUInt16BE(handshakeFlag.fixedNewstyle | handshakeFlag.noZeroes, 16);
  return b;
}

export function encodeOptionReply(option: number, type: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(20 + data.length);
  b.writeBigUInt64BE(optionReplyMagic, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  b.set(data, 20);
  return b;
}

/** An error reply with a message for a human, cut to the spec's string bound. */
export function encodeOptionError(option: number, type: number, message: string): Buffer {
  return encodeOptionReply(option, type, utf8Bounded(message));
}

export function encodeServerReply(option: number, name: string, description: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const d = utf8Bounded(description);
  const data = Buffer.allocUnsafe(4 + n.length + d.length);
  data.writeUInt32BE(n.length, 0);
  data.set(n, 4);
  data.set(d, 4 + n.length);
  return encodeOptionReply(option, rep.server, data);
}

export function encodeInfoExport(option: number, sizeBytes: number, flags: number): Buffer {
  const data = Buffer.allocUnsafe(12);
  data.writeUInt16BE(info.export, 0);
  data.writeBigUInt64BE(BigInt(sizeBytes), 2);
  data.writeUInt16BE(flags, 10);
  return encodeOptionReply(option, rep.info, data);
}

export function encodeInfoString(option: number, type: number, text: string): Buffer {
  const s = utf8Bounded(text);
  const data = Buffer.allocUnsafe(2 + s.length);
  data.writeUInt16BE(type, 0);
  data.set(s, 2);
  return encodeOptionReply(option, rep.info, data);
}

export function encodeInfoBlockSize(option: number, minimum: number, preferred: number, maximum: number): Buffer {
  const data = Buffer.allocUnsafe(14);
  data.writeUInt16BE(info.blockSize, 0);
  data.writeUInt32BE(minimum, 2);
  data.writeUInt32BE(preferred, 6);
  data.writeUInt32BE(maximum, 10);
  return encodeOptionReply(option, rep.info, data);
}

export function encodeMetaContextReply(option: number, id: number, name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const data = Buffer.allocUnsafe(4 + n.length);
  data.writeUInt32BE(id, 0);
  data.set(n, 4);
  return encodeOptionReply(option, rep.metaContext, data);
}

/** The reply to NBD_OPT_EXPORT_NAME: size, flags and (unless NO_ZEROES) 124 zero bytes. */
export function encodeExportNameReply(sizeBytes: number, flags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(noZeroes ? 10 : 134);
  b.writeBigUInt64BE(BigInt(sizeBytes), 0);
  b.writeUInt16BE(flags, 8);
  return b;
}

/** Writes a simple reply header into `b` at `at` (16 bytes). */
export function writeSimpleReply(b: Buffer, at: number, error: number, cookie: bigint): void {
  b.writeUInt32BE(simpleReplyMagic, at);
  b.writeUInt32BE(error, at + 4);
  b.writeBigUInt64BE(cookie, at + 8);
}

/** Writes a structured reply chunk header into `b` at `at` (20 bytes). */
export function writeStructuredHeader(b: Buffer, at: number, flags: number, type: number, cookie: bigint, length: number): void {
  b.writeUInt32BE(structuredReplyMagic, at);
  b.writeUInt16BE(flags, at + 4);
  b.writeUInt16BE(type, at + 6);
  b.writeBigUInt64BE(cookie, at + 8);
  b.writeUInt32BE(length, at + 16);
}

export function encodeSimpleReply(error: number, cookie: bigint): Buffer {
  const b = Buffer.allocUnsafe(simpleReplyHeaderBytes);
  writeSimpleReply(b, 0, error, cookie);
  return b;
}

/** A final NBD_REPLY_TYPE_NONE chunk: success without payload. */
export function encodeStructuredDone(cookie: bigint): Buffer {
  const b = Buffer.allocUnsafe(structuredReplyHeaderBytes);
  writeStructuredHeader(b, 0, replyFlag.done, replyType.none, cookie, 0);
  return b;
}

/** A final NBD_REPLY_TYPE_ERROR chunk carrying the error and a message for a human. */
export function encodeStructuredError(cookie: bigint, error: number, message: string): Buffer {
  const m = utf8Bounded(message, 1024);
  const b = Buffer.allocUnsafe(structuredReplyHeaderBytes + 6 + m.length);
  writeStructuredHeader(b, 0, replyFlag.done, replyType.error, cookie, 6 + m.length);
  b.writeUInt32BE(error, 20);
  b.writeUInt16BE(m.length, 24);
  b.set(m, 26);
  return b;
}

/** A final NBD_REPLY_TYPE_BLOCK_STATUS chunk for one context. */
export function encodeBlockStatus(cookie: bigint, contextId: number, extents: ReadonlyArray<{ length: number; flags: number }>): Buffer {
  const length = 4 + 8 * extents.length;
  const b = Buffer.allocUnsafe(structuredReplyHeaderBytes + length);
  writeStructuredHeader(b, 0, replyFlag.done, replyType.blockStatus, cookie, length);
  b.writeUInt32BE(contextId, 20);
  let at = 24;
  for (const e of extents) {
    b.writeUInt32BE(e.length, at);
    b.writeUInt32BE(e.flags, at + 4);
    at += 8;
  }
  return b;
}

/** UTF-8 bytes of `text`, cut at a character boundary to at most `bytesMax`. */
export function utf8Bounded(text: string, bytesMax = stringBytesMax): Buffer {
  const b = Buffer.from(text, 'utf8');
  if (b.length <= bytesMax) return b;
  let end = bytesMax;
  // Do not cut a multi-byte character in half: back up over continuation bytes.
  while (end > 0 && ((b[end] ?? 0) & 0xc0) === 0x80) end--;
  return b.subarray(0, end);
}
