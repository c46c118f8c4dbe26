import { createServer, connect, type Server, type Socket } from 'node:net';
import { FrameDecoder, encodeFrame, rcpPreamble, type Frame } from '../../src/transport/frame.js';

export interface FaultPlan {
  /** Probability that a chunk of bytes from source to target gets one bit flipped (beyond the first `cleanBytes`). */
  flipProbability: number;
  /** Bytes of each connection left alone (so the handshake gets through). */
  cleanBytes: number;
  /** Probability, per chunk, of cutting the connection. */
  dropProbability: number;
  /** Probability, per chunk, of stalling the stream for `stallMs`. */
  stallProbability: number;
  stallMs: number;
}

interface RequestInspection {
  preamble: number;
  decoder: FrameDecoder;
  frames: number;
  connection: { slow: boolean };
}

export const noFaults: FaultPlan = { flipProbability: 0, cleanBytes: 0, dropProbability: 0, stallProbability: 0, stallMs: 0 };

/**
 * A TCP proxy on loopback between two sites that injects faults into the traffic:
 * flipped bits, dropped connections, stalls. Faults hit both directions, so damaged
 * acknowledgements are exercised too. Deterministic for a given seed.
 */
export class FaultProxy {
  private server: Server | undefined;
  private readonly sockets = new Set<Socket>();
  port = 0;
  flips = 0;
  drops = 0;
  stalls = 0;
  plan: FaultPlan = noFaults;
  /**
   * Frames from the target for which it answers true are taken out of the stream (lost
   * acknowledgements); the rest pass unchanged. Applies to connections made while set.
   */
  dropReply: ((frame: Frame) => boolean) | undefined;
  droppedReplies = 0;
  /**
   * Frames to the target for which it answers true cut their connection before they
   * reach it (a request lost with its connection). Applies to connections made while set.
   */
  cutRequest: ((frame: Frame) => boolean) | undefined;
  cutRequests = 0;
  /**
   * Connections with a frame to the target that `match` picks (among their first few)
   * carry at most `bytesPerSecond` each way while this is set; read live, so clearing it
   * lifts the limit at once. Slows one kind of connection: a pair's copy, say.
   */
  slowConnections: { match: (frame: Frame) => boolean; bytesPerSecond: number } | undefined;
  private seed: number;

  constructor(
    private readonly targetHost: string,
    private readonly targetPort: number,
    seed = 1,
  ) {
    this.seed = seed;
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  async start(): Promise<void> {
    this.server = createServer((client) => this.onClient(client));
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', resolve));
    const address = this.server.address();
    if (address && typeof address === 'object') this.port = address.port;
  }

  /** Cuts every connection now. */
  dropAll(): void {
    for (const s of this.sockets) s.destroy();
  }

  async close(): Promise<void> {
    this.dropAll();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }

  /** Passes the target's bytes through, less the frames `dropReply` picks (frames re-encode to the same bytes). */
  private filterReplies(state: { preamble: number; decoder: FrameDecoder }, data: Buffer): Buffer {
    const drop = this.dropReply ?? ((): boolean => false);
    const head = data.subarray(0, state.preamble);
    state.preamble -= head.length;
    const out: Buffer[] = [head];
    for (const item of state.decoder.push(data.subarray(head.length))) {
      if (item.kind !== 'frame') continue;
      if (drop(item.frame)) {
        this.droppedReplies++;
        continue;
      }
      out.push(encodeFrame(item.frame));
    }
    return Buffer.concat(out);
  }

  /**
   * Looks at the frames to the target: false when one `cutRequest` picks arrives (the
   * connection is to be cut); marks the connection slow at one `slowConnections` picks.
   */
  private inspectRequests(state: RequestInspection, data: Buffer): boolean {
    const head = data.subarray(0, state.preamble);
    state.preamble -= head.length;
    for (const item of state.decoder.push(data.subarray(head.length))) {
      if (item.kind !== 'frame') continue;
      state.frames++;
      if (this.cutRequest?.(item.frame)) {
        this.cutRequests++;
        return false;
      }
      if (this.slowConnections?.match(item.frame)) state.connection.slow = true;
    }
    return true;
  }

  private random(): number {
    // mulberry32: small, seeded, good enough for fault schedules.
    this.seed = (this.seed + 0x6d2b79f5) | 0;
    let t = this.seed;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }

  private onClient(client: Socket): void {
    const upstream = connect(this.targetPort, this.targetHost);
    this.sockets.add(client);
    this.sockets.add(upstream);
    const end = (): void => {
      client.destroy();
      upstream.destroy();
      this.sockets.delete(client);
      this.sockets.delete(upstream);
    };
    client.on('error', end);
    upstream.on('error', end);
    const connection = { slow: false };
    this.pipe(client, upstream, end, false, connection);
    this.pipe(upstream, client, end, true, connection);
  }

  private pipe(from: Socket, to: Socket, end: () => void, replies: boolean, connection: { slow: boolean }): void {
    let seen = 0;
    const replyFilter = replies && this.dropReply ? { preamble: rcpPreamble.length, decoder: new FrameDecoder() } : undefined;
    let requests: RequestInspection | undefined = !replies && (this.cutRequest || this.slowConnections) ? { preamble: rcpPreamble.length, decoder: new FrameDecoder(), frames: 0, connection } : undefined;
    let queue = Promise.resolve();
    from.on('data', (chunk: Buffer) => {
      from.pause();
      queue = queue.then(async () => {
        const plan = this.plan;
        let data = chunk;
        if (seen + chunk.length > plan.cleanBytes) {
          if (this.random() < plan.dropProbability) {
            this.drops++;
            end();
            return;
          }
          if (this.random() < plan.stallProbability) {
            this.stalls++;
            await new Promise((r) => setTimeout(r, plan.stallMs));
          }
          if (this.random() < plan.flipProbability) {
            data = Buffer.from(chunk);
            const start = Math.max(0, plan.cleanBytes - seen);
            const at = start + Math.floor(this.random() * (data.length - start));
            data[at] = (data[at] as number) ^ (1 << Math.floor(this.random() * 8));
            this.flips++;
          }
        }
        if (replyFilter) {
          try {
            data = this.filterReplies(replyFilter, data);
          } catch {
            end();
            return;
          }
        }
        if (requests) {
          let pass: boolean;
          try {
            pass = this.inspectRequests(requests, data);
          } catch {
            pass = false;
          }
          if (!pass) {
            end();
            return;
          }
          // Past the first frames, only a request to cut needs them looked at.
          if (!this.cutRequest && (connection.slow || requests.frames >= 8)) requests = undefined;
        }
        const slow = this.slowConnections;
        if (slow && connection.slow) await new Promise((r) => setTimeout(r, (chunk.length / slow.bytesPerSecond) * 1000));
        seen += chunk.length;
        if (!to.destroyed) to.write(data);
        from.resume();
      });
    });
    // What a stall still holds reaches the other side before the close does.
    from.on('close', () => void queue.then(end));
  }
}
