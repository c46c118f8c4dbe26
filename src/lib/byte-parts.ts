import type { FileHandle } from 'node:fs/promises';

/** The bytes in `parts` together. */
export function byteLength(parts: readonly Uint8Array[]): number {
  let n = 0;
  for (const p of parts) n += p.length;
  return n;
}

/** The parts left after the first `n` bytes of `parts` (what a short writev did not write). */
export function dropBytes<T extends Uint8Array>(parts: readonly T[], n: number): T[] {
  const out: T[] = [];
  let skip = n;
  for (const p of parts) {
    if (skip >= p.length) {
      skip -= p.length;
      continue;
    }
    out.push(skip > 0 ? (p.subarray(skip) as T) : p);
    skip = 0;
  }
  return out;
}

/** Writes `parts` one after the other at `position` with pwritev, again after a short write, until all are written. */
export async function writeAllv(fh: FileHandle, parts: readonly Uint8Array[], position: number): Promise<void> {
  const length = byteLength(parts);
  let rest = parts;
  for (let done = 0; done < length; ) {
    const { bytesWritten } = await fh.writev(rest, position + done);
    done += bytesWritten;
    if (done < length) rest = dropBytes(rest, bytesWritten);
  }
}
