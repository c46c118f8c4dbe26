import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Volume } from '../../src/storage/volume.js';

test('Volume.write of consecutive pieces writes them as one range, and close waits for reads in flight', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-volio-'));
  try {
    const v = await Volume.create('v', join(dir, 'v.img'), join(dir, 'v.alloc'), 4 * 1024 * 1024, 8192);
    const data = randomBytes(1_000_003);
    const cuts = [0, 1, 4096, 65_536, 65_537, 500_000, data.length];
    const pieces = cuts.slice(1).map((end, i) => data.subarray(cuts[i], end));
    await v.write(12_345, pieces);
    assert.ok((await v.read(12_345, data.length)).equals(data));
    assert.equal(v.allocatedBlocks, Math.ceil((12_345 + data.length) / 8192) - Math.floor(12_345 / 8192));
    await v.write(0, [Buffer.from('ab'), Buffer.from('cd')]);
    assert.equal((await v.read(0, 4)).toString(), 'abcd');
    const reads = Array.from({ length: 32 }, (_, i) => v.read(i * 8192, 8192));
    await v.close();
    assert.equal((await Promise.all(reads)).length, 32);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
