import { connect, type Socket } from 'node:net';
import { ByteQueue } from '../../src/nbd/byte-queue.js';
import { clientFlag, nbdMagic, opt, optionMagic, optionReplyMagic, rep, simpleReplyMagic, structuredReplyMagic } from '../../src/nbd/protocol.js';
import { clientFlags, goData, metaData, option, request, type RequestFields } from './nbd-wire.js';

export interface StructuredChunk {
  flags: number;
  type: number;
  cookie: bigint;
  payload: Buffer;
}

export interface Reply {
  cookie: bigint;
  /** 0 for success. */
  error: number;
  /** Error message (structured replies) or read data. */
  message?: string;
  data?: Buffer;
  chunks?: StructuredChunk[];
}

/**
 * A bare NBD client that speaks the protocol byte by byte, for tests of what real
 * clients never send: bad magic, oversized requests, writes to read-only exports,
 * disconnects in the middle of a request.
 */
export class RawNbdClient {
  private readonly queue = new ByteQueue();
  private waiter: (() => void) | undefined;
  private ended = false;
  readonly closed: Promise<void>;
  structured = false;
  flags = 0;
  sizeBytes = 0;

  private constructor(readonly socket: Socket) {
    socket.on('data', (d: Buffer) => {
      this.queue.push(d);
      this.waiter?.();
    });
    this.closed = new Promise((resolve) =>
      socket.on('close', () => {
        this.ended = true;
        this.waiter?.();
        resolve();
      }),
    );
    socket.on('error', () => undefined);
  }

  static async connect(port: number, host = '127.0.0.1'): Promise<RawNbdClient> {
    const socket = connect({ port, host, noDelay: true });
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    const c = new RawNbdClient(socket);
    const greeting = await c.read(18);
    if (greeting.readBigUInt64BE(0) !== nbdMagic || greeting.readBigUInt64BE(8) !== optionMagic) throw new Error('not an NBD newstyle server');
    return c;
  }

  /** Connects and goes to transmission on `name` with NBD_OPT_GO. */
  static async open(port: number, name: string, options: { structured?: boolean; baseAllocation?: boolean } = {}): Promise<RawNbdClient> {
    const c = await RawNbdClient.connect(port);
    c.send(clientFlags(clientFlag.fixedNewstyle | clientFlag.noZeroes));
    if (options.structured ?? true) {
      c.send(option(opt.structuredReply));
      const r = await c.optionReply();
      if (r.type !== rep.ack) throw new Error(`structured replies refused: ${r.type}`);
      c.structured = true;
    }
    if (options.baseAllocation) {
      c.send(option(opt.setMetaContext, metaData(name, ['base:allocation'])));
      while ((await c.optionReply()).type !== rep.ack);
    }
    c.send(option(opt.go, goData(name)));
    for (;;) {
      const r = await c.optionReply();
      if (r.type === rep.ack) break;
      if (r.type === rep.info && r.data.readUInt16BE(0) === 0) {
        c.sizeBytes = Number(r.data.readBigUInt64BE(2));
        c.flags = r.data.readUInt16BE(10);
      } else if (r.type !== rep.info) {
        throw new Error(`NBD_OPT_GO failed: ${r.type.toString(16)} ${r.data.toString()}`);
      }
    }
    return c;
  }

  send(b: Buffer): void {
    this.socket.write(b);
  }

  sendRequest(r: RequestFields): void {
    this.send(request(r));
  }

  async read(n: number): Promise<Buffer> {
    for (;;) {
      const b = this.queue.take(n);
      if (b) return Buffer.from(b);
      if (this.ended) throw new Error(`connection closed while waiting for ${n} bytes`);
      await new Promise<void>((resolve) => (this.waiter = resolve));
      this.waiter = undefined;
    }
  }

  async optionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    if (h.readBigUInt64BE(0) !== optionReplyMagic) throw new Error('bad option reply magic');
    const len = h.readUInt32BE(16);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: len > 0 ? await this.read(len) : Buffer.alloc(0) };
  }

  /** Reads one whole reply. `readLength` is the data length of a simple reply to a successful READ. */
  async reply(readLength = 0): Promise<Reply> {
    const magic = (await this.read(4)).readUInt32BE(0);
    if (magic === simpleReplyMagic) {
      const h = await this.read(12);
      const error = h.readUInt32BE(0);
      const cookie = h.readBigUInt64BE(4);
      return { cookie, error, ...(error === 0 && readLength > 0 ? { data: await this.read(readLength) } : {}) };
    }
    if (magic !== structuredReplyMagic) throw new Error(`bad reply magic ${magic.toString(16)}`);
    const chunks: StructuredChunk[] = [];
    for (;;) {
      const h = chunks.length === 0 ? await this.read(16) : (await this.read(20)).subarray(4);
      const chunk: StructuredChunk = { flags: h.readUInt16BE(0), type: h.readUInt16BE(2), cookie: h.readBigUInt64BE(4), payload: Buffer.alloc(0) };
      const len = h.readUInt32BE(12);
      if (len > 0) chunk.payload = await this.read(len);
      chunks.push(chunk);
      if (chunk.flags & 1) break;
    }
    const cookie = chunks[0]?.cookie ?? 0n;
    const err = chunks.find((c) => c.type & 0x8000);
    if (err) {
      const mlen = err.payload.readUInt16BE(4);
      return { cookie, error: err.payload.readUInt32BE(0), message: err.payload.subarray(6, 6 + mlen).toString(), chunks };
    }
    const data = chunks.filter((c) => c.type === 1).map((c) => c.payload.subarray(8));
    return { cookie, error: 0, chunks, ...(data.length > 0 ? { data: Buffer.concat(data) } : {}) };
  }

  close(): void {
    this.socket.destroy();
  }
}
