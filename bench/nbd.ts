/**
 * NBD benchmark: the same fio jobs against ferry's NBD server and against
 * `qemu-nbd -f raw -t` (default writeback cache) serving a raw file on the same disk,
 * in one run. Prints IOPS, MiB/s, p99 completion latency and ferry/qemu-nbd ratios,
 * plus each server's resident memory.
 *
 *   npm run build && node dist/bench/nbd.js [--size 1G] [--runtime 10] [--rounds 3] [--dir /tmp]
 *
 * Each job runs `rounds` times against each server, alternating ferry and qemu-nbd, and
 * the median round is reported: on a shared machine, load from elsewhere then hits both
 * sides alike instead of skewing one ratio.
 */
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { mkdtemp, readFile, rm, open } from 'node:fs/promises';
import { createServer } from 'node:net';
import { availableParallelism, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import { promisify } from 'node:util';
import { parseSize } from '../src/lib/units.js';

const execFileP = promisify(execFile);
const here = dirname(fileURLToPath(import.meta.url));
const ferryBin = join(here, '..', 'src', 'cli', 'ferry.cjs');

interface Job {
  name: string;
  rw: string;
  bs: string;
  iodepth: number;
}

const jobs: Job[] = [
  { name: '4k randwrite QD32', rw: 'randwrite', bs: '4k', iodepth: 32 },
  { name: '4k randread QD32', rw: 'randread', bs: '4k', iodepth: 32 },
  { name: '1M seq write QD8', rw: 'write', bs: '1m', iodepth: 8 },
  { name: '1M seq read QD8', rw: 'read', bs: '1m', iodepth: 8 },
];

interface Result {
  iops: number;
  mibps: number;
  p99us: number;
  /** Server CPU time (all threads, user + system) per I/O, in microseconds. */
  cpuUsPerIo: number;
}

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] !== undefined ? (process.argv[i + 1] as string) : fallback;
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

/** User + system CPU time of a process, all threads, in microseconds (from /proc/PID/stat). */
async function cpuUs(pid: number): Promise<number> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const ticks = Number(fields[11]) + Number(fields[12]);
  return (ticks / clockTicksPerSecond) * 1e6;
}

/** USER_HZ; 100 on every Linux build that matters here. */
const clockTicksPerSecond = 100;

async function fio(uri: string, job: Job, sizeBytes: number, runtimeS: number, serverPid: number): Promise<Result> {
  const cpuBefore = await cpuUs(serverPid);
  const { stdout } = await execFileP(
    'fio',
    [
      '--name=bench',
      '--ioengine=nbd',
      `--uri=${uri}`,
      `--rw=${job.rw}`,
      `--bs=${job.bs}`,
      `--iodepth=${job.iodepth}`,
      `--size=${sizeBytes}`,
      '--time_based=1',
      `--runtime=${runtimeS}`,
      '--ramp_time=1',
      '--output-format=json',
    ],
    { maxBuffer: 64 * 1024 * 1024 },
  );
  const parsed = JSON.parse(stdout.slice(stdout.indexOf('{'))) as {
    jobs: { error: number; read: FioSide; write: FioSide }[];
  };
  const j = parsed.jobs[0];
  if (!j || j.error !== 0) throw new Error(`fio failed: ${stdout}`);
  const side = job.rw.includes('read') ? j.read : j.write;
  const cpu = (await cpuUs(serverPid)) - cpuBefore;
  // fio's counts exclude the ramp-up second; the CPU time includes it, so count its I/O too.
  const ios = side.iops * (runtimeS + 1);
  return { iops: side.iops, mibps: side.bw_bytes / 1024 / 1024, p99us: (side.clat_ns.percentile['99.000000'] ?? 0) / 1000, cpuUsPerIo: cpu / ios };
}

interface FioSide {
  iops: number;
  bw_bytes: number;
  clat_ns: { percentile: Record<string, number> };
}

/** Fills the export so that reads see data, not holes. */
async function prefill(uri: string, sizeBytes: number): Promise<void> {
  await execFileP('fio', ['--name=fill', '--ioengine=nbd', `--uri=${uri}`, '--rw=write', '--bs=1m', '--iodepth=8', `--size=${sizeBytes}`, '--output-format=terse']);
}

async function rssKiB(pid: number): Promise<{ rss: number; hwm: number }> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const get = (k: string): number => Number(new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(status)?.[1] ?? NaN);
  return { rss: get('VmRSS'), hwm: get('VmHWM') };
}

async function startFerry(root: string, sizeBytes: number): Promise<{ proc: ChildProcess; uri: string }> {
  const dir = join(root, 'site');
  await execFileP(process.execPath, [ferryBin, 'site', 'init', '--dir', dir, '--name', 'bench', '--listen', '127.0.0.1:0', '--nbd', '127.0.0.1:0']);
  // Info level: per-connection and per-request logs are debug, so nothing is logged while fio runs.
  const proc = spawn(process.execPath, [ferryBin, 'site', 'start', '--dir', dir], { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, FERRY_LOG_LEVEL: 'info' } });
  const started = await new Promise<{ listen: string; nbd: string }>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error('ferry did not start')), 20_000);
    const rl = createInterface({ input: proc.stdout! });
    rl.on('line', (l) => {
      try {
        const j = JSON.parse(l) as { msg?: string; listen?: string; nbd?: string };
        if (j.msg === 'site started' && j.listen && j.nbd) {
          clearTimeout(t);
          resolve({ listen: j.listen, nbd: j.nbd });
        }
      } catch {
        /* not a log line */
      }
    });
  });
  const res = await fetch(`http://${started.listen}/api/v1/volumes`, { method: 'POST', body: JSON.stringify({ name: 'bench', size: sizeBytes }), headers: { 'content-type': 'application/json' } });
  if (res.status !== 201) throw new Error(`volume create failed: ${await res.text()}`);
  return { proc, uri: `nbd://${started.nbd}/bench` };
}

async function startQemuNbd(root: string, sizeBytes: number): Promise<{ proc: ChildProcess; uri: string }> {
  const file = join(root, 'qemu.raw');
  const fh = await open(file, 'w');
  await fh.truncate(sizeBytes);
  await fh.close();
  const port = await freePort();
  const proc = spawn('qemu-nbd', ['-f', 'raw', '-t', '-b', '127.0.0.1', '-p', String(port), '-x', 'bench', file], { stdio: ['ignore', 'inherit', 'inherit'] });
  for (let i = 0; i < 100; i++) {
    try {
      await execFileP('nbdinfo', ['--size', `nbd://127.0.0.1:${port}/bench`]);
      return { proc, uri: `nbd://127.0.0.1:${port}/bench` };
    } catch {
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  throw new Error('qemu-nbd did not start');
}

/** The round with the median IOPS. */
function median(results: Result[]): Result {
  const sorted = [...results].sort((a, b) => a.iops - b.iops);
  return sorted[Math.floor(sorted.length / 2)] as Result;
}

function pad(s: string, n: number): string {
  return s.length >= n ? s : s + ' '.repeat(n - s.length);
}

async function main(): Promise<void> {
  const sizeBytes = parseSize(arg('size', '1G'));
  const runtimeS = Number(arg('runtime', '10'));
  const rounds = Math.max(1, Number(arg('rounds', '3')));
  const root = await mkdtemp(join(arg('dir', tmpdir()), 'ferry-bench-'));
  const ferry = await startFerry(root, sizeBytes);
  const qemu = await startQemuNbd(root, sizeBytes);
  try {
    await prefill(ferry.uri, sizeBytes);
    await prefill(qemu.uri, sizeBytes);
    const rows: { job: Job; f: Result; q: Result }[] = [];
    for (const job of jobs) {
      const fs: Result[] = [];
      const qs: Result[] = [];
      for (let i = 0; i < rounds; i++) {
        fs.push(await fio(ferry.uri, job, sizeBytes, runtimeS, ferry.proc.pid as number));
        qs.push(await fio(qemu.uri, job, sizeBytes, runtimeS, qemu.proc.pid as number));
      }
      const f = median(fs);
      const q = median(qs);
      rows.push({ job, f, q });
      process.stderr.write(`${job.name}: ferry ${f.iops.toFixed(0)} IOPS, qemu-nbd ${q.iops.toFixed(0)} IOPS\n`);
    }
    const fm = await rssKiB(ferry.proc.pid as number);
    const qm = await rssKiB(qemu.proc.pid as number);
    const header = ['job', 'ferry IOPS', 'qemu IOPS', 'ferry MiB/s', 'qemu MiB/s', 'ferry p99 us', 'qemu p99 us', 'ratio', 'CPU us/IO ferry', 'qemu'];
    const widths = [20, 11, 11, 12, 11, 13, 12, 6, 15, 6];
    const line = (cells: string[]): string => `| ${cells.map((c, i) => pad(c, widths[i] ?? 8)).join(' | ')} |`;
    const out = [line(header), `|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`];
    for (const { job, f, q } of rows) {
      out.push(
        line([
          job.name,
          f.iops.toFixed(0),
          q.iops.toFixed(0),
          f.mibps.toFixed(1),
          q.mibps.toFixed(1),
          f.p99us.toFixed(0),
          q.p99us.toFixed(0),
          (f.iops / q.iops).toFixed(2),
          f.cpuUsPerIo.toFixed(1),
          q.cpuUsPerIo.toFixed(1),
        ]),
      );
    }
    out.push('');
    out.push(`RSS after the run: ferry ${(fm.rss / 1024).toFixed(0)} MiB (peak ${(fm.hwm / 1024).toFixed(0)} MiB), qemu-nbd ${(qm.rss / 1024).toFixed(0)} MiB (peak ${(qm.hwm / 1024).toFixed(0)} MiB)`);
    out.push('ratio = ferry IOPS / qemu-nbd IOPS; CPU us/IO = server CPU time (all threads, user+system) per I/O');
    out.push(`volume ${sizeBytes} bytes, median of ${rounds} alternating rounds of ${runtimeS}s per job and server, ${availableParallelism()} CPUs`);
    process.stdout.write(`${out.join('\n')}\n`);
  } finally {
    ferry.proc.kill('SIGTERM');
    qemu.proc.kill('SIGTERM');
    await Promise.all([ferry.proc, qemu.proc].map((p) => new Promise((r) => (p.exitCode !== null ? r(null) : p.once('exit', r)))));
    await rm(root, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench failed: ${(err as Error).stack ?? String(err)}\n`);
  process.exit(1);
});
