import { createServer, type Server, type Socket } from 'node:net';
import type { Logger } from 'pino';
import type { HostPort } from '../lib/units.js';
import { BufferPool } from './buffer-pool.js';
import type { ExportProvider } from './export.js';
import { NbdSession, defaultSessionLimits, type SessionLimits, type SessionStats } from './session.js';

/** Connections served at once; more are refused by the kernel listener. */
export const connectionsMax = 256;
/** Idle READ buffers kept for reuse, across all connections. */
export const idleReadBufferBytesMax = 64 * 1024 * 1024;
/** How long a stopping server waits for requests in flight before cutting connections. */
export const drainTimeoutMs = 10_000;

export interface NbdServerOptions {
  host: string;
  port: number;
  provider: ExportProvider;
  log: Logger;
  limits?: Partial<SessionLimits>;
}

/**
 * The site's NBD listener: one `NbdSession` per TCP connection. Sockets have Nagle
 * off (replies are small and latency-bound) and batch each turn's replies into one
 * writev through cork/uncork.
 */
export class NbdServer {
  private readonly server: Server;
  private readonly sessions = new Map<NbdSession, Socket>();
  private readonly log: Logger;
  private readonly limits: SessionLimits;
  private readonly totals: SessionStats & { connections: number } = { connections: 0, requests: 0, errors: 0, bytesRead: 0, bytesWritten: 0 };
  private closing: Promise<void> | undefined;
  private readonly pool = new BufferPool(idleReadBufferBytesMax);

  constructor(private readonly options: NbdServerOptions) {
    this.log = options.log.child({ component: 'nbd' });
    this.limits = { ...defaultSessionLimits, ...options.limits };
    this.server = createServer({ noDelay: true, keepAlive: true, keepAliveInitialDelay: 30_000 }, (socket) => this.accept(socket));
    this.server.maxConnections = connectionsMax;
  }

  listen(): Promise<HostPort> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.options.port, this.options.host, () => {
        this.server.off('error', reject);
        this.server.on('error', (err) => this.log.error({ err }, 'nbd listener error'));
        const addr = this.server.address();
        if (addr === null || typeof addr === 'string') return reject(new Error('nbd listener has no TCP address'));
        resolve({ host: addr.address, port: addr.port });
      });
    });
  }

  get connectionCount(): number {
    return this.sessions.size;
  }

  /** Open connections by the export they use (those still negotiating are not counted). */
  connectionsByExport(): Map<string, number> {
    const by = new Map<string, number>();
    for (const s of this.sessions.keys()) if (s.exportName !== undefined) by.set(s.exportName, (by.get(s.exportName) ?? 0) + 1);
    return by;
  }

  /** Counters since start, including closed connections. */
  get stats(): Readonly<SessionStats & { connections: number }> {
    const live = { ...this.totals };
    for (const s of this.sessions.keys()) {
      live.requests += s.stats.requests;
      live.errors += s.stats.errors;
      live.bytesRead += s.stats.bytesRead;
      live.bytesWritten += s.stats.bytesWritten;
    }
    return live;
  }

  /**
   * Drains the connections using one export (they answer what is running, then close),
   * so that clients reconnect and see its new state, e.g. after it became read-only.
   */
  async disconnectExport(name: string): Promise<void> {
    await this.drain([...this.sessions.keys()].filter((s) => s.exportName === name));
  }

  /** Stops accepting, drains every connection, cuts those still busy after `drainTimeoutMs`. Idempotent. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      const stopped = new Promise<void>((resolve) => this.server.close(() => resolve()));
      await this.drain([...this.sessions.keys()]);
      await stopped;
    })();
    return this.closing;
  }

  /** Lets the sessions answer what they are running and close; cuts the ones a client keeps open too long. */
  private async drain(sessions: NbdSession[]): Promise<void> {
    if (sessions.length === 0) return;
    const drained = Promise.all(sessions.map((s) => s.shutdown()));
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<'timeout'>((resolve) => (timer = setTimeout(() => resolve('timeout'), drainTimeoutMs)));
    if ((await Promise.race([drained, timedOut])) === 'timeout') {
      this.log.warn({ connections: sessions.length }, 'nbd connections still open after the drain timeout; closing them');
      for (const s of sessions) this.sessions.get(s)?.destroy();
      await drained;
    }
    clearTimeout(timer);
  }

  private accept(socket: Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    socket.setNoDelay(true);
    const remote = `${socket.remoteAddress}:${socket.remotePort}`;
    const log = this.log.child({ remote });
    const session = new NbdSession(
      this.options.provider,
      {
        write: (chunks, onSent) => {
          if (socket.destroyed) return true;
          if (chunks.length === 1) return socket.write(chunks[0] as Buffer, onSent);
          socket.cork();
          let ok = true;
          chunks.forEach((c, i) => (ok = socket.write(c, i === chunks.length - 1 ? onSent : undefined)));
          socket.uncork();
          return ok;
        },
        end: () => socket.end(),
        destroy: () => socket.destroy(),
        pause: () => socket.pause(),
        resume: () => socket.resume(),
      },
      log,
      this.limits,
      this.pool,
    );
    this.sessions.set(session, socket);
    this.totals.connections++;
    socket.on('data', (chunk: Buffer) => session.onData(chunk));
    socket.on('end', () => session.onEnd());
    socket.on('drain', () => session.onDrain());
    socket.on('error', (err) => log.debug({ err: err.message }, 'nbd connection error'));
    socket.on('close', () => session.onClose());
    void session.done.then(() => {
      this.sessions.delete(session);
      this.totals.requests += session.stats.requests;
      this.totals.errors += session.stats.errors;
      this.totals.bytesRead += session.stats.bytesRead;
      this.totals.bytesWritten += session.stats.bytesWritten;
    });
    log.debug('nbd connection accepted');
    session.start();
  }
}
