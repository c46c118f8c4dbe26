import Database from 'better-sqlite3';
import { crc32c } from '../lib/checksum.js';
import { FerryError } from '../lib/errors.js';

/**
 * The site's catalog: SQLite in WAL mode, schema versioned by `PRAGMA user_version`
 * and migrated forward in order. Every row carries a CRC32C over its fields, checked
 * when read, so a damaged row is refused rather than acted upon.
 */
const migrations: string[] = [
  // 1: volumes
  `CREATE TABLE volumes (
     name        TEXT PRIMARY KEY,
     id          TEXT NOT NULL UNIQUE,
     size_bytes  INTEGER NOT NULL,
     block_bytes INTEGER NOT NULL,
     created_at  TEXT NOT NULL,
     access      TEXT NOT NULL,
     attrs       TEXT NOT NULL,
     crc         INTEGER NOT NULL
   ) STRICT;`,
  // 2: replication pairs and the mailbox of delta sets (E FIG. 8 "save volume mailbox")
  `CREATE TABLE pairs (
     volume      TEXT PRIMARY KEY,
     body        TEXT NOT NULL,
     crc         INTEGER NOT NULL
   ) STRICT;
   CREATE TABLE delta_sets (
     volume      TEXT NOT NULL,
     generation  INTEGER NOT NULL,
     n           INTEGER NOT NULL,
     body        TEXT NOT NULL,
     crc         INTEGER NOT NULL,
     PRIMARY KEY (volume, generation, n)
   ) STRICT;`,
  // 3: snapshots (E FIG. 42: the snapshot queue of each volume, ordered by seq)
  `CREATE TABLE snapshots (
     volume      TEXT NOT NULL,
     volume_id   TEXT NOT NULL,
     name        TEXT NOT NULL,
     id          TEXT NOT NULL UNIQUE,
     seq         INTEGER NOT NULL,
     size_bytes  INTEGER NOT NULL,
     block_bytes INTEGER NOT NULL,
     created_at  TEXT NOT NULL,
     state       TEXT NOT NULL,
     attrs       TEXT NOT NULL,
     crc         INTEGER NOT NULL,
     PRIMARY KEY (volume, name),
     UNIQUE (volume, seq)
   ) STRICT;`,
];

export const catalogSchemaVersion = migrations.length;

/** How hosts may use a volume: a replication target is read-only; a volume being rebuilt is raw. */
export type VolumeAccess = 'read-write' | 'read-only' | 'raw';

export interface VolumeRecord {
  name: string;
  id: string;
  sizeBytes: number;
  blockBytes: number;
  createdAt: string;
  access: VolumeAccess;
  attrs: Record<string, string>;
}

interface VolumeRow {
  name: string;
  id: string;
  size_bytes: number;
  block_bytes: number;
  created_at: string;
  access: string;
  attrs: string;
  crc: number;
}

function volumeCrc(r: VolumeRecord): number {
  return crc32c(JSON.stringify([r.name, r.id, r.sizeBytes, r.blockBytes, r.createdAt, r.access, r.attrs]));
}

/**
 * One snapshot in a volume's queue. `seq` orders the queue (older = smaller) and is
 * never reused for the volume. `state` 'damaged' marks a snapshot that may have
 * depended on before-images of a corrupt snapshot deleted with force.
 */
export interface SnapshotRecord {
  volume: string;
  volumeId: string;
  name: string;
  id: string;
  seq: number;
  sizeBytes: number;
  blockBytes: number;
  createdAt: string;
  state: 'ok' | 'damaged';
  attrs: Record<string, string>;
}

interface SnapshotRow {
  volume: string;
  volume_id: string;
  name: string;
  id: string;
  seq: number;
  size_bytes: number;
  block_bytes: number;
  created_at: string;
  state: string;
  attrs: string;
  crc: number;
}

function snapshotCrc(r: SnapshotRecord): number {
  return crc32c(JSON.stringify([r.volume, r.volumeId, r.name, r.id, r.seq, r.sizeBytes, r.blockBytes, r.createdAt, r.state, r.attrs]));
}

export class Catalog {
  /** The connection, for the storage layer's other record kinds (see replication-catalog.ts). */
  readonly db: Database.Database;

  constructor(path: string) {
    this.db = new Database(path);
    this.db.pragma('journal_mode = WAL');
    this.db.pragma('synchronous = FULL');
    this.db.pragma('foreign_keys = ON');
    this.migrate();
  }

  get schemaVersion(): number {
    return this.db.pragma('user_version', { simple: true }) as number;
  }

  listVolumes(): VolumeRecord[] {
    const rows = this.db.prepare('SELECT * FROM volumes ORDER BY name').all() as VolumeRow[];
    return rows.map(decodeVolume);
  }

  getVolume(name: string): VolumeRecord | undefined {
    const row = this.db.prepare('SELECT * FROM volumes WHERE name = ?').get(name) as VolumeRow | undefined;
    return row ? decodeVolume(row) : undefined;
  }

  insertVolume(record: VolumeRecord): void {
    try {
      this.db
        .prepare(
          `INSERT INTO volumes (name, id, size_bytes, block_bytes, created_at, access, attrs, crc)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
        )
        .run(record.name, record.id, record.sizeBytes, record.blockBytes, record.createdAt, record.access, JSON.stringify(record.attrs), volumeCrc(record));
    } catch (err) {
      if ((err as { code?: string }).code === 'SQLITE_CONSTRAINT_PRIMARYKEY') {
        throw new FerryError('VOLUME_EXISTS', `volume ${record.name} already exists`);
      }
      throw err;
    }
  }

  updateVolume(record: VolumeRecord): void {
    const result = this.db
      .prepare('UPDATE volumes SET size_bytes = ?, access = ?, attrs = ?, crc = ? WHERE name = ? AND id = ?')
      .run(record.sizeBytes, record.access, JSON.stringify(record.attrs), volumeCrc(record), record.name, record.id);
    if (result.changes !== 1) throw new FerryError('VOLUME_NOT_FOUND', `volume ${record.name} not found`);
  }

  deleteVolume(name: string): void {
    this.db.prepare('DELETE FROM volumes WHERE name = ?').run(name);
  }

  /** Every snapshot of the site (or of one volume), oldest first within a volume. */
  listSnapshots(volume?: string): SnapshotRecord[] {
    const rows = (
      volume === undefined
        ? this.db.prepare('SELECT * FROM snapshots ORDER BY volume, seq').all()
        : this.db.prepare('SELECT * FROM snapshots WHERE volume = ? ORDER BY seq').all(volume)
    ) as SnapshotRow[];
    return rows.map(decodeSnapshot);
  }

  insertSnapshot(record: SnapshotRecord): void {
    try {
      this.db
        .prepare(
          `INSERT INTO snapshots (volume, volume_id, name, id, seq, size_bytes, block_bytes, created_at, state, attrs, crc)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
        )
        .run(
          record.volume,
          record.volumeId,
          record.name,
          record.id,
          record.seq,
          record.sizeBytes,
          record.blockBytes,
          record.createdAt,
          record.state,
          JSON.stringify(record.attrs),
          snapshotCrc(record),
        );
    } catch (err) {
      if ((err as { code?: string }).code === 'SQLITE_CONSTRAINT_PRIMARYKEY') {
        throw new FerryError('SNAPSHOT_EXISTS', `volume ${record.volume} already has a snapshot named ${record.name}`);
      }
      throw err;
    }
  }

  updateSnapshot(record: SnapshotRecord): void {
    const result = this.db
      .prepare('UPDATE snapshots SET state = ?, attrs = ?, crc = ? WHERE id = ?')
      .run(record.state, JSON.stringify(record.attrs), snapshotCrc(record), record.id);
    if (result.changes !== 1) throw new FerryError('SNAPSHOT_NOT_FOUND', `snapshot ${record.volume}@${record.name} not found`);
  }

  deleteSnapshot(id: string): void {
    this.db.prepare('DELETE FROM snapshots WHERE id = ?').run(id);
  }

  transaction<T>(fn: () => T): T {
    return this.db.transaction(fn)();
  }

  close(): void {
    if (this.db.open) this.db.close();
  }

  private migrate(): void {
    const current = this.schemaVersion;
    if (current > migrations.length) {
      throw new FerryError('UNSUPPORTED_FORMAT', `catalog schema version ${current} is newer than this ferry (${migrations.length})`);
    }
    for (let v = current; v < migrations.length; v++) {
      this.db.transaction(() => {
        this.db.exec(migrations[v] as string);
        this.db.pragma(`user_version = ${v + 1}`);
      })();
    }
  }
}

function decodeVolume(row: VolumeRow): VolumeRecord {
  let attrs: Record<string, string>;
  try {
    attrs = JSON.parse(row.attrs) as Record<string, string>;
  } catch {
    throw new FerryError('CORRUPT_RECORD', `catalog row for volume ${row.name} has unreadable attributes`);
  }
  const record: VolumeRecord = {
    name: row.name,
    id: row.id,
    sizeBytes: row.size_bytes,
    blockBytes: row.block_bytes,
    createdAt: row.created_at,
    access: row.access as VolumeAccess,
    attrs,
  };
  if (volumeCrc(record) !== row.crc) {
    throw new FerryError('CORRUPT_RECORD', `catalog row for volume ${row.name} failed its checksum`);
  }
  return record;
}

function decodeSnapshot(row: SnapshotRow): SnapshotRecord {
  let attrs: Record<string, string>;
  try {
    attrs = JSON.parse(row.attrs) as Record<string, string>;
  } catch {
    throw new FerryError('CORRUPT_RECORD', `catalog row for snapshot ${row.volume}@${row.name} has unreadable attributes`);
  }
  const record: SnapshotRecord = {
    volume: row.volume,
    volumeId: row.volume_id,
    name: row.name,
    id: row.id,
    seq: row.seq,
    sizeBytes: row.size_bytes,
    blockBytes: row.block_bytes,
    createdAt: row.created_at,
    state: row.state === 'damaged' ? 'damaged' : 'ok',
    attrs,
  };
  if (snapshotCrc(record) !== row.crc || (row.state !== 'ok' && row.state !== 'damaged')) {
    throw new FerryError('CORRUPT_RECORD', `catalog row for snapshot ${row.volume}@${row.name} failed its checksum`);
  }
  return record;
}
