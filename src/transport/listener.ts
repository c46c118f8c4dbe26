import { createServer, type Server, type Socket } from 'node:net';
import type { Server as HttpServer } from 'node:http';
import type { Logger } from 'pino';
import { rcpSignature } from './frame.js';

/** How long a new connection may stay silent before it is closed. */
export const firstBytesTimeoutMsDefault = 10_000;

export interface SiteListenerOptions {
  host: string;
  port: number;
  http: HttpServer;
  rcp: { accept(socket: Socket): void };
  log: Logger;
  firstBytesTimeoutMs?: number;
}

/**
 * One TCP port, two protocols (E FIG. 19): the first bytes of each connection decide.
 * `RCP/1.0` goes to the replication protocol; anything that starts like an HTTP
 * request line (an upper-case method token) goes to the HTTP server; anything else is
 * closed. A connection that sends nothing in time is closed.
 */
export class SiteListener {
  private readonly server: Server;
  private readonly sockets = new Set<Socket>();
  private readonly firstBytesTimeoutMs: number;
  connectionsRefused = 0;

  constructor(private readonly options: SiteListenerOptions) {
    this.firstBytesTimeoutMs = options.firstBytesTimeoutMs ?? firstBytesTimeoutMsDefault;
    this.server = createServer((socket) => this.onConnection(socket));
  }

  async listen(): Promise<{ host: string; port: number }> {
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.options.port, this.options.host, () => {
        this.server.off('error', reject);
        resolve();
      });
    });
    const address = this.server.address();
    if (address === null || typeof address === 'string') throw new Error('listener has no TCP address');
    return { host: address.address, port: address.port };
  }

  /**
   * Stops accepting (the port is free when this returns) and drops connections that have
   * not said what they are. Those handed to HTTP or RCP are left to their owners to
   * close: the server's own close callback would wait for every one of them, and a
   * client polling on a keep-alive connection (a dashboard, a monitor) would hold the
   * site's shutdown up for as long as it polls.
   */
  close(): void {
    for (const socket of this.sockets) socket.destroy();
    this.server.close();
  }

  private onConnection(socket: Socket): void {
    this.sockets.add(socket);
    let seen: Buffer = Buffer.alloc(0);
    const timer = setTimeout(() => {
      this.connectionsRefused++;
      socket.destroy();
    }, this.firstBytesTimeoutMs);
    const detach = (): void => {
      clearTimeout(timer);
      socket.off('data', onData);
      this.sockets.delete(socket);
    };
    const onData = (chunk: Buffer): void => {
      seen = seen.length === 0 ? chunk : Buffer.concat([seen, chunk]);
      const verdict = classify(seen);
      if (verdict === 'undecided') return;
      detach();
      socket.pause();
      if (verdict === 'garbage') {
        this.connectionsRefused++;
        socket.destroy();
        return;
      }
      socket.unshift(seen);
      if (verdict === 'rcp') this.options.rcp.accept(socket);
      else this.options.http.emit('connection', socket);
      socket.resume();
    };
    socket.on('data', onData);
    socket.once('close', () => {
      clearTimeout(timer);
      this.sockets.delete(socket);
    });
    socket.on('error', () => undefined);
  }
}

function classify(bytes: Buffer): 'rcp' | 'http' | 'garbage' | 'undecided' {
  const n = Math.min(bytes.length, rcpSignature.length);
  if (bytes.subarray(0, n).equals(rcpSignature.subarray(0, n))) {
    return bytes.length >= rcpSignature.length ? 'rcp' : 'undecided';
  }
  // An HTTP request line starts with a method token of upper-case letters.
  const first = bytes[0] as number;
  return first >= 0x41 && first <= 0x5a ? 'http' : 'garbage';
}
