import { rm, stat, mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { BufferPool } from '../lib/buffer-pool.js';
import { RateMeter } from '../lib/rate.js';
import { Waker } from '../lib/clock.js';
import { crashPoint } from '../lib/crash-point.js';
import { FerryError, isFerryError, type ErrorCode } from '../lib/errors.js';
import { PagedBitmap } from '../lib/paged-bitmap.js';
import { encodeChecksummedJson, readChecksummedJson, writeFileAtomic } from '../lib/durable.js';
import { BitmapFile, readWorkBitmap, wasDamaged, writeBitmapFile } from '../storage/bitmap-file.js';
import { JournalFile, JournalRecordType } from '../storage/journal.js';
import type { PairRecord, RecoveryRecord, FailoverMode, SourceAhead } from '../storage/replication-catalog.js';
import { ActivityLog, FileActivityLogStore, activityExtentsMaxDefault } from '../tracking/activity-log.js';
import { extentBytesDefault } from '../tracking/change-log.js';
import type { PeerIdentity, RcpConnection } from '../transport/connection.js';
import { FrameType, type Frame } from '../transport/frame.js';
import { reachableUrl } from '../transport/peer-url.js';
import { chunkBytesMax, decodeChunk } from '../replication/chunk.js';
import { CopyRunner } from '../replication/copy.js';
import { Inbox } from '../replication/inbox.js';
import { ReplFrame, json, policyFigure, rateLimitFigure } from '../replication/protocol.js';
import { currentImageName, snapshotsPerVolumeMax } from '../snapshot/manager.js';
import type { ReplicationManager } from '../replication/manager.js';
import type { SourceReplicator } from '../replication/source.js';
import { checkFailover, checkReverseResync, describeRecovery, discardSnapshotName, intermediateSnapshotName, planUndo, restartSnapshotName, resyncCopied } from './plan.js';

/** How long a failover waits for the other site's answer when it is only told (not --sync). */
const fenceNoticeTimeoutMs = 1_500;
/** How often a fenced copy asks the other site whether it took over. */
const fenceWatchMs = 5_000;
const syncTimeoutMs = 120_000;
const playbackTimeoutMs = 600_000;
const requestTimeoutMs = 60_000;
/** Runs of blocks per RecoveryData frame (12 bytes each). */
const runsPerFrame = 1 << 20;
/** The chunk being read while the undo list is gathered from the save volume. */
const undoReadBuffers = new BufferPool(chunkBytesMax, 1);
/** Failback brings the other side within this many blocks before hosts are held (E FIG. 30: one chunk). */
const failbackWithinBytes = 1024 * 1024;

type RecoveryRequest =
  | { op: 'fence'; pairId: string; volume: string; generation: number; sync: boolean }
  | {
      op: 'resync';
      pairId: string;
      volume: string;
      generation: number;
      restartGeneration: number;
      restartPoint: number;
      sourceUrl: string;
      sourceVolume: string;
      saveVolumeBytes: number;
      /** The new source's volume size: a volume that grew there after this copy last did grows here too. */
      sizeBytes?: number;
      /** A dry run: only list what would be undone here; nothing changes. */
      check?: boolean;
    }
  | {
      /**
       * `resync --reverse`, from the old source: the site that took over gives up its
       * writes since the failover and is rebuilt from the old source (`check`: only say
       * whether it would, and where the restart point is; nothing changes).
       */
      op: 'reverse';
      pairId: string;
      volume: string;
      /** The old source's generation: the one the failover was from. */
      generation: number;
      sourceUrl: string;
      sourceVolume: string;
      saveVolumeBytes: number;
      check: boolean;
      /** With `check`: also send the list of blocks changed here since the restart point (a dry run). */
      list?: boolean;
    }
  | {
      op: 'takeover';
      pairId: string;
      volume: string;
      generation: number;
      fromGeneration: number;
      lastDeltaSet: number;
      targetUrl: string;
      targetVolume: string;
      intervalMs: number;
      highWaterBytes: number;
      maxRateBytes?: number;
      saveVolumeBytes: number;
      /** Only ask whether the takeover would be accepted now; nothing changes. */
      check?: boolean;
    }
  | {
      /** From a fenced old source: where does the pair stand at the other site? Nothing changes. */
      op: 'standing';
      pairId: string;
      volume: string;
      /** The asking site's generation (the one it was fenced at). */
      generation: number;
    };

interface StandingReply {
  role: PairRecord['role'];
  generation: number;
  /** A failover, resync or failback of the pair is running there now. */
  roleChange: boolean;
}

interface FenceReply {
  lastDeltaSet: number;
  /** The fenced source's cut policy and rate limit as they stood: the new source carries on with them. */
  intervalMs?: number;
  highWaterBytes?: number;
  maxRateBytes?: number;
}

interface ResyncReply {
  fullCopy: boolean;
  fullCopyReason?: string;
  discardedBlocks: number;
  discardSnapshot?: string;
  undoBlocks: number;
  /** RecoveryData frames that follow with the undo list. */
  frames: number;
}

/** The site that took over answers a reversed resync with this, then its changed blocks (RecoveryData frames). */
interface ReverseReply {
  /** The generation the rebuilt pair runs at. */
  generation: number;
  /** The point both copies last had in common (E FIG. 28's restart point). */
  restartGeneration: number;
  restartPoint: number;
  /** The volume's size there: the old source grows to it first. */
  sizeBytes: number;
  /** Blocks written there since the failover, now discarded, and the snapshot they are kept in (rule 6). */
  discardedBlocks: number;
  discardSnapshot: string;
  /** RecoveryData frames that follow (0 for a check). */
  frames: number;
}

/** A pair's files that only its source role uses (change log, save volume, copy list): they go when it stops being one. */
const sourceRoleFiles = ['dirty.bitmap', 'activity.log', 'save.journal', 'copy.bitmap'];
const undoMagic = 'ferry-undo';
const reverseMagic = 'ferry-reverse';

/** What the site that took over keeps of a reversed resync's answer while it is rebuilt (so the request can be repeated). */
type ReverseAnswer = Omit<ReverseReply, 'frames'>;

/** What the old source keeps of a reversed resync's list (its own changes plus the other site's). */
interface ReverseRecord {
  generation: number;
  fullCopy: boolean;
  fullCopyReason?: string;
  /** Blocks this copy wrote after the restart point (kept; sent to the other site). */
  keptBlocks: number;
}

/** What the old source keeps of its undo list while it is being rebuilt (so a resync can be re-issued). */
interface UndoRecord {
  fullCopy: boolean;
  fullCopyReason?: string;
  discardedBlocks: number;
  discardSnapshot?: string;
}

/** What a resync would do, as a dry run finds it (nothing changed at either site). */
export interface ResyncPreview {
  volume: string;
  reverse: boolean;
  /** The site whose writes would be discarded (kept in a snapshot there), and how many blocks. */
  discardSite: string;
  discardBlocks: number;
  /** The site the copy would run from, and how many blocks it would send. */
  copyFrom: string;
  copyBlocks: number;
  blockBytes: number;
  fullCopy: boolean;
  fullCopyReason?: string;
}

export interface FailoverResult {
  volume: string;
  generation: number;
  restartPoint: number;
  restartSnapshot: string;
  skippedDeltaSets: number;
  /** What the source had that this site did not receive, as it last said; null if not heard since this site started; absent with --sync (nothing). */
  sourceAhead?: SourceAhead | null;
  sourceFenced: boolean;
  /** Milliseconds from the command to read/write access. */
  tookMs: number;
}

/**
 * Failover, resync and failback of replicated volumes (E FIG. 21-33, SPEC C7-C9):
 * role changes of a pair with the generation incremented each time (rule 5), the
 * restart point kept as a snapshot, the old source rebuilt from the blocks that differ
 * (undo list from its own save volume and tracking, plus the new source's changes
 * since the restart point) on one connection while newer writes replicate on the
 * other, and the roles swapped back without a full copy.
 */
export class Recovery {
  /** Volumes whose pair is changing role: replication sessions for them are refused meanwhile. */
  readonly busy = new Set<string>();
  /** Volumes whose role change waits for the source's last delta set (failover --sync). */
  private readonly awaitingLastDeltaSet = new Set<string>();
  private readonly background = new Map<string, Promise<void>>();
  /**
   * Failbacks stuck at the hand-over (hosts held read-only here, the other site not
   * taking over): why, for status; they are retried in the background meanwhile.
   */
  private readonly stuckFailbacks = new Map<string, string>();
  /**
   * Full copies of resyncs under way (E FIG. 28 step 536; no source is open meanwhile):
   * the record each works from, which status shows, and a moved peer is noted in.
   */
  readonly fullCopies = new Map<string, { pair: PairRecord; copier: CopyRunner; sent: RateMeter }>();
  /** Fenced copies asking the other site now and then whether it took over (see `watchFence`). */
  private readonly fenceWatches = new Map<string, Promise<void>>();
  /** Fenced copies: blocks written here that the other site never got (see `countFencedUnsent`). */
  private readonly fencedUnsent = new Map<string, number>();
  /** Fence requests handled per volume (a fenced copy's answer from the other site is stale once one came after it). */
  private readonly fenceRequests = new Map<string, number>();
  private readonly closing = new Waker();
  private closed = false;

  constructor(private readonly m: ReplicationManager) {
    m.deps.rcp.register(ReplFrame.RecoveryRequest, (c, peer, f) => void this.onRequest(c, peer, f));
  }

  private get log() {
    return this.m.deps.log;
  }

  private now(): string {
    return new Date(this.m.deps.clock.now()).toISOString();
  }

  /** After load: carries on with resyncs and failbacks a restart interrupted. */
  /**
   * Sessions from the other site are refused while a role change is under way, except
   * while a synchronous failover waits for the last delta set they bring.
   */
  refusesSessions(volume: string): boolean {
    return this.busy.has(volume) && !this.awaitingLastDeltaSet.has(volume);
  }

  resumeAll(): void {
    for (const pair of this.m.catalog.listPairs()) {
      const phase = pair.recovery?.phase;
      if (pair.role === 'source' && (phase === 'resync-full' || (phase === 'resync' && !this.m.sources.has(pair.volume)))) this.runResync(pair.volume);
      if (pair.role === 'source' && phase === 'failing-back') this.retryFailback(pair.volume);
      if (pair.role === 'source' && phase === 'fenced') {
        this.countFencedUnsent(pair.volume);
        this.watchFence(pair.volume);
      }
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    this.closing.signal();
    for (const c of this.fullCopies.values()) c.copier.close();
    await Promise.allSettled([...this.background.values(), ...this.fenceWatches.values()]);
  }

  /**
   * Hosts held for the last delta set of a role change that failed write again, unless
   * this copy was fenced meanwhile (a second fence request, or the target's newer
   * generation, while the first one's delta set was still going): the other site may be
   * the source now, and a write here would be neither replicated nor on a resync's undo list.
   */
  private async releaseHosts(volume: string): Promise<void> {
    const pair = this.m.catalog.getPair(volume);
    if (pair?.role !== 'source' || pair.recovery?.phase === 'fenced' || !this.m.sources.has(volume)) {
      this.log.warn({ volume, phase: pair?.recovery?.phase }, 'a role change that held hosts failed, but this copy was fenced meanwhile: hosts stay read-only');
      return;
    }
    await this.m.deps.setAccess(volume, 'read-write');
  }

  // ---- failover (at the target's site) ----------------------------------------------

  async failover(volume: string, mode: FailoverMode): Promise<FailoverResult> {
    const started = this.m.deps.clock.now();
    const { snapshots, setAccess, volumes } = this.m.deps;
    const target = this.m.targets.get(volume);
    const pair = target?.pair ?? this.m.requirePair(volume);
    checkFailover(pair, mode);
    if (!target) throw new FerryError('UNAVAILABLE', `the target of ${volume} is not open`);
    if (this.busy.has(volume)) throw new FerryError('VOLUME_IN_USE', `a role change of ${volume} is already in progress`);
    this.busy.add(volume);
    // Until the pair is switched, a failure leaves this site the target: a target closed
    // for the switch is opened again (after a catch-up's restore began, to redo the catch-up).
    let targetClosed = false;
    let imageRestored = false;
    let switched = false;
    let sourceFenced = false;
    try {
      const next = pair.generation + 1;
      const restartSnapshot = restartSnapshotName(next);
      const existing = snapshots.list(volume);
      const snapshotCount = existing.length - (pair.initialCopy.doneAt === undefined && pair.initialCopy.protectiveSnapshot ? 1 : 0);
      if (snapshotCount >= snapshotsPerVolumeMax && !existing.some((s) => s.name === restartSnapshot)) {
        throw new FerryError('SNAPSHOT_LIMIT', `failover of ${volume} keeps a restart-point snapshot, and the volume has ${snapshotCount} snapshots, the most it may have: delete one and run it again; nothing was changed`);
      }
      if (mode === 'sync') {
        // E FIG. 33: the source must be up; it turns read-only and ships a last delta set.
        this.awaitingLastDeltaSet.add(volume);
        try {
          const reply = await this.request<FenceReply>(pair.peerUrl, { op: 'fence', pairId: pair.pairId, volume: pair.peerVolume, generation: next, sync: true }, syncTimeoutMs + 10_000);
          sourceFenced = true;
          // A change made there since the last heartbeat is not lost in the switch.
          if (policyFigure(reply.intervalMs) > 0 && policyFigure(reply.highWaterBytes) > 0) {
            pair.intervalMs = policyFigure(reply.intervalMs);
            pair.highWaterBytes = policyFigure(reply.highWaterBytes);
          }
          pair.maxRateBytes = rateLimitFigure(reply.maxRateBytes) ?? pair.maxRateBytes ?? 0;
          const deadline = this.m.deps.clock.now() + syncTimeoutMs;
          while (pair.deltaSetReceived < reply.lastDeltaSet) {
            if (this.m.deps.clock.now() > deadline) throw new FerryError('UNAVAILABLE', `the last delta set ${reply.lastDeltaSet} did not arrive`);
            await this.m.deps.clock.sleep(20);
          }
        } finally {
          this.awaitingLastDeltaSet.delete(volume);
        }
      }
      // Before the replica closes: what the source had that is not here, as it last said.
      const heardMs = target.stats.lastSourceHeardLocalMs;
      const sourceAhead: SourceAhead | null =
        heardMs > 0 ? { blocks: target.unreceived.blocks, deltaSets: Math.max(0, target.stats.sourceDeltaSetCreated - pair.deltaSetReceived), lastHeard: new Date(heardMs).toISOString() } : null;
      let skipped = 0;
      if (mode === 'now') {
        targetClosed = true;
        await target.close();
        skipped = target.unplayedDeltaSets();
      } else {
        try {
          await target.finishPlayback(playbackTimeoutMs);
        } catch (err) {
          const unplayed = target.unplayedDeltaSets();
          const changed = sourceFenced ? `this site is still the target; the source site, fenced for it, takes writes again within seconds once it sees no one took over` : 'nothing was changed';
          throw new FerryError(
            'UNAVAILABLE',
            `failover of ${volume} stopped, ${changed}: ${(err as Error).message}. Fix the cause and run it again, or run "ferry failover ${volume} --now" to take over at delta set ${pair.deltaSetPlayedBack} without the ${unplayed} received delta set(s) not played back`,
          );
        }
        targetClosed = true;
        await target.close();
        // Delta sets cut during a catch-up copy this side never got (the source was lost
        // before sending it) cannot be played back: they are skipped, and said so.
        skipped = target.unplayedDeltaSets();
        if (skipped > 0) this.log.warn({ volume, skipped }, 'failover: received delta sets that need a catch-up copy this site never got are skipped');
      }
      const protectiveSnapshot = pair.initialCopy.doneAt === undefined ? pair.initialCopy.protectiveSnapshot : undefined;
      if (protectiveSnapshot) {
        // Rule 8: a catch-up was half applied; the volume goes back to the consistent
        // image kept for it. The delta sets after the catch-up cannot be used without it.
        // The restore undoes blocks the catch-up wrote: should it stop part way (a crash,
        // an error), the replica opened again must redo the catch-up whole, not carry on
        // from its cursor over blocks put back. The record says so first.
        pair.initialCopy = { ...pair.initialCopy, cursorBlock: 0, bytes: 0 };
        this.m.catalog.putPair(pair);
        imageRestored = true;
        this.log.info({ volume, snapshot: protectiveSnapshot }, 'failover during a catch-up: putting back the image kept before it');
        const restored = await snapshots.restore(volume, protectiveSnapshot);
        skipped = target.unplayedDeltaSets();
        await snapshots.delete(volume, protectiveSnapshot);
        const now = this.now();
        pair.initialCopy = { ...pair.initialCopy, doneAt: now };
        delete pair.initialCopy.protectiveSnapshot;
        this.log.warn({ volume, snapshot: protectiveSnapshot, restored, skipped, restartPoint: pair.deltaSetPlayedBack }, 'failover during a catch-up: the volume is back at the consistent image kept before it');
      }
      const restartPoint = pair.deltaSetPlayedBack;
      // One left by an attempt that stopped (a crash, or a failure after it) is used only
      // if it holds this same point: the replica may have played back more since.
      const earlier = snapshots.list(volume).find((s) => s.name === restartSnapshot);
      const reusable = earlier !== undefined && earlier.attrs.deltaSet === String(restartPoint) && earlier.attrs.pairId === pair.pairId;
      if (earlier && !reusable) await snapshots.delete(volume, restartSnapshot);
      if (!reusable) {
        await snapshots.create(volume, restartSnapshot, { purpose: 'restart point', deltaSet: String(restartPoint), generation: String(pair.generation), pairId: pair.pairId });
      }
      crashPoint('failover.restart-point-taken');
      const recovery: RecoveryRecord = {
        phase: 'failed-over',
        previousGeneration: pair.generation,
        restartPoint,
        restartSnapshot,
        failedOverAt: this.now(),
        failoverMode: mode,
        skippedDeltaSets: skipped,
        ...(mode !== 'sync' && sourceAhead ? { sourceAhead } : {}),
      };
      const sourcePair: PairRecord = {
        ...pair,
        role: 'source',
        generation: next,
        state: 'suspended',
        stateReason: '',
        intervalMs: pair.intervalMs || this.m.defaults.intervalMs,
        highWaterBytes: pair.highWaterBytes || this.m.defaults.highWaterBytes,
        initialCopy: { cursorBlock: 0, totalBlocks: volumes.get(volume).blockCount, stampedDeltaSet: 0, startedAt: this.now(), bytes: 0, copyId: 0 },
        ...this.m.freshCounters(),
        recovery,
      };
      sourcePair.stateReason = describeRecovery(sourcePair);
      this.m.targets.delete(volume);
      this.replacePair(sourcePair);
      switched = true;
      crashPoint('failover.switched');
      await this.m.removeFiles(volumes.record(volume).id);
      crashPoint('failover.files-removed');
      await setAccess(volume, 'read-write');
      crashPoint('failover.read-write');
      const tookMs = this.m.deps.clock.now() - started;
      if (mode !== 'sync') {
        // E FIG. 32 step 561: if possible, the source is made read-only (told, not waited
        // for long) - only now that nothing can stop this failover any more.
        sourceFenced = await this.request<FenceReply>(pair.peerUrl, { op: 'fence', pairId: pair.pairId, volume: pair.peerVolume, generation: next, sync: false }, fenceNoticeTimeoutMs).then(
          () => true,
          (err: Error) => {
            this.log.warn({ volume, err: err.message }, 'the source site could not be told of the failover; it will learn of it when it returns');
            return false;
          },
        );
      }
      this.log.warn({ volume, generation: next, restartPoint, skipped, mode, sourceFenced }, 'failover: this site is now the source');
      return { volume, generation: next, restartPoint, restartSnapshot, skippedDeltaSets: skipped, ...(mode !== 'sync' ? { sourceAhead } : {}), sourceFenced, tookMs };
    } catch (err) {
      if (targetClosed && !switched) {
        // Opened from its record: after a restore that began, at the kept image, the catch-up to be redone.
        await this.reopenTarget(volume).catch((e: Error) => this.log.error({ volume, err: e.message }, 'failover failed and the replica could not be opened again; restart the site'));
        const changed = [
          imageRestored ? 'the catch-up copy it was applying starts over' : '',
          sourceFenced ? 'the source site, fenced for it, takes writes again within seconds once it sees no one took over' : '',
        ].filter((c) => c !== '').join('; ') || 'nothing was changed';
        throw new FerryError(err instanceof FerryError ? err.code : 'UNAVAILABLE', `failover of ${volume} stopped; this site is still the target, ${changed}: ${(err as Error).message}`);
      }
      throw err;
    } finally {
      this.busy.delete(volume);
    }
  }

  /** Opens the replica of a pair still the target here (after a role change that did not happen). */
  private async reopenTarget(volume: string): Promise<void> {
    const pair = this.m.catalog.getPair(volume);
    if (!pair || pair.role !== 'target') return;
    const target = await this.m.openTarget(pair);
    this.m.targets.set(volume, target);
    target.start();
  }

  // ---- fencing (at the old source) ----------------------------------------------------

  /**
   * The other site took over: this copy stops being written and replicated. Its change
   * tracking and save volume stay as they are: the resync reads them.
   */
  async fenceSelf(volume: string, by: string, reason: string): Promise<void> {
    const current = this.m.catalog.getPair(volume);
    if (current?.role === 'source' && current.recovery?.phase === 'failing-back') {
      // A newer generation there is this failback's hand-over, done where its answer was
      // lost: the hand-over, asked again, is acknowledged and makes this copy the replica.
      this.log.info({ volume, by, reason }, 'failback: the other site is at a newer generation; completing the hand-over');
      this.retryFailback(volume);
      return;
    }
    // Hosts are stopped first and the writes in flight finish under tracking: a write
    // made after the other site took over must be on the resync's undo list.
    if (current?.role === 'source') await this.m.deps.setAccess(volume, 'read-only');
    crashPoint('fence.hosts-held');
    const source = this.m.sources.get(volume);
    this.m.sources.delete(volume);
    if (source) {
      const resume = await this.m.deps.volumes.get(volume).quiesce();
      try {
        await source.close();
      } finally {
        resume();
      }
    }
    const pair = this.m.catalog.getPair(volume);
    if (!pair || pair.role !== 'source') return;
    if (pair.recovery?.phase !== 'fenced') {
      pair.recovery = { phase: 'fenced', previousGeneration: pair.generation, restartPoint: 0, failedOverTo: by };
      pair.state = 'suspended';
      pair.stateReason = describeRecovery(pair);
      this.m.catalog.putPair(pair);
    }
    crashPoint('fence.recorded');
    await this.m.deps.setAccess(volume, 'read-only');
    this.log.warn({ volume, by, reason }, 'this volume failed over to the other site: read-only until it is resynced');
    this.countFencedUnsent(volume);
    this.watchFence(volume);
  }

  /**
   * A fenced copy asks the other site every few seconds where the pair stands there. A
   * failover --sync fences this site before the other one switches; if that failover
   * then stopped (the other site died, its playback failed), the other site is still the
   * read-only replica at this site's generation and no role change runs there: no one
   * took over, so this site is the source again (the failed failover changes nothing).
   * Any real takeover raised the generation there, and this copy stays fenced.
   */
  private watchFence(volume: string): void {
    if (this.fenceWatches.has(volume)) return;
    const work = (async () => {
      while (!this.closed) {
        await this.closing.wait(this.m.deps.clock, fenceWatchMs);
        const pair = this.m.catalog.getPair(volume);
        if (this.closed || !pair || pair.role !== 'source' || pair.recovery?.phase !== 'fenced') return;
        if (this.busy.has(volume)) continue;
        const fenceRequests = this.fenceRequests.get(volume) ?? 0;
        const there = await this.askStanding(pair);
        if (there && there.role === 'target' && there.generation === pair.generation && !there.roleChange) {
          await this.unfence(volume, there, fenceRequests).catch((err: Error) => this.log.error({ volume, err: err.message }, 'a fenced copy whose failover did not happen could not be made the source again; retrying'));
        }
      }
    })().finally(() => this.fenceWatches.delete(volume));
    this.fenceWatches.set(volume, work);
  }

  private async unfence(volume: string, there: StandingReply, fenceRequests: number): Promise<void> {
    if (this.busy.has(volume)) return;
    this.busy.add(volume);
    try {
      const pair = this.m.catalog.getPair(volume);
      if (!pair || pair.role !== 'source' || pair.recovery?.phase !== 'fenced' || there.generation !== pair.generation) return;
      // A failover asked again since the answer: it may be switching now.
      if ((this.fenceRequests.get(volume) ?? 0) !== fenceRequests) return;
      const { recovery: _fenced, ...rest } = pair;
      // Suspended, not paused: the source reaches the target again by itself and resumes where it stopped.
      const sourcePair: PairRecord = { ...rest, state: 'suspended', stateReason: 'the failover did not happen at the other site; reconnecting', paused: false };
      this.m.catalog.putPair(sourcePair);
      const source = await this.m.openSource(sourcePair);
      this.m.sources.set(volume, source);
      source.start();
      await this.m.deps.setAccess(volume, 'read-write');
      this.log.warn(
        { volume, site: pair.peerSiteName, generation: pair.generation },
        'the failover that fenced this volume did not happen (the other site is still its replica at this generation): this site is the source again; hosts may write',
      );
    } finally {
      this.busy.delete(volume);
    }
  }

  // ---- resync (at the new source) -----------------------------------------------------

  /** Starts (or continues) rebuilding the old source from the blocks that differ. */
  async resync(volume: string): Promise<void> {
    const pair = this.m.sources.get(volume)?.pair ?? this.m.requirePair(volume);
    const phase = pair.recovery?.phase;
    if (pair.role !== 'source' || !pair.recovery || !['failed-over', 'resync-full', 'resync'].includes(phase ?? '')) {
      throw new FerryError('BAD_REQUEST', `volume ${volume} has not failed over to this site (it is the ${pair.role}${phase ? `, ${phase}` : ''}); resync is run at the site that took over`);
    }
    if (phase !== 'failed-over') {
      if (!this.background.has(volume) && !this.m.sources.has(volume)) this.runResync(volume);
      return;
    }
    if (this.busy.has(volume)) throw new FerryError('VOLUME_IN_USE', `a role change of ${volume} is already in progress`);
    // Checked before the old source is asked: once it has answered, it is being rebuilt.
    const existing = this.m.deps.snapshots.list(volume);
    if (existing.length >= snapshotsPerVolumeMax && !existing.some((s) => s.name === intermediateSnapshotName(pair.generation, 2))) {
      throw new FerryError('SNAPSHOT_LIMIT', `resync of ${volume} takes an intermediate snapshot here, and the volume has ${existing.length} snapshots, the most it may have: delete one and run it again; nothing was changed`);
    }
    this.busy.add(volume);
    const startedAt = this.now();
    try {
      const r = pair.recovery;
      const request = this.resyncRequestFor(pair, r, false);
      // E FIG. 28 step 533 needs nothing from the old source: the intermediate point is
      // taken here while the old source lists its undo blocks (steps 531-532).
      const preparing = r.restartSnapshot ? this.takeIntermediatePoint(pair, r.restartSnapshot) : undefined;
      // A failed preparation is dropped; the step is taken again in the background.
      const prepared = preparing?.catch((err: Error) => {
        this.log.warn({ volume, err: err.message }, 'resync: the intermediate point could not be taken yet; retrying');
        return undefined;
      });
      let answer: { reply: ResyncReply; runs: [number, number][] };
      try {
        answer = await this.requestRuns<ResyncReply>(pair.peerUrl, request, (r) => r.undoBlocks);
      } catch (err) {
        await this.abandonIntermediatePoint(pair, await prepared);
        const message = (err as Error).message;
        if (message.startsWith('other site: ') || !isFerryError(err, 'UNAVAILABLE')) throw err;
        // No answer: the old source may have acted on the request all the same.
        throw new FerryError('UNAVAILABLE', `resync of ${volume}: no answer from ${pair.peerSiteName} (${message}); it may have started its part (its status then says it is being rebuilt): run "ferry resync ${volume}" again`);
      }
      const { reply, runs } = answer;
      crashPoint('resync.answered');
      const dir = await this.pairDir(volume);
      const undo = new PagedBitmap(this.m.deps.volumes.get(volume).blockCount);
      for (const [s, n] of runs) undo.setRange(s, n);
      let point = await prepared;
      if (reply.fullCopy && point) {
        // E FIG. 28 steps 536-537: the intermediate point comes after a first full copy.
        await this.abandonIntermediatePoint(pair, point);
        point = undefined;
      }
      try {
        if (point) point.differ.or(undo);
        await Promise.all([writeBitmapFile(join(dir, 'undo.bitmap'), undo), point ? this.planIntermediateCopy(pair, point.differ) : undefined]);
        this.recordResyncReply(pair, reply, startedAt);
        pair.state = 'initial-copying';
        pair.stateReason = describeRecovery(pair);
        this.m.catalog.putPair(pair);
        crashPoint('resync.copy-planned');
      } catch (err) {
        await point?.source.close();
        throw err;
      }
      const started = point
        ? await this.handOverTracking(pair, point.source).then(
            () => true,
            (err: Error) => {
              this.log.error({ volume, err: err.message }, 'resync: the copy could not be started; retrying');
              return false;
            },
          )
        : false;
      if (started) this.log.info({ volume, blocks: r.resyncBlocks, fullCopy: false }, 'resync: copying the blocks that differ while newer writes replicate');
      // The rest (or a retry) runs in the background from what the record says.
      else this.runResync(volume);
    } finally {
      this.busy.delete(volume);
    }
  }

  /** What the old source answered, in the pair's record (the caller commits it); a full copy and discarded writes are logged loudly. */
  private recordResyncReply(pair: PairRecord, reply: ResyncReply, startedAt: string): void {
    const r = pair.recovery as RecoveryRecord;
    r.fullCopy = reply.fullCopy;
    if (reply.fullCopyReason !== undefined) r.fullCopyReason = reply.fullCopyReason;
    r.discardedBlocks = reply.discardedBlocks;
    if (reply.discardSnapshot !== undefined) r.discardSnapshot = reply.discardSnapshot;
    r.resyncStartedAt = startedAt;
    r.phase = reply.fullCopy ? 'resync-full' : 'resync';
    if (reply.fullCopy) {
      // Rule 6: never a full copy without saying so.
      this.log.warn({ volume: pair.volume, reason: reply.fullCopyReason }, 'resync needs a FULL COPY: the old source cannot undo its changes from its own records');
    }
    if (reply.discardedBlocks > 0 || reply.discardSnapshot) {
      this.log.warn({ volume: pair.volume, blocks: reply.discardedBlocks, snapshot: reply.discardSnapshot, site: pair.peerSiteName }, 'writes made at the old source after the restart point are discarded; they are kept in a snapshot there');
    }
  }

  private runResync(volume: string): void {
    this.retryInBackground(volume, () => this.continueResync(volume), (err) => {
      const pair = this.m.catalog.getPair(volume);
      if (!pair?.recovery) return false;
      this.log.error({ volume, err: err.message }, 'resync step failed; retrying');
      pair.stateReason = `${describeRecovery(pair)}: ${err.message}`;
      this.m.catalog.putPair(pair);
      return true;
    });
  }

  /**
   * Runs `step` for a volume in the background until it succeeds or the site closes,
   * backing off between attempts; `retry` reports a failure and says whether to go on.
   */
  private retryInBackground(volume: string, step: () => Promise<void>, retry: (err: Error) => boolean): void {
    if (this.background.has(volume)) return;
    const work = (async () => {
      for (let attempt = 0; !this.closed; attempt++) {
        try {
          await step();
          return;
        } catch (err) {
          if (this.closed || !retry(err as Error)) return;
          await this.m.deps.clock.sleep(Math.min(5000, 200 * 2 ** Math.min(attempt, 5)));
        }
      }
    })().finally(() => this.background.delete(volume));
    this.background.set(volume, work);
  }

  /** One pass through the resync's steps from wherever the record says it is. */
  private async continueResync(volume: string): Promise<void> {
    const { snapshots, volumes } = this.m.deps;
    let pair = this.m.requirePair(volume);
    const r = pair.recovery as RecoveryRecord;
    const generation = pair.generation;
    const i1 = intermediateSnapshotName(generation, 1);
    const i2 = intermediateSnapshotName(generation, 2);
    if (r.phase === 'resync-full') {
      // E FIG. 28 step 536: copy a first intermediate snapshot whole, without replication.
      if (!snapshots.list(volume).some((s) => s.name === i1)) {
        if (pair.initialCopy.cursorBlock > 0) this.log.warn({ volume, snapshot: i1 }, 'intermediate snapshot 1 is gone; the full copy starts over');
        await snapshots.create(volume, i1, { purpose: 'resync intermediate point 1', pairId: pair.pairId });
        crashPoint('resync.first-point-taken');
        pair.initialCopy = { cursorBlock: 0, totalBlocks: volumes.get(volume).blockCount, stampedDeltaSet: 0, startedAt: this.now(), bytes: 0, copyId: (pair.initialCopy.copyId ?? 0) + 1, snapshot: i1 };
        r.intermediateSnapshots = [i1];
        this.m.catalog.putPair(pair);
      }
      const volumeInfo = volumes.get(volume);
      const image = snapshots.exportView(volume, i1);
      const sent = new RateMeter(this.m.deps.clock);
      const copier = new CopyRunner({
        pair,
        clock: this.m.deps.clock,
        log: this.log,
        openSession: (p) => this.m.openSession(p, 'copy'),
        plan: async () => ({ copyId: pair.initialCopy.copyId ?? 1, image, blockCount: volumeInfo.blockCount, blockBytes: volumeInfo.blockBytes, stampedDeltaSet: 0, final: false }),
        persist: () => this.m.catalog.putPair(pair),
        limiter: this.m.limiter(pair),
        countSent: (bytes) => {
          pair.bytesSent += bytes;
          sent.count(bytes);
        },
      });
      sent.start();
      this.fullCopies.set(volume, { pair, copier, sent });
      let done: boolean;
      try {
        done = await copier.run();
      } finally {
        this.fullCopies.delete(volume);
      }
      if (!done) return;
      r.phase = 'resync';
      pair.stateReason = describeRecovery(pair);
      this.m.catalog.putPair(pair);
      crashPoint('resync.first-copy-done');
      this.log.info({ volume, snapshot: i1 }, 'resync: intermediate snapshot 1 copied; copying what changed since');
    }
    pair = this.m.requirePair(volume);
    if (pair.recovery?.phase !== 'resync' || this.m.sources.has(volume)) return;
    const rr = pair.recovery;
    const dir = await this.pairDir(volume);
    // The copy's plan is fixed once its bitmap is written and the record names its image.
    if (!resyncCopied(pair) && (!(await exists(this.m.copyBitmapPath(pair))) || pair.initialCopy.snapshot !== i2)) {
      const point = await this.takeIntermediatePoint(pair, rr.fullCopy ? i1 : (rr.restartSnapshot as string));
      try {
        if (!rr.fullCopy) point.differ.or(await this.readUndoList(volume, join(dir, 'undo.bitmap')));
        await this.planIntermediateCopy(pair, point.differ);
        pair.state = 'initial-copying';
        pair.stateReason = describeRecovery(pair);
        this.m.catalog.putPair(pair);
      } catch (err) {
        await point.source.close();
        throw err;
      }
      await this.handOverTracking(pair, point.source);
      this.log.info({ volume, blocks: rr.resyncBlocks, fullCopy: rr.fullCopy ?? false }, 'resync: copying the blocks that differ while newer writes replicate');
      return;
    }
    await this.startSource(pair);
  }

  /**
   * E FIG. 28 step 533: change tracking starts, then the intermediate point is taken;
   * the writes after it replicate as delta sets, the blocks that differ from `base`
   * before it are copied. An intermediate point left by an attempt that did not get
   * this far may predate this attempt's tracking: it is taken again.
   */
  private async takeIntermediatePoint(pair: PairRecord, base: string | undefined): Promise<{ source: SourceReplicator; differ: PagedBitmap }> {
    const { snapshots, volumes } = this.m.deps;
    const i2 = intermediateSnapshotName(pair.generation, 2);
    const source = await this.m.openSource(pair);
    try {
      if (snapshots.list(pair.volume).some((s) => s.name === i2)) await snapshots.delete(pair.volume, i2);
      await snapshots.create(pair.volume, i2, { purpose: 'resync intermediate point', pairId: pair.pairId, deltaSet: String(pair.deltaSetCreated) });
      // A reversed resync's list is complete already: its hosts were held since it was made.
      return { source, differ: base === undefined ? new PagedBitmap(volumes.get(pair.volume).blockCount) : await snapshots.changedBlocks(pair.volume, base, i2) };
    } catch (err) {
      await source.close();
      throw err;
    }
  }

  /** An intermediate point taken for a resync that is not going ahead with it. */
  private async abandonIntermediatePoint(pair: PairRecord, point: { source: SourceReplicator } | undefined): Promise<void> {
    if (!point) return;
    await point.source.close();
    await this.dropSnapshot(pair.volume, intermediateSnapshotName(pair.generation, 2));
  }

  /** Writes the copy's bitmap and plans the copy from the intermediate point in the record (the caller commits it). */
  private async planIntermediateCopy(pair: PairRecord, blocks: PagedBitmap): Promise<void> {
    const r = pair.recovery as RecoveryRecord;
    const i2 = intermediateSnapshotName(pair.generation, 2);
    await writeBitmapFile(this.m.copyBitmapPath(pair), blocks);
    r.resyncBlocks = blocks.count;
    r.intermediateSnapshots = [...new Set([...(r.intermediateSnapshots ?? []), i2])];
    pair.initialCopy = {
      cursorBlock: 0,
      totalBlocks: this.m.deps.volumes.get(pair.volume).blockCount,
      stampedDeltaSet: pair.deltaSetCreated,
      startedAt: this.now(),
      bytes: 0,
      copyId: (pair.initialCopy.copyId ?? 0) + 1,
      snapshot: i2,
      plannedBlocks: blocks.count,
      copiedBlocks: 0,
    };
  }

  /**
   * Tracking passes from the source that took the intermediate point to the one that
   * runs the copy; host writes wait meanwhile, so none falls between the two untracked.
   */
  private async handOverTracking(pair: PairRecord, tracking: SourceReplicator): Promise<void> {
    let resume: () => void;
    try {
      resume = await this.m.deps.volumes.get(pair.volume).quiesce();
    } catch (err) {
      await tracking.close();
      throw err;
    }
    try {
      await tracking.close();
      await this.startSource(pair);
    } finally {
      resume();
    }
  }

  private async startSource(pair: PairRecord): Promise<void> {
    const source = await this.m.openSource(pair);
    this.m.sources.set(pair.volume, source);
    source.start();
    // A reversed resync's old source was held read-only until its writes were tracked.
    if (pair.recovery?.reverse) await this.m.deps.setAccess(pair.volume, 'read-write');
  }

  /** The resync's copy is complete: the old source is a replica again (E FIG. 28 step 535). */
  async resyncDone(pair: PairRecord): Promise<void> {
    const r = pair.recovery;
    if (!r || r.phase !== 'resync') return;
    for (const name of [...(r.intermediateSnapshots ?? []), r.restartSnapshot]) await this.dropSnapshot(pair.volume, name);
    crashPoint('resync.snapshots-dropped');
    const dir = await this.pairDir(pair.volume);
    for (const f of ['undo.bitmap', 'reverse.bitmap', 'reverse.json']) await rm(join(dir, f), { force: true });
    await rm(this.m.copyBitmapPath(pair), { force: true });
    crashPoint('resync.files-removed');
    r.phase = 'resynced';
    r.resyncDoneAt = this.now();
    pair.stateReason = '';
    this.m.catalog.putPair(pair);
    this.log.info({ volume: pair.volume, blocks: r.resyncBlocks, fullCopy: r.fullCopy ?? false, bytes: pair.initialCopy.bytes }, 'resync complete');
  }

  /** An undo list kept on disk; damage widens it to every block it covered (copied again, never missed). */
  private async readUndoList(volume: string, path: string): Promise<PagedBitmap> {
    const { bits, report } = await readWorkBitmap(path, this.m.deps.volumes.get(volume).blockCount);
    if (wasDamaged(report)) {
      this.log.warn({ volume, headerRebuilt: report.headerRebuilt ?? false, pages: report.corruptPages.length }, 'the resync\'s undo list is damaged: the blocks it covered are all copied again');
    }
    return bits;
  }

  /** Deletes a snapshot the recovery made if it is still there; a failure is logged, not raised. */
  private async dropSnapshot(volume: string, name: string | undefined): Promise<void> {
    const { snapshots } = this.m.deps;
    if (!name || !snapshots.list(volume).some((s) => s.name === name)) return;
    await snapshots.delete(volume, name).catch((err: Error) => this.log.warn({ volume, snapshot: name, err: err.message }, 'snapshot could not be deleted'));
  }

  /**
   * `ferry resync VOL --dry-run` (at the site that took over) or `--reverse --dry-run` (at
   * the old source): which site's writes would be discarded and how many blocks the copy
   * would send, from the same lists the resync makes; nothing changes at either site.
   * The two answers side by side are what an administrator weighs to choose which
   * copy's data to keep.
   */
  async previewResync(volume: string, reverse: boolean): Promise<ResyncPreview> {
    const pair = this.m.requirePair(volume);
    const self = this.m.deps.self.siteName;
    const { volumes, snapshots } = this.m.deps;
    const volumeInfo = volumes.get(volume);
    const r = pair.recovery;
    let discard: { blocks: number; fullCopy: boolean; reason?: string };
    let union: PagedBitmap;
    if (!reverse) {
      if (pair.role !== 'source' || r?.phase !== 'failed-over' || !r.restartSnapshot) {
        throw new FerryError('BAD_REQUEST', `volume ${volume} ${r?.phase === 'resync' || r?.phase === 'resync-full' ? 'is being resynced already' : 'has not failed over to this site'}; a dry run of resync is run at the site that took over, before "ferry resync"`);
      }
      const { reply, runs } = await this.requestRuns<ResyncReply>(pair.peerUrl, this.resyncRequestFor(pair, r, true), (x) => x.undoBlocks);
      union = await snapshots.changedBlocks(volume, r.restartSnapshot, currentImageName);
      for (const [s, n] of runs) union.setRange(s, n);
      discard = { blocks: reply.discardedBlocks, fullCopy: reply.fullCopy, ...(reply.fullCopyReason !== undefined ? { reason: reply.fullCopyReason } : {}) };
    } else {
      checkReverseResync(pair);
      if (this.m.sources.has(volume)) throw new FerryError('BAD_REQUEST', `volume ${volume} here is still replicating: it has not learnt of a failover at ${pair.peerSiteName}`);
      const { reply, runs } = await this.requestRuns<ReverseReply>(pair.peerUrl, this.reverseRequestFor(pair, true, true), (x) => x.discardedBlocks);
      const own = await this.listUndo(pair, reply.restartGeneration, reply.restartPoint);
      // The other copy may be larger (a resize that did not finish here): this one would grow first.
      union = new PagedBitmap(Math.max(volumeInfo.blockCount, Math.ceil(reply.sizeBytes / volumeInfo.blockBytes)));
      for (const [s, n] of [...own.bits.runs(), ...runs]) union.setRange(s, n);
      discard = { blocks: reply.discardedBlocks, fullCopy: own.fullCopy, ...(own.reason !== undefined ? { reason: own.reason } : {}) };
    }
    return {
      volume,
      reverse,
      discardSite: pair.peerSiteName,
      discardBlocks: discard.blocks,
      copyFrom: self,
      copyBlocks: discard.fullCopy ? union.bitCount : union.count,
      blockBytes: volumeInfo.blockBytes,
      fullCopy: discard.fullCopy,
      ...(discard.reason !== undefined ? { fullCopyReason: discard.reason } : {}),
    };
  }

  // ---- reversed resync (at the old source) ---------------------------------------------

  /**
   * `ferry resync VOL --reverse` at the old source: this copy keeps its writes after the
   * restart point and becomes the source again; the site that took over is rebuilt from
   * it, and its writes since the failover are the ones discarded (kept in a snapshot
   * there, rule 6). The blocks sent are this copy's own undo list (the delta sets after
   * the restart point and its unsent changes) plus the other site's changes since the
   * restart point, as in E FIG. 28 with the roles the other way round; the copy then
   * runs as a resync's does, alongside replication of newer writes.
   */
  async resyncReverse(volume: string): Promise<void> {
    const pair = this.m.requirePair(volume);
    const phase = pair.recovery?.phase;
    if (pair.role === 'source' && pair.recovery?.reverse && (phase === 'resync' || phase === 'resync-full')) {
      if (!this.background.has(volume) && !this.m.sources.has(volume)) this.runResync(volume);
      return;
    }
    checkReverseResync(pair);
    if (this.busy.has(volume)) throw new FerryError('VOLUME_IN_USE', `a role change of ${volume} is already in progress`);
    this.busy.add(volume);
    const startedAt = this.now();
    try {
      // Nothing changes at either site until the other says it would be rebuilt.
      const point = await this.request<ReverseReply>(pair.peerUrl, this.reverseRequestFor(pair, true), requestTimeoutMs);
      // Hosts stop here, and the writes in flight finish under tracking: they are kept.
      await this.fenceSelf(volume, pair.peerSiteName, 'resync --reverse');
      crashPoint('reverse.fenced');
      if (point.sizeBytes > this.m.deps.volumes.get(volume).sizeBytes) await this.m.growToMatch(volume, point.sizeBytes, pair.peerSiteName);
      const { reply, runs } = await this.requestRuns<ReverseReply>(pair.peerUrl, this.reverseRequestFor(pair, false), (r) => r.discardedBlocks);
      const dir = await this.pairDir(volume);
      const ownPath = join(dir, 'reverse.bitmap');
      const recordPath = join(dir, 'reverse.json');
      // This copy's own writes after the restart point, listed (and kept, for a repeated
      // command) before its tracking files go.
      let own = await readChecksummedJson<ReverseRecord>(recordPath, reverseMagic, 1).then((r) => (r.body.generation === reply.generation ? r.body : undefined), () => undefined);
      let ownBits: PagedBitmap;
      if (own && (await exists(ownPath))) {
        ownBits = await this.readUndoList(volume, ownPath);
      } else {
        const undo = await this.listUndo(this.m.requirePair(volume), reply.restartGeneration, reply.restartPoint);
        ownBits = undo.bits;
        own = { generation: reply.generation, fullCopy: undo.fullCopy, keptBlocks: undo.bits.count };
        if (undo.reason !== undefined) own.fullCopyReason = undo.reason;
        await writeBitmapFile(ownPath, ownBits);
        await writeFileAtomic(recordPath, encodeChecksummedJson(reverseMagic, 1, own));
        crashPoint('reverse.own-listed');
      }
      for (const [s, n] of runs) ownBits.setRange(s, n);
      await writeBitmapFile(join(dir, 'undo.bitmap'), ownBits);
      for (const f of [...sourceRoleFiles, 'undo.json']) await rm(join(dir, f), { force: true });
      crashPoint('reverse.files-removed');
      const fenced = this.m.requirePair(volume);
      // An unfinished catch-up's image is of no use: this copy is the source now.
      if (fenced.initialCopy.catchUp) await this.dropSnapshot(volume, fenced.initialCopy.snapshot);
      const sourcePair: PairRecord = {
        ...fenced,
        role: 'source',
        generation: reply.generation,
        state: 'initial-copying',
        initialCopy: { cursorBlock: 0, totalBlocks: this.m.deps.volumes.get(volume).blockCount, stampedDeltaSet: 0, startedAt, bytes: 0, copyId: 0 },
        ...this.m.freshCounters(),
        recovery: {
          phase: own.fullCopy ? 'resync-full' : 'resync',
          previousGeneration: fenced.generation,
          restartPoint: reply.restartPoint,
          reverse: true,
          fullCopy: own.fullCopy,
          ...(own.fullCopyReason !== undefined ? { fullCopyReason: own.fullCopyReason } : {}),
          discardedBlocks: reply.discardedBlocks,
          discardSnapshot: reply.discardSnapshot,
          resyncStartedAt: startedAt,
        },
      };
      sourcePair.stateReason = describeRecovery(sourcePair);
      this.replacePair(sourcePair);
      crashPoint('reverse.switched');
      if (own.fullCopy) {
        // The first intermediate snapshot takes every write from now on: hosts may write.
        await this.m.deps.setAccess(volume, 'read-write');
        this.log.warn({ volume, reason: own.fullCopyReason }, 'resync --reverse needs a FULL COPY: this copy cannot list its own changes after the restart point from its records');
      }
      this.log.warn(
        { volume, generation: reply.generation, site: pair.peerSiteName, kept: own.keptBlocks, discarded: reply.discardedBlocks, snapshot: reply.discardSnapshot },
        'resync --reverse: this copy keeps its data and is the source again; the writes made at the other site since the failover are discarded there (kept in a snapshot)',
      );
    } finally {
      this.busy.delete(volume);
    }
    this.runResync(volume);
  }

  // ---- failback (at the current source) -----------------------------------------------

  /**
   * Hands the source role to the other site (E FIG. 30): catch up to within a chunk,
   * hold hosts (read-only), ship the rest, let the other side take over, become its
   * target. Also a planned switchover with no failure before it.
   */
  async failback(volume: string): Promise<void> {
    const source = this.m.sources.get(volume);
    const pair = source?.pair ?? this.m.requirePair(volume);
    if (pair.role !== 'source') throw new FerryError('BAD_REQUEST', `volume ${volume} is the target of its pair; failback is run at the current source`);
    const phase = pair.recovery?.phase;
    if (phase === 'failed-over' || phase === 'resync-full' || phase === 'resync' || phase === 'fenced') {
      throw new FerryError('BAD_REQUEST', `volume ${volume} cannot fail back now: ${describeRecovery(pair) || phase}; ${phase === 'fenced' ? 'it is not the current source' : 'run "ferry resync" and let it finish first'}`);
    }
    if (!source) throw new FerryError('UNAVAILABLE', `replication of ${volume} is not running`);
    if (this.busy.has(volume)) throw new FerryError('VOLUME_IN_USE', `a role change of ${volume} is already in progress`);
    this.busy.add(volume);
    let stuck = false;
    try {
      if (phase !== 'failing-back') {
        if (pair.state !== 'duplex' && pair.state !== 'duplex-pending') {
          throw new FerryError('BAD_REQUEST', `volume ${volume} is ${pair.state}${pair.stateReason ? ` (${pair.stateReason})` : ''}; failback needs a pair in duplex`);
        }
        // Hosts are held only once the other site says it would take over: a refusal changes nothing here.
        await this.request(pair.peerUrl, this.takeoverRequest(pair, true), requestTimeoutMs);
        const within = Math.max(1, Math.floor(failbackWithinBytes / this.m.deps.volumes.get(volume).blockBytes));
        await source.drain({ withinBlocks: within, playedBack: false, timeoutMs: syncTimeoutMs });
        await this.m.deps.setAccess(volume, 'read-only');
        crashPoint('failback.hosts-held');
        try {
          await this.m.unthrottled(volume, () => source.drain({ withinBlocks: 0, playedBack: true, timeoutMs: syncTimeoutMs }));
        } catch (err) {
          await this.releaseHosts(volume);
          throw err;
        }
        pair.recovery = { ...(pair.recovery ?? { previousGeneration: pair.generation, restartPoint: pair.deltaSetCreated }), phase: 'failing-back' };
        pair.stateReason = describeRecovery(pair);
        this.m.catalog.putPair(pair);
        crashPoint('failback.recorded');
      }
      await this.handOver(volume);
    } catch (err) {
      if (await this.abandonFailback(volume, err)) {
        throw new FerryError('NOT_FOUND', `failback of ${volume} abandoned: ${(err as Error).message}; this site is still the source and its hosts write again`);
      }
      if (await this.failbackOvertaken(volume, err)) {
        throw new FerryError('STALE_GENERATION', `failback of ${volume} cannot happen: ${pair.peerSiteName} took over by a failover meanwhile; this copy is fenced (read-only) until "ferry resync ${pair.peerVolume}" is run there`);
      }
      // Past the point of no return, hosts stay held and the hand-over goes on by itself.
      if (this.m.catalog.getPair(volume)?.recovery?.phase === 'failing-back') {
        this.failbackStuck(volume, err as Error);
        stuck = true;
        throw new FerryError(err instanceof FerryError ? err.code : 'UNAVAILABLE', `failback of ${volume}: ${this.failbackFailing(volume)}; "ferry status ${volume}" shows when it is done`);
      }
      throw err;
    } finally {
      this.busy.delete(volume);
      // Only once `busy` is released: the retry's first step would otherwise see it held.
      if (stuck) this.retryFailback(volume);
    }
  }

  /** Why a failback is stuck at its hand-over, '' when none is. */
  failbackFailing(volume: string): string {
    if (this.m.catalog.getPair(volume)?.recovery?.phase !== 'failing-back') this.stuckFailbacks.delete(volume);
    return this.stuckFailbacks.get(volume) ?? '';
  }

  private failbackStuck(volume: string, err: Error): void {
    this.stuckFailbacks.set(volume, `the other site has not taken over (${err.message}); hosts stay read-only here and the hand-over is retried`);
  }

  private retryFailback(volume: string): void {
    const step = async (): Promise<void> => {
      // Another role change here (a fence being answered) goes first; this one is retried after it.
      if (this.busy.has(volume)) throw new FerryError('VOLUME_IN_USE', `a role change of ${volume} is in progress here`);
      // Fenced or handed over meanwhile (by the command itself, or a failover there): nothing left to retry.
      if (this.m.catalog.getPair(volume)?.recovery?.phase !== 'failing-back') return;
      this.busy.add(volume);
      try {
        await this.handOver(volume);
      } catch (err) {
        if (!(await this.abandonFailback(volume, err)) && !(await this.failbackOvertaken(volume, err))) throw err;
      } finally {
        this.busy.delete(volume);
      }
    };
    this.retryInBackground(volume, step, (err) => {
      if (this.m.catalog.getPair(volume)?.recovery?.phase !== 'failing-back') return false;
      this.failbackStuck(volume, err);
      this.log.warn({ volume, err: err.message }, 'failback: the other site did not take over yet; retrying');
      return true;
    });
  }

  /**
   * A hand-over the other site refuses for good (it has no such pair: stopped there, its
   * volume deleted) can never happen, and the hosts held here would wait for nothing:
   * this site stays the source and takes writes again. Returns whether it gave up.
   */
  private async abandonFailback(volume: string, err: unknown): Promise<boolean> {
    if (!isFerryError(err, 'NOT_FOUND')) return false;
    // The open source's record is the one it keeps writing: it is changed in place.
    const pair = this.m.sources.get(volume)?.pair ?? this.m.catalog.getPair(volume);
    const recovery = pair?.recovery;
    if (!pair || pair.role !== 'source' || recovery?.phase !== 'failing-back') return false;
    // What the record said before the failback (the resync it came from) stays.
    if (recovery.resyncDoneAt !== undefined) pair.recovery = { ...recovery, phase: 'resynced' };
    else delete pair.recovery;
    pair.stateReason = '';
    this.m.catalog.putPair(pair);
    this.stuckFailbacks.delete(volume);
    await this.m.deps.setAccess(volume, 'read-write');
    this.log.error({ volume, site: pair.peerSiteName, err: (err as Error).message }, 'failback abandoned: the other site has no such pair and can never take over; this site is still the source and hosts may write again');
    return true;
  }

  /**
   * A hand-over refused because the other site took over by a failover meanwhile (it is
   * the source at a newer generation, not by this failback) can never happen: this copy
   * is an old source like any other, fenced with its hosts still held, and waits for a
   * resync from there. Returns whether it was so.
   */
  private async failbackOvertaken(volume: string, err: unknown): Promise<boolean> {
    if (!isFerryError(err, 'STALE_GENERATION')) return false;
    const pair = this.m.sources.get(volume)?.pair ?? this.m.catalog.getPair(volume);
    if (!pair || pair.role !== 'source' || pair.recovery?.phase !== 'failing-back') return false;
    const there = await this.askStanding(pair);
    if (!there || there.role !== 'source' || there.generation <= pair.generation) return false;
    // Not failing back any more: fenceSelf then fences this copy instead of completing a hand-over.
    delete pair.recovery;
    pair.stateReason = '';
    this.m.catalog.putPair(pair);
    this.stuckFailbacks.delete(volume);
    this.log.error({ volume, site: pair.peerSiteName, generation: there.generation, err: (err as Error).message }, 'failback overtaken: the other site took over by a failover; this copy is fenced until it is resynced from there');
    await this.fenceSelf(volume, pair.peerSiteName, `${pair.peerSiteName} took over by a failover during a failback`);
    return true;
  }

  /** Where the pair stands at the other site (its role and generation); undefined if it does not answer. */
  private askStanding(pair: PairRecord): Promise<StandingReply | undefined> {
    return this.request<StandingReply>(pair.peerUrl, { op: 'standing', pairId: pair.pairId, volume: pair.peerVolume, generation: pair.generation }, fenceNoticeTimeoutMs * 2).catch(() => undefined);
  }

  /** What the other site is asked at failback: to take over, or (check) whether it would now. */
  private takeoverRequest(pair: PairRecord, check: boolean): RecoveryRequest {
    return {
      op: 'takeover',
      pairId: pair.pairId,
      volume: pair.peerVolume,
      generation: pair.generation + 1,
      fromGeneration: pair.generation,
      lastDeltaSet: pair.deltaSetCreated,
      targetUrl: this.m.deps.selfUrl(),
      targetVolume: pair.volume,
      intervalMs: pair.intervalMs,
      highWaterBytes: pair.highWaterBytes,
      maxRateBytes: pair.maxRateBytes ?? 0,
      saveVolumeBytes: pair.saveVolumeBytes,
      check,
    };
  }

  /** The swap itself, once this side is read-only and the other has everything (idempotent). */
  private async handOver(volume: string): Promise<void> {
    const { volumes, setAccess } = this.m.deps;
    const source = this.m.sources.get(volume);
    const pair = source?.pair ?? this.m.requirePair(volume);
    const next = pair.generation + 1;
    await this.request(pair.peerUrl, this.takeoverRequest(pair, false), requestTimeoutMs);
    crashPoint('failback.taken-over');
    this.m.sources.delete(volume);
    await source?.close();
    const blockCount = volumes.get(volume).blockCount;
    const now = this.now();
    const { recovery: _previous, ...rest } = pair;
    const targetPair: PairRecord = {
      ...rest,
      role: 'target',
      generation: next,
      state: 'duplex',
      stateReason: '',
      initialCopy: { cursorBlock: blockCount, totalBlocks: blockCount, stampedDeltaSet: 0, startedAt: now, doneAt: now, bytes: 0, copyId: 1 },
      ...this.m.freshCounters(),
    };
    await this.m.removeFiles(volumes.record(volume).id);
    crashPoint('failback.files-removed');
    this.replacePair(targetPair);
    crashPoint('failback.switched');
    const target = await this.m.openTarget(targetPair);
    this.m.targets.set(volume, target);
    target.start();
    await setAccess(volume, 'read-only');
    this.stuckFailbacks.delete(volume);
    this.log.warn({ volume, generation: next, source: pair.peerSiteName }, 'failback: the other site is the source again; this volume is its read-only replica');
  }

  // ---- requests from the other site ---------------------------------------------------

  private async onRequest(connection: RcpConnection, peer: PeerIdentity, frame: Frame): Promise<void> {
    try {
      const body = json<RecoveryRequest>(frame);
      if (typeof body.volume !== 'string' || typeof body.pairId !== 'string' || !Number.isSafeInteger(body.generation)) {
        throw new FerryError('PROTOCOL_ERROR', 'recovery request lacks a volume, pair id or generation');
      }
      const pair = this.m.catalog.getPair(body.volume);
      if (!pair || pair.pairId !== body.pairId) throw new FerryError('NOT_FOUND', `no replication pair ${body.pairId} for volume ${body.volume} at ${this.m.deps.self.siteName}`);
      switch (body.op) {
        case 'fence':
          return await this.onFence(connection, peer, pair, body);
        case 'resync':
          return await this.onResync(connection, peer, pair, body);
        case 'reverse':
          return await this.onReverse(connection, peer, pair, body);
        case 'takeover':
          return await this.onTakeover(connection, peer, pair, body);
        case 'standing': {
          const reply: StandingReply = { role: pair.role, generation: pair.generation, roleChange: this.busy.has(pair.volume) || pair.recovery?.phase === 'failing-back' };
          connection.sendJson(ReplFrame.RecoveryReply as number, reply);
          connection.close();
          return;
        }
        default:
          throw new FerryError('PROTOCOL_ERROR', `unknown recovery request ${(body as { op: string }).op}`);
      }
    } catch (err) {
      const e = err instanceof FerryError ? err : new FerryError('INTERNAL', (err as Error).message);
      if (!connection.isClosed) {
        connection.sendError(e.code, e.message);
        connection.close();
      }
    }
  }

  private async onFence(connection: RcpConnection, peer: PeerIdentity, pair: PairRecord, body: Extract<RecoveryRequest, { op: 'fence' }>): Promise<void> {
    if (pair.role !== 'source') throw new FerryError('BAD_REQUEST', `volume ${pair.volume} is not the source of its pair here`);
    if (this.busy.has(pair.volume)) throw new FerryError('VOLUME_IN_USE', `a role change of ${pair.volume} is in progress at ${this.m.deps.self.siteName}; try again`);
    // A fenced copy that asked the other site where it stands must not act on an answer older than this request.
    this.fenceRequests.set(pair.volume, (this.fenceRequests.get(pair.volume) ?? 0) + 1);
    if (pair.recovery?.phase !== 'fenced') {
      if (body.generation <= pair.generation) throw new FerryError('STALE_GENERATION', `pair is at generation ${pair.generation}; a failover to generation ${body.generation} is refused`);
      // One fence at a time: a second request (a retry whose first connection was lost) must
      // not hold hosts, or give them back, while the first one's last delta set is going.
      this.busy.add(pair.volume);
      try {
        const source = this.m.sources.get(pair.volume);
        if (body.sync && source) {
          // E FIG. 33: hosts are held, a last delta set is cut and acknowledged.
          await this.m.deps.setAccess(pair.volume, 'read-only');
          try {
            await this.m.unthrottled(pair.volume, () => source.drain({ withinBlocks: 0, playedBack: false, timeoutMs: syncTimeoutMs }));
          } catch (err) {
            await this.releaseHosts(pair.volume);
            throw err;
          }
        }
        await this.fenceSelf(pair.volume, peer.siteName, `failover requested by ${peer.siteName}`);
      } finally {
        this.busy.delete(pair.volume);
      }
    }
    const fenced = this.m.catalog.getPair(pair.volume) as PairRecord;
    const reply: FenceReply = { lastDeltaSet: fenced.deltaSetCreated, intervalMs: fenced.intervalMs, highWaterBytes: fenced.highWaterBytes, maxRateBytes: fenced.maxRateBytes ?? 0 };
    connection.sendJson(ReplFrame.RecoveryReply as number, reply);
    connection.close();
  }

  /**
   * E FIG. 28 steps 531-532 at the old source: list the blocks to undo (delta sets after
   * the restart point from the save volume, plus unsent changes from the tracking),
   * keep the writes being discarded in a snapshot, and turn into a raw target.
   */
  private async onResync(connection: RcpConnection, peer: PeerIdentity, pair: PairRecord, body: Extract<RecoveryRequest, { op: 'resync' }>): Promise<void> {
    const { volumes, snapshots, setAccess } = this.m.deps;
    const dir = await this.pairDir(pair.volume);
    const undoPath = join(dir, 'undo.bitmap');
    const recordPath = join(dir, 'undo.json');
    const asTarget = pair.role === 'target' && pair.generation === body.generation && pair.recovery?.phase === 'resync-target';
    // A role change of its own under way here (a `resync --reverse`, say) goes first.
    if (!asTarget && this.busy.has(pair.volume)) throw new FerryError('VOLUME_IN_USE', `a role change of ${pair.volume} is already in progress at ${this.m.deps.self.siteName}`);
    if (body.check) {
      if (asTarget) throw new FerryError('BAD_REQUEST', `volume ${pair.volume} here is being rebuilt by the resync already`);
      if (pair.role !== 'source' || body.generation <= pair.generation) {
        throw new FerryError('STALE_GENERATION', `volume ${pair.volume} here is the ${pair.role} at generation ${pair.generation}; a resync to generation ${body.generation} is refused`);
      }
      // Its tracking files are read only once it has stopped with them.
      if (this.m.sources.has(pair.volume)) throw new FerryError('UNAVAILABLE', `volume ${pair.volume} here has not learnt of the failover yet; it does once it reaches ${peer.siteName}: try again shortly`);
      const undo = await this.listUndo(pair, body.restartGeneration, body.restartPoint);
      const reply: Omit<ResyncReply, 'frames'> = { fullCopy: undo.fullCopy, discardedBlocks: undo.bits.count, undoBlocks: undo.bits.count, ...(undo.reason !== undefined ? { fullCopyReason: undo.reason } : {}) };
      sendWithRuns(connection, reply, undo.bits);
      return;
    }
    if (!asTarget) {
      if (pair.role !== 'source' || body.generation <= pair.generation) {
        throw new FerryError('STALE_GENERATION', `volume ${pair.volume} here is the ${pair.role} at generation ${pair.generation}; a resync to generation ${body.generation} is refused`);
      }
      if (this.m.sources.has(pair.volume)) await this.fenceSelf(pair.volume, peer.siteName, 'resync requested');
      // The volume grew at the other site and not here (a resize that did not finish
      // before this site was lost): this copy grows first, before anything is listed
      // or kept in a snapshot, so every block the new source may send has a place.
      const sizeBytes = body.sizeBytes ?? 0;
      if (Number.isSafeInteger(sizeBytes) && sizeBytes > volumes.get(pair.volume).sizeBytes) await this.m.growToMatch(pair.volume, sizeBytes, peer.siteName);
      let record = await readChecksummedJson<UndoRecord>(recordPath, undoMagic, 1).then((r) => r.body, () => undefined);
      if (!record || !(await exists(undoPath))) {
        const undo = await this.listUndo(pair, body.restartGeneration, body.restartPoint);
        record = { fullCopy: undo.fullCopy, discardedBlocks: undo.bits.count };
        if (undo.reason) record.fullCopyReason = undo.reason;
        if (undo.fullCopy || undo.bits.count > 0) {
          // Rule 6: what is about to be overwritten stays readable.
          const name = discardSnapshotName(body.generation);
          if (!snapshots.list(pair.volume).some((s) => s.name === name)) {
            await snapshots.create(pair.volume, name, { purpose: 'writes discarded by resync', blocks: undo.fullCopy ? 'unknown' : String(undo.bits.count), pairId: pair.pairId });
          }
          crashPoint('rebuild.discard-snapshot-taken');
          record.discardSnapshot = name;
        }
        await writeBitmapFile(undoPath, undo.bits);
        await writeFileAtomic(recordPath, encodeChecksummedJson(undoMagic, 1, record));
        crashPoint('rebuild.undo-recorded');
      }
      await setAccess(pair.volume, 'raw');
      crashPoint('rebuild.raw');
      // The old source's own replication files go; the undo list stays.
      for (const f of sourceRoleFiles) await rm(join(dir, f), { force: true });
      // An unfinished catch-up's image is of no use once its blocks are on the undo list.
      if (pair.initialCopy.catchUp) await this.dropSnapshot(pair.volume, pair.initialCopy.snapshot);
      this.replacePair(
        this.rebuiltTarget(pair, body.generation, connection, peer, body, {
          phase: 'resync-target',
          previousGeneration: pair.generation,
          restartPoint: body.restartPoint,
          fullCopy: record.fullCopy,
          discardedBlocks: record.discardedBlocks,
          ...(record.fullCopyReason !== undefined ? { fullCopyReason: record.fullCopyReason } : {}),
          ...(record.discardSnapshot !== undefined ? { discardSnapshot: record.discardSnapshot } : {}),
        }),
      );
      crashPoint('rebuild.switched');
      this.log.warn({ volume: pair.volume, from: peer.siteName, fullCopy: record.fullCopy, discarded: record.discardedBlocks, snapshot: record.discardSnapshot }, 'resync: this volume is being rebuilt from the other site (raw until done)');
    }
    if (!this.m.targets.has(pair.volume)) {
      // Also when a request before this one changed the role but could not open the
      // replica (its save volume could not be created): a re-issued resync opens it.
      const target = await this.m.openTarget(this.m.catalog.getPair(pair.volume) as PairRecord);
      this.m.targets.set(pair.volume, target);
      target.start();
    }
    const { body: record } = await readChecksummedJson<UndoRecord>(recordPath, undoMagic, 1);
    const undo = await this.readUndoList(pair.volume, undoPath);
    const reply: Omit<ResyncReply, 'frames'> = { ...record, undoBlocks: undo.count };
    sendWithRuns(connection, reply, undo);
  }

  /**
   * `resync --reverse` at the site that took over: hosts stop, this copy's writes since
   * the failover are kept in a snapshot (rule 6) and listed (restart point → that
   * snapshot), and it turns into a raw target of the old source. Answered again from
   * what it kept if the request is repeated.
   */
  private async onReverse(connection: RcpConnection, peer: PeerIdentity, pair: PairRecord, body: Extract<RecoveryRequest, { op: 'reverse' }>): Promise<void> {
    const { volumes, snapshots, setAccess } = this.m.deps;
    const dir = await this.pairDir(pair.volume);
    const listPath = join(dir, 'reverse.bitmap');
    const recordPath = join(dir, 'reverse.json');
    const kept = await readChecksummedJson<ReverseAnswer>(recordPath, reverseMagic, 1).then((r) => r.body, () => undefined);
    const r = pair.recovery;
    // Once turned into the target, its answer stands; before, it is made afresh (hosts may have written since an attempt that stopped).
    const rebuilt = pair.role === 'target' && r?.phase === 'resync-target' && r.reverse === true && kept !== undefined && kept.generation === pair.generation && kept.restartGeneration === body.generation;
    if (!rebuilt) {
      if (pair.role !== 'source' || r?.phase !== 'failed-over' || !r.restartSnapshot) {
        throw new FerryError('BAD_REQUEST', `volume ${pair.volume} here is the ${pair.role}${r ? ` (${r.phase})` : ''}: only a site that took over, before "ferry resync" was run there, can be rebuilt from its old source`);
      }
      if (body.generation !== r.previousGeneration) {
        throw new FerryError('STALE_GENERATION', `volume ${pair.volume} here took over from generation ${r.previousGeneration}; the copy at generation ${body.generation} cannot be kept in its place`);
      }
      if (this.busy.has(pair.volume)) throw new FerryError('VOLUME_IN_USE', `a role change of ${pair.volume} is already in progress`);
      const next = pair.generation + 1;
      const discardSnapshot = discardSnapshotName(next);
      const answer: ReverseAnswer = { generation: next, restartGeneration: r.previousGeneration, restartPoint: r.restartPoint, sizeBytes: volumes.get(pair.volume).sizeBytes, discardedBlocks: 0, discardSnapshot };
      const existing = snapshots.list(pair.volume);
      if (existing.length >= snapshotsPerVolumeMax && !existing.some((s) => s.name === discardSnapshot)) {
        throw new FerryError('SNAPSHOT_LIMIT', `volume ${pair.volume} at ${this.m.deps.self.siteName} keeps its writes since the failover in a snapshot, and it has ${existing.length}, the most it may have: delete one there and run this again; nothing was changed`);
      }
      if (body.check && body.list) {
        const changed = await snapshots.changedBlocks(pair.volume, r.restartSnapshot, currentImageName);
        sendWithRuns(connection, { ...answer, discardedBlocks: changed.count }, changed);
        return;
      }
      if (body.check) {
        connection.sendJson(ReplFrame.RecoveryReply as number, { ...answer, frames: 0 });
        connection.close();
        return;
      }
      this.busy.add(pair.volume);
      try {
        // Hosts stop before the point that is kept; a failure before the switch gives them back.
        await setAccess(pair.volume, 'read-only');
        crashPoint('unwind.hosts-held');
        let answered: ReverseAnswer;
        try {
          // One left by an attempt that stopped holds less than this copy has now.
          await this.dropSnapshot(pair.volume, discardSnapshot);
          await snapshots.create(pair.volume, discardSnapshot, { purpose: 'writes discarded by resync --reverse', pairId: pair.pairId });
          crashPoint('unwind.discard-snapshot-taken');
          const changed = await snapshots.changedBlocks(pair.volume, r.restartSnapshot, discardSnapshot);
          answered = { ...answer, discardedBlocks: changed.count };
          await writeBitmapFile(listPath, changed);
          await writeFileAtomic(recordPath, encodeChecksummedJson(reverseMagic, 1, answered));
          crashPoint('unwind.listed');
        } catch (err) {
          await setAccess(pair.volume, 'read-write');
          throw err;
        }
        await setAccess(pair.volume, 'raw');
        crashPoint('unwind.raw');
        this.replacePair(
          this.rebuiltTarget(pair, next, connection, peer, body, { phase: 'resync-target', previousGeneration: pair.generation, restartPoint: r.restartPoint, reverse: true, discardedBlocks: answered.discardedBlocks, discardSnapshot }),
        );
        crashPoint('unwind.switched');
        // Its changes are listed: the restart point has served.
        await this.dropSnapshot(pair.volume, r.restartSnapshot);
        crashPoint('unwind.restart-point-dropped');
        this.log.warn(
          { volume: pair.volume, from: peer.siteName, discarded: answered.discardedBlocks, snapshot: discardSnapshot },
          'resync --reverse: the writes made here since the failover are discarded (kept in a snapshot); this volume is being rebuilt from the old source (raw until done)',
        );
      } finally {
        this.busy.delete(pair.volume);
      }
    }
    if (!this.m.targets.has(pair.volume)) {
      const target = await this.m.openTarget(this.m.catalog.getPair(pair.volume) as PairRecord);
      this.m.targets.set(pair.volume, target);
      target.start();
    }
    const answered = (await readChecksummedJson<ReverseAnswer>(recordPath, reverseMagic, 1)).body;
    const { bits } = await readWorkBitmap(listPath, volumes.get(pair.volume).blockCount);
    if (bits.count !== answered.discardedBlocks) throw new FerryError('CHECKSUM_MISMATCH', `the list of blocks written here since the failover holds ${bits.count} blocks, its record ${answered.discardedBlocks}`);
    const reply: Omit<ReverseReply, 'frames'> = answered;
    sendWithRuns(connection, reply, bits);
  }

  /**
   * The blocks this old source changed after the restart point: those of delta sets
   * n-x+1 … n still in its save volume, and everything its change tracking holds dirty
   * (persisted bitmap plus hot activity-log extents, the same superset recovery uses).
   */
  private async listUndo(pair: PairRecord, restartGeneration: number, restartPoint: number): Promise<{ bits: PagedBitmap; fullCopy: boolean; reason?: string }> {
    const volume = this.m.deps.volumes.get(pair.volume);
    const bits = new PagedBitmap(volume.blockCount);
    const full = (reason: string): { bits: PagedBitmap; fullCopy: boolean; reason: string } => {
      this.log.warn({ volume: pair.volume, reason }, 'the writes after the restart point cannot be listed: a full copy is needed');
      return { bits: new PagedBitmap(volume.blockCount), fullCopy: true, reason };
    };
    const plan = planUndo(pair, restartGeneration, restartPoint, this.m.catalog.listDeltaSets(pair.volume));
    if (plan.kind === 'full-copy') return full(plan.reason);
    const dir = await this.pairDir(pair.volume);
    const tracked = await this.readTracking(pair, dir, bits);
    if (tracked !== undefined) return full(tracked);
    if (plan.deltaSets.length > 0) {
      const journalPath = join(dir, 'save.journal');
      if (!(await exists(journalPath))) return full('the save volume is gone');
      const journal = await JournalFile.open(journalPath, pair.saveVolumeBytes);
      try {
        const rows = this.m.catalog.listDeltaSets(pair.volume).filter((d) => d.generation === restartGeneration);
        for (const n of plan.deltaSets) {
          const ds = rows.find((d) => d.n === n);
          if (!ds) return full(`delta set ${n} is missing`);
          let lsn = ds.startLsn;
          for (let index = 0; index < ds.chunks; index++) {
            const record = await journal.readNext(lsn, ds.endLsn, undoReadBuffers, { type: JournalRecordType.Chunk, generation: ds.generation, deltaSet: n, index }).catch(() => undefined);
            try {
              if (!record) {
                return full(`delta set ${n} is damaged in the save volume (chunk ${index})`);
              }
              for (const e of decodeChunk(record.payload, volume.blockBytes, volume.blockCount).extents) bits.setRange(e.block, e.count);
              lsn = record.nextLsn;
            } finally {
              record?.release?.();
            }
          }
        }
      } finally {
        await journal.close();
      }
    }
    return { bits, fullCopy: false };
  }

  /**
   * Adds to `bits` the blocks this site's change tracking holds for the pair (written
   * here, in no delta set yet): its bit map, the extents its activity log had in
   * flight, and an unfinished catch-up copy's blocks. The source must not be running.
   * Returns why the tracking cannot be read, or undefined. `damaged`: 'fill' marks a
   * damaged page of the bit map as all changed (and writes that back), 'throw' changes
   * nothing and reports it.
   */
  private async readTracking(pair: PairRecord, dir: string, bits: PagedBitmap, damaged: 'fill' | 'throw' = 'fill'): Promise<string | undefined> {
    const volume = this.m.deps.volumes.get(pair.volume);
    try {
      const { file } = await BitmapFile.open(join(dir, 'dirty.bitmap'), damaged);
      bits.or(file.bitmap);
      await file.close();
      const store = await FileActivityLogStore.open(join(dir, 'activity.log'), activityExtentsMaxDefault);
      const log = await ActivityLog.open(store);
      await store.close();
      if (log.damaged) return 'the activity log is damaged: which blocks had writes in flight is not known';
      const extentBlocks = Math.max(1, Math.floor(extentBytesDefault / volume.blockBytes));
      for (const e of log.recovered) {
        const first = e * extentBlocks;
        if (first < volume.blockCount) bits.setRange(first, Math.min(extentBlocks, volume.blockCount - first));
      }
      // A catch-up copy not known to be complete: its blocks left the change log for it.
      const catchUpPath = this.m.copyBitmapPath(pair);
      if (pair.initialCopy.catchUp && (await exists(catchUpPath))) bits.or((await readWorkBitmap(catchUpPath, volume.blockCount)).bits);
      return undefined;
    } catch (err) {
      return `the change tracking could not be read: ${(err as Error).message}`;
    }
  }

  /**
   * A fenced copy runs no source, so its status would say nothing is waiting to be
   * sent; in fact its writes the other site never got wait in its tracking (a resync
   * discards them). They are counted once (the volume is read-only meanwhile) and
   * shown as the pair's lag. Tracking that cannot be read counts as every block, as
   * the resync would treat it.
   */
  private countFencedUnsent(volume: string): void {
    void (async () => {
      const pair = this.m.catalog.getPair(volume);
      if (!pair || pair.role !== 'source' || pair.recovery?.phase !== 'fenced' || this.m.sources.has(volume)) return;
      const blockCount = this.m.deps.volumes.get(volume).blockCount;
      const bits = new PagedBitmap(blockCount);
      // Only read: a damaged bit map is the resync's to mend, and counts as every block here.
      const unreadable = await this.readTracking(pair, await this.pairDir(volume), bits, 'throw');
      this.fencedUnsent.set(volume, unreadable === undefined ? bits.count : blockCount);
    })().catch((err: Error) => this.log.warn({ volume, err: err.message }, 'the writes waiting at this fenced copy could not be counted'));
  }

  /** Blocks written at this fenced copy that the other site never got (undefined: not a fenced copy, or not counted yet). */
  fencedUnsentBlocks(pair: PairRecord): number | undefined {
    if (pair.role !== 'source' || pair.recovery?.phase !== 'fenced') {
      this.fencedUnsent.delete(pair.volume);
      return undefined;
    }
    return this.fencedUnsent.get(pair.volume);
  }

  /** E FIG. 30 at the old source: play back everything, then become the source again. */
  private async onTakeover(connection: RcpConnection, peer: PeerIdentity, pair: PairRecord, body: Extract<RecoveryRequest, { op: 'takeover' }>): Promise<void> {
    const { volumes, setAccess } = this.m.deps;
    // A source at the generation asked for took over by this hand-over (its answer lost), unless it
    // took over by a failover of its own at the same generation: then it has a recovery record.
    const handedOver = pair.role === 'source' && pair.generation === body.generation && pair.recovery === undefined;
    if (!handedOver) {
      if (pair.role === 'source' && pair.generation >= body.generation) {
        throw new FerryError('STALE_GENERATION', `volume ${pair.volume} here took over by a failover at generation ${pair.generation}; a failback from generation ${body.fromGeneration} cannot hand over to it: run "ferry resync ${pair.volume}" here to rebuild the other site`);
      }
      if (pair.role !== 'target' || pair.generation !== body.fromGeneration) {
        throw new FerryError('STALE_GENERATION', `volume ${pair.volume} here is the ${pair.role} at generation ${pair.generation}; a takeover from generation ${body.fromGeneration} is refused`);
      }
      if (this.busy.has(pair.volume)) throw new FerryError('VOLUME_IN_USE', `a role change of ${pair.volume} is already in progress`);
      const ready = this.m.targets.get(pair.volume);
      if (!ready) throw new FerryError('UNAVAILABLE', `the target of ${pair.volume} is not open`);
      if (!ready.copyDone) throw new FerryError('BAD_REQUEST', `volume ${pair.volume} here is still being rebuilt`);
      // A replica that cannot store or play back what it receives would keep the source's hosts waiting.
      const failing = [ready.stats.failing.receive, ready.stats.failing.playback].filter((r) => r !== '').join('; ');
      if (failing) throw new FerryError('UNAVAILABLE', `volume ${pair.volume} here cannot take over now: ${failing}`);
    }
    if (body.check) {
      connection.sendJson(ReplFrame.RecoveryReply as number, {});
      connection.close();
      return;
    }
    if (!handedOver) {
      this.busy.add(pair.volume);
      try {
        const target = this.m.targets.get(pair.volume);
        if (!target) throw new FerryError('UNAVAILABLE', `the target of ${pair.volume} is not open`);
        await target.finishPlayback(playbackTimeoutMs);
        if (target.pair.deltaSetPlayedBack < body.lastDeltaSet) {
          throw new FerryError('UNAVAILABLE', `volume ${pair.volume} here has played back delta set ${target.pair.deltaSetPlayedBack}, not ${body.lastDeltaSet}; try again`);
        }
        await target.close();
        this.m.targets.delete(pair.volume);
        crashPoint('takeover.played-back');
        const blockCount = volumes.get(pair.volume).blockCount;
        const now = this.now();
        const { recovery: _previous, ...rest } = target.pair;
        const sourcePair: PairRecord = {
          ...rest,
          role: 'source',
          generation: body.generation,
          peerUrl: reachableUrl(body.targetUrl, connection.socket.remoteAddress),
          peerSiteId: peer.siteId,
          peerSiteName: peer.siteName,
          peerVolume: body.targetVolume,
          state: 'duplex',
          stateReason: '',
          intervalMs: body.intervalMs || this.m.defaults.intervalMs,
          highWaterBytes: body.highWaterBytes || this.m.defaults.highWaterBytes,
          maxRateBytes: rateLimitFigure(body.maxRateBytes) ?? pair.maxRateBytes ?? 0,
          saveVolumeBytes: Math.max(body.saveVolumeBytes || 0, pair.saveVolumeBytes),
          initialCopy: { cursorBlock: blockCount, totalBlocks: blockCount, stampedDeltaSet: 0, startedAt: now, doneAt: now, bytes: 0, copyId: 1 },
          ...this.m.freshCounters(),
        };
        await this.m.removeFiles(volumes.record(pair.volume).id);
        crashPoint('takeover.files-removed');
        this.replacePair(sourcePair);
        crashPoint('takeover.switched');
        // Tracking is installed before hosts may write again.
        const source = await this.m.openSource(sourcePair);
        this.m.sources.set(pair.volume, source);
        source.start();
        await setAccess(pair.volume, 'read-write');
        crashPoint('takeover.read-write');
        this.log.warn({ volume: pair.volume, generation: body.generation, target: peer.siteName }, 'failback: this site is the source again');
      } finally {
        this.busy.delete(pair.volume);
      }
    }
    connection.sendJson(ReplFrame.RecoveryReply as number, {});
    connection.close();
  }

  // ---- plumbing ---------------------------------------------------------------------

  /** The record of a copy turned into a raw target that the site asking rebuilds (a resync, either way round). */
  private rebuiltTarget(pair: PairRecord, generation: number, connection: RcpConnection, peer: PeerIdentity, asked: { sourceUrl: string; sourceVolume: string; saveVolumeBytes: number }, recovery: RecoveryRecord): PairRecord {
    const targetPair: PairRecord = {
      ...pair,
      role: 'target',
      generation,
      peerUrl: reachableUrl(asked.sourceUrl, connection.socket.remoteAddress),
      peerSiteId: peer.siteId,
      peerSiteName: peer.siteName,
      peerVolume: asked.sourceVolume,
      state: 'initial-copying',
      stateReason: '',
      saveVolumeBytes: Math.max(pair.saveVolumeBytes, Number.isSafeInteger(asked.saveVolumeBytes) ? asked.saveVolumeBytes : 0),
      initialCopy: { cursorBlock: 0, totalBlocks: this.m.deps.volumes.get(pair.volume).blockCount, stampedDeltaSet: 0, startedAt: this.now(), bytes: 0, copyId: 0 },
      ...this.m.freshCounters(),
      recovery,
    };
    targetPair.stateReason = describeRecovery(targetPair);
    return targetPair;
  }

  /** Asks the old source to list (`check`: only list) the blocks it changed after the restart point. */
  private resyncRequestFor(pair: PairRecord, r: RecoveryRecord, check: boolean): RecoveryRequest {
    return {
      op: 'resync',
      pairId: pair.pairId,
      volume: pair.peerVolume,
      generation: pair.generation,
      restartGeneration: r.previousGeneration,
      restartPoint: r.restartPoint,
      sourceUrl: this.m.deps.selfUrl(),
      sourceVolume: pair.volume,
      saveVolumeBytes: pair.saveVolumeBytes,
      sizeBytes: this.m.deps.volumes.get(pair.volume).sizeBytes,
      ...(check ? { check } : {}),
    };
  }

  /** Asks the site that took over whether it would be rebuilt from here (`list`: with its changed blocks). */
  private reverseRequestFor(pair: PairRecord, check: boolean, list = false): RecoveryRequest {
    return {
      op: 'reverse',
      pairId: pair.pairId,
      volume: pair.peerVolume,
      generation: pair.generation,
      sourceUrl: this.m.deps.selfUrl(),
      sourceVolume: pair.volume,
      saveVolumeBytes: pair.saveVolumeBytes,
      check,
      ...(list ? { list } : {}),
    };
  }

  /** A role change's new record; the delta sets of the old role go with it, in one transaction. */
  private replacePair(pair: PairRecord): void {
    this.m.catalog.transaction(() => {
      this.m.catalog.deleteDeltaSets(pair.volume);
      this.m.catalog.putPair(pair);
    });
  }

  private async pairDir(volume: string): Promise<string> {
    const dir = this.m.pairDir(this.m.deps.volumes.record(volume).id);
    await mkdir(dir, { recursive: true });
    return dir;
  }

  private async request<T>(url: string, body: RecoveryRequest, timeoutMs: number): Promise<T> {
    const { connection } = await this.m.connect(url);
    try {
      const inbox = new Inbox(connection);
      connection.sendJson(ReplFrame.RecoveryRequest as number, body);
      return await expectReply<T>(inbox, timeoutMs);
    } finally {
      connection.destroy();
    }
  }

  /** A request answered by a reply and a list of blocks (RecoveryData frames); `blocks` says how many the reply announced. */
  private async requestRuns<T extends { frames: number }>(url: string, body: RecoveryRequest, blocks: (reply: T) => number): Promise<{ reply: T; runs: [number, number][] }> {
    const { connection } = await this.m.connect(url);
    try {
      // Frames are queued as they arrive: the reply and its data may come in one read.
      const inbox = new Inbox(connection);
      connection.sendJson(ReplFrame.RecoveryRequest as number, body);
      const reply = await expectReply<T>(inbox, requestTimeoutMs);
      const runs: [number, number][] = [];
      for (let f = 0; f < reply.frames; f++) {
        const frame = await inbox.next(requestTimeoutMs);
        if (frame.type !== ReplFrame.RecoveryData || frame.payload.length % 16 !== 0) throw new FerryError('PROTOCOL_ERROR', 'malformed list of blocks from the other site');
        for (let at = 0; at < frame.payload.length; at += 16) runs.push([Number(frame.payload.readBigUInt64LE(at)), frame.payload.readUInt32LE(at + 8)]);
      }
      const listed = runs.reduce((s, [, n]) => s + n, 0);
      if (listed !== blocks(reply)) throw new FerryError('CHECKSUM_MISMATCH', `the list of blocks has ${listed} blocks, the other site said ${blocks(reply)}`);
      return { reply, runs };
    } finally {
      connection.destroy();
    }
  }
}

/** Sends a reply, then a list of blocks as runs in RecoveryData frames (the reply says how many frames), and closes. */
function sendWithRuns(connection: RcpConnection, reply: object, bits: PagedBitmap): void {
  const runs = [...bits.runs()];
  const frames = Math.ceil(runs.length / runsPerFrame);
  connection.sendJson(ReplFrame.RecoveryReply as number, { ...reply, frames });
  for (let f = 0; f < frames; f++) {
    const part = runs.slice(f * runsPerFrame, (f + 1) * runsPerFrame);
    const buf = Buffer.alloc(part.length * 16);
    part.forEach(([s, n], i) => {
      buf.writeBigUInt64LE(BigInt(s), i * 16);
      buf.writeUInt32LE(n, i * 16 + 8);
    });
    connection.send(ReplFrame.RecoveryData, buf);
  }
  connection.close();
}

async function expectReply<T>(inbox: Inbox, timeoutMs: number): Promise<T> {
  const reply = await inbox.next(timeoutMs);
  if (reply.type === FrameType.Error) {
    const body = json<{ code: string; message: string }>(reply);
    const code = ['STALE_GENERATION', 'BAD_REQUEST', 'NOT_FOUND', 'VOLUME_IN_USE', 'SNAPSHOT_LIMIT'].includes(body.code) ? (body.code as ErrorCode) : 'UNAVAILABLE';
    throw new FerryError(code, `other site: ${body.message}`);
  }
  if (reply.type !== ReplFrame.RecoveryReply) throw new FerryError('PROTOCOL_ERROR', `other site answered with frame type ${reply.type}`);
  return json<T>(reply);
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}


