import { EventEmitter } from 'node:events';
import { connect, type Socket } from 'node:net';
import { FerryError } from '../lib/errors.js';
import {
  FrameDecoder,
  FrameType,
  decodeJsonPayload,
  encodeFrame,
  encodeFrameHeader,
  encodeJsonFrame,
  rcpPreamble,
  type Frame,
  type FrameHeader,
} from './frame.js';

export interface PeerIdentity {
  siteId: string;
  siteName: string;
}

export interface HelloBody extends PeerIdentity {
  protocol: 'RCP/1.0';
}

export interface ErrorBody {
  code: string;
  message: string;
}

/** Bytes of the preamble expected before frames; the mux has already seen "RCP/1.0". */
const preambleBytes = rcpPreamble.length;
export const handshakeTimeoutMs = 10_000;

/**
 * One RCP connection, either side. Emits 'frame' for each intact frame, 'corrupt' for a
 * frame whose payload failed its checksum (header intact), 'error' on a protocol
 * violation (the socket is then destroyed) and 'close'.
 */
export class RcpConnection extends EventEmitter {
  private readonly decoder = new FrameDecoder();
  private sequence = 0n;
  private preambleSeen = 0;
  private closed = false;
  corruptFrames = 0;
  bytesIn = 0;
  bytesOut = 0;

  constructor(readonly socket: Socket) {
    super();
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('close', () => {
      this.closed = true;
      this.emit('close');
    });
    socket.on('error', (err) => this.emit('socket-error', err));
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /**
   * Sends one frame. A payload given as parts (e.g. a piece's extent list and its data)
   * is written as it is, corked into one writev, never joined into one buffer.
   * `written` runs once the socket no longer needs the payload (it was handed to the
   * kernel, or the connection failed), so its buffers can be reused. `payloadCrc` is the
   * parts' CRC32C when the caller already knows it (the parts are then not read for it).
   */
  send(type: number, payload?: Uint8Array | readonly Uint8Array[], header: Partial<FrameHeader> = {}, written?: () => void, payloadCrc?: number): bigint {
    const sequence = header.sequence ?? ++this.sequence;
    if (payload === undefined || payload instanceof Uint8Array) {
      const bytes = encodeFrame({ ...header, type, sequence, ...(payload ? { payload } : {}) });
      this.bytesOut += bytes.length;
      this.socket.write(bytes, written && (() => written()));
      return sequence;
    }
    const head = encodeFrameHeader({ ...header, type, sequence }, payload, payloadCrc);
    const parts = [head, ...payload.filter((p) => p.length > 0)];
    this.socket.cork();
    parts.forEach((part, i) => {
      // Writes complete in order: when the last has, so have the parts before it.
      this.socket.write(part, i === parts.length - 1 && written ? () => written() : undefined);
      this.bytesOut += part.length;
    });
    this.socket.uncork();
    return sequence;
  }

  sendJson(type: FrameType, body: unknown, header: Partial<FrameHeader> = {}): bigint {
    const sequence = header.sequence ?? ++this.sequence;
    const bytes = encodeJsonFrame(type, body, { ...header, sequence });
    this.bytesOut += bytes.length;
    this.socket.write(bytes);
    return sequence;
  }

  sendError(code: string, message: string, header: Partial<FrameHeader> = {}): void {
    this.sendJson(FrameType.Error, { code, message } satisfies ErrorBody, header);
  }

  /** Waits for the next frame (or fails on error, close or timeout). */
  nextFrame(timeoutMs = handshakeTimeoutMs): Promise<Frame> {
    return new Promise((resolve, reject) => {
      const cleanup = (): void => {
        clearTimeout(timer);
        this.off('frame', onFrame);
        this.off('error', onError);
        this.off('close', onClose);
      };
      const onFrame = (frame: Frame): void => {
        cleanup();
        resolve(frame);
      };
      const onError = (err: Error): void => {
        cleanup();
        reject(err);
      };
      const onClose = (): void => {
        cleanup();
        reject(new FerryError('UNAVAILABLE', 'peer closed the replication connection'));
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new FerryError('UNAVAILABLE', `no answer from peer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.on('frame', onFrame);
      this.on('error', onError);
      this.on('close', onClose);
    });
  }

  /** Half-closes after pending writes; idempotent. */
  close(): void {
    if (this.closed) return;
    this.socket.end();
  }

  destroy(): void {
    this.closed = true;
    this.socket.destroy();
  }

  /**
   * Ends the connection after what was sent (an error frame) and lets the peer close
   * it: destroying at once, with the peer's frames still unread here, resets the
   * connection, and the peer may lose that last frame. Destroyed after `graceMs` anyway.
   */
  closeGracefully(graceMs = 2_000): void {
    if (this.closed) return;
    this.socket.end();
    setTimeout(() => this.destroy(), graceMs).unref();
  }

  private onData(chunk: Buffer): void {
    this.bytesIn += chunk.length;
    if (this.preambleSeen < preambleBytes) {
      const need = preambleBytes - this.preambleSeen;
      const part = chunk.subarray(0, need);
      if (!part.equals(rcpPreamble.subarray(this.preambleSeen, this.preambleSeen + part.length))) {
        this.fail(new FerryError('PROTOCOL_ERROR', 'connection does not start with the RCP/1.0 preamble'));
        return;
      }
      this.preambleSeen += part.length;
      chunk = chunk.subarray(part.length);
      if (chunk.length === 0) return;
    }
    let items;
    try {
      items = this.decoder.push(chunk);
    } catch (err) {
      this.fail(err as Error);
      return;
    }
    for (const item of items) {
      if (item.kind === 'frame') this.emit('frame', item.frame);
      else {
        this.corruptFrames++;
        this.emit('corrupt', item.header);
      }
    }
  }

  private fail(err: Error): void {
    if (this.closed) return;
    this.emit('error', err);
    this.destroy();
  }
}

/** Connects to a peer's site port, sends the preamble and HELLO, and waits for HELLO_OK. */
export async function connectRcp(host: string, port: number, self: PeerIdentity, timeoutMs = handshakeTimeoutMs): Promise<{ connection: RcpConnection; peer: PeerIdentity }> {
  const socket = connect({ host, port });
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new FerryError('UNAVAILABLE', `could not connect to ${host}:${port} within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      resolve();
    });
    socket.once('error', (err) => {
      clearTimeout(timer);
      reject(new FerryError('UNAVAILABLE', `could not connect to ${host}:${port}: ${err.message}`));
    });
  });
  const connection = new RcpConnection(socket);
  connection.on('error', () => undefined);
  socket.write(rcpPreamble);
  connection.sendJson(FrameType.Hello, { protocol: 'RCP/1.0', ...self } satisfies HelloBody);
  try {
    const reply = await connection.nextFrame(timeoutMs);
    if (reply.type === FrameType.Error) {
      const body = decodeJsonPayload<ErrorBody>(reply);
      throw new FerryError('PROTOCOL_ERROR', `peer refused the handshake: ${body.code}: ${body.message}`);
    }
    if (reply.type !== FrameType.HelloOk) throw new FerryError('PROTOCOL_ERROR', `peer answered the handshake with frame type ${reply.type}`);
    const peer = decodeJsonPayload<PeerIdentity>(reply);
    if (typeof peer.siteId !== 'string' || typeof peer.siteName !== 'string') {
      throw new FerryError('PROTOCOL_ERROR', 'peer handshake reply lacks a site id and name');
    }
    return { connection, peer: { siteId: peer.siteId, siteName: peer.siteName } };
  } catch (err) {
    connection.destroy();
    throw err;
  }
}
