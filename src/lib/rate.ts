import type { Clock } from './clock.js';
import { assert } from './errors.js';

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

/** A cap below which a rate limit would starve a session of frames (a 4 MiB copy piece then waits 16 s). */
export const rateLimitBytesMin = 256 * 1024;
/** What an idle sender may save up and spend at once, in time at its rate. */
export const rateLimitBurstMs = 250;

/**
 * A cap on a transfer's rate (SnapMirror's throttle, DRBD's c-max-rate): a token
 * bucket that may go into debt. A send of any size goes out once the bucket holds no
 * debt, and the debt is paid back at the rate, so over any stretch the bytes sent stay
 * within the rate times the stretch, plus one burst and the sends in flight. Rate 0:
 * no limit. Several senders may share one limiter.
 */
export class RateLimiter {
  private tokens = 0;
  private atMs: number;
  private changed = new AbortController();
  private lifts = 0;
  /** When a send last had to wait for the limit (clock ms; -Infinity: never). */
  heldAtMs = Number.NEGATIVE_INFINITY;

  constructor(
    private readonly clock: Clock,
    private bytesPerSecond = 0,
  ) {
    this.atMs = clock.now();
  }

  /** Bytes per second as set, lifted or not; 0: no limit. */
  get configuredRate(): number {
    return this.bytesPerSecond;
  }

  /** Bytes per second allowed now; 0 while unlimited (also while lifted). */
  get rate(): number {
    return this.lifts > 0 ? 0 : this.bytesPerSecond;
  }

  setRate(bytesPerSecond: number): void {
    assert(Number.isSafeInteger(bytesPerSecond) && bytesPerSecond >= 0, 'a rate limit is a whole number of bytes per second');
    this.refill();
    this.bytesPerSecond = bytesPerSecond;
    this.tokens = Math.min(this.tokens, this.burstBytes());
    this.wake();
  }

  /**
   * Lifts the limit until the returned function is called (hosts held for a role
   * change should not wait on a WAN budget). Lifts nest.
   */
  lift(): () => void {
    this.lifts++;
    this.wake();
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this.lifts--;
      this.atMs = this.clock.now();
    };
  }

  /** Waits until `bytes` may go (they are counted at once), or until `stop` aborts. */
  async take(bytes: number, stop?: AbortSignal): Promise<void> {
    for (;;) {
      if (this.rate === 0 || stop?.aborted) return;
      this.refill();
      if (this.tokens >= 0) {
        this.tokens -= bytes;
        return;
      }
      const waitMs = Math.ceil((-this.tokens * 1000) / this.rate);
      this.heldAtMs = this.clock.now() + waitMs;
      await this.clock.sleep(waitMs, stop ? AbortSignal.any([this.changed.signal, stop]) : this.changed.signal);
    }
  }

  private refill(): void {
    const now = this.clock.now();
    const rate = this.rate;
    if (rate > 0 && now > this.atMs) this.tokens = Math.min(this.burstBytes(), this.tokens + ((now - this.atMs) * rate) / 1000);
    this.atMs = now;
  }

  private burstBytes(): number {
    return (this.bytesPerSecond * rateLimitBurstMs) / 1000;
  }

  private wake(): void {
    this.changed.abort();
    this.changed = new AbortController();
  }
}
