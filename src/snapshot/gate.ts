const noop = (): void => undefined;

/**
 * A readers/writer gate over async work: `shared` runs overlap each other; an
 * `exclusive` run waits for every run started before it and holds back every run
 * started after it. Snapshot reads, deltas and restores are shared; creating and
 * deleting snapshots (which change the queue and move before-images) are exclusive.
 * Not re-entrant: code running inside a gate must not enter it again.
 */
export class Gate {
  private exclusiveTail: Promise<void> = Promise.resolve();
  private readonly sharedSince = new Set<Promise<void>>();

  shared<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.exclusiveTail.then(fn);
    const done = run.then(noop, noop);
    this.sharedSince.add(done);
    void done.then(() => this.sharedSince.delete(done));
    return run;
  }

  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const prior = Promise.all([this.exclusiveTail, ...this.sharedSince]);
    this.sharedSince.clear();
    const run = prior.then(fn);
    this.exclusiveTail = run.then(noop, noop);
    return run;
  }
}
