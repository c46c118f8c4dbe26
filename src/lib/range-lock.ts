import { assert } from './errors.js';

interface Held {
  start: number;
  end: number;
  released: Promise<void>;
}

/**
 * Serialises operations on overlapping ranges (of blocks or bytes) while letting
 * disjoint ones run concurrently. Waiters are admitted in arrival order per overlap,
 * so an overwrite can never overtake the copy of the before-image it depends on.
 */
export class RangeLock {
  private readonly held = new Set<Held>();

  async acquire(start: number, end: number): Promise<() => void> {
    assert(end > start, `empty lock range ${start}..${end}`);
    let release!: () => void;
    const entry: Held = { start, end, released: new Promise<void>((resolve) => (release = resolve)) };
    const blockers = [...this.held].filter((h) => h.start < end && start < h.end);
    this.held.add(entry);
    if (blockers.length > 0) await Promise.all(blockers.map((b) => b.released));
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this.held.delete(entry);
      release();
    };
  }

  /** Waits until every operation now holding or waiting for a lock has finished. */
  async drain(): Promise<void> {
    await Promise.all([...this.held].map((h) => h.released));
  }

  get size(): number {
    return this.held.size;
  }
}
