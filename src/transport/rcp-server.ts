import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import { FerryError } from '../lib/errors.js';
import { FrameType, decodeJsonPayload, rcpPreamble, type Frame } from './frame.js';
import { RcpConnection, handshakeTimeoutMs, type HelloBody, type PeerIdentity } from './connection.js';

/** Serves one accepted RCP connection after the handshake; replication registers these. */
export type SessionHandler = (connection: RcpConnection, peer: PeerIdentity, first: Frame) => void;

/**
 * The accepting side of RCP/1.0: checks the preamble and HELLO, answers with this
 * site's identity, then hands frames to the handler registered for the first frame's
 * type. Until a later layer registers handlers, a session request is answered with
 * an ERROR frame naming the unsupported type.
 */
export class RcpServer {
  private readonly handlers = new Map<number, SessionHandler>();
  private readonly connections = new Set<RcpConnection>();
  handshakes = 0;

  constructor(
    private readonly self: PeerIdentity,
    private readonly log: Logger,
  ) {}

  register(firstFrameType: number, handler: SessionHandler): void {
    this.handlers.set(firstFrameType, handler);
  }

  accept(socket: Socket): void {
    const connection = new RcpConnection(socket);
    this.connections.add(connection);
    connection.on('close', () => this.connections.delete(connection));
    connection.on('socket-error', () => undefined);
    connection.on('error', (err: Error) => this.log.warn({ peer: socket.remoteAddress, err: err.message }, 'replication connection closed on a protocol error'));
    socket.write(rcpPreamble);
    void this.serve(connection);
  }

  /** Closes every open replication connection. */
  closeAll(): void {
    for (const c of this.connections) c.destroy();
  }

  private async serve(connection: RcpConnection): Promise<void> {
    let peer: PeerIdentity;
    try {
      const hello = await connection.nextFrame(handshakeTimeoutMs);
      if (hello.type !== FrameType.Hello) {
        throw new FerryError('PROTOCOL_ERROR', `expected HELLO, got frame type ${hello.type}`);
      }
      const body = decodeJsonPayload<Partial<HelloBody>>(hello);
      if (body.protocol !== 'RCP/1.0' || typeof body.siteId !== 'string' || typeof body.siteName !== 'string') {
        throw new FerryError('PROTOCOL_ERROR', 'HELLO must carry protocol "RCP/1.0", siteId and siteName');
      }
      peer = { siteId: body.siteId, siteName: body.siteName };
      connection.sendJson(FrameType.HelloOk, this.self, { sequence: hello.sequence });
      this.handshakes++;
    } catch (err) {
      const e = err instanceof FerryError ? err : new FerryError('PROTOCOL_ERROR', (err as Error).message);
      if (!connection.isClosed) {
        connection.sendError(e.code, e.message);
        connection.close();
      }
      return;
    }
    connection.on('frame', function onFrame(this: RcpConnection, frame: Frame) {
      // Only the first frame picks the handler; the handler then owns the connection.
      connection.off('frame', onFrame);
      dispatch(frame);
    });
    const dispatch = (frame: Frame): void => {
      if (frame.type === FrameType.Ping) {
        connection.sendJson(FrameType.Pong, {}, { sequence: frame.sequence });
        connection.on('frame', function again(f: Frame) {
          connection.off('frame', again);
          dispatch(f);
        });
        return;
      }
      const handler = this.handlers.get(frame.type);
      if (!handler) {
        connection.sendError('PROTOCOL_ERROR', `frame type ${frame.type} is not supported by this site`, { sequence: frame.sequence });
        connection.close();
        return;
      }
      handler(connection, peer, frame);
    };
  }
}
