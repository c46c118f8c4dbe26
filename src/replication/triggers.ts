/**
 * When to cut the next delta set (E FIG. 10 steps 343-350): a timeout re-armed at each
 * cut, a high-water mark of bytes modified, or on demand — whichever comes first.
 * Pure: the caller passes the clock's time and the bytes modified.
 */
export interface TriggerPolicy {
  intervalMs: number;
  highWaterBytes: number;
}

export type TriggerReason = 'interval' | 'high-water' | 'on-demand';

/** After a cut fails, the next waits this long, doubling with each failure in a row up to `cutRetryDelayMsMax`. */
export const cutRetryDelayMsMin = 1_000;
export const cutRetryDelayMsMax = 10_000;

export class DeltaSetTrigger {
  private deadlineMs: number;
  private demanded = false;
  /** Cuts that failed in a row, and when the next may be tried (a full disk must not be hammered). */
  private failures = 0;
  private retryAtMs = 0;

  constructor(
    private policy: TriggerPolicy,
    nowMs: number,
  ) {
    this.deadlineMs = nowMs + policy.intervalMs;
  }

  /** A cut is asked for now: it is tried at once, even within a retry delay. */
  demand(): void {
    this.demanded = true;
    this.retryAtMs = 0;
  }

  setPolicy(policy: TriggerPolicy, nowMs: number): void {
    this.policy = policy;
    this.deadlineMs = Math.min(this.deadlineMs, nowMs + policy.intervalMs);
  }

  /**
   * The reason to cut now, or undefined. An interval with nothing modified cuts nothing.
   * After a failed cut nothing is due until the retry delay has passed.
   */
  due(nowMs: number, modifiedBytes: number): TriggerReason | undefined {
    if (nowMs < this.retryAtMs) return undefined;
    if (this.demanded) return 'on-demand';
    if (modifiedBytes >= this.policy.highWaterBytes) return 'high-water';
    if (nowMs >= this.deadlineMs) {
      if (modifiedBytes > 0) return 'interval';
      this.deadlineMs = nowMs + this.policy.intervalMs;
    }
    return undefined;
  }

  /** Re-arms after a cut (step 350). */
  rearm(nowMs: number): void {
    this.demanded = false;
    this.deadlineMs = nowMs + this.policy.intervalMs;
  }

  /** A cut failed (its blocks stay tracked): whatever made it due is tried again after a delay. */
  failed(nowMs: number): number {
    this.failures++;
    const delayMs = Math.min(cutRetryDelayMsMax, cutRetryDelayMsMin * 2 ** Math.min(this.failures - 1, 16));
    this.retryAtMs = nowMs + delayMs;
    return delayMs;
  }

  /** A cut went through: the retry delay starts over. */
  succeeded(): void {
    this.failures = 0;
    this.retryAtMs = 0;
  }

  msUntilDeadline(nowMs: number): number {
    return Math.max(0, this.deadlineMs - nowMs);
  }
}
