/** Renders rows as an aligned text table with a header line. */
export function table(headers: string[], rows: string[][]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]): string =>
    cells
      .map((c, i) => c.padEnd(widths[i] ?? 0))
      .join('  ')
      .trimEnd();
  return [line(headers), ...rows.map(line)].join('\n');
}

/** Renders an object as `key: value` lines. */
export function keyValues(pairs: [string, string][]): string {
  const width = Math.max(...pairs.map(([k]) => k.length));
  return pairs.map(([k, v]) => `${`${k}:`.padEnd(width + 1)} ${v}`).join('\n');
}

/**
 * A progress bar on stderr: redrawn in place on a terminal, a line every 2 s otherwise
 * (a log), and nothing when disabled (`--json`).
 */
export class ProgressBar {
  private drawnAtMs = 0;
  private readonly tty = process.stderr.isTTY === true;

  constructor(private readonly enabled: boolean) {}

  /** `fraction` done (0..1) and what follows the percentage; `last` is drawn whatever the time. */
  update(fraction: number, detail: string, last = false): void {
    if (!this.enabled || (!last && Date.now() - this.drawnAtMs < (this.tty ? 500 : 2000))) return;
    this.drawnAtMs = Date.now();
    const width = 30;
    const filled = Math.round(Math.min(1, Math.max(0, fraction)) * width);
    const line = `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${(fraction * 100).toFixed(1)}% ${detail}`;
    process.stderr.write(this.tty ? `\r${line}` : `${line}\n`);
  }

  /** Ends the bar's line on a terminal. */
  end(): void {
    if (this.enabled && this.tty && this.drawnAtMs > 0) process.stderr.write('\n');
  }
}
