import { crc32c } from '../lib/checksum.js';
import { FerryError } from '../lib/errors.js';
import type { Catalog } from './catalog.js';

/**
 * Catalog records of replication: one pair row per replicated volume and the
 * mailbox of delta sets (what is ready, sent, acknowledged, received, played back).
 * Each row is a JSON body with a CRC32C, checked when read.
 */
export type PairRole = 'source' | 'target';
export type PairMode = 'async' | 'sync';

export interface PairRecord {
  volume: string;
  pairId: string;
  role: PairRole;
  mode: PairMode;
  /** The other site's API URL (for the source: where to send; for the target: who sends). */
  peerUrl: string;
  peerSiteId: string;
  peerSiteName: string;
  peerVolume: string;
  state: string;
  stateReason: string;
  generation: number;
  intervalMs: number;
  highWaterBytes: number;
  /**
   * The most this pair may send, bytes per second, across all its copies and delta sets
   * (`--max-rate`); 0 or absent: no limit. The target keeps the source's for a failover.
   */
  maxRateBytes?: number;
  saveVolumeBytes: number;
  createdAt: string;
  /**
   * The copy that makes the target whole (a new remote copy, or a resync's): next
   * block, volume blocks, the delta set stamped on its image. `copyId` numbers the
   * copies of the pair (0: none yet); `plannedBlocks`/`copiedBlocks` count only the
   * blocks it sends (a resync copies a few); `snapshot` names the image it reads.
   */
  initialCopy: {
    cursorBlock: number;
    totalBlocks: number;
    stampedDeltaSet: number;
    startedAt: string;
    doneAt?: string;
    bytes: number;
    copyId?: number;
    plannedBlocks?: number;
    copiedBlocks?: number;
    snapshot?: string;
    /**
     * Source: this copy catches up a backlog larger than the save volume (rule 8); it
     * starts once the target has played back the stamped delta set.
     */
    catchUp?: boolean;
    /** Target: the snapshot that keeps the consistent image readable while a catch-up is applied. */
    protectiveSnapshot?: string;
  };
  deltaSetCreated: number;
  deltaSetSent: number;
  deltaSetAcked: number;
  deltaSetReceived: number;
  deltaSetPlayedBack: number;
  bytesSent: number;
  bytesReceived: number;
  paused: boolean;
  /** Source clock, ms: the cut of the delta set last played back at the target (what the replica reflects). */
  playedBackCutMs: number;
  /**
   * Target, this site's clock, ms: when the source was last heard from. Recorded with
   * the pair's other changes and at stop, so after a restart it may be older than the
   * truth (lag then reads higher, never lower).
   */
  sourceHeardAtMs?: number;
  /** Failover, resync and failback (E FIG. 21-33): where the pair stands, what was lost or kept. */
  recovery?: RecoveryRecord;
}

/** Where a pair stands in a failover → resync → failback cycle (kept in its record). */
export type RecoveryPhase =
  /** New source after `failover`: read/write, not replicating; waits for `resync`. */
  | 'failed-over'
  /** Old source that learnt of the failover: read-only until resynced. */
  | 'fenced'
  /** New source (or, reversed, the old source again): full-copy fallback, first step (copy of intermediate snapshot 1, E FIG. 28 step 536). */
  | 'resync-full'
  /** New source (or, reversed, the old source again): the copy of the blocks that differ runs alongside replication of newer writes. */
  | 'resync'
  /** Old source (or, reversed, the site that took over) rebuilt as the target: raw until the copy is done. */
  | 'resync-target'
  /** Resync complete: an ordinary pair in the new direction. */
  | 'resynced'
  /** New source handing the source role back (`failback` in progress). */
  | 'failing-back';

export type FailoverMode = 'default' | 'now' | 'sync';

/** Writes a source had that its target did not receive, as the source last said (heartbeats). */
export interface SourceAhead {
  /** Blocks not yet cut into a delta set, or in delta sets not received. */
  blocks: number;
  /** Delta sets cut at the source and not received. */
  deltaSets: number;
  /** When the source said so (the target's clock, ISO 8601); of writes after that nothing is known. */
  lastHeard: string;
}

export interface RecoveryRecord {
  phase: RecoveryPhase;
  /** The generation the pair had before the failover. */
  previousGeneration: number;
  /** Last delta set of `previousGeneration` played back at the target when it took over. */
  restartPoint: number;
  /** The restart-point snapshot (at the new source). */
  restartSnapshot?: string;
  failedOverAt?: string;
  failoverMode?: FailoverMode;
  /** Delta sets received but not played back (`--now`): lost with the failover. */
  skippedDeltaSets?: number;
  /** At failover (not --sync): what the source had that the new source did not receive, as the source last said. */
  sourceAhead?: SourceAhead;
  /** The resync had to copy everything (its reason is in `fullCopyReason`). */
  fullCopy?: boolean;
  fullCopyReason?: string;
  /** Blocks of the old source that were written after the restart point and overwritten. */
  discardedBlocks?: number;
  /** Where those writes are kept (a snapshot at the old source, rule 6). */
  discardSnapshot?: string;
  /** Blocks the resync had to send (differing blocks, or the whole volume). */
  resyncBlocks?: number;
  /** Intermediate snapshots at the new source (E FIG. 28 steps 533, 536-537). */
  intermediateSnapshots?: string[];
  resyncStartedAt?: string;
  resyncDoneAt?: string;
  /** Site that took over (at a fenced old source). */
  failedOverTo?: string;
  /**
   * `resync --reverse`: the old source kept its data and is the source again; the site
   * that took over is rebuilt from it, and its writes since the failover are the ones
   * discarded (kept in `discardSnapshot` there).
   */
  reverse?: boolean;
}

export type DeltaSetState = 'ready' | 'acked' | 'received' | 'playing' | 'played';

export interface DeltaSetRecord {
  volume: string;
  generation: number;
  n: number;
  state: DeltaSetState;
  /** Save-volume positions of its chunk records, [startLsn, endLsn). */
  startLsn: number;
  endLsn: number;
  chunks: number;
  blocks: number;
  dataBytes: number;
  dataCrc: number;
  /** Source clock, ms: when the delta set was cut (lag is measured against these, both from one clock). */
  createdAtMs: number;
  /** Source clock, ms: the cut of the previous delta set (start of the interval this one covers). */
  previousCutMs: number;
  sealedAtMs: number;
  /** Cut while copy `afterCopy` was running: the target plays it back only after that copy. */
  afterCopy?: number;
  /**
   * Source clock, ms: when its first write was made; the replica that reflects the
   * previous cut is exact until then. 0 or absent: not known (as old as that cut).
   */
  firstWriteMs?: number;
  ackedAtMs?: number;
  receivedAtMs?: number;
  playbackStartedAtMs?: number;
  playbackMs?: number;
}

function checked<T>(body: string, crc: number, what: string): T {
  if (crc32c(body) !== crc) throw new FerryError('CORRUPT_RECORD', `catalog row for ${what} failed its checksum`);
  return JSON.parse(body) as T;
}

export class ReplicationCatalog {
  constructor(private readonly catalog: Catalog) {}

  listPairs(): PairRecord[] {
    const rows = this.catalog.db.prepare('SELECT volume, body, crc FROM pairs ORDER BY volume').all() as { volume: string; body: string; crc: number }[];
    return rows.map((r) => checked<PairRecord>(r.body, r.crc, `pair ${r.volume}`));
  }

  getPair(volume: string): PairRecord | undefined {
    const row = this.catalog.db.prepare('SELECT body, crc FROM pairs WHERE volume = ?').get(volume) as { body: string; crc: number } | undefined;
    return row ? checked<PairRecord>(row.body, row.crc, `pair ${volume}`) : undefined;
  }

  putPair(pair: PairRecord): void {
    const body = JSON.stringify(pair);
    this.catalog.db.prepare('INSERT INTO pairs (volume, body, crc) VALUES (?, ?, ?) ON CONFLICT(volume) DO UPDATE SET body = excluded.body, crc = excluded.crc').run(pair.volume, body, crc32c(body));
  }

  deletePair(volume: string): void {
    this.catalog.transaction(() => {
      this.catalog.db.prepare('DELETE FROM pairs WHERE volume = ?').run(volume);
      this.catalog.db.prepare('DELETE FROM delta_sets WHERE volume = ?').run(volume);
    });
  }

  putDeltaSet(ds: DeltaSetRecord): void {
    const body = JSON.stringify(ds);
    this.catalog.db
      .prepare('INSERT INTO delta_sets (volume, generation, n, body, crc) VALUES (?, ?, ?, ?, ?) ON CONFLICT(volume, generation, n) DO UPDATE SET body = excluded.body, crc = excluded.crc')
      .run(ds.volume, ds.generation, ds.n, body, crc32c(body));
  }

  deleteDeltaSet(volume: string, generation: number, n: number): void {
    this.catalog.db.prepare('DELETE FROM delta_sets WHERE volume = ? AND generation = ? AND n = ?').run(volume, generation, n);
  }

  deleteDeltaSets(volume: string): void {
    this.catalog.db.prepare('DELETE FROM delta_sets WHERE volume = ?').run(volume);
  }

  /** Delta sets of a volume, oldest first. */
  listDeltaSets(volume: string): DeltaSetRecord[] {
    const rows = this.catalog.db.prepare('SELECT n, body, crc FROM delta_sets WHERE volume = ? ORDER BY generation, n').all(volume) as { n: number; body: string; crc: number }[];
    return rows.map((r) => checked<DeltaSetRecord>(r.body, r.crc, `delta set ${volume}#${r.n}`));
  }

  /** Several updates as one durable step. */
  transaction<T>(fn: () => T): T {
    return this.catalog.transaction(fn);
  }
}
