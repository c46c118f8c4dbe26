import type { Clock } from './clock.js';

/** A transfer's rate: bytes per second over the last seconds, and since it started. */
export class RateMeter {
  private window: { atMs: number; bytes: number }[] = [];
  private sinceMs = 0;
  private total = 0;

  constructor(
    private readonly clock: Clock,
    private readonly windowMs = 5_000,
  ) {}

  /** The transfer started (the average counts from here, even before the first byte). */
  start(): void {
    if (this.sinceMs === 0) this.sinceMs = this.clock.now();
  }

  count(bytes: number): void {
    this.start();
    this.total += bytes;
    this.window.push({ atMs: this.clock.now(), bytes });
    this.trim();
  }

  rates(): { current: number; average: number } {
    this.trim();
    const windowBytes = this.window.reduce((s, r) => s + r.bytes, 0);
    const elapsed = this.sinceMs > 0 ? Math.max(1, this.clock.now() - this.sinceMs) : 0;
    // A transfer younger than the window is measured over its own age (at least a second).
    const spanMs = Math.min(this.windowMs, Math.max(1000, elapsed));
    return { current: (windowBytes * 1000) / spanMs, average: elapsed > 0 ? (this.total * 1000) / elapsed : 0 };
  }

  private trim(): void {
    const now = this.clock.now();
    while (this.window.length > 0 && now - (this.window[0] as { atMs: number }).atMs > this.windowMs) this.window.shift();
  }
}
