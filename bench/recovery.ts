/**
 * bench/recovery — run by hand: `npm run bench:recovery`.
 *
 * A volume (default 4 GiB) full of data is replicated from site A to site B; the
 * initial copy is the full-copy reference of the same run. Then A writes 1% of its
 * blocks into delta sets B never gets, B fails over (A up, fenced cleanly), B writes
 * another 1%, and `ferry resync` rebuilds A. Reported:
 *   - resync bytes on the wire / bytes of the blocks that differ (target <= 1.1);
 *   - resync time / full-copy time (target <= 0.05), as the daemons record them (command
 *     accepted to copy complete) and as the CLI sees them (process start and polling included);
 *   - the same resync's file work alone, without ferry (bench/io-floor: the reads,
 *     before-image appends, writes and flushes of its differing blocks, on copies of the
 *     two images), as a floor for the resync time on this machine;
 *   - failover time from command to read/write with nothing left to play back (target < 1 s);
 *   - failback time;
 *   - then the same again with the old source keeping its data: `resync --reverse`'s
 *     bytes and time.
 * Writes are fio random 8k writes through NBD (each block once: fio's random map), at
 * independent random offsets on the two sides, so about 2% of the blocks differ.
 *
 * The run starts with the machine's free memory held in the page cache (MemoryOccupier in
 * report.ts), and frees nothing until the end: on this VM, writes into memory that has
 * been free for a few seconds are ten times slower, which would weigh on the full copy
 * (4 GiB of new pages at the target) far more than on the resync.
 *
 * Environment: BENCH_VOLUME_GIB (default 4), BENCH_CHANGED_PERCENT (default 1),
 * BENCH_MEMORY=fresh (no memory held), BENCH_LOG_DIR (both daemons' log lines of the
 * resync, times from its start, into resync-log.jsonl there).
 */
import { execFile } from 'node:child_process';
import { mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { randomBytes } from 'node:crypto';
import { TestSite } from '../test/helpers/site.js';
import { CpuMeter, MemoryOccupier, describeCpu, table, timed } from './report.js';
import { pairStatus, waitFor, waitInSync } from '../test/helpers/replication.js';

const run = promisify(execFile);
const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
const volumeBytes = Number(process.env.BENCH_VOLUME_GIB ?? 4) * GiB;
const changedPercent = Number(process.env.BENCH_CHANGED_PERCENT ?? 1);
const bs = 8192;
const cpus = availableParallelism();



/**
 * fio random 8k writes of `percent`% of the volume's blocks, each block once. fio 3.33
 * draws the same offsets for every `randseed` while `randrepeat` is on, so it is turned
 * off: each side changes its own random blocks, as the benchmark says.
 */
async function randomBlockWrites(site: TestSite, percent: number): Promise<void> {
  const bytes = Math.floor((volumeBytes * percent) / 100 / bs) * bs;
  await run('fio', ['--name=changes', '--ioengine=nbd', `--uri=nbd://127.0.0.1:${site.nbdPort}/db`, '--rw=randwrite', `--bs=${bs}`, '--iodepth=16', `--size=${volumeBytes}`, `--io_size=${bytes}`, '--randrepeat=0', '--refill_buffers', '--output-format=terse'], { maxBuffer: 64 * MiB });
}

/**
 * Blocks whose contents differ between the two sites' images (read through NBD into
 * `dir`/a.raw and b.raw, which stay there for the file-work floor).
 */
async function differingBlocks(a: TestSite, b: TestSite, dir: string): Promise<number[]> {
  const fa = join(dir, 'a.raw');
  const fb = join(dir, 'b.raw');
  await run('nbdcopy', [`nbd://127.0.0.1:${a.nbdPort}/db`, fa]);
  await run('nbdcopy', [`nbd://127.0.0.1:${b.nbdPort}/db`, fb]);
  const ha = await open(fa, 'r');
  const hb = await open(fb, 'r');
  const step = 64 * MiB;
  const ba = Buffer.alloc(step);
  const bb = Buffer.alloc(step);
  const differ: number[] = [];
  try {
    for (let at = 0; at < volumeBytes; at += step) {
      await ha.read(ba, 0, step, at);
      await hb.read(bb, 0, step, at);
      for (let o = 0; o < step; o += bs) if (!ba.subarray(o, o + bs).equals(bb.subarray(o, o + bs))) differ.push((at + o) / bs);
    }
  } finally {
    // The images stay until the end of the run: removing them would free memory before the resync.
    await ha.close();
    await hb.close();
  }
  return differ;
}

/** BENCH_LOG_DIR: both daemons' log lines of the resync's span, in one file, times in ms from its start. */
async function dumpLogs(dir: string, sites: Record<string, TestSite>, from: number, to: number): Promise<void> {
  const lines = Object.entries(sites)
    .flatMap(([name, site]) => site.logs.map((l) => ({ ...l, site: name, at: Number(l.time) - from })))
    .filter((l) => l.at >= -1000 && l.at <= to - from + 1000)
    .sort((x, y) => x.at - y.at);
  await writeFile(join(dir, 'resync-log.jsonl'), lines.map((l) => JSON.stringify(l)).join('\n') + '\n');
}

/** What bench/io-floor prints. */
interface FileWorkFloor {
  wallMs: number;
  cpuMs: number;
  phasesMs: Record<string, number>;
}

/**
 * bench/io-floor in a child process with the daemons' thread-pool size: the file work
 * of this resync (its differing blocks, on the images in `dir`) without ferry.
 */
async function fileWorkFloor(dir: string, blocks: number[], threadPoolSize: number): Promise<FileWorkFloor> {
  const list = join(dir, 'differ.json');
  await writeFile(list, JSON.stringify(blocks));
  const script = fileURLToPath(new URL('./io-floor.js', import.meta.url));
  const { stdout } = await run(process.execPath, [script, join(dir, 'a.raw'), join(dir, 'b.raw'), join(dir, 'floor-save.raw'), list, String(bs)], {
    env: { ...process.env, UV_THREADPOOL_SIZE: String(threadPoolSize) },
  });
  return JSON.parse(stdout) as FileWorkFloor;
}

async function main(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-bench-recovery-'));
  const memory = new MemoryOccupier(join(dir, 'memory'));
  console.log(`memory condition: ${memory.condition}`);
  await memory.fill();
  const [a, b] = await Promise.all([TestSite.create('bench-ra'), TestSite.create('bench-rb')]);
  try {
    await a.api('POST', '/api/v1/volumes', { name: 'db', size: volumeBytes });
    // Every block holds data, so the full copy moves the whole volume.
    const fill = join(dir, 'fill.raw');
    const fh = await open(fill, 'w');
    for (let at = 0; at < volumeBytes; at += 16 * MiB) await fh.write(randomBytes(16 * MiB), 0, 16 * MiB, at);
    await fh.close();
    await run('nbdcopy', [fill, `nbd://127.0.0.1:${a.nbdPort}/db`]);
    // The fill file stays until the end: removing it would free memory mid-run.
    // Timed from a quiet disk, as the resync is: the fill's writeback is not the copy's.
    await run('sync');
    const pids = { A: a.proc?.pid, B: b.proc?.pid };
    const fullCopyMeter = await CpuMeter.start(pids);
    const [fullCopySeconds, started] = await timed(() => a.cli(['replicate', 'start', 'db', '--to', b.url, '--interval', '2s', '--wait']));
    const fullCopyCpu = await fullCopyMeter.stop();
    if (started.code !== 0) throw new Error(started.stderr);
    await waitInSync(a, b, 'db', 'db', 600_000);
    const first = (await pairStatus(a, 'db')).initialCopy;
    const fullCopyDaemonSeconds = (Date.parse(first.doneAt ?? '') - Date.parse(first.startedAt)) / 1000;

    // A: 1% in delta sets never shipped (paused), then B takes over with A up.
    if ((await a.cli(['replicate', 'pause', 'db'])).code !== 0) throw new Error('pause failed');
    await randomBlockWrites(a, changedPercent);
    await a.api('POST', '/api/v1/replication/db/delta');
    const [failoverCliSeconds, fo] = await timed(() => b.cli(['failover', 'db', '--json']));
    if (fo.code !== 0) throw new Error(fo.stderr);
    const failover = JSON.parse(fo.stdout) as { tookMs: number; sourceFenced: boolean };
    await randomBlockWrites(b, changedPercent);
    const differList = await differingBlocks(a, b, dir);
    const differ = differList.length;
    // Timed from a quiet disk: writeback of the comparison's files is not the resync's.
    await run('sync');

    const resyncMeter = await CpuMeter.start(pids);
    const [resyncSeconds, rs] = await timed(async () => {
      const r = await b.cli(['resync', 'db']);
      if (r.code !== 0) throw new Error(r.stderr);
      await waitFor('resync done', async () => (await pairStatus(b, 'db')).recovery?.phase === 'resynced', 600_000, 100);
      await waitInSync(b, a, 'db', 'db', 600_000);
      return pairStatus(b, 'db');
    });
    const resyncCpu = await resyncMeter.stop();
    const resyncDaemonSeconds = (Date.parse(rs.recovery?.resyncDoneAt ?? '') - Date.parse(rs.recovery?.resyncStartedAt ?? '')) / 1000;
    if (process.env.BENCH_LOG_DIR) await dumpLogs(process.env.BENCH_LOG_DIR, { A: a, B: b }, Date.parse(rs.recovery?.resyncStartedAt ?? ''), Date.parse(rs.recovery?.resyncDoneAt ?? ''));
    const same = (await a.digest('db')) === (await b.digest('db'));
    const floor = await fileWorkFloor(dir, differList, (await a.api<{ threadPoolSize: number }>('GET', '/api/v1/site')).body.threadPoolSize);
    await run('sync');
    const [failbackSeconds, fb] = await timed(() => b.cli(['failback', 'db']));
    if (fb.code !== 0) throw new Error(fb.stderr);
    // Counted from the failover on: the copy's frames and any delta sets, framing included.
    const wire = rs.bytesSent;
    const changedBytes = differ * bs;

    // The same again the other way: A (the source again) writes 1% B never gets, B takes
    // over and writes 1%, and A keeps its data: `resync --reverse` rebuilds B from A.
    await waitInSync(a, b, 'db', 'db', 600_000);
    if ((await a.cli(['replicate', 'pause', 'db'])).code !== 0) throw new Error('pause failed');
    await randomBlockWrites(a, changedPercent);
    await a.api('POST', '/api/v1/replication/db/delta');
    const fo2 = await b.cli(['failover', 'db']);
    if (fo2.code !== 0) throw new Error(fo2.stderr);
    await randomBlockWrites(b, changedPercent);
    const differReverse = (await differingBlocks(a, b, dir)).length;
    await run('sync');
    const [reverseSeconds, rv] = await timed(async () => {
      const r = await a.cli(['resync', 'db', '--reverse']);
      if (r.code !== 0) throw new Error(r.stderr);
      await waitFor('resync --reverse done', async () => (await pairStatus(a, 'db')).recovery?.phase === 'resynced', 600_000, 100);
      await waitInSync(a, b, 'db', 'db', 600_000);
      return pairStatus(a, 'db');
    });
    const reverseDaemonSeconds = (Date.parse(rv.recovery?.resyncDoneAt ?? '') - Date.parse(rv.recovery?.resyncStartedAt ?? '')) / 1000;
    const sameReverse = (await a.digest('db')) === (await b.digest('db'));
    const rows = [
      ['resync bytes on the wire / changed bytes', `${(wire / MiB).toFixed(1)} MiB`, `${(changedBytes / MiB).toFixed(1)} MiB (${differ} blocks differ)`, (wire / changedBytes).toFixed(3), `<= 1.1; full copy: ${rs.recovery?.fullCopy ? 'YES' : 'no'}; digests ${same ? 'equal' : 'DIFFER'}`],
      ['resync time / full-copy time (daemon)', `${resyncDaemonSeconds.toFixed(2)} s`, `${fullCopyDaemonSeconds.toFixed(2)} s`, (resyncDaemonSeconds / fullCopyDaemonSeconds).toFixed(3), '<= 0.05; command accepted to copy complete, both'],
      [
        'file-work floor (no ferry) / full-copy time',
        `${(floor.wallMs / 1000).toFixed(2)} s`,
        `${fullCopyDaemonSeconds.toFixed(2)} s`,
        (floor.wallMs / 1000 / fullCopyDaemonSeconds).toFixed(3),
        `the resync's reads, before-image appends, writes and flushes alone (bench/io-floor): ${Object.entries(floor.phasesMs).map(([k, v]) => `${k} ${v}`).join(', ')} ms; ` +
          `${floor.cpuMs} ms CPU, so at least ${(floor.cpuMs / 1000 / cpus).toFixed(2)} s on ${cpus} CPUs however overlapped (ratio ${(floor.cpuMs / 1000 / cpus / fullCopyDaemonSeconds).toFixed(3)})`,
      ],
      ['resync time / file-work floor', `${resyncDaemonSeconds.toFixed(2)} s`, `${(floor.wallMs / 1000).toFixed(2)} s`, (resyncDaemonSeconds / (floor.wallMs / 1000)).toFixed(2), 'what ferry adds: network, checksums, snapshots, catalog, two processes on one machine'],
      ['resync time / full-copy time (CLI wall)', `${resyncSeconds.toFixed(2)} s`, `${fullCopySeconds.toFixed(2)} s`, (resyncSeconds / fullCopySeconds).toFixed(3), 'CLI start and status polling included'],
      [
        'resync CPU / full-copy CPU (CLI wall)',
        describeCpu(resyncCpu),
        describeCpu(fullCopyCpu),
        (resyncCpu.machineSeconds / fullCopyCpu.machineSeconds).toFixed(3),
        `machine CPU per block: resync ${((resyncCpu.machineSeconds / differ) * 1e6).toFixed(0)} µs, full copy ${((fullCopyCpu.machineSeconds / (volumeBytes / bs)) * 1e6).toFixed(0)} µs`,
      ],
      [
        'resync --reverse bytes on the wire / changed bytes',
        `${(rv.bytesSent / MiB).toFixed(1)} MiB`,
        `${((differReverse * bs) / MiB).toFixed(1)} MiB (${differReverse} blocks differ)`,
        (rv.bytesSent / (differReverse * bs)).toFixed(3),
        `full copy: ${rv.recovery?.fullCopy ? 'YES' : 'no'}; digests ${sameReverse ? 'equal' : 'DIFFER'}`,
      ],
      ['resync --reverse time / full-copy time', `${reverseDaemonSeconds.toFixed(2)} s (daemon)`, `${fullCopyDaemonSeconds.toFixed(2)} s`, (reverseDaemonSeconds / fullCopyDaemonSeconds).toFixed(3), `CLI wall ${reverseSeconds.toFixed(2)} s`],
      ['failover: command to read/write', `${failover.tookMs} ms (daemon)`, `${(failoverCliSeconds * 1000).toFixed(0)} ms (CLI wall)`, '-', `< 1 s; source fenced: ${failover.sourceFenced}`],
      ['failback (swap roles, no copy)', `${failbackSeconds.toFixed(2)} s`, '-', '-', ''],
    ];
    console.log(`\nferry recovery benchmark: ${(volumeBytes / GiB).toFixed(0)} GiB volume, ${changedPercent}% of blocks changed on each side\n`);
    console.log(table(['measure', 'ferry', 'reference', 'ratio', 'target / notes'], rows));
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
    await memory.release();
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
