import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { ByteQueue } from '../../src/nbd/byte-queue.js';
import { ExportRegistry, exportRefused, type ExportExtent, type NbdExport } from '../../src/nbd/export.js';
import { Negotiation, optionDataBytesMax, type NegotiationStep } from '../../src/nbd/negotiation.js';
import { clientFlag, cmd, cmdFlag, info, nbdErrno, opt, optionReplyMagic, rep, simpleReplyMagic, structuredReplyMagic, txFlag } from '../../src/nbd/protocol.js';
import { RequestParser, checkRequest, type RequestContext } from '../../src/nbd/requests.js';
import { NbdSession, defaultSessionLimits, type NbdTransport } from '../../src/nbd/session.js';
import { clientFlags, goData, metaData, option, request } from '../helpers/nbd-wire.js';

const exportBytes = 1 << 20;

/** An in-memory export that records every change it is asked to make. */
class MemExport implements NbdExport {
  readonly description = 'memory';
  readonly blockSizes = { minimumBytes: 1, preferredBytes: 4096, maximumBytes: 1 << 20 };
  readonly data: Buffer;
  readonly writes: { offset: number; data: Buffer }[] = [];
  constructor(
    readonly name: string,
    readonly sizeBytes = exportBytes,
    readonly readOnly = false,
  ) {
    this.data = Buffer.alloc(sizeBytes);
  }
  async readInto(buf: Uint8Array, offset: number): Promise<void> {
    buf.set(this.data.subarray(offset, offset + buf.length));
  }
  async write(offset: number, pieces: Uint8Array | readonly Uint8Array[]): Promise<void> {
    const data = Buffer.concat(pieces instanceof Uint8Array ? [pieces] : pieces);
    assert.ok(offset + data.length <= this.sizeBytes, 'write inside the export');
    this.writes.push({ offset, data });
    this.data.set(data, offset);
  }
  async writeZeroes(offset: number, length: number): Promise<void> {
    this.data.fill(0, offset, offset + length);
  }
  async trim(offset: number, length: number): Promise<void> {
    this.data.fill(0, offset, offset + length);
  }
  async flush(): Promise<void> {}
  blockStatus(offset: number, length: number): ExportExtent[] {
    return [{ offset, length, allocated: true }];
  }
}

function provider(): ExportRegistry {
  const r = new ExportRegistry();
  const disks = new Map([
    ['disk', () => new MemExport('disk')],
    ['ro', () => new MemExport('ro', exportBytes, true)],
  ]);
  r.add({
    list: () => [{ name: 'disk', description: 'rw' }, { name: 'ro', description: 'read-only' }],
    open: (name) => {
      if (name === 'rebuilding') throw exportRefused(name, 'the volume is being rebuilt');
      return disks.get(name)?.();
    },
  });
  return r;
}

interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

function parseOptionReplies(buffers: Buffer[]): OptionReply[] {
  const all = Buffer.concat(buffers);
  const out: OptionReply[] = [];
  for (let at = 0; at < all.length; ) {
    assert.equal(all.readBigUInt64BE(at), optionReplyMagic, 'option reply magic');
    const len = all.readUInt32BE(at + 16);
    out.push({ option: all.readUInt32BE(at + 8), type: all.readUInt32BE(at + 12), data: all.subarray(at + 20, at + 20 + len) });
    at += 20 + len;
  }
  return out;
}

/** Runs the negotiation over `input` until it needs more bytes, closes or starts transmission. */
function negotiate(input: Buffer, chunkBytes = input.length || 1): { steps: NegotiationStep[]; sent: Buffer[] } {
  const n = new Negotiation(provider());
  const q = new ByteQueue();
  const steps: NegotiationStep[] = [];
  const sent: Buffer[] = [];
  for (let at = 0; at < input.length && !n.finished; at += chunkBytes) {
    q.push(input.subarray(at, at + chunkBytes));
    for (let s = n.step(q); s; s = n.step(q)) {
      steps.push(s);
      sent.push(...s.data);
      if (s.kind !== 'continue') break;
    }
  }
  return { steps, sent };
}

test('negotiation: GO with structured replies and base:allocation, answered as the spec says', () => {
  const input = Buffer.concat([
    clientFlags(clientFlag.fixedNewstyle | clientFlag.noZeroes),
    option(opt.structuredReply),
    option(opt.setMetaContext, metaData('disk', ['base:allocation', 'qemu:dirty-bitmap:x'])),
    option(opt.go, goData('disk', [info.name, info.description, info.blockSize])),
  ]);
  for (const chunk of [input.length, 1, 7]) {
    const { steps, sent } = negotiate(input, chunk);
    const last = steps[steps.length - 1];
    assert.equal(last?.kind, 'transmission');
    if (last?.kind !== 'transmission') return;
    assert.equal(last.setup.structuredReplies, true);
    assert.equal(last.setup.baseAllocation, true);
    const flags = last.setup.flags;
    for (const f of [txFlag.hasFlags, txFlag.sendFlush, txFlag.sendFua, txFlag.sendTrim, txFlag.sendWriteZeroes, txFlag.sendDf, txFlag.canMultiConn, txFlag.sendCache, txFlag.sendFastZero]) {
      assert.ok((flags & f) !== 0, `flag ${f} set`);
    }
    assert.equal(flags & txFlag.readOnly, 0);
    const replies = parseOptionReplies(sent);
    assert.deepEqual(
      replies.map((r) => [r.option, r.type]),
      [
        [opt.structuredReply, rep.ack],
        [opt.setMetaContext, rep.metaContext],
        [opt.setMetaContext, rep.ack],
        [opt.go, rep.info],
        [opt.go, rep.info],
        [opt.go, rep.info],
        [opt.go, rep.info],
        [opt.go, rep.ack],
      ],
    );
    const exportInfo = replies[3]?.data as Buffer;
    assert.equal(exportInfo.readUInt16BE(0), info.export);
    assert.equal(Number(exportInfo.readBigUInt64BE(2)), exportBytes);
    assert.equal(exportInfo.readUInt16BE(10), flags);
    assert.equal(replies[4]?.data.subarray(2).toString(), 'disk');
    const bs = replies[6]?.data as Buffer;
    assert.deepEqual([bs.readUInt16BE(0), bs.readUInt32BE(2), bs.readUInt32BE(6), bs.readUInt32BE(10)], [info.blockSize, 1, 4096, 1 << 20]);
  }
});

test('negotiation: EXPORT_NAME, LIST, unknown and unsupported options, bad lengths, refused and unknown exports', () => {
  // EXPORT_NAME with and without NO_ZEROES.
  for (const [flags, bytes] of [
    [clientFlag.fixedNewstyle | clientFlag.noZeroes, 10],
    [clientFlag.fixedNewstyle, 134],
  ] as const) {
    const { steps } = negotiate(Buffer.concat([clientFlags(flags), option(opt.exportName, Buffer.from('ro'))]));
    const last = steps[steps.length - 1];
    assert.equal(last?.kind, 'transmission');
    assert.equal(last?.data[0]?.length, bytes);
    assert.ok(((last?.data[0] as Buffer).readUInt16BE(8) & txFlag.readOnly) !== 0, 'read-only export flagged');
    assert.equal((last?.data[0] as Buffer).readUInt16BE(8) & txFlag.sendTrim, 0, 'no TRIM on a read-only export');
  }
  // EXPORT_NAME of an unknown export can only be answered by closing.
  assert.equal(negotiate(Buffer.concat([clientFlags(1), option(opt.exportName, Buffer.from('nope'))])).steps.at(-1)?.kind, 'close');
  // Unknown client flags: close.
  assert.equal(negotiate(clientFlags(0x80)).steps.at(-1)?.kind, 'close');
  // Bad option magic: close.
  const badMagic = option(opt.list);
  badMagic.writeUInt8(0x48, 0);
  assert.equal(negotiate(Buffer.concat([clientFlags(1), badMagic])).steps.at(-1)?.kind, 'close');

  const { sent, steps } = negotiate(
    Buffer.concat([
      clientFlags(clientFlag.fixedNewstyle),
      option(opt.list),
      option(opt.list, Buffer.from('x')),
      option(opt.startTls),
      option(opt.extendedHeaders),
      option(12345),
      option(opt.listMetaContext, metaData('disk', [])), // before STRUCTURED_REPLY: invalid
      option(opt.info, goData('nope')),
      option(opt.info, goData('rebuilding')),
      option(opt.info, Buffer.from([0, 0, 0, 9, 1])),
      option(opt.go, Buffer.concat([goData('disk'), Buffer.from([0])])),
      option(opt.structuredReply),
      option(opt.listMetaContext, metaData('disk', [])),
      option(opt.listMetaContext, metaData('disk', ['qemu:'])),
      option(opt.info, Buffer.alloc(optionDataBytesMax + 1)),
      option(opt.abort),
    ]),
  );
  assert.equal(steps.at(-1)?.kind, 'close');
  const replies = parseOptionReplies(sent);
  assert.deepEqual(
    replies.map((r) => [r.option, r.type]),
    [
      [opt.list, rep.server],
      [opt.list, rep.server],
      [opt.list, rep.ack],
      [opt.list, rep.errInvalid],
      [opt.startTls, rep.errPolicy],
      [opt.extendedHeaders, rep.errUnsup],
      [12345, rep.errUnsup],
      [opt.listMetaContext, rep.errInvalid],
      [opt.info, rep.errUnknown],
      [opt.info, rep.errPolicy],
      [opt.info, rep.errInvalid],
      [opt.go, rep.errInvalid],
      [opt.structuredReply, rep.ack],
      [opt.listMetaContext, rep.metaContext],
      [opt.listMetaContext, rep.ack],
      [opt.listMetaContext, rep.ack],
      [opt.info, rep.errTooBig],
      [opt.abort, rep.ack],
    ],
  );
  assert.match(replies[9]?.data.toString() ?? '', /export "rebuilding" is refused: the volume is being rebuilt/);
  assert.equal(replies[0]?.data.readUInt32BE(0), 4);
  assert.equal(replies[0]?.data.subarray(4, 8).toString(), 'disk');
});

/** A client script: flags then options, most of them well-formed, some arbitrary. */
const optionArb = fc.oneof(
  fc.constantFrom(
    option(opt.structuredReply),
    option(opt.list),
    option(opt.startTls),
    option(opt.extendedHeaders),
    option(opt.info, goData('disk', [0, 1, 2, 3])),
    option(opt.go, goData('disk')),
    option(opt.go, goData('ro', [3])),
    option(opt.exportName, Buffer.from('disk')),
    option(opt.setMetaContext, metaData('disk', ['base:allocation'])),
    option(opt.listMetaContext, metaData('ro', ['base:'])),
    option(opt.abort),
  ),
  fc.record({ code: fc.nat({ max: 20 }), data: fc.uint8Array({ maxLength: 64 }) }).map((o) => option(o.code, Buffer.from(o.data))),
  fc.uint8Array({ maxLength: 40 }).map((b) => Buffer.from(b)),
);
const scriptArb = fc
  .tuple(fc.constantFrom(0, 1, 2, 3, 4, 0x10), fc.array(optionArb, { maxLength: 12 }))
  .map(([flags, options]) => Buffer.concat([clientFlags(flags), ...options]));

function mutate(input: Buffer, flips: number[], cut: number | undefined): Buffer {
  const b = Buffer.from(input);
  for (const f of flips) if (b.length > 0) b[f % b.length] = (b[f % b.length] as number) ^ (1 << (f % 8));
  return cut === undefined ? b : b.subarray(0, cut % (b.length + 1));
}

test('fuzz: option haggling over random, bit-flipped and truncated streams never throws and answers in frames', () => {
  fc.assert(
    fc.property(scriptArb, fc.array(fc.nat(), { maxLength: 4 }), fc.option(fc.nat()), fc.integer({ min: 1, max: 64 }), (script, flips, cut, chunk) => {
      const input = mutate(script, flips, cut ?? undefined);
      const { steps, sent } = negotiate(input, chunk);
      const last = steps.at(-1);
      const terminal = steps.filter((s) => s.kind !== 'continue');
      assert.ok(terminal.length <= 1, 'at most one ending');
      if (last?.kind === 'transmission' && last.data[0]?.readBigUInt64BE(0) !== optionReplyMagic) {
        // EXPORT_NAME: everything before the final reply is option replies.
        parseOptionReplies(sent.slice(0, -1));
      } else {
        parseOptionReplies(sent);
      }
    }),
    { numRuns: 2000 },
  );
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 300 }), fc.integer({ min: 1, max: 32 }), (bytes, chunk) => {
      negotiate(Buffer.from(bytes), chunk);
    }),
    { numRuns: 2000 },
  );
});

test('request parser: the same requests whatever the chunking; oversized WRITE payloads are skipped; bad magic is reported', () => {
  const payload = Buffer.alloc(5000, 7);
  const stream = Buffer.concat([
    request({ type: cmd.read, cookie: 1n, offset: 10, length: 100 }),
    request({ type: cmd.write, cookie: 2n, offset: 3, length: payload.length, payload }),
    request({ type: cmd.write, cookie: 3n, offset: 0, length: 9000, payload: Buffer.alloc(9000, 1) }),
    request({ type: cmd.flush, cookie: 4n, offset: 0, length: 0 }),
    request({ type: cmd.read, cookie: 5n, offset: 2n ** 64n - 1n, length: 1 }),
    request({ type: cmd.flush, cookie: 6n, offset: 0, length: 0, magic: 0x12345678 }),
  ]);
  for (const chunk of [1, 3, 28, 4096, stream.length]) {
    const parser = new RequestParser(8192);
    const q = new ByteQueue();
    const got: string[] = [];
    for (let at = 0; at < stream.length; at += chunk) {
      q.push(stream.subarray(at, at + chunk));
      for (let p = parser.next(q); p; p = parser.next(q)) {
        if (p.kind === 'bad-magic') {
          got.push(`bad ${p.magic.toString(16)}`);
          break;
        }
        got.push(`${p.kind} ${p.request.cookie} ${p.request.type} ${p.request.offset} ${p.request.length} ${p.request.payload ? Buffer.concat(p.request.payload).equals(payload) : '-'}`);
      }
      if (got.at(-1)?.startsWith('bad')) break;
    }
    assert.deepEqual(got, [
      'request 1 0 10 100 -',
      'request 2 1 3 5000 true',
      'oversized 3 1 0 9000 -',
      'request 4 3 0 0 -',
      `request 5 0 ${Number.MAX_SAFE_INTEGER + 1} 1 -`,
      'bad 12345678',
    ]);
  }
});

test('request checks: the errors proto.md prescribes', () => {
  const ctx: RequestContext = { sizeBytes: 1 << 20, readOnly: false, structuredReplies: true, baseAllocation: true, payloadBytesMax: 1 << 16 };
  const ro = { ...ctx, readOnly: true };
  const simple = { ...ctx, structuredReplies: false, baseAllocation: false };
  const r = (type: number, offset: number, length: number, flags = 0) => ({ type, offset, length, flags, cookie: 1n });
  const cases: [ReturnType<typeof r>, RequestContext, number | undefined][] = [
    [r(cmd.read, 0, 4096), ctx, undefined],
    [r(cmd.read, (1 << 20) - 1, 2), ctx, nbdErrno.EINVAL],
    [r(cmd.read, 0, (1 << 16) + 1), ctx, nbdErrno.EINVAL],
    [r(cmd.read, 0, 1, cmdFlag.df), ctx, undefined],
    [r(cmd.read, 0, 1, cmdFlag.df), simple, nbdErrno.EINVAL],
    [r(cmd.read, 0, 1, cmdFlag.noHole), ctx, nbdErrno.EINVAL],
    [r(cmd.read, 0, 1, 1 << 15), ctx, nbdErrno.EINVAL],
    [r(cmd.write, (1 << 20) - 10, 11), ctx, nbdErrno.ENOSPC],
    [r(cmd.write, 0, 1), ro, nbdErrno.EPERM],
    [r(cmd.trim, 0, 1), ro, nbdErrno.EPERM],
    [r(cmd.writeZeroes, 0, 1, cmdFlag.noHole | cmdFlag.fastZero | cmdFlag.fua), ctx, undefined],
    [r(cmd.writeZeroes, 0, 1), ro, nbdErrno.EPERM],
    [r(cmd.trim, 0, (1 << 20) + 1), ctx, nbdErrno.ENOSPC],
    [r(cmd.trim, 0, 1 << 20, cmdFlag.fua), ctx, undefined],
    [r(cmd.flush, 0, 0), ro, undefined],
    [r(cmd.flush, 0, 1), ctx, nbdErrno.EINVAL],
    [r(cmd.cache, 0, 1 << 20), ctx, undefined],
    [r(cmd.blockStatus, 0, 1 << 20, cmdFlag.reqOne), ctx, undefined],
    [r(cmd.blockStatus, 0, 1), simple, nbdErrno.EINVAL],
    [r(cmd.blockStatus, 0, 0), ctx, nbdErrno.EINVAL],
    [r(cmd.blockStatus, 1 << 20, 1), ctx, nbdErrno.EINVAL],
    [r(cmd.resize, 0, 0), ctx, nbdErrno.EINVAL],
    [r(99, 0, 0), ctx, nbdErrno.EINVAL],
  ];
  for (const [req, c, errno] of cases) assert.equal(checkRequest(req, c)?.errno, errno, JSON.stringify({ ...req, cookie: 1 }));
});

/** A transport that records what the session sends and closes like a socket would. */
class MemTransport implements NbdTransport {
  out: Buffer[] = [];
  session!: NbdSession;
  ended = false;
  write(chunks: Buffer[]): boolean {
    this.out.push(...chunks);
    return true;
  }
  end(): void {
    if (this.ended) return;
    this.ended = true;
    setImmediate(() => this.session.onClose());
  }
  destroy(): void {
    this.end();
  }
  pause(): void {}
  resume(): void {}
}

const handshake = Buffer.concat([
  clientFlags(clientFlag.fixedNewstyle | clientFlag.noZeroes),
  option(opt.structuredReply),
  option(opt.setMetaContext, metaData('disk', ['base:allocation'])),
  option(opt.go, goData('disk')),
]);

async function runSession(stream: Buffer, chunk: number): Promise<{ exp: MemExport; out: Buffer }> {
  let exp: MemExport | undefined;
  const reg = new ExportRegistry();
  reg.add({ list: () => [], open: (name) => (name === 'disk' ? (exp = new MemExport('disk', 1 << 16)) : undefined) });
  const t = new MemTransport();
  const s = new NbdSession(reg, t, { debug() {}, warn() {} }, { ...defaultSessionLimits, payloadBytesMax: 4096, requestsInFlightMax: 4 });
  t.session = s;
  s.start();
  for (let at = 0; at < stream.length && !t.ended; at += chunk) {
    s.onData(Buffer.from(stream.subarray(at, at + chunk)));
    if (at % (chunk * 4) === 0) await new Promise((r) => setImmediate(r));
  }
  // Like a real client, wait for the answers before hanging up: the server answers what
  // it has read, and drops what is still queued when the client goes away.
  for (let i = 0; i < 50 && !t.ended; i++) await new Promise((r) => setImmediate(r));
  s.onEnd();
  await s.done;
  return { exp: exp ?? new MemExport('none', 1 << 16), out: Buffer.concat(t.out) };
}

/** Checks that everything after the greeting and the handshake's 6 option replies is a sequence of well-formed reply frames. */
function checkReplyFrames(out: Buffer, handshakeReplies: number): bigint[] {
  let at = 18;
  for (let i = 0; i < handshakeReplies && at < out.length; i++) at += 20 + out.readUInt32BE(at + 16);
  const cookies: bigint[] = [];
  while (at < out.length) {
    const magic = out.readUInt32BE(at);
    if (magic === simpleReplyMagic) {
      cookies.push(out.readBigUInt64BE(at + 8));
      at += 16;
    } else {
      assert.equal(magic, structuredReplyMagic, `reply magic at ${at}`);
      cookies.push(out.readBigUInt64BE(at + 8));
      at += 20 + out.readUInt32BE(at + 16);
    }
  }
  assert.equal(at, out.length, 'no partial frame');
  return cookies;
}

const requestArb = fc.oneof(
  fc.record({ offset: fc.nat({ max: (1 << 16) - 1 }), length: fc.integer({ min: 1, max: 3000 }), fill: fc.nat({ max: 255 }) }).map(({ offset, length, fill }) => ({
    type: cmd.write,
    offset,
    length,
    payload: Buffer.alloc(length, fill),
  })),
  fc.record({ type: fc.constantFrom(cmd.read, cmd.flush, cmd.trim, cmd.writeZeroes, cmd.cache, cmd.blockStatus, 9), offset: fc.nat({ max: 1 << 16 }), length: fc.nat({ max: 5000 }), flags: fc.constantFrom(0, 1, 2, 8, 16, 64) }),
);

test('fuzz: a session never applies a partial or corrupted write, whatever the stream, and always answers in whole frames', async () => {
  await fc.assert(
    fc.asyncProperty(fc.array(requestArb, { maxLength: 12 }), fc.option(fc.nat()), fc.integer({ min: 1, max: 700 }), async (reqs, cut, chunk) => {
      const encoded = reqs.map((r, i) => request({ ...r, cookie: BigInt(i + 1) }));
      const body = Buffer.concat(encoded);
      const truncated = cut === null ? body : body.subarray(0, cut % (body.length + 1));
      const { exp, out } = await runSession(Buffer.concat([handshake, truncated]), chunk);
      // Expected: the writes whose request and payload arrived whole, and only those.
      const complete = new Set<number>();
      let at = 0;
      encoded.forEach((e, i) => {
        at += e.length;
        if (at <= truncated.length) complete.add(i);
      });
      const expectedWrites = reqs
        .map((r, i) => ({ r, i }))
        .filter(({ r, i }) => r.type === cmd.write && complete.has(i) && r.offset + r.length <= 1 << 16)
        .map(({ r }) => ({ offset: r.offset, data: (r as { payload: Buffer }).payload }));
      assert.deepEqual(
        exp.writes.map((w) => [w.offset, w.data.length, w.data[0]]),
        expectedWrites.map((w) => [w.offset, w.data.length, w.data[0]]),
      );
      for (const [i, w] of exp.writes.entries()) assert.ok(w.data.equals(expectedWrites[i]?.data as Buffer));
      const cookies = checkReplyFrames(out, 6);
      const answered = new Set(cookies.map(Number));
      for (const i of complete) assert.ok(answered.has(i + 1), `request ${i + 1} answered`);
    }),
    { numRuns: 300 },
  );
  await fc.assert(
    fc.asyncProperty(fc.array(requestArb, { maxLength: 8 }), fc.array(fc.nat(), { minLength: 1, maxLength: 6 }), fc.integer({ min: 1, max: 500 }), async (reqs, flips, chunk) => {
      const body = mutate(Buffer.concat(reqs.map((r, i) => request({ ...r, cookie: BigInt(i + 1) }))), flips, undefined);
      const { exp, out } = await runSession(Buffer.concat([handshake, body]), chunk);
      for (const w of exp.writes) assert.ok(w.offset + w.data.length <= 1 << 16);
      checkReplyFrames(out, 6);
    }),
    { numRuns: 300 },
  );
});

test('buffer pool: reuses released buffers by power-of-two size, keeps at most its bound idle', async () => {
  const { BufferPool } = await import('../../src/nbd/buffer-pool.js');
  const pool = new BufferPool(3 * 1024 * 1024);
  const a = pool.get(1024 * 1024 + 28);
  assert.equal(a.length, 2 * 1024 * 1024);
  pool.release(a);
  assert.equal(pool.get(1_500_000), a, 'reused');
  const b = pool.get(2 * 1024 * 1024);
  const c = pool.get(2 * 1024 * 1024);
  pool.release(b);
  pool.release(c); // over the bound: dropped
  assert.equal(pool.get(2 * 1024 * 1024), b);
  assert.notEqual(pool.get(2 * 1024 * 1024), c);
  assert.equal(pool.get(100).length, 100, 'small buffers are not pooled');
});
