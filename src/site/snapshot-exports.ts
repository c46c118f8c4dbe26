import { FerryError, isFerryError } from '../lib/errors.js';
import { formatSize } from '../lib/units.js';
import { exportRefused, type ExportExtent, type ExportListing, type ExportSource, type NbdExport } from '../nbd/export.js';
import { requestBytesMax } from '../nbd/session.js';
import { parseExportName, type SnapshotImage, type SnapshotManager } from '../snapshot/manager.js';
import type { VolumeStore } from '../storage/volume-store.js';

/** Every snapshot, exported read-only as `VOL@SNAP` (SPEC §5). */
export class SnapshotExportSource implements ExportSource {
  constructor(
    private readonly volumes: VolumeStore,
    private readonly snapshots: SnapshotManager,
  ) {}

  list(): ExportListing[] {
    const out: ExportListing[] = [];
    for (const v of this.volumes.list()) {
      for (const s of this.snapshots.list(v.name)) {
        if (s.state === 'ok') out.push({ name: `${v.name}@${s.name}`, description: `ferry snapshot of ${v.name} taken ${s.createdAt}, ${formatSize(s.sizeBytes)}, read-only` });
      }
    }
    return out;
  }

  open(name: string): NbdExport | undefined {
    const { volume, snapshot } = parseExportName(name);
    if (snapshot === undefined) return undefined;
    let image: SnapshotImage;
    try {
      image = this.snapshots.exportView(volume, snapshot);
    } catch (err) {
      if (isFerryError(err, 'SNAPSHOT_NOT_FOUND') || isFerryError(err, 'VOLUME_NOT_FOUND')) return undefined;
      throw exportRefused(name, (err as Error).message);
    }
    return new SnapshotExport(name, image);
  }
}

class SnapshotExport implements NbdExport {
  readonly readOnly = true;
  readonly sizeBytes: number;
  readonly description: string;
  readonly blockSizes;

  constructor(
    readonly name: string,
    private readonly image: SnapshotImage,
  ) {
    this.sizeBytes = image.sizeBytes;
    this.description = `ferry snapshot ${name}, read-only`;
    this.blockSizes = { minimumBytes: 1, preferredBytes: Math.min(image.blockBytes, requestBytesMax), maximumBytes: requestBytesMax };
  }

  readInto(buf: Uint8Array, offset: number): Promise<void> {
    return this.image.readInto(buf, offset);
  }

  write(): Promise<void> {
    return Promise.reject(this.readOnlyError());
  }

  writeZeroes(): Promise<void> {
    return Promise.reject(this.readOnlyError());
  }

  trim(): Promise<void> {
    return Promise.reject(this.readOnlyError());
  }

  async flush(): Promise<void> {}

  blockStatus(offset: number, length: number, extentsMax: number): ExportExtent[] {
    return this.image.blockStatus(offset, length).slice(0, Math.max(1, extentsMax));
  }

  private readOnlyError(): FerryError {
    return new FerryError('VOLUME_READ_ONLY', `snapshot ${this.name} is read-only`);
  }
}
