/** Time as the deciding code sees it; the simulator and tests pass their own. */
export interface Clock {
  /** Wall-clock milliseconds (stamped into delta sets). */
  now(): number;
  /** Resolves after `ms` (or earlier if the signal is given). */
  sleep(ms: number, wake?: AbortSignal): Promise<void>;
}

export const systemClock: Clock = {
  now: () => Date.now(),
  sleep: (ms, wake) =>
    new Promise<void>((resolve) => {
      if (wake?.aborted) return resolve();
      const timer = setTimeout(done, ms);
      function done(): void {
        clearTimeout(timer);
        wake?.removeEventListener('abort', done);
        resolve();
      }
      wake?.addEventListener('abort', done, { once: true });
    }),
};

/** A resettable wake-up: `wait` resolves on the next `signal` or after a timeout. */
export class Waker {
  private controller = new AbortController();

  signal(): void {
    this.controller.abort();
    this.controller = new AbortController();
  }

  wait(clock: Clock, ms: number): Promise<void> {
    return clock.sleep(ms, this.controller.signal);
  }
}
