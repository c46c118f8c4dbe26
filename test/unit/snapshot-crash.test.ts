import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, mkdir, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomInt } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { pino } from 'pino';
import { Catalog } from '../../src/storage/catalog.js';
import { VolumeStore } from '../../src/storage/volume-store.js';
import { SnapshotManager } from '../../src/snapshot/manager.js';
const bb = 4096; // as in helpers/snapshot-child.ts

/**
 * Kills a process with SIGKILL at random moments of a snapshot delete (which moves
 * before-images to the older snapshot), a create, and a run of first writes; after each
 * kill every snapshot that exists reads exactly as before, and the interrupted
 * operation can be run again.
 */
const log = pino({ level: 'silent' });
const here = dirname(fileURLToPath(import.meta.url));
const child = join(here, '..', 'helpers', 'snapshot-child.js');
const baseDir = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
const blocks = 1024;
const killsPerOperation = 8;

async function openEnv(dir: string): Promise<{ snaps: SnapshotManager; store: VolumeStore; close: () => Promise<void> }> {
  const catalog = new Catalog(join(dir, 'catalog.db'));
  const store = new VolumeStore(catalog, join(dir, 'volumes'), bb, log);
  await store.load();
  const snaps = new SnapshotManager(catalog, store, join(dir, 'snapshots'), log);
  await snaps.load();
  return {
    snaps,
    store,
    close: async () => {
      await snaps.close();
      await store.close();
      catalog.close();
    },
  };
}

/** Volume with snapshots old, mid, new; mid holds before-images that old needs. */
async function setup(dir: string): Promise<Map<string, Buffer>> {
  await mkdir(join(dir, 'volumes'), { recursive: true });
  const env = await openEnv(dir);
  await env.store.create('v', blocks * bb);
  const v = env.store.get('v');
  await v.write(0, Buffer.alloc(blocks * bb, 1));
  await env.snaps.create('v', 'old');
  await env.snaps.create('v', 'mid');
  for (let b = 0; b < blocks; b += 2) await v.write(b * bb + 7, Buffer.alloc(100, 2));
  await env.snaps.create('v', 'new');
  await v.write(0, Buffer.alloc(blocks * bb, 3));
  const images = new Map<string, Buffer>();
  for (const s of ['old', 'mid', 'new']) images.set(s, await env.snaps.read('v', s, 0, blocks * bb));
  images.set('current', await v.read(0, blocks * bb));
  await env.close();
  return images;
}

/** Runs the child; kills it `delayMs` after it is ready (never, if undefined). Returns whether it finished and how long it took. */
async function runAndKill(dir: string, args: string[], delayMs: number | undefined): Promise<{ done: boolean; ms: number }> {
  const proc = spawn(process.execPath, [child, dir, ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  let readyAt = 0;
  let doneAt = 0;
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
  await new Promise<void>((resolve) =>
    proc.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes('done') && doneAt === 0) doneAt = performance.now();
      if (out.includes('ready') && readyAt === 0) {
        readyAt = performance.now();
        resolve();
      }
    }),
  );
  if (delayMs !== undefined) {
    await new Promise((r) => setTimeout(r, delayMs));
    proc.kill('SIGKILL');
  }
  await exited;
  return { done: out.includes('done'), ms: (doneAt || performance.now()) - readyAt };
}

async function check(dir: string, images: Map<string, Buffer>, label: string): Promise<string[]> {
  const env = await openEnv(dir);
  try {
    const names = env.snaps.list('v').map((s) => s.name);
    for (const name of names) {
      const want = images.get(name);
      if (want) assert.ok((await env.snaps.read('v', name, 0, blocks * bb)).equals(want), `${label}: snapshot ${name} exact`);
      const info = env.snaps.show('v', name);
      assert.equal(info.state, 'ok', `${label}: snapshot ${name} state`);
    }
    const files = await readdir(join(dir, 'snapshots'));
    const ids = new Set(env.snaps.list('v').map((s) => s.id));
    assert.ok(files.every((f) => ids.has(f.slice(0, 36))), `${label}: no orphan files after start`);
    return names;
  } finally {
    await env.close();
  }
}

for (const op of ['delete mid', 'delete new', 'create extra', 'write 9'] as const) {
  test(`SIGKILL during "${op}" at ${killsPerOperation} random moments leaves every snapshot exact`, { timeout: 120_000 }, async (t) => {
    let finished = 0;
    const [verb, arg] = op.split(' ') as [string, string];
    // Calibration: how long the operation takes here, so the kills spread over all of it.
    const calibration = await mkdtemp(join(baseDir, 'ferry-snapcrash-'));
    await setup(calibration);
    const { ms: durationMs } = await runAndKill(calibration, [verb, arg], undefined);
    await rm(calibration, { recursive: true, force: true });
    for (let i = 0; i < killsPerOperation; i++) {
      const dir = await mkdtemp(join(baseDir, 'ferry-snapcrash-'));
      try {
        const images = await setup(dir);
        const { done } = await runAndKill(dir, [verb, arg], randomInt(Math.ceil(durationMs * 1.2) + 1));
        if (done) finished++;
        const label = `${op} #${i}${done ? ' (finished)' : ''}`;
        const names = await check(dir, images, label);
        if (verb === 'create' && names.includes('extra')) {
          const env = await openEnv(dir);
          assert.ok((await env.snaps.read('v', 'extra', 0, blocks * bb)).equals(images.get('current') as Buffer), `${label}: new snapshot = volume`);
          await env.close();
        }
        if (verb === 'write') {
          // The writes are not acknowledged, but every snapshot must still be exact (checked above).
          continue;
        }
        // The operation can be run again to completion.
        const env = await openEnv(dir);
        if (verb === 'delete' && names.includes(arg)) await env.snaps.delete('v', arg);
        if (verb === 'create' && !names.includes(arg)) await env.snaps.create('v', arg);
        await env.close();
        await check(dir, images, `${label} then again`);
      } finally {
        await rm(dir, { recursive: true, force: true });
      }
    }
    t.diagnostic(`operation takes ${durationMs.toFixed(1)} ms; ${finished} of ${killsPerOperation} runs finished before the kill`);
  });
}
