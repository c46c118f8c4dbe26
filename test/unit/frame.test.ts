import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { FrameDecoder, type DecodedItem, encodeFrame, encodeFrameHeader, frameHeaderBytes, FrameType, framePayloadBytesMax } from '../../src/transport/frame.js';
import { FerryError } from '../../src/lib/errors.js';
import { crc32c, crc32cCombine, crc32cSuffix } from '../../src/lib/checksum.js';

test('frames round-trip through the decoder split at every byte boundary', () => {
  const a = encodeFrame({ type: FrameType.Hello, generation: 7n, sequence: 1n, payload: Buffer.from('hello') });
  const b = encodeFrame({ type: 99, flags: 3, generation: 2n ** 63n, sequence: 2n, payload: Buffer.alloc(1000, 5) });
  const stream = Buffer.concat([a, b]);
  for (let split = 0; split <= stream.length; split++) {
    const d = new FrameDecoder();
    const items = [...d.push(stream.subarray(0, split)), ...d.push(stream.subarray(split))];
    assert.equal(items.length, 2);
    const [x, y] = items;
    assert.ok(x?.kind === 'frame' && y?.kind === 'frame');
    assert.equal(x.frame.payload.toString(), 'hello');
    assert.equal(x.frame.generation, 7n);
    assert.equal(y.frame.type, 99);
    assert.equal(y.frame.flags, 3);
    assert.equal(y.frame.generation, 2n ** 63n);
    assert.deepEqual(y.frame.payload, Buffer.alloc(1000, 5));
  }
});

test('a frame sent as parts is the same bytes as one sent whole', () => {
  fc.assert(
    fc.property(fc.array(fc.uint8Array({ maxLength: 200 }), { maxLength: 6 }), fc.bigInt({ min: 0n, max: 2n ** 63n - 1n }), (parts, generation) => {
      const whole = encodeFrame({ type: 7, generation, sequence: 3n, payload: Buffer.concat(parts) });
      const head = encodeFrameHeader({ type: 7, generation, sequence: 3n }, parts);
      assert.equal(head.length, frameHeaderBytes);
      assert.deepEqual(Buffer.concat([head, ...parts]), whole);
    }),
    { numRuns: 300 },
  );
  const big = [Buffer.alloc(framePayloadBytesMax), Buffer.alloc(1)];
  assert.throws(() => encodeFrameHeader({ type: 7 }, big), (err) => err instanceof FerryError && err.code === 'PAYLOAD_TOO_LARGE');
});

test('a flipped payload bit is reported as corrupt with the header intact; a flipped header bit stops the stream', () => {
  const frame = encodeFrame({ type: 42, generation: 3n, sequence: 9n, payload: Buffer.alloc(64, 1) });
  for (let bit = 0; bit < frame.length * 8; bit++) {
    const copy = Buffer.from(frame);
    copy[bit >>> 3] = (copy[bit >>> 3] as number) ^ (1 << (bit & 7));
    const d = new FrameDecoder();
    if (bit < frameHeaderBytes * 8) {
      // Any header change must be caught (magic, checksum, or an impossible length).
      let caught = false;
      try {
        const items = d.push(copy);
        // A flipped length bit may leave the decoder waiting for more bytes: never a frame.
        assert.equal(items.filter((i) => i.kind === 'frame').length, 0, `bit ${bit}`);
        caught = items.length === 0 || items.every((i) => i.kind === 'corrupt-payload');
      } catch (err) {
        caught = err instanceof FerryError;
      }
      assert.ok(caught, `header bit ${bit}`);
    } else {
      const items = d.push(copy);
      assert.equal(items.length, 1);
      assert.equal(items[0]?.kind, 'corrupt-payload', `payload bit ${bit}`);
    }
  }
});

test('large payloads arriving in socket-sized pieces are gathered whole, checked, and their buffers reused once released', () => {
  const payloads = [3, 4 * 1024 * 1024 + 65_564, 300_000, 5 * 1024 * 1024].map((n, i) => Buffer.alloc(n, i + 1));
  for (const [i, p] of payloads.entries()) if (p.length >= 4) p.writeUInt32LE(i * 7919, p.length - 4);
  const frames = payloads.map((payload, i) => encodeFrame({ type: 50 + i, sequence: BigInt(i), payload }));
  const corrupt = Buffer.from(frames[1] as Buffer);
  corrupt.writeUInt8(corrupt.readUInt8(frameHeaderBytes + 1_000_000) ^ 0x10, frameHeaderBytes + 1_000_000);
  const stream = Buffer.concat([...frames, corrupt, frames[1] as Buffer]);
  const d = new FrameDecoder();
  const items: DecodedItem[] = [];
  // Odd-sized pieces, as a socket hands them over: headers and payloads split anywhere.
  for (let at = 0; at < stream.length; at += 65_519) items.push(...d.push(stream.subarray(at, at + 65_519)));
  assert.equal(d.pendingBytes, 0);
  assert.deepEqual(items.map((i) => i.kind), ['frame', 'frame', 'frame', 'frame', 'corrupt-payload', 'frame']);
  for (let i = 0; i < payloads.length; i++) {
    const item = items[i];
    assert.ok(item?.kind === 'frame');
    assert.equal(item.frame.type, 50 + i);
    assert.ok(item.frame.payload.equals(payloads[i] as Buffer), `payload ${i}`);
  }
  const first = items[1];
  const again = items[5];
  assert.ok(first?.kind === 'frame' && again?.kind === 'frame');
  // Gathered into a pooled buffer (4 MiB piece), so it can be given back; a payload
  // larger than the pool's buffers is not.
  assert.equal(typeof first.frame.release, 'function');
  assert.equal((items[3] as { frame: { release?: unknown } }).frame.release, undefined);
  assert.ok(again.frame.payload.equals(payloads[1] as Buffer));
  assert.notEqual(again.frame.payload.buffer, first.frame.payload.buffer, 'a buffer not released is not reused');
  first.frame.release?.();
  first.frame.release?.();
  const d2 = new FrameDecoder();
  const whole = frames[1] as Buffer;
  const [reused] = [...d2.push(whole.subarray(0, 100_000)), ...d2.push(whole.subarray(100_000))];
  assert.ok(reused?.kind === 'frame');
  assert.equal(reused.frame.payload.buffer, first.frame.payload.buffer, 'a released buffer is reused');
  assert.ok(reused.frame.payload.equals(payloads[1] as Buffer));
});

test('random byte streams never crash the decoder: frames, typed errors or waiting', () => {
  fc.assert(
    fc.property(fc.array(fc.uint8Array({ maxLength: 200 }), { maxLength: 10 }), (chunks) => {
      const d = new FrameDecoder();
      try {
        for (const c of chunks) d.push(Buffer.from(c));
      } catch (err) {
        assert.ok(err instanceof FerryError, String(err));
      }
    }),
    { numRuns: 2000 },
  );
});

test('an oversized length is refused before buffering it', () => {
  const frame = encodeFrame({ type: 1, payload: Buffer.alloc(4) });
  // Rewrite length and fix the header checksum so only the size check can stop it.
  frame.writeUInt32BE(0xffffffff, 8);
  const { crc32c } = awaitImportCrc();
  frame.writeUInt32BE(crc32c(frame.subarray(0, 36)), 36);
  assert.throws(() => new FrameDecoder().push(frame), (err) => err instanceof FerryError && err.code === 'PROTOCOL_ERROR');
});

import * as checksum from '../../src/lib/checksum.js';
function awaitImportCrc(): typeof checksum {
  return checksum;
}

test('CRC32C of a concatenation from its parts agrees with the checksum of the whole', () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 300 }), fc.uint8Array({ maxLength: 5000 }), (a, b) => {
      const whole = crc32c(Buffer.concat([a, b]));
      assert.equal(crc32cCombine(crc32c(a), crc32c(b), b.length), whole);
      assert.equal(crc32cSuffix(whole, crc32c(a), b.length), crc32c(b));
    }),
    { seed: 2026, numRuns: 300 },
  );
  // A chunk-sized suffix, and one past 2^32 bits.
  const a = Buffer.from('prefix');
  const b = Buffer.alloc(1024 * 1024 + 17, 7);
  assert.equal(crc32cCombine(crc32c(a), crc32c(b), b.length), crc32c(Buffer.concat([a, b])));
  const big = 600 * 1024 * 1024;
  assert.equal(crc32cSuffix(crc32cCombine(crc32c(a), 0x1234, big), crc32c(a), big), 0x1234);
});
