import { FerryError } from '../lib/errors.js';
import { formatSize } from '../lib/units.js';
import { exportRefused, type ExportExtent, type ExportListing, type ExportSource, type NbdExport } from '../nbd/export.js';
import { requestBytesMax } from '../nbd/session.js';
import { ioBytesMax, type Extent, type Volume } from '../storage/volume.js';
import type { VolumeStore } from '../storage/volume-store.js';

/**
 * Every volume, exported under its name: read-write, or read-only (READ_ONLY flag,
 * EPERM on writes) when its catalog access says so (a replication target). A volume
 * whose access is `raw` (being rebuilt) or that failed to open is refused with a
 * message the host's administrator can act on.
 */
/** How a replication target is read: its consistent image, not the raw volume (see TargetReplica). */
export interface ReplicaReader {
  readInto(buf: Uint8Array, offset: number): Promise<void>;
  blockStatus(offset: number, length: number): Extent[];
}

export class VolumeExportSource implements ExportSource {
  constructor(
    private readonly volumes: VolumeStore,
    private readonly replicaReader: (name: string) => ReplicaReader | undefined = () => undefined,
  ) {}

  list(): ExportListing[] {
    return this.volumes
      .list()
      .filter((v) => v.access !== 'raw' && v.failure === undefined)
      .map((v) => ({ name: v.name, description: describe(v.sizeBytes, v.access === 'read-only') }));
  }

  open(name: string): NbdExport | undefined {
    if (name.includes('@')) return undefined; // VOL@SNAP: a snapshot, served by another source.
    let record;
    try {
      record = this.volumes.record(name);
    } catch {
      return undefined;
    }
    if (record.access === 'raw') {
      throw exportRefused(name, 'the volume is being rebuilt (access "raw"); it can be used again once its resync has finished');
    }
    let volume: Volume;
    try {
      volume = this.volumes.get(name);
    } catch (err) {
      throw exportRefused(name, `the volume could not be opened at start-up (${(err as Error).message})`);
    }
    return new VolumeExport(volume, record.access === 'read-only', this.replicaReader(name));
  }
}

function describe(sizeBytes: number, readOnly: boolean): string {
  return `ferry volume, ${formatSize(sizeBytes)}, ${readOnly ? 'read-only' : 'read-write'}`;
}

/** A volume seen through NBD. Ranges longer than the volume layer's request limit are split. */
export class VolumeExport implements NbdExport {
  readonly name: string;
  readonly description: string;
  readonly sizeBytes: number;
  readonly blockSizes;

  constructor(
    private readonly volume: Volume,
    readonly readOnly: boolean,
    private readonly replica?: ReplicaReader,
  ) {
    this.name = volume.name;
    this.sizeBytes = volume.sizeBytes;
    this.description = describe(volume.sizeBytes, readOnly);
    // Any alignment works (partial blocks are read-modify-written by the kernel page cache);
    // whole blocks avoid that and keep change tracking exact.
    this.blockSizes = { minimumBytes: 1, preferredBytes: Math.min(volume.blockBytes, requestBytesMax), maximumBytes: requestBytesMax };
  }

  readInto(buf: Uint8Array, offset: number): Promise<void> {
    return this.replica ? this.replica.readInto(buf, offset) : this.volume.readInto(buf, offset);
  }

  async write(offset: number, data: Uint8Array | readonly Uint8Array[], options: { fua: boolean }): Promise<void> {
    this.checkWritable();
    await this.volume.write(offset, data, { fua: options.fua });
  }

  async writeZeroes(offset: number, length: number, options: { fua: boolean; noHole: boolean }): Promise<void> {
    this.checkWritable();
    await this.pieces(offset, length, (o, l) => this.volume.writeZeroes(o, l, { noHole: options.noHole }));
    if (options.fua) await this.volume.flush();
  }

  async trim(offset: number, length: number, options: { fua: boolean }): Promise<void> {
    this.checkWritable();
    await this.pieces(offset, length, (o, l) => this.volume.trim(o, l));
    if (options.fua) await this.volume.flush();
  }

  flush(): Promise<void> {
    return this.volume.flush();
  }

  blockStatus(offset: number, length: number, extentsMax: number): ExportExtent[] {
    const out: ExportExtent[] = [];
    const end = offset + length;
    for (let at = offset; at < end && out.length < extentsMax; ) {
      const next = Math.min(end, (Math.floor(at / ioBytesMax) + 1) * ioBytesMax);
      for (const e of (this.replica ?? this.volume).blockStatus(at, next - at)) {
        const last = out[out.length - 1];
        if (last && last.allocated === e.allocated) last.length += e.length;
        else out.push({ ...e });
      }
      at = next;
    }
    return out;
  }

  private checkWritable(): void {
    if (this.readOnly) throw new FerryError('VOLUME_READ_ONLY', `volume ${this.name} is exported read-only`);
  }

  /** Runs `fn` over the range cut at multiples of the volume layer's limit, so whole blocks stay whole. */
  private async pieces(offset: number, length: number, fn: (offset: number, length: number) => Promise<void>): Promise<void> {
    const end = offset + length;
    for (let at = offset; at < end; ) {
      const next = Math.min(end, (Math.floor(at / ioBytesMax) + 1) * ioBytesMax);
      await fn(at, next - at);
      at = next;
    }
  }
}
