import { readdir, unlink } from 'node:fs/promises';
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { FerryError } from '../lib/errors.js';
import { unlinkIfExists } from '../lib/durable.js';
import type { Catalog, VolumeRecord, VolumeAccess } from './catalog.js';
import { Volume } from './volume.js';
import { wasDamaged } from './bitmap-file.js';

/** Files this store creates: `<uuid>.img` (data) and `<uuid>.alloc` (allocation map). */
const volumeFilePattern = /^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.(?:img|alloc)(?:\.tmp)?$/;

export const volumeNamePattern = /^[A-Za-z0-9._-]{1,64}$/;

export function checkVolumeName(name: unknown): string {
  if (typeof name !== 'string' || !volumeNamePattern.test(name) || name === '.' || name === '..') {
    throw new FerryError('INVALID_NAME', `invalid volume name ${JSON.stringify(name)}: use 1-64 characters of A-Z a-z 0-9 . _ -`);
  }
  return name;
}

/** Something that uses a volume and so forbids deleting it (a pair, a snapshot, …). */
export type VolumeUseCheck = (name: string) => string | undefined;

export interface VolumeInfo extends VolumeRecord {
  allocatedBytes: number;
  /** Set when the volume could not be opened at start-up; the volume is not served. */
  failure?: { code: string; message: string };
}

/**
 * Volumes of one site: catalog rows plus open data files. Files are named by the
 * volume's id, so a name can be reused safely and an interrupted create or delete
 * leaves only an orphan file, removed at the next start.
 */
export class VolumeStore {
  private readonly open = new Map<string, Volume>();
  private readonly failed = new Map<string, FerryError>();
  private readonly useChecks: VolumeUseCheck[] = [];

  constructor(
    private readonly catalog: Catalog,
    private readonly volumesDir: string,
    private readonly blockBytes: number,
    private readonly log: Logger,
  ) {}

  /** Opens every catalogued volume and removes files no row refers to. */
  async load(): Promise<void> {
    const records = this.catalog.listVolumes();
    const ids = new Set(records.map((r) => r.id));
    for (const file of await readdir(this.volumesDir)) {
      const id = volumeFilePattern.exec(file)?.[1];
      if (id === undefined) {
        this.log.warn({ file, dir: this.volumesDir }, 'ignoring a file ferry did not create in the volumes directory');
      } else if (!ids.has(id)) {
        this.log.warn({ file }, 'removing a volume file no catalog entry refers to (interrupted create or delete)');
        await unlink(join(this.volumesDir, file));
      }
    }
    for (const record of records) {
      try {
        const volume = await Volume.open(record.name, this.dataPath(record.id), this.allocPath(record.id), record.sizeBytes, record.blockBytes);
        const { corruptPages, headerRebuilt } = volume.loadReport;
        if (wasDamaged(volume.loadReport)) {
          this.log.warn({ volume: record.name, pages: corruptPages, headerRebuilt: headerRebuilt ?? false }, 'the allocation map is damaged; treating the blocks it covered as allocated');
        }
        this.open.set(record.name, volume);
      } catch (err) {
        const failure = err instanceof FerryError ? err : new FerryError('CORRUPT_FILE', `volume ${record.name} could not be opened: ${(err as Error).message}`);
        this.log.error({ volume: record.name, err: failure.message }, 'volume not served');
        this.failed.set(record.name, failure);
      }
    }
  }

  addUseCheck(check: VolumeUseCheck): void {
    this.useChecks.push(check);
  }

  list(): VolumeInfo[] {
    return this.catalog.listVolumes().map((r) => this.info(r));
  }

  show(name: string): VolumeInfo {
    return this.info(this.record(name));
  }

  record(name: string): VolumeRecord {
    const record = this.catalog.getVolume(name);
    if (!record) throw new FerryError('VOLUME_NOT_FOUND', `volume ${name} not found`);
    return record;
  }

  /** The open volume; throws if it does not exist or failed to open. */
  get(name: string): Volume {
    const volume = this.open.get(name);
    if (volume) return volume;
    const failure = this.failed.get(name);
    if (failure) throw failure;
    throw new FerryError('VOLUME_NOT_FOUND', `volume ${name} not found`);
  }

  has(name: string): boolean {
    return this.open.has(name);
  }

  async create(name: string, sizeBytes: number, attrs: Record<string, string> = {}): Promise<VolumeInfo> {
    checkVolumeName(name);
    this.checkSize(sizeBytes);
    if (this.catalog.getVolume(name)) throw new FerryError('VOLUME_EXISTS', `volume ${name} already exists`);
    const id = randomUUID();
    const volume = await Volume.create(name, this.dataPath(id), this.allocPath(id), sizeBytes, this.blockBytes).catch(async (err: unknown) => {
      // Nothing is left behind (a full disk refuses the allocation map, say).
      await this.removeFiles(id);
      throw err;
    });
    const record: VolumeRecord = {
      name,
      id,
      sizeBytes,
      blockBytes: this.blockBytes,
      createdAt: new Date().toISOString(),
      access: 'read-write',
      attrs,
    };
    try {
      this.catalog.insertVolume(record);
    } catch (err) {
      await volume.close();
      await this.removeFiles(id);
      throw err;
    }
    this.open.set(name, volume);
    this.log.info({ volume: name, sizeBytes }, 'volume created');
    return this.info(record);
  }

  /** Refuses, changing nothing, a resize `resize` would refuse. */
  checkResize(name: string, sizeBytes: number, force = false): void {
    const record = this.record(name);
    this.get(name);
    this.checkSize(sizeBytes);
    if (sizeBytes < record.sizeBytes && !force) {
      throw new FerryError('SHRINK_REFUSED', `shrinking volume ${name} from ${record.sizeBytes} to ${sizeBytes} bytes discards data; repeat with --force to do it`);
    }
    const user = this.userOf(name);
    if (user) throw new FerryError('VOLUME_IN_USE', `volume ${name} cannot be resized: ${user}`);
  }

  async resize(name: string, sizeBytes: number, force = false): Promise<VolumeInfo> {
    this.checkResize(name, sizeBytes, force);
    const record = this.record(name);
    const volume = this.get(name);
    const updated = { ...record, sizeBytes };
    if (sizeBytes >= record.sizeBytes) {
      await volume.resize(sizeBytes);
      this.catalog.updateVolume(updated);
    } else {
      // Shrink: the catalog first, so a crash leaves the file to be cut at the next open.
      this.catalog.updateVolume(updated);
      await volume.resize(sizeBytes);
    }
    this.log.info({ volume: name, from: record.sizeBytes, to: sizeBytes }, 'volume resized');
    return this.info(updated);
  }

  setAccess(name: string, access: VolumeAccess): VolumeInfo {
    const updated = { ...this.record(name), access };
    this.catalog.updateVolume(updated);
    return this.info(updated);
  }

  async delete(name: string): Promise<void> {
    const record = this.record(name);
    const user = this.userOf(name);
    if (user) throw new FerryError('VOLUME_IN_USE', `volume ${name} cannot be deleted: ${user}`);
    const volume = this.open.get(name);
    this.open.delete(name);
    this.failed.delete(name);
    this.catalog.deleteVolume(name);
    if (volume) await volume.close();
    await this.removeFiles(record.id);
    this.log.info({ volume: name }, 'volume deleted');
  }

  async close(): Promise<void> {
    const volumes = [...this.open.values()];
    this.open.clear();
    await Promise.all(volumes.map((v) => v.close()));
  }

  private userOf(name: string): string | undefined {
    for (const check of this.useChecks) {
      const reason = check(name);
      if (reason) return reason;
    }
    return undefined;
  }

  private checkSize(sizeBytes: number): void {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % this.blockBytes !== 0) {
      throw new FerryError('INVALID_SIZE', `volume size ${sizeBytes} must be a positive multiple of the site's block size (${this.blockBytes} bytes)`);
    }
  }

  private info(record: VolumeRecord): VolumeInfo {
    const volume = this.open.get(record.name);
    const failure = this.failed.get(record.name);
    return {
      ...record,
      allocatedBytes: volume ? volume.allocatedBlocks * record.blockBytes : 0,
      ...(failure ? { failure: { code: failure.code, message: failure.message } } : {}),
    };
  }

  private dataPath(id: string): string {
    return join(this.volumesDir, `${id}.img`);
  }

  private allocPath(id: string): string {
    return join(this.volumesDir, `${id}.alloc`);
  }

  private async removeFiles(id: string): Promise<void> {
    await unlinkIfExists(this.dataPath(id));
    await unlinkIfExists(this.allocPath(id));
  }
}
