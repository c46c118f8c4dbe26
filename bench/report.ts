/** Shared by the benchmarks: aligned text tables, wall-clock timing, the memory condition, CPU and disk use over a run. */
import { mkdir, open, readFile, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';

export function table(headers: string[], rows: string[][]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  return [headers, ...rows].map((r) => r.map((c, i) => c.padEnd(widths[i] ?? 0)).join('  ')).join('\n');
}

/** Runs `fn` and returns the seconds it took with its result. */
export async function timed<T>(fn: () => Promise<T>): Promise<[number, T]> {
  const t0 = process.hrtime.bigint();
  const v = await fn();
  return [Number(process.hrtime.bigint() - t0) / 1e9, v];
}

/**
 * Holds the machine's free memory in the page cache, as a storage server's memory is
 * held, so that every measured side gets new page-cache pages the same way: by
 * reclaiming clean pages.
 *
 * Why: on a VM whose balloon reports free memory to the hypervisor (virtio free page
 * reporting), the first write into memory that has been free for a few seconds costs
 * the guest a hypervisor fault per page: 5.4 s for 2 GiB on the machine these figures
 * come from, against 0.46 s into memory just freed. A comparison then measures which
 * side touched more new memory (ferry's target, beside a separate source volume, does
 * in a copy; the replicated run's save volumes do in (b)), not the software.
 *
 * `fill()` reads a new sparse scratch file as large as the free memory less
 * `keepFreeBytes`: holes read as zeros, so its pages cost no disk and stay clean,
 * reclaimable pages. Call it before writing a comparison's data, so the scratch pages
 * are the oldest and reclaim takes them first. Scratch files are removed by
 * `release()` (removing one earlier would free its memory again).
 */
export class MemoryOccupier {
  private files = 0;

  /** Off when BENCH_MEMORY=fresh: the sides then get whatever memory the kernel hands out. */
  readonly enabled = process.env.BENCH_MEMORY !== 'fresh';

  constructor(
    private readonly dir: string,
    private readonly keepFreeBytes = 1024 ** 3,
  ) {}

  /** For a report's header: which memory condition the figures were taken in. */
  get condition(): string {
    return this.enabled ? 'free memory held in the page cache (BENCH_MEMORY=fresh to turn off)' : 'fresh memory (BENCH_MEMORY=fresh)';
  }

  /** Reads free memory less `keepFreeBytes` into the page cache; returns the bytes read. */
  async fill(): Promise<number> {
    if (!this.enabled) return 0;
    const free = await freeMemoryBytes();
    const bytes = free === undefined ? 0 : Math.floor((free - this.keepFreeBytes) / (1024 * 1024)) * 1024 * 1024;
    if (bytes <= 0) return 0;
    await mkdir(this.dir, { recursive: true });
    const fh = await open(join(this.dir, `scratch-${this.files++}`), 'w+');
    try {
      await fh.truncate(bytes);
      const buf = Buffer.allocUnsafe(8 * 1024 * 1024);
      for (let at = 0; at < bytes; at += buf.length) await fh.read(buf, 0, Math.min(buf.length, bytes - at), at);
    } finally {
      await fh.close();
    }
    return bytes;
  }

  async release(): Promise<void> {
    await rm(this.dir, { recursive: true, force: true });
  }
}

/** Bytes of free memory, or undefined off Linux. */
async function freeMemoryBytes(): Promise<number | undefined> {
  const info = await readFile('/proc/meminfo', 'utf8').catch(() => '');
  const kb = /^MemFree:\s+(\d+) kB/m.exec(info)?.[1];
  return kb === undefined ? undefined : Number(kb) * 1024;
}

/** What a `CpuMeter` saw between its start and `stop()`. */
export interface CpuUse {
  seconds: number;
  /** CPU-seconds the whole machine spent busy (every process, the kernel's threads too). */
  machineSeconds: number;
  /** Busy share of all the machine's CPUs, 0 to 1. */
  busy: number;
  /** CPU-seconds of each watched process (all its threads). */
  byProcess: Record<string, number>;
  /** Bytes the machine's disks wrote (every process, writeback included). */
  diskWrittenBytes: number;
}

/**
 * Counts CPU time over a measured run, from /proc: the machine's busy time and the
 * watched processes' own. On a machine whose CPUs are all busy in the reference run,
 * anything more the measured side does shows in wall time; these figures say how much
 * CPU each side took for the same work.
 */
export class CpuMeter {
  private constructor(
    private readonly pids: Record<string, number>,
    private readonly startedAt: bigint,
    private readonly machineAtStart: MachineCounters,
    private readonly processAtStart: Record<string, number>,
  ) {}

  static async start(pids: Record<string, number | undefined> = {}): Promise<CpuMeter> {
    const watched = Object.fromEntries(Object.entries(pids).filter((e): e is [string, number] => e[1] !== undefined));
    const [machine, processes] = await Promise.all([machineCounters(), processTicks(watched)]);
    return new CpuMeter(watched, process.hrtime.bigint(), machine, processes);
  }

  async stop(): Promise<CpuUse> {
    const [machine, processes] = await Promise.all([machineCounters(), processTicks(this.pids)]);
    const seconds = Number(process.hrtime.bigint() - this.startedAt) / 1e9;
    const busyTicks = machine.busy - this.machineAtStart.busy;
    const totalTicks = machine.total - this.machineAtStart.total;
    const byProcess: Record<string, number> = {};
    for (const [name, ticks] of Object.entries(processes)) byProcess[name] = (ticks - (this.processAtStart[name] ?? 0)) / clockTicksPerSecond;
    return {
      seconds,
      machineSeconds: busyTicks / clockTicksPerSecond,
      busy: totalTicks > 0 ? busyTicks / totalTicks : 0,
      byProcess,
      diskWrittenBytes: machine.diskWrittenBytes - this.machineAtStart.diskWrittenBytes,
    };
  }
}

/** USER_HZ: the unit of /proc's CPU times (100 on every Linux this runs on). */
const clockTicksPerSecond = 100;

interface MachineCounters {
  busy: number;
  total: number;
  diskWrittenBytes: number;
}

/**
 * The machine's busy and total ticks over all CPUs (idle and I/O wait count as not
 * busy), and the bytes its disks have written: whole disks only, not partitions,
 * loop or memory devices.
 */
async function machineCounters(): Promise<MachineCounters> {
  const [stat, disks, blocks] = await Promise.all([readFile('/proc/stat', 'utf8'), readFile('/proc/diskstats', 'utf8').catch(() => ''), readdir('/sys/block').catch(() => [] as string[])]);
  const fields = (stat.split('\n')[0] ?? '').trim().split(/\s+/).slice(1, 9).map(Number);
  const total = fields.reduce((s, v) => s + v, 0);
  const idle = (fields[3] ?? 0) + (fields[4] ?? 0);
  const wholeDisks = new Set(blocks.filter((d) => !/^(loop|ram|zram)/.test(d)));
  let sectors = 0;
  for (const line of disks.split('\n')) {
    const f = line.trim().split(/\s+/);
    // Field 10 is sectors written, in 512-byte units whatever the device's sector size.
    if (f[2] !== undefined && wholeDisks.has(f[2])) sectors += Number(f[9] ?? 0);
  }
  return { busy: total - idle, total, diskWrittenBytes: sectors * 512 };
}

/** User and system ticks of each process so far (a process gone counts as 0). */
async function processTicks(pids: Record<string, number>): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  await Promise.all(
    Object.entries(pids).map(async ([name, pid]) => {
      const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
      // Fields after the command name (which may hold spaces) in parentheses: utime and stime are the 12th and 13th.
      const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      out[name] = Number(rest[11] ?? 0) + Number(rest[12] ?? 0);
    }),
  );
  return out;
}

/** "A 1.2 + B 0.8 CPU-s; machine 2.3 CPU-s, 96% busy; disk wrote 1.50 GiB" */
export function describeCpu(use: CpuUse): string {
  const own = Object.entries(use.byProcess).map(([name, s]) => `${name} ${s.toFixed(1)}`);
  return `${own.length > 0 ? `${own.join(' + ')} CPU-s; ` : ''}machine ${use.machineSeconds.toFixed(1)} CPU-s, ${(use.busy * 100).toFixed(0)}% busy; disk wrote ${(use.diskWrittenBytes / 1024 ** 3).toFixed(2)} GiB`;
}
