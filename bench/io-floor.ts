/**
 * The file work a resync cannot do without, timed alone: a reference for
 * bench/recovery, which runs this in a child process (so it gets the daemons'
 * thread-pool size) on its own copies of the two sites' images.
 *
 * For each block that differs, in batches of a copy piece's size:
 *   1. read it from the new source's image;
 *   2. read the old source's block (its before-image, rule 6's snapshot needs it);
 *   3. append those before-images to a save file, and flush it (rule 3: durable
 *      before the block is overwritten);
 *   4. write the new block over the old;
 * then flush the old source's image. No network, no checksums, no catalog: only the
 * reads, writes and flushes, at the copy's concurrency.
 *
 * Usage: node io-floor.js OLD-SOURCE-IMAGE NEW-SOURCE-IMAGE SAVE-FILE BLOCKS-JSON BLOCK-BYTES
 * Prints one JSON line: { wallMs, cpuMs, phasesMs }.
 */
import { open, readFile, type FileHandle } from 'node:fs/promises';
import { runLimited } from '../src/lib/concurrency.js';

const batchBlocks = 512;
const concurrency = 32;

async function main(): Promise<void> {
  const [oldPath, newPath, savePath, blocksPath, blockBytesArg] = process.argv.slice(2);
  if (!oldPath || !newPath || !savePath || !blocksPath || !blockBytesArg) throw new Error('usage: io-floor OLD NEW SAVE BLOCKS-JSON BLOCK-BYTES');
  const bs = Number(blockBytesArg);
  const blocks = (JSON.parse(await readFile(blocksPath, 'utf8')) as number[]).sort((x, y) => x - y);
  const handles: FileHandle[] = [];
  const target = await open(oldPath, 'r+');
  handles.push(target);
  const source = await open(newPath, 'r');
  handles.push(source);
  const save = await open(savePath, 'w');
  handles.push(save);
  const fresh = Buffer.allocUnsafe(batchBlocks * bs);
  const before = Buffer.allocUnsafe(batchBlocks * bs);
  const phasesMs = { readNew: 0, readOld: 0, appendAndFlush: 0, write: 0, finalFlush: 0 };
  let mark = process.hrtime.bigint();
  const lap = (phase: keyof typeof phasesMs): void => {
    const now = process.hrtime.bigint();
    phasesMs[phase] += Number(now - mark) / 1e6;
    mark = now;
  };
  const started = process.hrtime.bigint();
  const cpu = process.cpuUsage();
  try {
    let saveAt = 0;
    for (let s = 0; s < blocks.length; s += batchBlocks) {
      // Each block with its slot in the batch's buffers.
      const batch = blocks.slice(s, s + batchBlocks).map((b, k) => [b, k] as const);
      mark = process.hrtime.bigint();
      await runLimited(batch, concurrency, ([b, k]) => source.read(fresh, k * bs, bs, b * bs));
      lap('readNew');
      await runLimited(batch, concurrency, ([b, k]) => target.read(before, k * bs, bs, b * bs));
      lap('readOld');
      await save.write(before, 0, batch.length * bs, saveAt);
      saveAt += batch.length * bs;
      await save.datasync();
      lap('appendAndFlush');
      await runLimited(batch, concurrency, ([b, k]) => target.write(fresh, k * bs, bs, b * bs));
      lap('write');
    }
    mark = process.hrtime.bigint();
    await target.datasync();
    lap('finalFlush');
  } finally {
    for (const h of handles) await h.close();
  }
  const used = process.cpuUsage(cpu);
  const round = (ms: number): number => Math.round(ms);
  console.log(
    JSON.stringify({
      wallMs: round(Number(process.hrtime.bigint() - started) / 1e6),
      cpuMs: round((used.user + used.system) / 1000),
      phasesMs: Object.fromEntries(Object.entries(phasesMs).map(([k, v]) => [k, round(v)])),
    }),
  );
}

await main();
