/**
 * The bytes received on a connection and not yet consumed, as a list of chunks.
 * Parsers peek at fixed-size headers and take payloads without copying when a payload
 * lies inside one chunk (the common case for small writes); a payload spanning chunks
 * is copied once into a buffer of its own.
 */
export class ByteQueue {
  private chunks: Buffer[] = [];
  private head = 0; // offset of the first unconsumed byte in chunks[0]
  private total = 0;

  get length(): number {
    return this.total;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /** The next `n` bytes without consuming them; undefined if fewer are queued. */
  peek(n: number): Buffer | undefined {
    if (n > this.total) return undefined;
    const first = this.chunks[0];
    if (first && first.length - this.head >= n) return first.subarray(this.head, this.head + n);
    return this.gather(n);
  }

  /** Consumes and returns the next `n` bytes; undefined (nothing consumed) if fewer are queued. */
  take(n: number): Buffer | undefined {
    const out = this.peek(n);
    if (out) this.skip(n);
    return out;
  }

  /** Consumes the next `n` bytes as views of the chunks holding them (no copy); undefined if fewer are queued. */
  takeChunks(n: number): Buffer[] | undefined {
    if (n > this.total) return undefined;
    const out: Buffer[] = [];
    let left = n;
    while (left > 0) {
      const first = this.chunks[0] as Buffer;
      const available = first.length - this.head;
      const part = Math.min(available, left);
      out.push(first.subarray(this.head, this.head + part));
      left -= part;
      if (part === available) {
        this.chunks.shift();
        this.head = 0;
      } else {
        this.head += part;
      }
    }
    this.total -= n;
    return out;
  }

  /** Discards up to `n` bytes; returns how many were discarded. */
  skip(n: number): number {
    let left = Math.min(n, this.total);
    const done = left;
    while (left > 0) {
      const first = this.chunks[0] as Buffer;
      const available = first.length - this.head;
      if (available > left) {
        this.head += left;
        left = 0;
      } else {
        left -= available;
        this.chunks.shift();
        this.head = 0;
      }
    }
    this.total -= done;
    return done;
  }

  clear(): void {
    this.chunks = [];
    this.head = 0;
    this.total = 0;
  }

  private gather(n: number): Buffer {
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    let head = this.head;
    for (const chunk of this.chunks) {
      const part = Math.min(chunk.length - head, n - filled);
      chunk.copy(out, filled, head, head + part);
      filled += part;
      head = 0;
      if (filled === n) break;
    }
    return out;
  }
}
