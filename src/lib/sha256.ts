import { Worker } from 'node:worker_threads';
import { FerryError } from './errors.js';

export type ToHasher = { type: 'data'; buffer: ArrayBuffer; byteOffset: number; byteLength: number } | { type: 'zeros'; bytes: number } | { type: 'end' };
type FromHasher = { type: 'hashed'; bytes: number; done: boolean } | { type: 'digest'; hex: string };

/** Messages sent and not yet hashed before `update` waits: bounds the memory held in flight. */
const inFlightMax = 4;

/**
 * SHA-256 computed on a worker thread. Hashing a large volume takes minutes (a 1 TiB
 * sparse volume is 1 TiB of zeros to hash, about 1.4 GB/s here); on the daemon's event
 * loop that would stall every host, session and heartbeat of the site meanwhile.
 */
export class Sha256InWorker {
  /** Bytes hashed so far. */
  hashedBytes = 0;
  private readonly worker: Worker;
  private inFlight = 0;
  private readonly waiting: (() => void)[] = [];
  private failure: Error | undefined;
  private result: { resolve(hex: string): void; reject(err: Error): void } | undefined;
  private closed = false;

  constructor(
    private readonly onProgress: (hashedBytes: number) => void = () => undefined,
    signal?: AbortSignal,
  ) {
    this.worker = new Worker(new URL('./sha256-worker.js', import.meta.url));
    this.worker.on('message', (m: FromHasher) => {
      if (m.type === 'digest') {
        this.result?.resolve(m.hex);
        return;
      }
      this.hashedBytes += m.bytes;
      this.onProgress(this.hashedBytes);
      if (m.done) {
        this.inFlight--;
        this.waiting.shift()?.();
      }
    });
    this.worker.on('error', (err) => this.fail(err));
    this.worker.on('exit', () => this.fail(new FerryError('INTERNAL', 'the hashing thread stopped')));
    signal?.addEventListener('abort', () => this.fail(new FerryError('UNAVAILABLE', 'the digest was cancelled')), { once: true });
  }

  /** Hashes `data` next. Takes the buffer: the caller must not touch it again. */
  async update(data: Buffer): Promise<void> {
    // Only a buffer that owns its whole memory can be handed over without a copy.
    const owned = data.byteOffset === 0 && data.byteLength === data.buffer.byteLength ? data : Buffer.from(data);
    const buffer = owned.buffer as ArrayBuffer;
    await this.send({ type: 'data', buffer, byteOffset: 0, byteLength: owned.byteLength }, [buffer]);
  }

  /** Hashes `bytes` zero bytes next. */
  async zeros(bytes: number): Promise<void> {
    if (bytes > 0) await this.send({ type: 'zeros', bytes });
  }

  /** The digest, once everything sent is hashed; the thread ends. */
  async digest(): Promise<string> {
    this.check();
    const hex = new Promise<string>((resolve, reject) => (this.result = { resolve, reject }));
    this.worker.postMessage({ type: 'end' } satisfies ToHasher);
    try {
      return await hex;
    } finally {
      await this.close();
    }
  }

  /** Stops the thread (after a failure of the caller's, or once the digest is known). */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.worker.terminate();
  }

  private async send(message: ToHasher, transfer: ArrayBuffer[] = []): Promise<void> {
    while (this.inFlight >= inFlightMax) {
      this.check();
      await new Promise<void>((resolve) => this.waiting.push(resolve));
    }
    this.check();
    this.inFlight++;
    this.worker.postMessage(message, transfer);
  }

  private check(): void {
    if (this.failure) throw this.failure;
  }

  private fail(err: Error): void {
    if (this.closed || this.failure) return;
    this.failure = err;
    for (const wake of this.waiting.splice(0)) wake();
    this.result?.reject(err);
    void this.worker.terminate();
  }
}
