/**
 * The size of libuv's thread pool, which carries every file read, write and flush of a
 * site. Node starts 4 threads whatever the machine; on a machine with fewer CPUs they
 * take the CPUs from each other and from the event loop (on 2 CPUs, 4 KiB random reads
 * over NBD went from 47k to 76k IOPS with 2 threads: `npm run bench:nbd`). So: one per
 * CPU, at least 2 (a read and a flush overlap), at most Node's own 4.
 * CommonJS, like the entry that uses it: see `ferry.cts`.
 */
export function threadPoolSize(cpus: number): number {
  return Math.min(4, Math.max(2, Math.floor(cpus)));
}
