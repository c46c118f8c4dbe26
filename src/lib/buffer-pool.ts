/**
 * Large buffers of one size, kept for reuse. A bulk transfer (a copy's pieces, frames
 * of several MiB) that allocated a new buffer per piece would have the kernel zero
 * fresh pages for each and V8 run a full collection every few dozen MiB of external
 * memory; a few buffers reused avoid both.
 *
 * A buffer is given back only by the one code path that knows nothing refers to it
 * any more; a buffer never given back is simply collected.
 */
export class BufferPool {
  private readonly free: Buffer[] = [];

  constructor(
    readonly bufferBytes: number,
    private readonly keepMax: number,
  ) {}

  /** A buffer of `bufferBytes`, contents undefined. */
  take(): Buffer {
    return this.free.pop() ?? Buffer.allocUnsafeSlow(this.bufferBytes);
  }

  /** Returns a buffer from `take` (whole, not a view of part of it). */
  give(buffer: Buffer): void {
    if (buffer.byteLength !== this.bufferBytes || buffer.buffer.byteLength !== this.bufferBytes) return;
    if (this.free.length < this.keepMax && !this.free.includes(buffer)) this.free.push(buffer);
  }

  /** A function that gives `buffer` back the first time it is called and does nothing after. */
  releaser(buffer: Buffer): () => void {
    let given = false;
    return () => {
      if (given) return;
      given = true;
      this.give(buffer);
    };
  }

  get kept(): number {
    return this.free.length;
  }
}
