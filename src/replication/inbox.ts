import { FerryError } from '../lib/errors.js';
import type { RcpConnection } from '../transport/connection.js';
import { FrameType, type Frame, type FrameHeader } from '../transport/frame.js';
import { ReplFrame, json, type AckBody } from './protocol.js';

/** Frames queued before a reader asks for them. Bounded: a peer that floods is cut off. */
const inboxFramesMax = 1024;

/**
 * Turns a connection's frame events into awaited reads with a timeout, so a sender or
 * receiver reads its session as straight-line code.
 */
export class Inbox {
  private readonly queue: Frame[] = [];
  private waiter: { resolve: (f: Frame) => void; reject: (e: Error) => void } | undefined;
  private failure: Error | undefined;
  private readonly onFrame = (frame: Frame): void => {
    if (frame.type === FrameType.Pong) return;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = undefined;
      w.resolve(frame);
    } else if (this.queue.length >= inboxFramesMax) {
      this.fail(new FerryError('PROTOCOL_ERROR', 'peer sent too many frames without being read'));
      this.connection.destroy();
    } else {
      this.queue.push(frame);
    }
  };
  private readonly onCorrupt = (header: FrameHeader): void => {
    this.corrupt.push(header);
  };
  private readonly onClose = (): void => this.fail(new FerryError('UNAVAILABLE', 'peer closed the replication connection'));
  private readonly onError = (err: Error): void => this.fail(err);
  /** Frames whose payload failed its checksum (header intact), for the owner to handle. */
  readonly corrupt: FrameHeader[] = [];

  constructor(private readonly connection: RcpConnection) {
    connection.on('frame', this.onFrame);
    connection.on('corrupt', this.onCorrupt);
    connection.on('close', this.onClose);
    connection.on('error', this.onError);
    if (connection.isClosed) this.onClose();
  }

  next(timeoutMs: number): Promise<Frame> {
    const queued = this.queue.shift();
    if (queued) return Promise.resolve(queued);
    if (this.failure) return Promise.reject(this.failure);
    return new Promise<Frame>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = undefined;
        reject(new FerryError('UNAVAILABLE', `no answer from the peer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiter = {
        resolve: (f) => {
          clearTimeout(timer);
          resolve(f);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
    });
  }

  /** The type of the frame `next` would return now without waiting, if one is queued. */
  get nextQueuedType(): number | undefined {
    return this.queue[0]?.type;
  }

  /** Consumes queued acknowledgements (while idle) and hands them to `fn`. */
  drainAcks(fn: (ack: AckBody) => void): void {
    for (let i = 0; i < this.queue.length; ) {
      const f = this.queue[i] as Frame;
      if (f.type === ReplFrame.Ack) {
        fn(json<AckBody>(f));
        this.queue.splice(i, 1);
      } else if (f.type === FrameType.Error) {
        const body = json<{ code: string; message: string }>(f);
        throw new FerryError('UNAVAILABLE', `peer: ${body.code}: ${body.message}`);
      } else i++;
    }
  }

  close(): void {
    this.connection.off('frame', this.onFrame);
    this.connection.off('corrupt', this.onCorrupt);
    this.connection.off('close', this.onClose);
    this.connection.off('error', this.onError);
  }

  private fail(err: Error): void {
    this.failure ??= err;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = undefined;
      w.reject(err);
    }
  }
}
