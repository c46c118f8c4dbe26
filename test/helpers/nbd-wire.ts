/** Client-side encoders of the NBD wire format, for tests that speak the protocol by hand. */
import { optionMagic, requestMagic } from '../../src/nbd/protocol.js';

export function clientFlags(flags: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(flags >>> 0, 0);
  return b;
}

export function option(code: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(16 + data.length);
  b.writeBigUInt64BE(optionMagic, 0);
  b.writeUInt32BE(code >>> 0, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, 16);
  return b;
}

/** Data of NBD_OPT_INFO / NBD_OPT_GO. */
export function goData(name: string, infos: number[] = []): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((t, i) => b.writeUInt16BE(t, 4 + n.length + 2 + 2 * i));
  return b;
}

/** Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT. */
export function metaData(name: string, queries: string[]): Buffer {
  const parts: Buffer[] = [];
  const n = Buffer.from(name, 'utf8');
  const head = Buffer.alloc(4);
  head.writeUInt32BE(n.length, 0);
  parts.push(head, n);
  const count = Buffer.alloc(4);
  count.writeUInt32BE(queries.length, 0);
  parts.push(count);
  for (const q of queries) {
    const qb = Buffer.from(q, 'utf8');
    const l = Buffer.alloc(4);
    l.writeUInt32BE(qb.length, 0);
    parts.push(l, qb);
  }
  return Buffer.concat(parts);
}

export interface RequestFields {
  flags?: number;
  type: number;
  cookie: bigint;
  offset: number | bigint;
  length: number;
  payload?: Buffer;
  magic?: number;
}

export function request(r: RequestFields): Buffer {
  const payload = r.payload ?? Buffer.alloc(0);
  const b = Buffer.alloc(28 + payload.length);
  b.writeUInt32BE(r.magic ?? requestMagic, 0);
  b.writeUInt16BE(r.flags ?? 0, 4);
  b.writeUInt16BE(r.type, 6);
  b.writeBigUInt64BE(r.cookie, 8);
  b.writeBigUInt64BE(BigInt(r.offset), 16);
  b.writeUInt32BE(r.length >>> 0, 24);
  payload.copy(b, 28);
  return b;
}
