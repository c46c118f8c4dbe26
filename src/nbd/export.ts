import { FerryError, isFerryError, isNoSpace } from '../lib/errors.js';
import { nbdErrno, type NbdErrno } from './protocol.js';

/** Where an export's bytes live; the volume layer's extents, block granularity. */
export interface ExportExtent {
  offset: number;
  length: number;
  /** false: a hole that reads as zeros. */
  allocated: boolean;
}

export interface ExportBlockSizes {
  /** Smallest alignment the export accepts (1: any). */
  minimumBytes: number;
  /** The size below which requests cost a read-modify-write or extra bookkeeping. */
  preferredBytes: number;
  /** The largest READ or WRITE payload accepted. */
  maximumBytes: number;
}

/**
 * One opened export: what a connection in the transmission phase reads and writes.
 * Every write reaches the volume I/O module through these methods, so the tracking
 * and replication layers hook all host writes in one place (`Volume` write hooks);
 * a write resolves only after those hooks (e.g. a remote acknowledgement) are done.
 */
export interface NbdExport {
  readonly name: string;
  readonly description: string;
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly blockSizes: ExportBlockSizes;
  readInto(buf: Uint8Array, offset: number): Promise<void>;
  /** `data` may be consecutive pieces (the chunks a payload arrived in), written as one range. */
  write(offset: number, data: Uint8Array | readonly Uint8Array[], options: { fua: boolean }): Promise<void>;
  writeZeroes(offset: number, length: number, options: { fua: boolean; noHole: boolean }): Promise<void>;
  trim(offset: number, length: number, options: { fua: boolean }): Promise<void>;
  flush(): Promise<void>;
  /** Consecutive extents from `offset`; may stop early (after `extentsMax` extents) but covers at least one byte. */
  blockStatus(offset: number, length: number, extentsMax: number): ExportExtent[];
}

export interface ExportListing {
  name: string;
  description: string;
}

/**
 * What the NBD server serves. Synchronous on purpose: option negotiation stays a pure
 * state machine. `open` throws EXPORT_NOT_FOUND for an unknown name and EXPORT_REFUSED
 * (with a sentence for the host's administrator) for one that exists but may not be
 * used now, e.g. a volume being rebuilt.
 */
export interface ExportProvider {
  list(): ExportListing[];
  open(name: string): NbdExport;
}

export function exportNotFound(name: string): FerryError {
  return new FerryError('EXPORT_NOT_FOUND', `no export named ${JSON.stringify(name)} on this site`);
}

export function exportRefused(name: string, reason: string): FerryError {
  return new FerryError('EXPORT_REFUSED', `export ${JSON.stringify(name)} is refused: ${reason}`);
}

/**
 * The NBD error for a failed export call. Writes past the end are ENOSPC (proto.md
 * "Error values"), other bad ranges EINVAL; a closed volume means the server is going
 * away (ESHUTDOWN); anything unexpected is EIO.
 */
export function errnoOf(err: unknown, isWrite: boolean): NbdErrno {
  if (isFerryError(err)) {
    switch (err.code) {
      case 'OUT_OF_RANGE':
        return isWrite ? nbdErrno.ENOSPC : nbdErrno.EINVAL;
      case 'PAYLOAD_TOO_LARGE':
      case 'BAD_REQUEST':
        return nbdErrno.EINVAL;
      case 'VOLUME_READ_ONLY':
        return nbdErrno.EPERM;
      case 'UNAVAILABLE':
        return nbdErrno.ESHUTDOWN;
      case 'NO_SPACE':
        return nbdErrno.ENOSPC;
      default:
        return nbdErrno.EIO;
    }
  }
  if (isNoSpace(err)) return nbdErrno.ENOSPC;
  if ((err as { code?: unknown } | undefined)?.code === 'ENOMEM') return nbdErrno.ENOMEM;
  return nbdErrno.EIO;
}

/**
 * The exports of a site, gathered from sources tried in order: volumes under their
 * names, and later snapshots as `VOL@SNAP` (volume names cannot contain `@`).
 */
export interface ExportSource {
  list(): ExportListing[];
  /** The export, or undefined if the name is not this source's; throws EXPORT_REFUSED to refuse it. */
  open(name: string): NbdExport | undefined;
}

export class ExportRegistry implements ExportProvider {
  private readonly sources: ExportSource[] = [];

  add(source: ExportSource): void {
    this.sources.push(source);
  }

  list(): ExportListing[] {
    return this.sources.flatMap((s) => s.list());
  }

  open(name: string): NbdExport {
    for (const source of this.sources) {
      const opened = source.open(name);
      if (opened) return opened;
    }
    throw exportNotFound(name);
  }
}
