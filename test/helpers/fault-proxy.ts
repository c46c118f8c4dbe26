import { createServer, connect, type Server, type Socket } from 'node:net';

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
    client.on('close', end);
    upstream.on('close', end);
    this.pipe(client, upstream, end);
    this.pipe(upstream, client, end);
  }

  private pipe(from: Socket, to: Socket, end: () => void): void {
    let seen = 0;
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
        seen += chunk.length;
        if (!to.destroyed) to.write(data);
        from.resume();
      });
    });
  }
}
