import { BufferPool } from './buffer-pool.js';
import { ByteQueue } from './byte-queue.js';
import { errnoOf, type ExportProvider, type NbdExport } from './export.js';
import { Negotiation, type TransmissionSetup } from './negotiation.js';
import {
  baseAllocationContextId,
  cmd,
  cmdFlag,
  encodeBlockStatus,
  encodeGreeting,
  encodeSimpleReply,
  encodeStructuredDone,
  encodeStructuredError,
  nbdErrno,
  replyFlag,
  replyType,
  simpleReplyHeaderBytes,
  stateFlag,
  structuredReplyHeaderBytes,
  writeSimpleReply,
  writeStructuredHeader,
  type NbdErrno,
} from './protocol.js';
import { RequestParser, checkRequest, commandName, type NbdRequest, type RequestContext } from './requests.js';

/** The byte pipe a session talks over: a TCP socket in the server, an array in tests. */
export interface NbdTransport {
  /**
   * Sends the buffers in order, batched into as few syscalls as possible; false when the
   * peer is not keeping up. `onSent` runs once the bytes have left the buffers (or the
   * connection failed), after which they may be reused.
   */
  write(chunks: Buffer[], onSent?: () => void): boolean;
  /** Sends what is queued, then closes. */
  end(): void;
  /** Closes at once (hard disconnect). */
  destroy(): void;
  /** Stops and restarts delivery of received bytes (backpressure). */
  pause(): void;
  resume(): void;
}

export interface SessionLog {
  debug(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
}

export interface SessionLimits {
  /** Largest READ or WRITE payload (advertised as the maximum block size). */
  payloadBytesMax: number;
  /** Requests being served at once on one connection; past it, reading pauses. */
  requestsInFlightMax: number;
  /** READ and WRITE bytes held in memory at once on one connection; past it, reading pauses. */
  bytesInFlightMax: number;
  /** A client must finish option haggling within this time. */
  negotiationTimeoutMs: number;
  /** Most descriptors in one BLOCK_STATUS reply (the spec lets a server describe a prefix). */
  blockStatusExtentsMax: number;
}

export const requestBytesMax = 32 * 1024 * 1024;

export const defaultSessionLimits: SessionLimits = {
  payloadBytesMax: requestBytesMax,
  requestsInFlightMax: 128,
  bytesInFlightMax: 128 * 1024 * 1024,
  negotiationTimeoutMs: 30_000,
  blockStatusExtentsMax: 4096,
};

/** Per-session counters, summed by the server. */
export interface SessionStats {
  requests: number;
  errors: number;
  bytesRead: number;
  bytesWritten: number;
}

/**
 * One NBD connection: option haggling, then the transmission phase. Requests run
 * concurrently and are answered as they complete (possibly out of order); replies
 * finishing in the same turn of the event loop leave in one batched write. A WRITE
 * reaches the export only once its whole payload has arrived. Input never makes this
 * class throw: bad requests get the spec's error reply, a broken stream a close.
 */
export class NbdSession {
  readonly stats: SessionStats = { requests: 0, errors: 0, bytesRead: 0, bytesWritten: 0 };
  /** Resolves when the connection is closed and no request is still running. */
  readonly done: Promise<void>;
  private resolveDone!: () => void;
  private readonly queue = new ByteQueue();
  private readonly negotiation: Negotiation;
  private setup: TransmissionSetup | undefined;
  private exp: NbdExport | undefined;
  private parser: RequestParser | undefined;
  private ctx: RequestContext | undefined;
  private inFlight = 0;
  private inFlightBytes = 0;
  private outputBlocked = false;
  private readPaused = false;
  /** No more requests are read: DISC, EOF, a broken stream or a server shutdown. */
  private stopping = false;
  private ending = false;
  private closed = false;
  private pending: Buffer[] = [];
  /** Pooled buffers behind `pending` replies, given back once those are sent. */
  private pendingPooled: Buffer[] = [];
  private flushScheduled = false;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    provider: ExportProvider,
    private readonly transport: NbdTransport,
    private readonly log: SessionLog,
    private readonly limits: SessionLimits = defaultSessionLimits,
    private readonly pool: BufferPool = new BufferPool(0),
  ) {
    this.negotiation = new Negotiation(provider);
    this.done = new Promise((resolve) => (this.resolveDone = resolve));
  }

  /** The export in use once transmission has begun. */
  get exportName(): string | undefined {
    return this.exp?.name;
  }

  start(): void {
    this.timer = setTimeout(() => this.hardClose('option haggling took too long'), this.limits.negotiationTimeoutMs);
    this.timer.unref?.();
    this.transport.write([encodeGreeting()]);
  }

  onData(chunk: Buffer): void {
    if (this.stopping || this.closed) return;
    this.queue.push(chunk);
    this.pump();
  }

  /** The client closed its side. Bytes of an unfinished request are dropped, never applied. */
  onEnd(): void {
    this.stop();
  }

  onDrain(): void {
    this.outputBlocked = false;
    this.pump();
  }

  /** The connection is gone (either side, or an error). */
  onClose(): void {
    if (this.closed) return;
    this.closed = true;
    this.stopping = true;
    this.pending = [];
    this.pendingPooled = [];
    this.queue.clear();
    if (this.timer) clearTimeout(this.timer);
    this.settle();
  }

  /** Stops reading, answers the requests already running, then closes. */
  shutdown(): Promise<void> {
    this.stop();
    return this.done;
  }

  private stop(): void {
    if (this.stopping) return;
    this.stopping = true;
    this.queue.clear();
    this.finishIfIdle();
  }

  private pump(): void {
    try {
      while (!this.stopping) {
        if (!this.setup) {
          const step = this.negotiation.step(this.queue);
          if (!step) break;
          if (step.data.length > 0) this.transport.write(step.data);
          if (step.kind === 'close') {
            this.log.debug({ reason: step.reason }, 'nbd negotiation ended');
            this.stopping = true;
            this.queue.clear();
            this.finishIfIdle();
            return;
          }
          if (step.kind === 'transmission') this.beginTransmission(step.setup);
          continue;
        }
        if (this.blocked()) {
          if (!this.readPaused) {
            this.readPaused = true;
            this.transport.pause();
          }
          return;
        }
        const parsed = (this.parser as RequestParser).next(this.queue);
        if (!parsed) break;
        if (parsed.kind === 'bad-magic') {
          this.log.warn({ export: this.exp?.name, magic: parsed.magic }, 'nbd request without the request magic; closing the connection');
          this.stop();
          return;
        }
        this.stats.requests++;
        if (parsed.kind === 'oversized') {
          const r = parsed.request;
          this.replyError(r, nbdErrno.EINVAL, `WRITE of ${r.length} bytes exceeds the ${this.limits.payloadBytesMax}-byte maximum`);
          continue;
        }
        this.handle(parsed.request);
      }
      if (this.readPaused && !this.stopping && !this.blocked()) {
        this.readPaused = false;
        this.transport.resume();
      }
    } catch (err) {
      // A bug, not bad input: drop this connection and keep the daemon and its other connections serving.
      this.log.warn({ err }, 'nbd session failed; closing the connection');
      this.hardClose('internal error');
    }
  }

  private beginTransmission(setup: TransmissionSetup): void {
    if (this.timer) clearTimeout(this.timer);
    this.setup = setup;
    this.exp = setup.export;
    this.parser = new RequestParser(this.limits.payloadBytesMax);
    this.ctx = {
      sizeBytes: setup.export.sizeBytes,
      readOnly: setup.export.readOnly,
      structuredReplies: setup.structuredReplies,
      baseAllocation: setup.baseAllocation,
      payloadBytesMax: this.limits.payloadBytesMax,
    };
    this.log.debug({ export: setup.export.name, flags: setup.flags, structured: setup.structuredReplies }, 'nbd transmission started');
  }

  private blocked(): boolean {
    return this.outputBlocked || this.inFlight >= this.limits.requestsInFlightMax || this.inFlightBytes >= this.limits.bytesInFlightMax;
  }

  private handle(r: NbdRequest): void {
    if (r.type === cmd.disc) {
      // Answer everything already running, then close (proto.md NBD_CMD_DISC).
      this.stop();
      return;
    }
    const bad = checkRequest(r, this.ctx as RequestContext);
    if (bad) {
      this.replyError(r, bad.errno, bad.message);
      return;
    }
    const exp = this.exp as NbdExport;
    const fua = (r.flags & cmdFlag.fua) !== 0;
    const bytes = r.type === cmd.read || r.type === cmd.write ? r.length : 0;
    let op: Promise<Buffer>;
    try {
      switch (r.type) {
        case cmd.read:
          op = this.read(exp, r);
          break;
        case cmd.write:
          op = exp.write(r.offset, r.payload as Buffer[], { fua }).then(() => this.ok(r));
          break;
        case cmd.writeZeroes: {
          const noHole = (r.flags & cmdFlag.noHole) !== 0;
          // Punching holes is fast; writing zero bytes is not, and a FAST_ZERO client would rather write data.
          if (noHole && (r.flags & cmdFlag.fastZero) !== 0) {
            this.replyError(r, nbdErrno.ENOTSUP, 'zeroing without holes is not faster than writing');
            return;
          }
          op = exp.writeZeroes(r.offset, r.length, { fua, noHole }).then(() => this.ok(r));
          break;
        }
        case cmd.trim:
          op = exp.trim(r.offset, r.length, { fua }).then(() => this.ok(r));
          break;
        case cmd.flush:
          op = exp.flush().then(() => this.ok(r));
          break;
        case cmd.cache:
          // A hint; the volume's data is already in the page cache or on local disk.
          op = Promise.resolve(this.ok(r));
          break;
        case cmd.blockStatus:
          op = Promise.resolve(this.blockStatus(exp, r));
          break;
        default:
          this.replyError(r, nbdErrno.EINVAL, `unsupported command ${r.type}`);
          return;
      }
    } catch (err) {
      op = Promise.reject(err);
    }
    this.inFlight++;
    this.inFlightBytes += bytes;
    op.then(
      (reply) => {
        if (r.type === cmd.read) this.stats.bytesRead += r.length;
        else if (r.type === cmd.write) this.stats.bytesWritten += r.length;
        this.complete(bytes, reply, this.readBuffers.get(r));
      },
      (err: unknown) => {
        const isWrite = r.type === cmd.write || r.type === cmd.trim || r.type === cmd.writeZeroes;
        const errno = errnoOf(err, isWrite);
        if (errno === nbdErrno.EIO) this.log.warn({ err, export: exp.name, command: commandName(r.type), offset: r.offset, length: r.length }, 'nbd request failed');
        this.stats.errors++;
        const pooled = this.readBuffers.get(r);
        if (pooled) this.pool.release(pooled);
        this.complete(bytes, this.errorReply(r, errno, (err as Error)?.message ?? String(err)));
      },
    );
  }

  /** The pooled buffer each READ in flight reads into. */
  private readonly readBuffers = new WeakMap<NbdRequest, Buffer>();

  private async read(exp: NbdExport, r: NbdRequest): Promise<Buffer> {
    const structured = this.setup?.structuredReplies === true;
    if (structured && r.length === 0) return encodeStructuredDone(r.cookie);
    // One buffer for header and data: the read lands where it is sent from.
    const at = structured ? structuredReplyHeaderBytes + 8 : simpleReplyHeaderBytes;
    const pooled = this.pool.get(at + r.length);
    this.readBuffers.set(r, pooled);
    const buf = pooled.subarray(0, at + r.length);
    await exp.readInto(buf.subarray(at), r.offset);
    if (structured) {
      writeStructuredHeader(buf, 0, replyFlag.done, replyType.offsetData, r.cookie, 8 + r.length);
      buf.writeBigUInt64BE(BigInt(r.offset), structuredReplyHeaderBytes);
    } else {
      writeSimpleReply(buf, 0, 0, r.cookie);
    }
    return buf;
  }

  private blockStatus(exp: NbdExport, r: NbdRequest): Buffer {
    const reqOne = (r.flags & cmdFlag.reqOne) !== 0;
    const extentsMax = reqOne ? 1 : this.limits.blockStatusExtentsMax;
    const out: { length: number; flags: number }[] = [];
    for (const e of exp.blockStatus(r.offset, r.length, extentsMax)) {
      const flags = e.allocated ? 0 : stateFlag.hole | stateFlag.zero;
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.length += e.length;
      else if (out.length < extentsMax) out.push({ length: e.length, flags });
      else break;
    }
    return encodeBlockStatus(r.cookie, baseAllocationContextId, out);
  }

  /** Success without data: a simple reply is allowed even with structured replies. */
  private ok(r: NbdRequest): Buffer {
    return encodeSimpleReply(0, r.cookie);
  }

  private errorReply(r: NbdRequest, errno: NbdErrno, message: string): Buffer {
    return this.setup?.structuredReplies ? encodeStructuredError(r.cookie, errno, message) : encodeSimpleReply(errno, r.cookie);
  }

  private replyError(r: NbdRequest, errno: NbdErrno, message: string): void {
    this.stats.errors++;
    this.log.debug({ export: this.exp?.name, command: commandName(r.type), offset: r.offset, length: r.length, errno, message }, 'nbd request refused');
    this.queueReply(this.errorReply(r, errno, message));
  }

  private complete(bytes: number, reply: Buffer, pooled?: Buffer): void {
    this.inFlight--;
    this.inFlightBytes -= bytes;
    this.queueReply(reply, pooled);
    if (this.stopping) this.finishIfIdle();
    else if (this.readPaused) this.pump();
    this.settle();
  }

  private queueReply(reply: Buffer, pooled?: Buffer): void {
    if (this.closed) return;
    this.pending.push(reply);
    if (pooled) this.pendingPooled.push(pooled);
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      // Replies completing in this turn of the event loop go out together.
      setImmediate(() => this.flush());
    }
  }

  private flush(): void {
    this.flushScheduled = false;
    if (this.closed || this.pending.length === 0) return;
    const batch = this.pending;
    const pooled = this.pendingPooled;
    this.pending = [];
    this.pendingPooled = [];
    const onSent = pooled.length === 0 ? undefined : () => pooled.forEach((b) => this.pool.release(b));
    if (!this.transport.write(batch, onSent)) this.outputBlocked = true;
  }

  private finishIfIdle(): void {
    if (this.inFlight > 0 || this.ending || this.closed) return;
    this.ending = true;
    this.flush();
    this.transport.end();
  }

  private hardClose(reason: string): void {
    if (this.closed) return;
    this.log.debug({ reason }, 'nbd connection closed by the server');
    this.stopping = true;
    this.queue.clear();
    this.transport.destroy();
    this.onClose();
  }

  private settle(): void {
    if (this.closed && this.inFlight === 0) this.resolveDone();
  }
}
