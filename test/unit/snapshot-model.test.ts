import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, mkdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { pino } from 'pino';
import { Catalog } from '../../src/storage/catalog.js';
import { VolumeStore } from '../../src/storage/volume-store.js';
import { SnapshotManager } from '../../src/snapshot/manager.js';

/**
 * Model-based test of the snapshot facility: random sequences of writes (at byte
 * offsets, partial blocks), trims, zeroes, snapshots, deletes, restores, reads, deltas
 * unloads of older snapshots' maps, and restarts (clean, or crash-like without
 * block-map checkpoints) against an
 * in-memory model — a byte array for the volume and a copy of it per snapshot. Every
 * read is compared byte for byte.
 */
const log = pino({ level: 'silent' });
const blockBytes = 512;
const blocks = 24;
const sizeBytes = blocks * blockBytes;
const snapshotsMax = 6;
const runs = Number(process.env.FERRY_MODEL_RUNS ?? 500);
/** tmpfs keeps the fsyncs of 500 runs cheap. */
const baseDir = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();

interface Model {
  volume: Buffer;
  snapshots: { name: string; image: Buffer }[];
  nextName: number;
}

class Real {
  catalog!: Catalog;
  store!: VolumeStore;
  manager!: SnapshotManager;
  constructor(readonly dir: string) {}

  async open(): Promise<void> {
    this.catalog = new Catalog(join(this.dir, 'catalog.db'));
    this.store = new VolumeStore(this.catalog, join(this.dir, 'volumes'), blockBytes, log);
    await this.store.load();
    this.manager = new SnapshotManager(this.catalog, this.store, join(this.dir, 'snapshots'), log);
    await this.manager.load();
  }

  async close(checkpoint: boolean): Promise<void> {
    await this.manager.close({ checkpoint });
    await this.store.close();
    this.catalog.close();
  }

  get volume() {
    return this.store.get('v');
  }
}

type Cmd = fc.AsyncCommand<Model, Real>;

function pattern(seed: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  let x = seed | 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

class Write implements Cmd {
  constructor(readonly offset: number, readonly length: number, readonly seed: number) {}
  check = (): boolean => true;
  async run(m: Model, r: Real): Promise<void> {
    const length = Math.min(this.length, sizeBytes - this.offset);
    const data = pattern(this.seed, length);
    await r.volume.write(this.offset, data);
    data.copy(m.volume, this.offset);
  }
  toString = (): string => `write(${this.offset}, ${this.length}, ${this.seed})`;
}

class Trim implements Cmd {
  constructor(readonly offset: number, readonly length: number, readonly zero: boolean) {}
  check = (): boolean => true;
  async run(m: Model, r: Real): Promise<void> {
    const length = Math.min(this.length, sizeBytes - this.offset);
    if (this.zero) {
      await r.volume.writeZeroes(this.offset, length);
      m.volume.fill(0, this.offset, this.offset + length);
    } else {
      await r.volume.trim(this.offset, length);
      const first = Math.ceil(this.offset / blockBytes) * blockBytes;
      const end = Math.floor((this.offset + length) / blockBytes) * blockBytes;
      if (end > first) m.volume.fill(0, first, end);
    }
  }
  toString = (): string => `${this.zero ? 'zero' : 'trim'}(${this.offset}, ${this.length})`;
}

class Snap implements Cmd {
  check = (m: Readonly<Model>): boolean => m.snapshots.length < snapshotsMax;
  async run(m: Model, r: Real): Promise<void> {
    const name = `s${m.nextName++}`;
    await r.manager.create('v', name, { n: name });
    m.snapshots.push({ name, image: Buffer.from(m.volume) });
  }
  toString = (): string => 'snapshot';
}

class Delete implements Cmd {
  constructor(readonly pick: number) {}
  check = (m: Readonly<Model>): boolean => m.snapshots.length > 0;
  async run(m: Model, r: Real): Promise<void> {
    const i = this.pick % m.snapshots.length;
    await r.manager.delete('v', (m.snapshots[i] as { name: string }).name);
    m.snapshots.splice(i, 1);
  }
  toString = (): string => `delete(${this.pick})`;
}

class Restore implements Cmd {
  constructor(readonly pick: number) {}
  check = (m: Readonly<Model>): boolean => m.snapshots.length > 0;
  async run(m: Model, r: Real): Promise<void> {
    const s = m.snapshots[this.pick % m.snapshots.length] as { name: string; image: Buffer };
    await r.manager.restore('v', s.name);
    m.volume = Buffer.from(s.image);
    assert.deepEqual(await r.volume.read(0, sizeBytes), m.volume, 'volume after restore');
  }
  toString = (): string => `restore(${this.pick})`;
}

class Read implements Cmd {
  constructor(readonly pick: number, readonly offset: number, readonly length: number) {}
  check = (): boolean => true;
  async run(m: Model, r: Real): Promise<void> {
    assert.deepEqual(await r.volume.read(0, sizeBytes), m.volume, 'volume');
    const length = Math.min(this.length, sizeBytes - this.offset);
    for (const s of m.snapshots) {
      assert.deepEqual(await r.manager.read('v', s.name, 0, sizeBytes), s.image, `snapshot ${s.name} whole`);
      assert.deepEqual(await r.manager.read('v', s.name, this.offset, length), s.image.subarray(this.offset, this.offset + length), `snapshot ${s.name} at ${this.offset}+${length}`);
    }
  }
  toString = (): string => `read(${this.offset}, ${this.length})`;
}

class Delta implements Cmd {
  constructor(readonly a: number, readonly b: number) {}
  check = (m: Readonly<Model>): boolean => m.snapshots.length > 0;
  async run(m: Model, r: Real): Promise<void> {
    const n = m.snapshots.length;
    const i = this.a % n;
    const j = i + (this.b % (n - i + 1)); // j === n: current
    const from = m.snapshots[i] as { name: string; image: Buffer };
    const to = j === n ? { name: 'current', image: m.volume } : (m.snapshots[j] as { name: string; image: Buffer });
    const got = Buffer.alloc(sizeBytes);
    const inDelta = new Set<number>();
    let lastEnd = -1;
    for await (const e of r.manager.delta('v', from.name, to.name)) {
      assert.ok(e.offset > lastEnd - 1 && e.offset % blockBytes === 0 && e.length % blockBytes === 0 && e.data.length === e.length, 'extents in block order, whole blocks');
      lastEnd = e.offset + e.length;
      e.data.copy(got, e.offset);
      for (let b = e.offset / blockBytes; b < (e.offset + e.length) / blockBytes; b++) inDelta.add(b);
    }
    const status = to.name === 'current' ? r.volume.blockStatus(0, sizeBytes) : (await r.manager.image('v', to.name)).blockStatus(0, sizeBytes);
    const validTo = new Set<number>();
    for (const x of status) if (x.allocated) for (let b = x.offset / blockBytes; b < (x.offset + x.length) / blockBytes; b++) validTo.add(b);
    for (let b = 0; b < blocks; b++) {
      const lo = b * blockBytes;
      const differs = !from.image.subarray(lo, lo + blockBytes).equals(to.image.subarray(lo, lo + blockBytes));
      assert.equal(inDelta.has(b), differs && validTo.has(b), `block ${b} in delta ${from.name}→${to.name}`);
      if (inDelta.has(b)) assert.deepEqual(got.subarray(lo, lo + blockBytes), to.image.subarray(lo, lo + blockBytes), `delta data of block ${b}`);
      if (!validTo.has(b)) assert.ok(to.image.subarray(lo, lo + blockBytes).every((x) => x === 0), `block ${b} invalid in ${to.name} reads as zeros`);
    }
  }
  toString = (): string => `delta(${this.a}, ${this.b})`;
}

class Unload implements Cmd {
  check = (): boolean => true;
  async run(_m: Model, r: Real): Promise<void> {
    // Idle time 0: every older snapshot's maps leave memory; reads load them again.
    await r.manager.unloadIdle(0);
  }
  toString = (): string => 'unload';
}

class Restart implements Cmd {
  constructor(readonly crash: boolean) {}
  check = (): boolean => true;
  async run(m: Model, r: Real): Promise<void> {
    await r.close(!this.crash);
    await r.open();
    assert.deepEqual(
      r.manager.list('v').map((s) => s.name),
      m.snapshots.map((s) => s.name),
      'queue after restart',
    );
  }
  toString = (): string => `restart(${this.crash ? 'crash' : 'clean'})`;
}

const offsetArb = fc.nat({ max: sizeBytes - 1 });
const lengthArb = fc.integer({ min: 1, max: 4 * blockBytes });
const commands = [
  fc.tuple(offsetArb, lengthArb, fc.integer()).map(([o, l, s]) => new Write(o, l, s)),
  fc.tuple(offsetArb, lengthArb, fc.integer()).map(([o, l, s]) => new Write(Math.floor(o / blockBytes) * blockBytes, l, s)),
  fc.tuple(offsetArb, lengthArb, fc.boolean()).map(([o, l, z]) => new Trim(o, l, z)),
  fc.constant(null).map(() => new Snap()),
  fc.constant(null).map(() => new Snap()),
  fc.nat().map((p) => new Delete(p)),
  fc.nat().map((p) => new Restore(p)),
  fc.tuple(fc.nat(), offsetArb, lengthArb).map(([p, o, l]) => new Read(p, o, l)),
  fc.tuple(fc.nat(), fc.nat()).map(([a, b]) => new Delta(a, b)),
  fc.boolean().map((c) => new Restart(c)),
  fc.constant(null).map(() => new Unload()),
] as fc.Arbitrary<Cmd>[];

test(`snapshot model: ${runs} runs of write/trim/snapshot/delete/restore/read/delta/unload/restart`, { timeout: 600_000 }, async () => {
  const root = await mkdtemp(join(baseDir, 'ferry-snapmodel-'));
  let runNo = 0;
  try {
    await fc.assert(
      fc.asyncProperty(fc.commands(commands, { maxCommands: 40, size: 'max' }), async (cmds) => {
        const dir = join(root, String(runNo++));
        await mkdir(join(dir, 'volumes'), { recursive: true });
        const real = new Real(dir);
        await real.open();
        await real.store.create('v', sizeBytes);
        try {
          const model: Model = { volume: Buffer.alloc(sizeBytes), snapshots: [], nextName: 1 };
          await fc.asyncModelRun(() => ({ model, real }), cmds);
          // Every run ends with a crash-like restart and a full comparison.
          await new Restart(true).run(model, real);
          await new Read(0, 0, sizeBytes).run(model, real);
        } finally {
          await real.close(true).catch(() => undefined);
          await rm(dir, { recursive: true, force: true });
        }
      }),
      { numRuns: runs },
    );
  } finally {
    await rm(root, { recursive: true, force: true });
  }
});

