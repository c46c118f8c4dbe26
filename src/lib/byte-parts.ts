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
