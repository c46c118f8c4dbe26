/**
 * bench/replication — run by hand: `npm run bench:replication` (after `npm run build`).
 *
 * (a) new remote copy of a 4 GiB volume holding 2 GiB of data, ferry vs nbdcopy between
 *     two qemu-nbd exports of raw files on the same disk (time ratio, target <= 1.0), in
 *     rounds, medians reported; also against `nbdcopy --flush`, which like ferry ends
 *     with the copy on disk;
 * (b) fio 4k random write QD32 and 1M sequential write QD8 through NBD on a replicated
 *     source vs an unreplicated volume of the same site (ratio, target >= 0.9), with the
 *     largest lag seen during the run;
 * (c) bytes on the wire per distinct block written when the same blocks are rewritten
 *     within one delta set (target 1.0 plus framing).
 *
 * Each measured side starts with the machine's free memory held in the page cache (see
 * MemoryOccupier in report.ts): on this VM, writes into memory that has been free for a
 * few seconds are ten times slower, and the sides do not touch equal amounts of it.
 *
 * Environment: BENCH_VOLUME_GIB (default 4), BENCH_DATA_GIB (default 2), BENCH_FIO_SECONDS (default 20),
 * BENCH_SAVE_VOLUME (default 4G), BENCH_COPY_ROUNDS (default 3), BENCH_MEMORY=fresh (no memory held).
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm, open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { randomBytes } from 'node:crypto';
import { TestSite } from '../test/helpers/site.js';
import { CpuMeter, MemoryOccupier, describeCpu, table, timed, type CpuUse } from './report.js';
import { pairStatus, waitInSync } from '../test/helpers/replication.js';

const run = promisify(execFile);
const GiB = 1024 ** 3;
const volumeBytes = Number(process.env.BENCH_VOLUME_GIB ?? 4) * GiB;
const dataBytes = Number(process.env.BENCH_DATA_GIB ?? 2) * GiB;
const fioSeconds = Number(process.env.BENCH_FIO_SECONDS ?? 20);
/** Save volume for (b): a burst of random writes can dirty the whole 1 GiB range fio uses. */
const saveVolume = process.env.BENCH_SAVE_VOLUME ?? '4G';
const syncWaitMs = Number(process.env.BENCH_SYNC_WAIT_S ?? 120) * 1000;
const copyRounds = Number(process.env.BENCH_COPY_ROUNDS ?? 3);



async function writeDataFile(path: string, bytes: number): Promise<void> {
  const fh = await open(path, 'w');
  const chunk = 16 * 1024 * 1024;
  for (let at = 0; at < bytes; at += chunk) await fh.write(randomBytes(Math.min(chunk, bytes - at)), 0, Math.min(chunk, bytes - at), at);
  await fh.truncate(volumeBytes);
  await fh.close();
}

function qemuNbd(file: string, port: number): ChildProcess {
  return spawn('qemu-nbd', ['-f', 'raw', '-t', '-b', '127.0.0.1', '-p', String(port), '-x', 'disk', file], { stdio: 'ignore' });
}

async function waitPort(port: number): Promise<void> {
  for (let i = 0; i < 100; i++) {
    try {
      await run('nbdinfo', [`nbd://127.0.0.1:${port}/disk`]);
      return;
    } catch {
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  throw new Error(`qemu-nbd on ${port} did not come up`);
}

/** nbdcopy between two qemu-nbd exports of raw files on the same disk; `flush`: the copy ends with the data on disk. */
async function nbdcopyReference(src: string, dst: string, flush: boolean, memory: MemoryOccupier): Promise<{ seconds: number; cpu: CpuUse }> {
  await rm(dst, { force: true });
  await memory.fill();
  const dstFh = await open(dst, 'w');
  await dstFh.truncate(volumeBytes);
  await dstFh.close();
  await run('sync');
  const q1 = qemuNbd(src, 10901);
  const q2 = qemuNbd(dst, 10902);
  try {
    await waitPort(10901);
    await waitPort(10902);
    const meter = await CpuMeter.start();
    const [seconds] = await timed(() => run('nbdcopy', [...(flush ? ['--flush'] : []), 'nbd://127.0.0.1:10901/disk', 'nbd://127.0.0.1:10902/disk']));
    return { seconds, cpu: await meter.stop() };
  } finally {
    // The next round binds the same ports.
    await Promise.all([stop(q1), stop(q2)]);
  }
}

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill();
  await exited;
}

/** One new remote copy by ferry between two fresh sites; the target's digest is checked. */
async function ferryCopy(src: string, memory: MemoryOccupier): Promise<{ seconds: number; cpu: CpuUse; wireBytes: number; same: boolean }> {
  await memory.fill();
  const [a, b] = await Promise.all([TestSite.create('bench-a'), TestSite.create('bench-b')]);
  try {
    await a.api('POST', '/api/v1/volumes', { name: 'big', size: volumeBytes });
    await run('nbdcopy', [src, `nbd://127.0.0.1:${a.nbdPort}/big`]);
    await run('sync');
    const meter = await CpuMeter.start({ A: a.proc?.pid, B: b.proc?.pid });
    const [seconds, r] = await timed(() => a.cli(['replicate', 'start', 'big', '--to', b.url, '--wait']));
    const cpu = await meter.stop();
    if (r.code !== 0) throw new Error(r.stderr);
    const s = await pairStatus(a, 'big');
    const same = (await a.digest('big')) === (await b.digest('big'));
    return { seconds, cpu, wireBytes: s.bytesSent, same };
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
  }
}

function median(xs: number[]): number {
  const v = [...xs].sort((x, y) => x - y);
  const mid = Math.floor(v.length / 2);
  return v.length % 2 ? (v[mid] as number) : ((v[mid - 1] as number) + (v[mid] as number)) / 2;
}

/**
 * (a) Rounds of reference and ferry copies in turn: this machine's page cache and
 * disk make single runs vary by 2x or more, so each side is reported as its median
 * with the range beside it.
 */
async function benchCopy(dir: string, memory: MemoryOccupier): Promise<string[][]> {
  const src = join(dir, 'src.raw');
  const dst = join(dir, 'dst.raw');
  await writeDataFile(src, dataBytes);
  const plain: number[] = [];
  const flushed: number[] = [];
  const ferry: number[] = [];
  const cpu: Record<'plain' | 'flushed' | 'ferry', CpuUse[]> = { plain: [], flushed: [], ferry: [] };
  let wire = 0;
  let allSame = true;
  for (let round = 0; round < copyRounds; round++) {
    const p = await nbdcopyReference(src, dst, false, memory);
    const fl = await nbdcopyReference(src, dst, true, memory);
    await rm(dst, { force: true });
    const f = await ferryCopy(src, memory);
    plain.push(p.seconds);
    flushed.push(fl.seconds);
    ferry.push(f.seconds);
    cpu.plain.push(p.cpu);
    cpu.flushed.push(fl.cpu);
    cpu.ferry.push(f.cpu);
    wire = f.wireBytes;
    allSame &&= f.same;
    process.stdout.write(`(a) round ${round + 1}: nbdcopy ${p.seconds.toFixed(2)} s (${describeCpu(p.cpu)}), nbdcopy --flush ${fl.seconds.toFixed(2)} s (${describeCpu(fl.cpu)}), ferry ${f.seconds.toFixed(2)} s (${describeCpu(f.cpu)})\n`);
  }
  const range = (xs: number[]): string => `${Math.min(...xs).toFixed(2)}-${Math.max(...xs).toFixed(2)} s`;
  const workload = `${(dataBytes / GiB).toFixed(1)} GiB of ${(volumeBytes / GiB).toFixed(0)} GiB, median of ${copyRounds}`;
  const ferryCell = `${median(ferry).toFixed(2)} s (${range(ferry)})`;
  const cpuOf = (uses: CpuUse[]): number => median(uses.map((u) => u.machineSeconds));
  const busyOf = (uses: CpuUse[]): string => `${(median(uses.map((u) => u.busy)) * 100).toFixed(0)}% busy`;
  return [
    ['(a) new remote copy vs nbdcopy', workload, ferryCell, `${median(plain).toFixed(2)} s (${range(plain)})`, (median(ferry) / median(plain)).toFixed(2), `<= 1.0; ${(wire / GiB).toFixed(2)} GiB on the wire; digests ${allSame ? 'equal' : 'DIFFER'}`],
    ['(a) new remote copy vs nbdcopy --flush', workload, ferryCell, `${median(flushed).toFixed(2)} s (${range(flushed)})`, (median(ferry) / median(flushed)).toFixed(2), 'both end with the copy on disk (ferry flushes before it reports the copy done)'],
    [
      '(a) machine CPU during the copy',
      workload,
      `${cpuOf(cpu.ferry).toFixed(1)} CPU-s, ${busyOf(cpu.ferry)}`,
      `${cpuOf(cpu.plain).toFixed(1)} CPU-s, ${busyOf(cpu.plain)}`,
      (cpuOf(cpu.ferry) / cpuOf(cpu.plain)).toFixed(2),
      `all processes and kernel threads; nbdcopy --flush ${cpuOf(cpu.flushed).toFixed(1)} CPU-s, ${busyOf(cpu.flushed)}`,
    ],
  ];
}

interface FioResult {
  iops: number;
  mibps: number;
}

/** "36 µs of machine CPU per write, 99% busy; disk wrote 0.3 GiB" */
function cpuPerWrite(r: FioResult & { cpu: CpuUse }): string {
  const writes = r.iops * r.cpu.seconds;
  return `${((r.cpu.machineSeconds / writes) * 1e6).toFixed(0)} µs of machine CPU per write, ${(r.cpu.busy * 100).toFixed(0)}% busy; disk wrote ${(r.cpu.diskWrittenBytes / GiB).toFixed(1)} GiB`;
}

async function fio(port: number, name: string, rw: string, bs: string, depth: number, pids: Record<string, number | undefined>): Promise<FioResult & { cpu: CpuUse }> {
  const meter = await CpuMeter.start(pids);
  const { stdout } = await run('fio', [
    '--name=bench', '--ioengine=nbd', `--uri=nbd://127.0.0.1:${port}/${name}`, `--rw=${rw}`, `--bs=${bs}`, `--iodepth=${depth}`,
    '--size=1G', '--time_based', `--runtime=${fioSeconds}`, '--output-format=json',
  ], { maxBuffer: 64 * 1024 * 1024 });
  const cpu = await meter.stop();
  // fio may print notices before its JSON.
  const job = (JSON.parse(stdout.slice(stdout.indexOf('{'))) as { jobs: { write: { iops: number; bw_bytes: number } }[] }).jobs[0]!;
  return { iops: job.write.iops, mibps: job.write.bw_bytes / 1024 / 1024, cpu };
}

async function benchWrites(memory: MemoryOccupier): Promise<string[][]> {
  await memory.fill();
  const [a, b] = await Promise.all([TestSite.create('bench-wa'), TestSite.create('bench-wb')]);
  const rows: string[][] = [];
  try {
    for (const v of ['plain', 'repl']) await a.api('POST', '/api/v1/volumes', { name: v, size: 2 * GiB });
    const start = await a.cli(['replicate', 'start', 'repl', '--to', b.url, '--interval', '5s', '--save-volume', saveVolume, '--wait']);
    if (start.code !== 0) throw new Error(start.stderr);
    const pids = { A: a.proc?.pid, B: b.proc?.pid };
    for (const [label, rw, bs, depth] of [['4k random write QD32', 'randwrite', '4k', 32], ['1M sequential write QD8', 'write', '1M', 8]] as const) {
      const plain = await fio(a.nbdPort, 'plain', rw, bs, depth, pids);
      let maxLag = 0;
      const watcher = setInterval(() => {
        void pairStatus(a, 'repl').then((s) => (maxLag = Math.max(maxLag, s.lagSeconds)), () => undefined);
      }, 500);
      const repl = await fio(a.nbdPort, 'repl', rw, bs, depth, pids);
      clearInterval(watcher);
      const [syncSeconds, synced] = await timed(() => waitInSync(a, b, 'repl', 'repl', syncWaitMs).then(() => true, () => false));
      const after = await pairStatus(a, 'repl');
      const row = [
        `(b) ${label}`,
        `${repl.iops.toFixed(0)} IOPS ${repl.mibps.toFixed(1)} MiB/s replicated`,
        `${plain.iops.toFixed(0)} IOPS ${plain.mibps.toFixed(1)} MiB/s plain`,
        (repl.iops / plain.iops).toFixed(2),
        `>= 0.9; max lag during the run ${maxLag.toFixed(1)} s (interval 5 s); ${synced ? `in sync ${syncSeconds.toFixed(1)} s after fio` : `NOT in sync ${syncSeconds.toFixed(0)} s after fio (${after.lagBlocks} blocks behind)`}`,
      ];
      const cpuRow = [`(b) ${label}: CPU and disk`, `replicated: ${cpuPerWrite(repl)}; A ${repl.cpu.byProcess.A?.toFixed(1)} + B ${repl.cpu.byProcess.B?.toFixed(1)} CPU-s`, `plain: ${cpuPerWrite(plain)}`, '', 'during fio only (the catch-up after it is not counted)'];
      process.stdout.write(`${row.join(' | ')}\n${cpuRow.join(' | ')}\n`);
      rows.push(row, cpuRow);
      if (!synced) break;
    }
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
  }
  return rows;
}

async function benchRewrites(): Promise<string[][]> {
  const [a, b] = await Promise.all([TestSite.create('bench-ra'), TestSite.create('bench-rb')]);
  try {
    const bs = 8192;
    await a.api('POST', '/api/v1/volumes', { name: 'v', size: 256 * 1024 * 1024 });
    const start = await a.cli(['replicate', 'start', 'v', '--to', b.url, '--interval', '1h', '--high-water', '1T', '--wait']);
    if (start.code !== 0) throw new Error(start.stderr);
    const before = (await pairStatus(a, 'v')).bytesSent;
    const distinct = 2000;
    const rewrites = 10;
    const blocks = Array.from({ length: distinct }, (_, i) => i * 3);
    for (let r = 0; r < rewrites; r++) {
      for (let i = 0; i < blocks.length; i += 50) {
        await Promise.all(blocks.slice(i, i + 50).map((blk) => a.writeData('v', blk * bs, randomBytes(bs))));
      }
    }
    await a.api('POST', '/api/v1/replication/v/delta');
    await waitInSync(a, b, 'v');
    const sent = (await pairStatus(a, 'v')).bytesSent - before;
    return [['(c) rewrites in one delta set', `${distinct} blocks x ${rewrites} writes`, `${sent} bytes sent`, `${distinct * bs} bytes distinct`, (sent / (distinct * bs)).toFixed(3), '1.0 plus framing']];
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
  }
}

async function main(): Promise<void> {
  const only = process.argv[2];
  const dir = await mkdtemp(join(tmpdir(), 'ferry-bench-repl-'));
  const rows: string[][] = [];
  const memory = new MemoryOccupier(join(dir, 'memory'));
  process.stdout.write(`memory condition: ${memory.condition}\n`);
  try {
    if (!only || only === 'c') rows.push(...(await benchRewrites()));
    if (!only || only === 'a') rows.push(...(await benchCopy(dir, memory)));
    if (!only || only === 'b') rows.push(...(await benchWrites(memory)));
  } finally {
    await memory.release();
    await rm(dir, { recursive: true, force: true });
  }
  process.stdout.write(`${table(['case', 'workload', 'ferry', 'reference', 'ratio', 'target / notes'], rows)}\n`);
}

main().catch((err: unknown) => {
  process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
  process.exit(1);
});
