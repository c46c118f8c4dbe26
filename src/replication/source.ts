import type { Logger } from 'pino';
import { BufferPool } from '../lib/buffer-pool.js';
import { type Clock, Waker } from '../lib/clock.js';
import { RateMeter, type RateLimiter } from '../lib/rate.js';
import { formatSize } from '../lib/units.js';
import { crc32c, crc32cCombine } from '../lib/checksum.js';
import { FerryError, assert, isFerryError } from '../lib/errors.js';
import { JournalRecordType, RingSpace, type JournalFile } from '../storage/journal.js';
import type { DeltaSetRecord, PairRecord, ReplicationCatalog } from '../storage/replication-catalog.js';
import type { Volume, WriteHook } from '../storage/volume.js';
import type { PagedBitmap } from '../lib/paged-bitmap.js';
import type { ChangeLog } from '../tracking/change-log.js';
import type { RcpConnection } from '../transport/connection.js';
import { FrameType, type Frame } from '../transport/frame.js';
import { DeltaSetBuilder, deltaSetSpanBytesMax } from './builder.js';
import { chunkBytesMax } from './chunk.js';
import { Inbox } from './inbox.js';
import { DeltaSetWindow, SessionRetries, makeRoom, resumePoint, retransmitMs, retryDelayMsMax, rowToSend, sendWindowChunks, type SendAction } from './ledger.js';
import { isActive, nextPairStatus, type PairEvent, type PairStatus } from './pair-state.js';
import {
  ReplFrame,
  encodeChunkFrameParts,
  headerCrcFields,
  json,
  type AckBody,
  type DeltaSetHeaderBody,
  type HeartbeatBody,
  type NackBody,
  type TargetPosition,
} from './protocol.js';
import { DeltaSetTrigger, type TriggerPolicy, type TriggerReason } from './triggers.js';
import { CopyRunner, type CopyPlan, type CopyStats } from './copy.js';

/**
 * Buffers the sender reads chunk records into (a chunk's data, its extent list), shared
 * by the pairs of the process: the window's and a few more.
 */
const chunkBuffers = new BufferPool(chunkBytesMax, sendWindowChunks * 2);
/** How often a paused pair checks in with the target. */
const probeMs = 5_000;
/** Longest sleep of the cutter between trigger checks. */
export const cutterPollMs = 100;
export const heartbeatMs = 1_000;

export interface SourceDeps {
  volume: Volume;
  pair: PairRecord;
  catalog: ReplicationCatalog;
  changeLog: ChangeLog;
  journal: JournalFile;
  clock: Clock;
  log: Logger;
  /**
   * The copy that makes the target whole: its image (a snapshot stamped with the delta
   * set current when it was taken, E FIG. 11), made if it does not exist yet.
   */
  copyPlan(pair: PairRecord): Promise<CopyPlan>;
  /** The copy is complete: its image can go. */
  copied(pair: PairRecord): Promise<void>;
  /**
   * Rule 8: the backlog (the old table, just switched out) is larger than the whole
   * save volume. Records it durably as the blocks of a new copy from a snapshot taken
   * now, stamped with the last delta set cut, and makes that copy the pair's.
   */
  catchUp(pair: PairRecord, backlog: PagedBitmap): Promise<void>;
  /** The target refused this pair's generation: the volume failed over (the manager fences it). */
  fenced(reason: string): void;
  /** Opens an RCP connection of the pair (handshake done) and returns the target's position. */
  openSession(pair: PairRecord, channel: 'deltas' | 'copy'): Promise<{ connection: RcpConnection; position: TargetPosition }>;
  /** The pair's rate limit: every chunk and copy piece waits on it before it goes. */
  limiter: RateLimiter;
}

/** Counters for status and metrics, kept in memory. */
export interface SourceStats {
  retries: number;
  corruptFramesResent: number;
  /** Storage errors met building delta sets (writing the save volume) or releasing their blocks from tracking. */
  ioErrors: number;
  lastError: string;
  /** Delta sets cannot be built now (the last attempt failed), '' once one is: shown with the state. */
  failing: string;
  currentDeltaSet: number;
  currentChunk: number;
  rateBytesPerSec: number;
  averageRateBytesPerSec: number;
  saveVolumeUsedBytes: number;
  saveVolumeFull: boolean;
  connected: boolean;
  lastCut?: { reason: TriggerReason; pauseMs: number; atMs: number };
  /** The target volume's size as it last said (0: not known). */
  targetVolumeBytes: number;
}

/**
 * The source end of one pair (E FIG. 8, 10, 12): the change log's hook on the volume,
 * the cutter that turns the old table into delta sets in the save volume, and the
 * send thread that ships them over RCP with retries and resumes where the target
 * stands after any reconnect or restart.
 */
export class SourceReplicator {
  readonly stats: SourceStats = {
    retries: 0,
    corruptFramesResent: 0,
    ioErrors: 0,
    lastError: '',
    failing: '',
    currentDeltaSet: 0,
    currentChunk: 0,
    rateBytesPerSec: 0,
    averageRateBytesPerSec: 0,
    saveVolumeUsedBytes: 0,
    saveVolumeFull: false,
    connected: false,
    targetVolumeBytes: 0,
  };
  private status: PairStatus;
  /** Cuts that failed since start (a demanded cut reports the next failure). */
  private cutFailures = 0;
  /** When the current session last sent a heartbeat (0: not yet). */
  private lastHeartbeatMs = 0;
  private readonly ring: RingSpace;
  private readonly trigger: DeltaSetTrigger;
  private readonly cutWaker = new Waker();
  private readonly sendWaker = new Waker();
  private building: Promise<void> | undefined;
  private removeHook: (() => void) | undefined;
  private closed = false;
  /** Aborted at close: ends a wait on the rate limit. */
  private readonly stopping = new AbortController();
  private loops: Promise<void>[] = [];
  private copier: CopyRunner | undefined;
  private connection: RcpConnection | undefined;
  private previousCutMs: number;
  private readonly sent: RateMeter;

  /** Blocks of the delta set being built, from the switch until its mailbox row is written. */
  private buildingBlocks = 0;
  /** Counts acknowledged work (copy pieces, chunks, delta sets). */
  private progress = 0;

  constructor(private readonly deps: SourceDeps) {
    const { pair, catalog } = deps;
    // A pair suspended and not paused was suspended by a failure: after a restart it keeps
    // trying to reach the target, as it did before (without a cause it would wait for good).
    const cause = pair.paused ? ('command' as const) : pair.state === 'suspended' ? ('failure' as const) : undefined;
    this.status = { state: pair.state as PairStatus['state'], reason: pair.stateReason, initialCopyDone: pair.initialCopy.doneAt !== undefined, ...(cause ? { cause } : {}) };
    const retained = catalog.listDeltaSets(pair.volume).filter((d) => d.generation === pair.generation);
    const head = retained.reduce((h, d) => Math.max(h, d.endLsn), 0);
    const tail = retained.length > 0 ? Math.min(...retained.map((d) => d.startLsn)) : head;
    this.ring = new RingSpace(pair.saveVolumeBytes, head, tail);
    this.sent = new RateMeter(deps.clock);
    this.trigger = new DeltaSetTrigger({ intervalMs: pair.intervalMs, highWaterBytes: pair.highWaterBytes }, deps.clock.now());
    this.previousCutMs = retained.at(-1)?.createdAtMs ?? deps.clock.now();
    this.stats.saveVolumeUsedBytes = this.ring.usedBytes;
  }

  get pair(): PairRecord {
    return this.deps.pair;
  }

  get pairStatus(): PairStatus {
    return this.status;
  }

  get changeLog(): ChangeLog {
    return this.deps.changeLog;
  }

  /**
   * Blocks written and not yet in a sealed delta set: the new table plus every block of
   * the delta set being built (those leave the old table as they are copied, but are
   * not in the mailbox until it is sealed; lag must not read 0 in between).
   */
  get dirtyBlocks(): number {
    return this.deps.changeLog.current.count + this.buildingBlocks;
  }

  /** Installs the change log's write hook. Done when the pair is opened, before any host is let in (rule 1). */
  track(): void {
    if (this.removeHook) return;
    const hook: WriteHook = {
      beforeChange: (_volume, change) => this.deps.changeLog.mark(change.firstBlock, change.blockCount),
    };
    this.removeHook = this.deps.volume.addHook(hook);
  }

  /** The volume grew (the target first): the change log follows. The caller holds the volume quiesced. */
  async grow(blockCount: number): Promise<void> {
    await this.deps.changeLog.grow(blockCount);
    this.pair.initialCopy.totalBlocks = blockCount;
    this.persist();
  }

  /** Starts the cutter, the send thread and, until the target is whole, the copy. */
  start(): void {
    this.track();
    this.loops = [this.cutLoop(), this.sendLoop()];
    if (this.pair.initialCopy.doneAt === undefined) this.loops.push(this.copyLoop());
    // A stop between a copy's end and its clean-up (a resync's last step, the copy's
    // image dropped) leaves that to be done: it is, and doing it twice is harmless.
    else this.finishCopy();
  }

  /** Bytes per second of the running copy the target has been acknowledging lately. */
  get copyPace(): number {
    return this.copier?.pace ?? 0;
  }

  /** Copy progress and connection, while a copy runs. */
  get copyStats(): CopyStats | undefined {
    return this.copier?.stats;
  }

  /** Cut a delta set now (`ferry replicate delta`). Resolves when it is sealed. */
  async cutNow(): Promise<number> {
    this.trigger.demand();
    this.cutWaker.signal();
    const before = this.pair.deltaSetCreated;
    const failuresBefore = this.cutFailures;
    while (!this.closed && this.pair.deltaSetCreated === before) {
      if (this.cutFailures > failuresBefore) throw new FerryError('UNAVAILABLE', this.stats.failing);
      if (this.stats.saveVolumeFull) {
        throw new FerryError(
          'UNAVAILABLE',
          this.pair.initialCopy.doneAt === undefined && this.pair.initialCopy.catchUp
            ? 'the save volume is full and a catch-up copy is running; the changes wait in the bitmap until it is done'
            : 'the save volume is full; the delta set will be cut once the target has acknowledged older ones',
        );
      }
      if (this.dirtyBlocks === 0 && !this.building) return before;
      await this.deps.clock.sleep(20);
    }
    return this.pair.deltaSetCreated;
  }

  /** Blocks the target does not have yet: dirty ones, those of unacknowledged delta sets and of a catch-up copy. */
  outstandingBlocks(): number {
    return this.dirtyBlocks + this.unackedBlocks() + this.catchUpBlocks;
  }

  /** Blocks of the delta sets cut and not yet acknowledged by the target. */
  private unackedBlocks(): number {
    const { generation, deltaSetAcked } = this.pair;
    return this.deps.catalog.listDeltaSets(this.pair.volume).reduce((sum, d) => sum + (d.generation === generation && d.n > deltaSetAcked ? d.blocks : 0), 0);
  }

  /** Blocks of a catch-up copy not yet acknowledged by the target. */
  get catchUpBlocks(): number {
    const c = this.pair.initialCopy;
    return this.catchingUp ? Math.max(0, (c.plannedBlocks ?? 0) - (c.copiedBlocks ?? 0)) : 0;
  }

  /**
   * Ships what has been written: cuts delta sets until at most `withinBlocks` blocks are
   * outstanding and, with `playedBack`, waits until the target has played back every
   * delta set (failover --sync, failback). Fails after `timeoutMs` with what is left, and
   * at once if the link fails meanwhile (the pair goes to Suspend (failure)): callers hold
   * hosts while they wait, and a lost target would keep them held for nothing.
   */
  async drain(options: { withinBlocks: number; playedBack: boolean; timeoutMs: number }): Promise<void> {
    const { clock } = this.deps;
    const deadline = clock.now() + options.timeoutMs;
    const failedBefore = this.suspendedByFailure;
    for (;;) {
      if (this.closed) throw new FerryError('UNAVAILABLE', `replication of ${this.pair.volume} stopped`);
      if (!failedBefore && this.suspendedByFailure) {
        throw new FerryError('UNAVAILABLE', `the other site was lost before it caught up: ${this.status.reason}`);
      }
      const outstanding = this.outstandingBlocks();
      const played = !options.playedBack || this.pair.deltaSetPlayedBack >= this.pair.deltaSetCreated;
      if (outstanding <= options.withinBlocks && played && (options.withinBlocks > 0 || !this.building)) return;
      if (this.dirtyBlocks > 0 && !this.building) {
        this.trigger.demand();
        this.cutWaker.signal();
      }
      if (clock.now() > deadline) {
        // Hosts are not held while it waits at the rate limit: the wait is lifted only once they are.
        const limit = this.deps.limiter.rate > 0 ? `; the pair's rate limit (${formatSize(this.deps.limiter.rate)}/s) holds it back: run it again, or lift the limit with "ferry replicate set ${this.pair.volume} --max-rate 0"` : '';
        throw new FerryError('UNAVAILABLE', `the other site did not catch up within ${Math.round(options.timeoutMs / 1000)} s: ${outstanding} blocks outstanding, delta set ${this.pair.deltaSetPlayedBack} of ${this.pair.deltaSetCreated} played back${this.stats.lastError ? ` (${this.stats.lastError})` : ''}${limit}`);
      }
      await clock.sleep(50);
    }
  }

  apply(event: PairEvent): PairStatus {
    const next = nextPairStatus(this.status, event);
    if (next.state !== this.status.state || next.reason !== this.status.reason) {
      this.deps.log.info({ volume: this.pair.volume, from: this.status.state, to: next.state, reason: next.reason }, 'pair state changed');
    }
    this.status = next;
    this.pair.state = next.state;
    this.pair.stateReason = next.reason;
    this.pair.paused = next.cause === 'command' && (next.state === 'suspended' || next.state === 'suspending');
    this.persist();
    this.sendWaker.signal();
    return next;
  }

  /** A new cut policy and rate limit (`ferry replicate set`): applies from now, a nearer deadline at once. */
  setPolicy(policy: TriggerPolicy, maxRateBytes: number): void {
    this.pair.intervalMs = policy.intervalMs;
    this.pair.highWaterBytes = policy.highWaterBytes;
    this.pair.maxRateBytes = maxRateBytes;
    this.trigger.setPolicy(policy, this.deps.clock.now());
    this.persist();
    this.cutWaker.signal();
  }

  pause(): PairStatus {
    const s = this.apply({ type: 'suspend' });
    this.connection?.destroy();
    return s.state === 'suspending' ? this.apply({ type: 'drained' }) : s;
  }

  resume(): PairStatus {
    return this.resumeState();
  }

  /** Resumes; a catch-up still running keeps the pair Duplex-Pending and says so. */
  private resumeState(): PairStatus {
    const s = this.apply({ type: 'resume' });
    return this.catchingUp ? this.apply({ type: 'catch-up' }) : s;
  }

  private get suspendedByFailure(): boolean {
    return this.status.state === 'suspended' && this.status.cause === 'failure';
  }

  private get catchingUp(): boolean {
    return this.pair.initialCopy.catchUp === true && this.pair.initialCopy.doneAt === undefined;
  }

  /** Stops the loops; persists the change log so no dirty block is forgotten. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.stopping.abort();
    this.cutWaker.signal();
    this.sendWaker.signal();
    this.connection?.destroy();
    this.copier?.close();
    await Promise.allSettled(this.loops);
    await this.building?.catch(() => undefined);
    this.removeHook?.();
    this.persist();
    await this.deps.changeLog.close();
  }

  // ---- cutter (E FIG. 10) -------------------------------------------------------

  private async cutLoop(): Promise<void> {
    while (!this.closed) {
      const now = this.deps.clock.now();
      const modifiedBytes = this.deps.changeLog.current.count * this.deps.volume.blockBytes;
      const reason = this.trigger.due(now, modifiedBytes);
      if (reason && !this.building && this.dirtyBlocks > 0) {
        const asCopy = this.backlogOutgrowsSaveVolume();
        try {
          await this.cut(reason);
          this.trigger.succeeded();
        } catch (err) {
          // Its blocks went back to the change log: they go out with the next one.
          const what = asCopy ? 'a catch-up copy could not be started' : 'a delta set could not be created';
          const retryInMs = this.trigger.failed(this.deps.clock.now());
          this.deps.log.error({ err, volume: this.pair.volume, retryInMs }, what);
          this.stats.ioErrors++;
          this.cutFailures++;
          this.stats.lastError = this.stats.failing = `${what} (its blocks stay tracked): ${(err as Error).message}`;
        }
      } else if (reason === 'on-demand' && this.dirtyBlocks === 0) {
        this.trigger.rearm(now);
      }
      await this.cutWaker.wait(this.deps.clock, Math.min(cutterPollMs, this.trigger.msUntilDeadline(now) || cutterPollMs));
    }
  }

  /** Even an empty save volume could not hold the backlog as one delta set. */
  private backlogOutgrowsSaveVolume(): boolean {
    return deltaSetSpanBytesMax(this.deps.changeLog.current.count, this.deps.volume.blockBytes) > this.ring.capacityBytes;
  }

  private async cut(reason: TriggerReason): Promise<void> {
    const { volume, changeLog, clock } = this.deps;
    const blocks = changeLog.current.count;
    const needBytes = deltaSetSpanBytesMax(blocks, volume.blockBytes);
    if (needBytes > this.ring.capacityBytes) {
      // Even an empty save volume cannot hold this backlog as one delta set: it goes
      // as a copy of its blocks instead (rule 8), once no other copy is running.
      if (this.pair.initialCopy.doneAt === undefined) {
        this.stats.saveVolumeFull = true;
        return;
      }
      this.deps.log.warn({ volume: this.pair.volume, blocks, needBytes, saveVolumeBytes: this.ring.capacityBytes }, 'the backlog outgrew the save volume: catching up by a copy of its blocks');
      await this.startCatchUp();
      return;
    }
    if (!this.makeRoom(needBytes)) {
      // Rule 8: never block or drop host writes; keep accumulating in the bitmap and
      // cut once acknowledgements free the save volume.
      if (!this.stats.saveVolumeFull) this.deps.log.warn({ volume: this.pair.volume, needBytes, freeBytes: this.ring.freeBytes }, 'save volume full: tracking changes in the bitmap until space is freed');
      this.stats.saveVolumeFull = true;
      return;
    }
    this.stats.saveVolumeFull = false;
    // E FIG. 10 steps 347-351: a brief pause so no write is between its mark and its data.
    const pauseStart = clock.now();
    const resume = await volume.quiesce();
    let old;
    let firstWriteMs = 0;
    const n = this.pair.deltaSetCreated + 1;
    const createdAtMs = clock.now();
    // Written while a copy runs: the target must not play it back before the copy is whole.
    const afterCopy = this.pair.initialCopy.doneAt === undefined ? (this.pair.initialCopy.copyId ?? 1) : undefined;
    try {
      old = changeLog.switchTables();
      this.buildingBlocks = old.count;
      firstWriteMs = changeLog.oldFirstWriteMs ?? 0;
    } finally {
      resume();
    }
    this.stats.lastCut = { reason, pauseMs: clock.now() - pauseStart, atMs: createdAtMs };
    this.trigger.rearm(createdAtMs);
    const headBefore = this.ring.head;
    const builder = new DeltaSetBuilder(volume, old, this.deps.journal, this.ring, this.pair.generation, n);
    changeLog.setCopier((first, count) => builder.copyRange(first, count));
    this.building = (async () => {
      try {
        await builder.copyAll();
        const built = await builder.finish();
        changeLog.setCopier(undefined);
        const record: DeltaSetRecord = {
          volume: this.pair.volume,
          generation: this.pair.generation,
          n,
          state: 'ready',
          ...(afterCopy !== undefined ? { afterCopy } : {}),
          ...built,
          createdAtMs,
          previousCutMs: this.previousCutMs,
          firstWriteMs,
          sealedAtMs: clock.now(),
        };
        // The mailbox entry makes the delta set visible to the sender; only then may the
        // change log forget its blocks.
        this.deps.catalog.transaction(() => {
          this.deps.catalog.putDeltaSet(record);
          this.pair.deltaSetCreated = n;
          this.deps.catalog.putPair(this.pair);
        });
        this.buildingBlocks = 0;
        this.stats.failing = '';
        this.previousCutMs = createdAtMs;
        await changeLog.sealed().catch((err: Error) => {
          // The delta set is ready; its extents just stay in the activity log (a crash
          // then marks them dirty again and they are sent again): safe, and said.
          this.stats.ioErrors++;
          this.stats.lastError = `delta set ${n} is ready, but the volume could not be flushed to release its blocks from tracking: ${err.message}`;
          this.deps.log.warn({ volume: this.pair.volume, deltaSet: n, err: err.message }, 'the volume could not be flushed; the delta set\'s extents stay tracked');
        });
        this.stats.saveVolumeUsedBytes = this.ring.usedBytes;
        this.deps.log.debug({ volume: this.pair.volume, deltaSet: n, blocks: built.blocks, chunks: built.chunks, reason }, 'delta set ready');
        this.sendWaker.signal();
      } catch (err) {
        changeLog.setCopier(undefined);
        // The records written for it are abandoned: their space goes back, or every
        // failed attempt would leave the save volume fuller until it looked full for good.
        this.ring.rollBack(headBefore);
        await changeLog.mergeOldBack(builder.copied);
        this.buildingBlocks = 0;
        throw err;
      } finally {
        this.building = undefined;
      }
    })();
    await this.building;
  }

  /**
   * Rule 8 catch-up: the backlog becomes the block list of a copy from a snapshot taken
   * at the switch; writes from now on go into delta sets the target holds until that
   * copy is complete. Host writes are paused only for the switch.
   */
  private async startCatchUp(): Promise<void> {
    const { volume, changeLog } = this.deps;
    const resume = await volume.quiesce();
    let backlog: PagedBitmap;
    try {
      backlog = changeLog.switchTables();
      // Until the copy is recorded these blocks are in neither the change log's current
      // table nor a copy: they count as dirty, or a drain or a cut on demand would
      // think everything shipped.
      this.buildingBlocks = backlog.count;
    } finally {
      resume();
    }
    try {
      await this.deps.catchUp(this.pair, backlog);
    } catch (err) {
      await changeLog.mergeOldBack();
      this.buildingBlocks = 0;
      throw err;
    }
    // The copy's bitmap is durable: the change log may forget these blocks.
    await changeLog.handOff();
    this.stats.saveVolumeFull = false;
    // The backlog is on its way: a delta set that could not be cut before is no longer news.
    this.stats.failing = '';
    this.apply({ type: 'catch-up' });
    this.buildingBlocks = 0;
    this.loops.push(this.copyLoop());
  }

  /** Frees acknowledged delta sets, oldest first, until `bytes` fit. */
  private makeRoom(bytes: number): boolean {
    const retained = this.deps.catalog.listDeltaSets(this.pair.volume).filter((d) => d.generation === this.pair.generation);
    const { fits, freed } = makeRoom(this.ring, retained, bytes);
    for (const d of freed) this.deps.catalog.deleteDeltaSet(d.volume, d.generation, d.n);
    return fits;
  }

  // ---- send thread (E FIG. 12) ----------------------------------------------------

  private async sendLoop(): Promise<void> {
    const retries = new SessionRetries();
    let lastProbeMs = Number.NEGATIVE_INFINITY;
    while (!this.closed) {
      if (!isActive(this.status) && !this.suspendedByFailure) {
        // Paused: nothing is sent, but the pair still checks in now and then, so a
        // failover of the other site is learnt (rule 5) even with no data moving.
        if (this.deps.clock.now() - lastProbeMs >= probeMs) {
          lastProbeMs = this.deps.clock.now();
          if (await this.probe()) return;
        }
        await this.sendWaker.wait(this.deps.clock, 1000);
        continue;
      }
      try {
        const { connection, position } = await this.deps.openSession(this.pair, 'deltas');
        this.connection = connection;
        this.stats.connected = true;
        if (this.closed || (!isActive(this.status) && this.status.cause === 'command')) {
          connection.destroy();
          continue;
        }
        if (this.status.state === 'suspended') this.resumeState();
        const progressBefore = this.progress;
        try {
          await this.session(connection, position);
        } finally {
          if (this.progress > progressBefore) retries.progressed();
        }
      } catch (err) {
        if (this.closed) break;
        if (isFerryError(err, 'STALE_GENERATION')) {
          // Rule 5: the other side has taken over; this copy must stop being a source.
          this.stats.lastError = (err as Error).message;
          this.deps.fenced((err as Error).message);
          return;
        }
        const { delayMs, suspend } = retries.failed();
        this.stats.retries++;
        this.stats.lastError = (err as Error).message;
        // An error the target sent says what failed there; anything else is the link. A
        // pair already suspended by failure shows the newest reason (the cause may change).
        const message = (err as Error).message;
        const reason = message.startsWith('target: ') ? message : `target unreachable: ${message}`;
        const failed = this.suspendedByFailure;
        if (suspend && (isActive(this.status) || (failed && this.status.reason !== reason))) this.apply({ type: 'failure', reason });
        this.deps.log.warn({ volume: this.pair.volume, err: (err as Error).message, failures: retries.failures }, 'replication session failed; retrying');
        await this.sendWaker.wait(this.deps.clock, delayMs);
      } finally {
        this.stats.connected = false;
        this.connection?.destroy();
        this.connection = undefined;
      }
    }
  }

  /** Opens and closes a session; true if the target refused the generation (then fenced). */
  private async probe(): Promise<boolean> {
    try {
      const { connection } = await this.deps.openSession(this.pair, 'deltas');
      connection.destroy();
    } catch (err) {
      if (isFerryError(err, 'STALE_GENERATION')) {
        this.stats.lastError = (err as Error).message;
        this.deps.fenced((err as Error).message);
        return true;
      }
    }
    return false;
  }

  private async session(connection: RcpConnection, position: TargetPosition): Promise<void> {
    const inbox = new Inbox(connection);
    try {
      this.notePlayedBack(position.deltaSetPlayedBack);
      this.stats.targetVolumeBytes = position.volumeBytes ?? 0;
      const resume = resumePoint(position, this.pair);
      if (resume.received !== undefined) this.noteReceived(resume.received);
      let { next, fromChunk } = resume;
      // First thing in every session: a target whose storage fails ends each one early,
      // and must still know what this site has that it does not.
      this.lastHeartbeatMs = 0;
      while (!this.closed && isActive(this.status)) {
        this.heartbeatIfDue(connection);
        const ds = rowToSend(this.deps.catalog.listDeltaSets(this.pair.volume), this.pair, next);
        if (!ds) {
          if (this.status.state === 'duplex-pending' && this.dirtyBlocks === 0 && !this.catchingUp) this.apply({ type: 'caught-up' });
          inbox.drainAcks((ack) => this.noteAck(ack));
          if (connection.isClosed) throw new FerryError('UNAVAILABLE', 'target closed the connection');
          await this.sendWaker.wait(this.deps.clock, 250);
          continue;
        }
        await this.sendDeltaSet(connection, inbox, ds, fromChunk);
        next++;
        fromChunk = 0;
      }
    } finally {
      inbox.close();
    }
  }

  /** Heartbeats go every `heartbeatMs`, between delta sets and between the chunks of a long one. */
  private heartbeatIfDue(connection: RcpConnection): void {
    if (this.deps.clock.now() - this.lastHeartbeatMs < heartbeatMs) return;
    this.sendHeartbeat(connection);
    this.lastHeartbeatMs = this.deps.clock.now();
  }

  private sendHeartbeat(connection: RcpConnection): void {
    const oldest = this.deps.changeLog.oldestUnsentWriteMs;
    const body: HeartbeatBody = {
      sourceNowMs: this.deps.clock.now(),
      dirtyBlocks: this.dirtyBlocks,
      deltaSetCreated: this.pair.deltaSetCreated,
      deltaSetAcked: this.pair.deltaSetAcked,
      unackedBlocks: this.unackedBlocks(),
      intervalMs: this.pair.intervalMs,
      highWaterBytes: this.pair.highWaterBytes,
      maxRateBytes: this.pair.maxRateBytes ?? 0,
      ...(oldest !== undefined ? { oldestUnsentWriteMs: oldest } : {}),
    };
    connection.sendJson(ReplFrame.Heartbeat as number, body, { generation: BigInt(this.pair.generation) });
  }

  private noteAck(ack: AckBody): void {
    this.notePlayedBack(ack.deltaSetPlayedBack);
  }

  /**
   * The target holds every delta set up to `n` durably (its position when a session
   * opens). The acknowledgement of the last one may have been lost with the previous
   * connection; it is not sent again, so it counts as acknowledged now, else it would
   * never be and its save-volume space never reclaimed.
   */
  private noteReceived(n: number): void {
    if (n <= this.pair.deltaSetAcked) return;
    const now = this.deps.clock.now();
    const rows = this.deps.catalog.listDeltaSets(this.pair.volume).filter((d) => d.generation === this.pair.generation && d.n > this.pair.deltaSetAcked && d.n <= n);
    this.deps.catalog.transaction(() => {
      for (const d of rows) if (d.state !== 'acked') this.deps.catalog.putDeltaSet({ ...d, state: 'acked', ackedAtMs: now });
      this.pair.deltaSetAcked = n;
      this.pair.deltaSetSent = Math.max(this.pair.deltaSetSent, n);
      this.deps.catalog.putPair(this.pair);
    });
    this.deps.log.info({ volume: this.pair.volume, deltaSet: n }, 'the target already holds delta sets whose acknowledgement was lost: counted as acknowledged');
    this.cutWaker.signal();
  }

  private notePlayedBack(n: number): void {
    if (n <= this.pair.deltaSetPlayedBack) return;
    this.pair.deltaSetPlayedBack = n;
    const row = this.deps.catalog.listDeltaSets(this.pair.volume).find((d) => d.generation === this.pair.generation && d.n === n);
    if (row) this.pair.playedBackCutMs = row.createdAtMs;
  }

  private async sendDeltaSet(connection: RcpConnection, inbox: Inbox, ds: DeltaSetRecord, fromChunk: number): Promise<void> {
    const generation = BigInt(this.pair.generation);
    const { clock } = this.deps;
    this.stats.currentDeltaSet = ds.n;
    const lsns = await this.chunkPositions(ds);
    const fields = {
      deltaSet: ds.n,
      chunkCount: ds.chunks,
      blockCount: ds.blocks,
      dataBytes: ds.dataBytes,
      dataCrc: ds.dataCrc,
      createdAtMs: ds.createdAtMs,
      previousCutMs: ds.previousCutMs,
      ...(ds.afterCopy !== undefined ? { afterCopy: ds.afterCopy } : {}),
      ...(ds.firstWriteMs ? { firstWriteMs: ds.firstWriteMs } : {}),
    };
    const header: DeltaSetHeaderBody = { ...fields, headerCrc: crc32c(headerCrcFields(fields)) };
    const window = new DeltaSetWindow(ds.n, ds.chunks, fromChunk, clock.now());
    const carryOut = async (actions: SendAction[]): Promise<void> => {
      for (const action of actions) {
        if (action.kind === 'header') {
          connection.sendJson(ReplFrame.DeltaSetHeader as number, header, { generation });
          this.pair.deltaSetSent = Math.max(this.pair.deltaSetSent, ds.n);
          continue;
        }
        const { index } = action;
        const record = await this.deps.journal.read(lsns[index] as number, { deltaSet: ds.n, index, generation: ds.generation, type: JournalRecordType.Chunk }, chunkBuffers);
        const parts = encodeChunkFrameParts(ds.n, index, record.payload);
        // The buffer is reused once the socket has taken the chunk. The frame's checksum
        // comes from the record's, checked as it was read: the chunk is not read again.
        const payloadCrc = crc32cCombine(crc32c(parts[0]), record.crc, parts[1].length);
        const frameBytes = parts[0].length + parts[1].length;
        await this.deps.limiter.take(frameBytes, this.stopping.signal);
        connection.send(ReplFrame.Chunk, parts, { generation }, record.release, payloadCrc);
        this.countSent(frameBytes);
        this.stats.currentChunk = index;
      }
    };
    while (!window.sealed) {
      await carryOut(window.fill(clock.now()));
      this.heartbeatIfDue(connection);
      let frame: Frame;
      try {
        frame = await inbox.next(retransmitMs);
      } catch (err) {
        const resend = isFerryError(err, 'UNAVAILABLE') && !connection.isClosed ? window.onSilence(clock.now()) : undefined;
        if (!resend) throw err;
        this.stats.corruptFramesResent++;
        await carryOut(resend);
        continue;
      }
      if (frame.type === ReplFrame.Nack) {
        const resend = window.onNack(json<NackBody>(frame));
        if (resend.length > 0) this.stats.corruptFramesResent++;
        await carryOut(resend);
      } else if (frame.type === ReplFrame.Ack) {
        const ack = json<AckBody>(frame);
        this.noteAck(ack);
        if (window.onAck(ack, clock.now())) this.progress++;
      } else {
        this.unexpected(frame);
      }
    }
    const now = clock.now();
    this.deps.catalog.transaction(() => {
      this.deps.catalog.putDeltaSet({ ...ds, state: 'acked', ackedAtMs: now });
      this.pair.deltaSetAcked = Math.max(this.pair.deltaSetAcked, ds.n);
      this.deps.catalog.putPair(this.pair);
    });
    this.cutWaker.signal();
  }

  /**
   * Where each chunk record of a delta set is, found by walking their headers (each
   * chunk's data is checked as it is read to be sent).
   */
  private async chunkPositions(ds: DeltaSetRecord): Promise<number[]> {
    const out: number[] = [];
    let lsn = ds.startLsn;
    while (out.length < ds.chunks) {
      const header = await this.deps.journal.findHeader(lsn, ds.endLsn, { type: JournalRecordType.Chunk, generation: ds.generation, deltaSet: ds.n, index: out.length });
      if (!header) throw new FerryError('CORRUPT_RECORD', `save volume: chunk ${out.length} of delta set ${ds.n} is missing or damaged`);
      out.push(header.lsn);
      lsn = header.nextLsn;
    }
    return out;
  }

  // ---- copy (E FIG. 11, SPEC C5) ---------------------------------------------------

  /**
   * Runs the copy on its own connection while delta sets flow on the other (E FIG. 29):
   * the target stores them and plays them back once the copy is done.
   */
  private async copyLoop(): Promise<void> {
    while (!this.closed && this.pair.initialCopy.doneAt === undefined) {
      if (!isActive(this.status) && !this.suspendedByFailure) {
        await this.sendWaker.wait(this.deps.clock, 1000);
        continue;
      }
      const copy = this.pair.initialCopy;
      if (copy.catchUp && this.pair.deltaSetPlayedBack < copy.stampedDeltaSet) {
        // The catch-up's blocks are newer than every delta set up to the stamp: those
        // are played back at the target first.
        await this.sendWaker.wait(this.deps.clock, 200);
        continue;
      }
      this.copier = new CopyRunner({
        pair: this.pair,
        clock: this.deps.clock,
        log: this.deps.log,
        openSession: (p) => this.deps.openSession(p, 'copy'),
        plan: () => this.deps.copyPlan(this.pair),
        persist: () => this.persist(),
        limiter: this.deps.limiter,
        countSent: (bytes) => this.countSent(bytes),
      });
      try {
        this.sent.start();
        if (await this.copier.run()) this.markCopied();
      } catch (err) {
        this.stats.lastError = (err as Error).message;
        this.deps.log.error({ err, volume: this.pair.volume }, 'copy could not run; retrying');
        await this.sendWaker.wait(this.deps.clock, retryDelayMsMax);
      }
    }
  }

  private markCopied(): void {
    this.pair.initialCopy.cursorBlock = this.pair.initialCopy.totalBlocks;
    this.pair.initialCopy.doneAt = new Date(this.deps.clock.now()).toISOString();
    this.apply({ type: 'copied' });
    this.finishCopy();
    this.deps.log.info({ volume: this.pair.volume, bytes: this.pair.initialCopy.bytes }, 'initial copy complete');
  }

  private finishCopy(): void {
    this.deps.copied(this.pair).catch((err: Error) => this.deps.log.warn({ volume: this.pair.volume, err: err.message }, 'the end of the copy could not be recorded (its snapshot deleted, or a resync marked complete); it is tried again when the site restarts'));
  }

  // ---- bookkeeping -------------------------------------------------------------------

  private countSent(bytes: number): void {
    this.pair.bytesSent += bytes;
    this.sent.count(bytes);
  }

  /** Bytes per second sent over the last 5 s, and since the sender started. */
  rates(): { current: number; average: number } {
    return this.sent.rates();
  }

  private unexpected(frame: Frame): void {
    if (frame.type === FrameType.Pong || frame.type === ReplFrame.Ack) return;
    if (frame.type === FrameType.Error) {
      const body = json<{ code: string; message: string }>(frame);
      throw new FerryError(body.code === 'STALE_GENERATION' ? 'PROTOCOL_ERROR' : 'UNAVAILABLE', `target: ${body.code}: ${body.message}`);
    }
    throw new FerryError('PROTOCOL_ERROR', `unexpected frame type ${frame.type} from the target`);
  }

  persist(): void {

    this.deps.catalog.putPair(this.pair);
  }

  get saveVolume(): { usedBytes: number; capacityBytes: number } {
    return { usedBytes: this.ring.usedBytes, capacityBytes: this.ring.capacityBytes };
  }
}

export function assertSource(pair: PairRecord): void {
  assert(pair.role === 'source', `pair of ${pair.volume} is not a source`);
}
