/** Shared by the benchmarks: aligned text tables, wall-clock timing, the memory condition. */
import { mkdir, open, readFile, rm } from 'node:fs/promises';
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
