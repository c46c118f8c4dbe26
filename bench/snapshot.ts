/**
 * Snapshot benchmark (run by hand: `npm run bench:snapshot`; `node --expose-gc` for the
 * memory figure). Works in a temporary directory on the disk holding $FERRY_BENCH_DIR
 * (default the OS temp dir) and deletes it afterwards.
 *
 *   1. write throughput with 0, 1 and 16 snapshots, first writes and rewrites, relative to none
 *   2. read latency of the oldest vs the newest of 256 snapshots (target <= 1.5x)
 *   3. delta time between two snapshots with 1% vs 10% of the blocks changed
 *   4. resident memory of the maps for a 1 TiB sparse volume with 1 GiB written
 *   5. time to create a snapshot of a 100 GiB sparse volume with 10 GiB written (target < 100 ms)
 *
 * FERRY_BENCH_CREATE_WRITTEN_GIB (default 10) sets how much of the 100 GiB volume is written.
 */
import { mkdtemp, mkdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { randomBytes, randomInt } from 'node:crypto';
import { pino } from 'pino';
import { Catalog } from '../src/storage/catalog.js';
import { VolumeStore } from '../src/storage/volume-store.js';
import { SnapshotManager } from '../src/snapshot/manager.js';

const log = pino({ level: 'silent' });
const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const blockBytes = 8 * KiB;

interface Env {
  dir: string;
  catalog: Catalog;
  store: VolumeStore;
  snaps: SnapshotManager;
}

async function openEnv(root: string, name: string): Promise<Env> {
  const dir = join(root, name);
  await mkdir(join(dir, 'volumes'), { recursive: true });
  const catalog = new Catalog(join(dir, 'catalog.db'));
  const store = new VolumeStore(catalog, join(dir, 'volumes'), blockBytes, log);
  await store.load();
  const snaps = new SnapshotManager(catalog, store, join(dir, 'snapshots'), log);
  await snaps.load();
  return { dir, catalog, store, snaps };
}

async function closeEnv(env: Env): Promise<void> {
  await env.snaps.close();
  await env.store.close();
  env.catalog.close();
  await rm(env.dir, { recursive: true, force: true });
}

function fmt(n: number, digits = 1): string {
  return n.toFixed(digits);
}

/** Random 64 KiB writes, aligned, `concurrency` in flight, inside [0, regionBytes). */
async function writeLoad(env: Env, volume: string, regionBytes: number, offsets: number[], concurrency: number): Promise<number> {
  const v = env.store.get(volume);
  const data = randomBytes(64 * KiB);
  let next = 0;
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < offsets.length) {
        const offset = offsets[next++] as number;
        await v.write(offset % regionBytes, data);
      }
    }),
  );
  await v.flush();
  const s = (performance.now() - t0) / 1000;
  return (offsets.length * 64 * KiB) / MiB / s;
}

async function benchWrites(root: string): Promise<void> {
  console.log('\n1. write throughput (random 64 KiB writes, 8 in flight, 128 MiB per run, region 256 MiB pre-filled)');
  const regionBytes = 256 * MiB;
  const count = 2048;
  // Distinct 64 KiB slots: the first pass is all first writes, the second all rewrites.
  const slots = Array.from({ length: regionBytes / (64 * KiB) }, (_, i) => i);
  for (let i = slots.length - 1; i > 0; i--) {
    const j = randomInt(i + 1);
    [slots[i], slots[j]] = [slots[j] as number, slots[i] as number];
  }
  const offsets = slots.slice(0, count).map((s) => s * 64 * KiB);
  const rows: [string, number][] = [];
  for (const snapshots of [0, 1, 16]) {
    const env = await openEnv(root, `w${snapshots}`);
    await env.store.create('v', regionBytes);
    const v = env.store.get('v');
    const fill = randomBytes(4 * MiB);
    for (let o = 0; o < regionBytes; o += fill.length) await v.write(o, fill);
    await v.flush();
    for (let i = 0; i < snapshots; i++) {
      // Older snapshots each saved part of the region, as a real queue would have.
      await env.snaps.create('v', `s${i}`);
      if (i < snapshots - 1) await writeLoad(env, 'v', regionBytes, slots.slice(count + i * 64, count + (i + 1) * 64).map((s) => s * 64 * KiB), 8);
    }
    const first = await writeLoad(env, 'v', regionBytes, offsets, 8);
    const again = await writeLoad(env, 'v', regionBytes, offsets, 8);
    rows.push([`${snapshots} snapshot(s), first writes`, first]);
    rows.push([`${snapshots} snapshot(s), rewrites`, again]);
    await closeEnv(env);
  }
  const base = rows[0]?.[1] ?? 1;
  for (const [label, mibs] of rows) console.log(`   ${label.padEnd(34)} ${fmt(mibs).padStart(8)} MiB/s   ${fmt(mibs / base, 2)}x of no snapshot`);
}

async function benchReads(root: string): Promise<void> {
  console.log('\n2. read latency, oldest vs newest of 256 snapshots (64 MiB volume, 1% of blocks rewritten between snapshots)');
  const env = await openEnv(root, 'r');
  const sizeBytes = 64 * MiB;
  const blocks = sizeBytes / blockBytes;
  await env.store.create('v', sizeBytes);
  const v = env.store.get('v');
  const fill = randomBytes(4 * MiB);
  for (let o = 0; o < sizeBytes; o += fill.length) await v.write(o, fill);
  const block = randomBytes(blockBytes);
  for (let i = 0; i < 256; i++) {
    await env.snaps.create('v', `s${i}`);
    await Promise.all(Array.from({ length: blocks / 100 }, () => v.write(randomInt(blocks) * blockBytes, block)));
  }
  const reads = 4000;
  const measure = async (snap: string): Promise<number> => {
    const img = await env.snaps.image('v', snap);
    const picks = Array.from({ length: reads }, () => randomInt(blocks) * blockBytes);
    for (const p of picks.slice(0, 200)) await img.read(p, blockBytes); // warm
    const t0 = performance.now();
    for (const p of picks) await img.read(p, blockBytes);
    return ((performance.now() - t0) * 1000) / reads;
  };
  // Interleaved rounds, median of each: the disk's background work hits both alike.
  const olds: number[] = [];
  const news: number[] = [];
  for (let round = 0; round < 5; round++) {
    olds.push(await measure('s0'));
    news.push(await measure('s255'));
  }
  const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] as number;
  const oldest = median(olds);
  const newest = median(news);
  console.log(`   oldest (s0)   ${fmt(oldest)} µs per 8 KiB read`);
  console.log(`   newest (s255) ${fmt(newest)} µs per 8 KiB read`);
  console.log(`   ratio oldest/newest ${fmt(oldest / newest, 2)} (target <= 1.5)`);
  await closeEnv(env);
}

async function benchCreate(root: string): Promise<void> {
  const writtenGiB = Number(process.env.FERRY_BENCH_CREATE_WRITTEN_GIB ?? 10);
  console.log(`\n5. snapshot create on a 100 GiB sparse volume with ${writtenGiB} GiB written (1 MiB every ${fmt(100 / writtenGiB, 0)} MiB)`);
  const env = await openEnv(root, 'c');
  await env.store.create('v', 100 * GiB);
  const v = env.store.get('v');
  const data = randomBytes(MiB);
  const stride = Math.round(100 / writtenGiB) * MiB;
  const t0 = performance.now();
  let written = 0;
  for (let o = 0; o + MiB <= 100 * GiB && written < writtenGiB * GiB; o += stride) {
    await v.write(o, data);
    written += MiB;
  }
  await v.flush();
  console.log(`   wrote ${fmt(written / GiB, 2)} GiB in ${fmt((performance.now() - t0) / 1000)} s; allocated ${fmt((v.allocatedBlocks * blockBytes) / GiB, 2)} GiB`);
  const times: number[] = [];
  for (let i = 0; i < 7; i++) {
    await v.write(i * stride, data); // something to flush, as in real use
    const t1 = performance.now();
    await env.snaps.create('v', `s${i}`);
    times.push(performance.now() - t1);
  }
  const sorted = [...times].sort((a, b) => a - b);
  console.log(`   create: ${times.map((t) => `${fmt(t)} ms`).join(', ')}; median ${fmt(sorted[3] as number)} ms (target < 100 ms)`);
  await closeEnv(env);
}

async function benchDelta(root: string): Promise<void> {
  console.log('\n3. delta between two snapshots, 1 GiB volume fully written, 1% vs 10% of its blocks changed between them');
  const results: [number, number, number][] = [];
  for (const percent of [1, 10]) {
    const env = await openEnv(root, `d${percent}`);
    const sizeBytes = GiB;
    const blocks = sizeBytes / blockBytes;
    await env.store.create('v', sizeBytes);
    const v = env.store.get('v');
    const fill = randomBytes(4 * MiB);
    for (let o = 0; o < sizeBytes; o += fill.length) await v.write(o, fill);
    await env.snaps.create('v', 'base');
    const changed = new Set<number>();
    while (changed.size < (blocks * percent) / 100) changed.add(randomInt(blocks));
    const block = randomBytes(blockBytes);
    const list = [...changed];
    for (let i = 0; i < list.length; i += 64) await Promise.all(list.slice(i, i + 64).map((b) => v.write(b * blockBytes, block)));
    await env.snaps.create('v', 'next');
    const t0 = performance.now();
    let bytes = 0;
    for await (const e of env.snaps.delta('v', 'base', 'next')) bytes += e.length;
    const ms = performance.now() - t0;
    results.push([percent, ms, bytes / blockBytes]);
    await closeEnv(env);
  }
  for (const [percent, ms, n] of results) console.log(`   ${String(percent).padStart(2)}% changed: ${n} blocks in ${fmt(ms)} ms (${fmt((ms * 1000) / n, 1)} µs per changed block)`);
  const [a, b] = results as [[number, number, number], [number, number, number]];
  console.log(`   time ratio 10%/1%: ${fmt(b[1] / a[1], 2)} (changed blocks ratio ${fmt(b[2] / a[2], 2)})`);
}

async function benchMemory(root: string): Promise<void> {
  const gc = (globalThis as { gc?: () => void }).gc;
  console.log('\n4. resident memory of the maps: 1 TiB sparse volume, 1 GiB written (1 MiB every 1 GiB), snapshot, the same 1 GiB rewritten');
  if (!gc) {
    console.log('   (skipped: run with node --expose-gc)');
    return;
  }
  const env = await openEnv(root, 'm');
  await env.store.create('v', 1024 * GiB);
  const v = env.store.get('v');
  const data = randomBytes(MiB);
  for (let i = 0; i < 1024; i++) await v.write(i * GiB, data);
  const heap = (): number => {
    gc();
    gc();
    const m = process.memoryUsage();
    return m.heapUsed + m.arrayBuffers;
  };
  const before = heap();
  await env.snaps.create('v', 's');
  const afterCreate = heap();
  for (let i = 0; i < 1024; i += 8) await Promise.all(Array.from({ length: 8 }, (_, k) => v.write((i + k) * GiB, data)));
  const afterWrites = heap();
  const info = env.snaps.show('v', 's');
  console.log(`   meta bit map copy at create: ${fmt((afterCreate - before) / MiB, 2)} MiB`);
  console.log(`   after 1 GiB of first writes (${info.savedBlocks} before-images, save volume ${fmt(info.saveBytes / GiB, 2)} GiB): maps ${fmt((afterWrites - before) / MiB, 2)} MiB in total`);
  await closeEnv(env);
}

async function main(): Promise<void> {
  const root = await mkdtemp(join(process.env.FERRY_BENCH_DIR ?? tmpdir(), 'ferry-bench-snap-'));
  console.log(`ferry snapshot benchmark in ${root} (block size ${blockBytes / KiB} KiB)`);
  try {
    const only = process.argv[2];
    if (!only || only === 'writes') await benchWrites(root);
    if (!only || only === 'reads') await benchReads(root);
    if (!only || only === 'delta') await benchDelta(root);
    if (!only || only === 'memory') await benchMemory(root);
    // Last: its 10 GiB would still be written back while the others run.
    if (!only || only === 'create') await benchCreate(root);
  } finally {
    await rm(root, { recursive: true, force: true });
  }
}

await main();
