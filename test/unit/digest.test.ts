import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { digestVolume } from '../../src/api/server.js';
import { isFerryError } from '../../src/lib/errors.js';
import { Sha256InWorker } from '../../src/lib/sha256.js';
import type { Extent } from '../../src/storage/volume.js';

const MiB = 1024 * 1024;
const bs = 8192;

/** An in-memory volume image whose map says which blocks hold data. */
function fakeVolume(image: Buffer, allocated: (block: number) => boolean): { sizeBytes: number; blockStatus(offset: number, length: number): Extent[]; readInto(buf: Uint8Array, offset: number): Promise<void>; reads: number } {
  return {
    sizeBytes: image.length,
    reads: 0,
    blockStatus(offset: number, length: number): Extent[] {
      const out: Extent[] = [];
      for (let at = offset; at < offset + length; at += bs) {
        const a = allocated(at / bs);
        const last = out.at(-1);
        if (last && last.allocated === a) last.length += bs;
        else out.push({ offset: at, length: bs, allocated: a });
      }
      return out;
    },
    async readInto(buf: Uint8Array, offset: number): Promise<void> {
      this.reads++;
      image.copy(buf, 0, offset, offset + buf.length);
    },
  };
}

test('digestVolume: the SHA-256 of the whole image, holes hashed as zeros without being read, data spanning the pieces it is scanned in', async () => {
  const size = 160 * MiB + 5 * bs;
  const image = Buffer.alloc(size);
  // Data at the start, across the 64 MiB scan boundary, in a long run of several reads, and at the very end.
  const runs: [number, number][] = [[0, 3], [64 * MiB / bs - 2, 5], [100 * MiB / bs, 9 * MiB / bs + 1], [size / bs - 1, 1]];
  for (const [first, count] of runs) randomBytes(count * bs).copy(image, first * bs);
  const inRun = (block: number): boolean => runs.some(([first, count]) => block >= first && block < first + count);
  const volume = fakeVolume(image, inRun);
  let progress = 0;
  const digest = await digestVolume(volume, { onProgress: (bytes) => (progress = bytes) });
  assert.equal(digest, createHash('sha256').update(image).digest('hex'));
  assert.equal(progress, size);
  // Reads of at most 4 MiB, of the data runs only (the run across the scan boundary in two).
  assert.equal(volume.reads, 1 + 2 + Math.ceil((9 * MiB + bs) / (4 * MiB)) + 1);
});

test('digestVolume: a cancelled digest stops with UNAVAILABLE', async () => {
  const volume = { sizeBytes: 1024 ** 4, blockStatus: (offset: number, length: number): Extent[] => [{ offset, length, allocated: false }], readInto: async () => undefined };
  const controller = new AbortController();
  const digest = digestVolume(volume, { signal: controller.signal });
  setTimeout(() => controller.abort(), 50);
  await assert.rejects(digest, (err) => isFerryError(err, 'UNAVAILABLE'));
});

test('Sha256InWorker: cancelled while its last pieces are being hashed, the digest fails instead of waiting for good', async () => {
  const controller = new AbortController();
  const hasher = new Sha256InWorker(undefined, controller.signal);
  // Pieces still in flight when the digest is asked for: their acknowledgements come after it.
  await hasher.update(Buffer.allocUnsafeSlow(4 * MiB));
  await hasher.update(Buffer.allocUnsafeSlow(4 * MiB));
  await hasher.zeros(1024 ** 4);
  const digest = hasher.digest();
  setTimeout(() => controller.abort(), 100);
  await assert.rejects(digest, (err) => isFerryError(err, 'UNAVAILABLE'));
});
