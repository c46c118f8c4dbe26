import { isFerryError } from '../lib/errors.js';
import { ByteQueue } from './byte-queue.js';
import type { ExportProvider, NbdExport } from './export.js';
import {
  baseAllocation,
  baseAllocationContextId,
  clientFlag,
  clientFlagsKnown,
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContextReply,
  encodeOptionError,
  encodeOptionReply,
  encodeServerReply,
  info,
  opt,
  optionMagic,
  rep,
  stringBytesMax,
  txFlag,
} from './protocol.js';

/** Largest option payload read into memory; larger ones are skipped and answered ERR_TOO_BIG. */
export const optionDataBytesMax = 64 * 1024;
/** Options one connection may send before the server treats it as a denial of service and closes. */
export const optionCountMax = 1024;

export interface TransmissionSetup {
  export: NbdExport;
  /** The transmission flags sent to the client. */
  flags: number;
  structuredReplies: boolean;
  /** `base:allocation` was selected for this export: BLOCK_STATUS is allowed. */
  baseAllocation: boolean;
}

/** What to do after consuming some input: send `data`, then keep negotiating, close, or start transmission. */
export type NegotiationStep =
  | { kind: 'continue'; data: Buffer[] }
  | { kind: 'close'; data: Buffer[]; reason: string }
  | { kind: 'transmission'; data: Buffer[]; setup: TransmissionSetup };

type State = 'client-flags' | 'option-header' | 'option-data' | 'option-skip' | 'done';

/**
 * Fixed newstyle option haggling as a pure state machine: bytes in, replies and a
 * decision out. No sockets and no clock, so fuzz tests can feed it any byte stream.
 * It never throws on input; every malformed option is answered with the error reply
 * proto.md prescribes, and only the cases where the spec requires (or allows, for a
 * denial of service) a hard disconnect end in `close`.
 */
export class Negotiation {
  private state: State = 'client-flags';
  private noZeroes = false;
  private structured = false;
  /** Contexts chosen by SET_META_CONTEXT, and the export they were chosen for. */
  private metaExport: string | undefined;
  private metaAllocation = false;
  private option = 0;
  private optionBytes = 0;
  private skipLeft = 0;
  private optionCount = 0;

  constructor(private readonly provider: ExportProvider) {}

  get finished(): boolean {
    return this.state === 'done';
  }

  /** Consumes what it can; undefined means more bytes are needed. */
  step(queue: ByteQueue): NegotiationStep | undefined {
    switch (this.state) {
      case 'done':
        return undefined;
      case 'client-flags': {
        const b = queue.take(4);
        if (!b) return undefined;
        const flags = b.readUInt32BE(0);
        if ((flags & ~clientFlagsKnown) !== 0) return this.close(`client flags 0x${flags.toString(16)} include bits this server does not know`);
        // Clients without C_FIXED_NEWSTYLE are still served fixed newstyle (proto.md allows it).
        this.noZeroes = (flags & clientFlag.noZeroes) !== 0;
        this.state = 'option-header';
        return { kind: 'continue', data: [] };
      }
      case 'option-header': {
        const h = queue.take(16);
        if (!h) return undefined;
        if (h.readBigUInt64BE(0) !== optionMagic) return this.close('option without the IHAVEOPT magic');
        if (++this.optionCount > optionCountMax) return this.close(`more than ${optionCountMax} options`);
        this.option = h.readUInt32BE(8);
        this.optionBytes = h.readUInt32BE(12);
        if (this.optionBytes > optionDataBytesMax) {
          this.skipLeft = this.optionBytes;
          this.state = 'option-skip';
        } else {
          this.state = 'option-data';
        }
        return { kind: 'continue', data: [] };
      }
      case 'option-skip': {
        this.skipLeft -= queue.skip(this.skipLeft);
        if (this.skipLeft > 0) return undefined;
        this.state = 'option-header';
        if (this.option === opt.exportName) return this.close('NBD_OPT_EXPORT_NAME with an export name over the size limit');
        return this.reply(encodeOptionError(this.option, rep.errTooBig, `option data of ${this.optionBytes} bytes exceeds this server's ${optionDataBytesMax}-byte limit`));
      }
      case 'option-data': {
        const data = queue.take(this.optionBytes) ?? (this.optionBytes === 0 ? Buffer.alloc(0) : undefined);
        if (!data) return undefined;
        this.state = 'option-header';
        return this.handle(this.option, data);
      }
    }
  }

  private handle(option: number, data: Buffer): NegotiationStep {
    switch (option) {
      case opt.exportName:
        return this.exportName(data);
      case opt.abort:
        // The client drops the connection after this; ACK as the spec asks, then close.
        this.state = 'done';
        return { kind: 'close', data: [encodeOptionReply(option, rep.ack)], reason: 'client sent NBD_OPT_ABORT' };
      case opt.list: {
        if (data.length !== 0) return this.invalid(option, 'NBD_OPT_LIST takes no data');
        const out = this.provider.list().map((e) => encodeServerReply(option, e.name, e.description));
        out.push(encodeOptionReply(option, rep.ack));
        return { kind: 'continue', data: out };
      }
      case opt.startTls:
        if (data.length !== 0) return this.invalid(option, 'NBD_OPT_STARTTLS takes no data');
        return this.reply(encodeOptionError(option, rep.errPolicy, 'TLS is not offered by this server'));
      case opt.info:
      case opt.go:
        return this.infoOrGo(option, data);
      case opt.structuredReply:
        if (data.length !== 0) return this.invalid(option, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        this.structured = true;
        return this.reply(encodeOptionReply(option, rep.ack));
      case opt.listMetaContext:
      case opt.setMetaContext:
        return this.metaContext(option, data);
      case opt.extendedHeaders:
        return this.reply(encodeOptionError(option, rep.errUnsup, 'extended headers are not supported by this server'));
      default:
        return this.reply(encodeOptionError(option, rep.errUnsup, `option ${option} is not supported by this server`));
    }
  }

  private exportName(data: Buffer): NegotiationStep {
    // NBD_OPT_EXPORT_NAME cannot be answered with an error: the spec says close.
    if (data.length > stringBytesMax) return this.close('export name too long');
    const name = data.toString('utf8');
    const opened = this.tryOpen(name);
    if ('error' in opened) return this.close(`NBD_OPT_EXPORT_NAME ${JSON.stringify(name)}: ${opened.message}`);
    const setup = this.setup(opened.export);
    this.state = 'done';
    return { kind: 'transmission', data: [encodeExportNameReply(setup.export.sizeBytes, setup.flags, this.noZeroes)], setup };
  }

  private infoOrGo(option: number, data: Buffer): NegotiationStep {
    // u32 name length, name, u16 count, count × u16 info type.
    if (data.length < 6) return this.invalid(option, 'option data too short');
    const nameBytes = data.readUInt32BE(0);
    if (nameBytes > stringBytesMax || 4 + nameBytes + 2 > data.length) return this.invalid(option, 'export name length does not fit the option');
    const name = data.toString('utf8', 4, 4 + nameBytes);
    const count = data.readUInt16BE(4 + nameBytes);
    if (data.length !== 4 + nameBytes + 2 + 2 * count) return this.invalid(option, 'information request count does not match the option length');
    const requested = new Set<number>();
    for (let i = 0; i < count; i++) requested.add(data.readUInt16BE(4 + nameBytes + 2 + 2 * i));
    const opened = this.tryOpen(name);
    if ('error' in opened) return this.reply(encodeOptionError(option, opened.error, opened.message));
    const setup = this.setup(opened.export);
    const e = setup.export;
    const out = [encodeInfoExport(option, e.sizeBytes, setup.flags)];
    if (requested.has(info.name)) out.push(encodeInfoString(option, info.name, e.name));
    if (requested.has(info.description) && e.description.length > 0) out.push(encodeInfoString(option, info.description, e.description));
    // Sent even when not asked for: the minimum of 1 puts no alignment burden on the client.
    out.push(encodeInfoBlockSize(option, e.blockSizes.minimumBytes, e.blockSizes.preferredBytes, e.blockSizes.maximumBytes));
    out.push(encodeOptionReply(option, rep.ack));
    if (option === opt.info) return { kind: 'continue', data: out };
    this.state = 'done';
    return { kind: 'transmission', data: out, setup };
  }

  private metaContext(option: number, data: Buffer): NegotiationStep {
    if (!this.structured) return this.invalid(option, 'metadata contexts need structured replies first');
    // u32 name length, name, u32 query count, count × (u32 length, query).
    if (data.length < 8) return this.invalid(option, 'option data too short');
    const nameBytes = data.readUInt32BE(0);
    if (nameBytes > stringBytesMax || 4 + nameBytes + 4 > data.length) return this.invalid(option, 'export name length does not fit the option');
    const name = data.toString('utf8', 4, 4 + nameBytes);
    const count = data.readUInt32BE(4 + nameBytes);
    const queries: string[] = [];
    let at = 4 + nameBytes + 4;
    for (let i = 0; i < count; i++) {
      if (at + 4 > data.length) return this.invalid(option, 'query count does not match the option length');
      const len = data.readUInt32BE(at);
      if (len > stringBytesMax || at + 4 + len > data.length) return this.invalid(option, 'query length does not fit the option');
      queries.push(data.toString('utf8', at + 4, at + 4 + len));
      at += 4 + len;
    }
    if (at !== data.length) return this.invalid(option, 'trailing bytes after the queries');
    const opened = this.tryOpen(name);
    if ('error' in opened) return this.reply(encodeOptionError(option, opened.error, opened.message));
    const listing = option === opt.listMetaContext;
    // LIST with no query lists everything; a namespace-only query lists that namespace.
    const selected = listing
      ? count === 0 || queries.some((q) => q === 'base:' || q === baseAllocation)
      : queries.some((q) => q === baseAllocation);
    if (!listing) {
      this.metaExport = name;
      this.metaAllocation = selected;
    }
    const out = selected ? [encodeMetaContextReply(option, listing ? 0 : baseAllocationContextId, baseAllocation)] : [];
    out.push(encodeOptionReply(option, rep.ack));
    return { kind: 'continue', data: out };
  }

  private setup(e: NbdExport): TransmissionSetup {
    let flags = txFlag.hasFlags | txFlag.sendFlush | txFlag.sendFua | txFlag.sendCache;
    // Every connection shares the volume's one file descriptor, and FLUSH fdatasyncs
    // it, so a flush on any connection covers writes answered on all of them.
    flags |= txFlag.canMultiConn;
    if (this.structured) flags |= txFlag.sendDf;
    flags |= e.readOnly ? txFlag.readOnly : txFlag.sendTrim | txFlag.sendWriteZeroes | txFlag.sendFastZero;
    return {
      export: e,
      flags,
      structuredReplies: this.structured,
      // Contexts chosen for another export do not carry over (proto.md, NBD_OPT_GO).
      baseAllocation: this.structured && this.metaAllocation && this.metaExport === e.name,
    };
  }

  private tryOpen(name: string): { export: NbdExport } | { error: number; message: string } {
    try {
      return { export: this.provider.open(name) };
    } catch (err) {
      if (isFerryError(err, 'EXPORT_NOT_FOUND')) return { error: rep.errUnknown, message: err.message };
      if (isFerryError(err, 'EXPORT_REFUSED')) return { error: rep.errPolicy, message: err.message };
      return { error: rep.errUnknown, message: `export ${JSON.stringify(name)} cannot be opened: ${(err as Error).message}` };
    }
  }

  private reply(data: Buffer): NegotiationStep {
    return { kind: 'continue', data: [data] };
  }

  private invalid(option: number, message: string): NegotiationStep {
    return this.reply(encodeOptionError(option, rep.errInvalid, message));
  }

  private close(reason: string): NegotiationStep {
    this.state = 'done';
    return { kind: 'close', data: [], reason };
  }
}
