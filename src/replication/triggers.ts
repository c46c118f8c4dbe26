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

export class DeltaSetTrigger {
  private deadlineMs: number;
  private demanded = false;

  constructor(
    private policy: TriggerPolicy,
    nowMs: number,
  ) {
    this.deadlineMs = nowMs + policy.intervalMs;
  }

  demand(): void {
    this.demanded = true;
  }

  setPolicy(policy: TriggerPolicy, nowMs: number): void {
    this.policy = policy;
    this.deadlineMs = Math.min(this.deadlineMs, nowMs + policy.intervalMs);
  }

  /** The reason to cut now, or undefined. An interval with nothing modified cuts nothing. */
  due(nowMs: number, modifiedBytes: number): TriggerReason | undefined {
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

  msUntilDeadline(nowMs: number): number {
    return Math.max(0, this.deadlineMs - nowMs);
  }
}
