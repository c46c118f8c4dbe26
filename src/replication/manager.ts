import { mkdir, rm, stat } from 'node:fs/promises';
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import type { Logger } from 'pino';
import type { Clock } from '../lib/clock.js';
import { crashPoint } from '../lib/crash-point.js';
import { RateLimiter, rateLimitBytesMin } from '../lib/rate.js';
import { formatSize } from '../lib/units.js';
import { FerryError } from '../lib/errors.js';
import { BitmapFile, readWorkBitmap, wasDamaged, writeBitmapFile } from '../storage/bitmap-file.js';
import type { PagedBitmap } from '../lib/paged-bitmap.js';
import type { Catalog, VolumeAccess } from '../storage/catalog.js';
import { JournalFile } from '../storage/journal.js';
import { ReplicationCatalog, type FailoverMode, type PairMode, type PairRecord } from '../storage/replication-catalog.js';
import type { VolumeInfo, VolumeStore } from '../storage/volume-store.js';
import { ActivityLog, FileActivityLogStore, activityExtentsMaxDefault } from '../tracking/activity-log.js';
import { ChangeLog } from '../tracking/change-log.js';
import { connectRcp, type PeerIdentity, type RcpConnection } from '../transport/connection.js';
import { FrameType, type Frame } from '../transport/frame.js';
import type { RcpServer } from '../transport/rcp-server.js';
import { peerAddress, reachableUrl } from '../transport/peer-url.js';
import { nextPairStatus, initialPairStatus } from './pair-state.js';
import { ReplFrame, json, policyFigure, rateLimitFigure, type PairCreateBody, type PairOpenBody, type TargetPosition } from './protocol.js';
import { SourceReplicator } from './source.js';
import type { CopyPlan, PointInTimeImage } from './copy.js';
import type { SnapshotManager } from '../snapshot/manager.js';
import { infoView, pairStatusView, type InfoView, type LiveFigures, type PairStatusView } from './status.js';
import { TargetReplica } from './target.js';
import { Recovery, type FailoverResult, type ResyncPreview } from '../recovery/recovery.js';
import { describeRecovery, resyncCopied } from '../recovery/plan.js';

export const intervalMsDefault = 10_000;
export const highWaterBytesDefault = 64 * 1024 * 1024;
export const saveVolumeBytesDefault = 1024 * 1024 * 1024;
const sessionOpenTimeoutMs = 10_000;
/** A pair whose rate limit held a send back this recently is reported as held back by it. */
const throttledWindowMs = 5_000;

export interface StartOptions {
  volume: string;
  to: string;
  targetVolume?: string;
  mode: PairMode;
  intervalMs: number;
  highWaterBytes: number;
  /** Bytes per second the pair may send (`--max-rate`); 0 or absent: no limit. */
  maxRateBytes?: number;
  saveVolumeBytes: number;
  /** The target's save volume; default: the larger of the source's and 1 GiB. */
  targetSaveVolumeBytes?: number;
  /** An existing target volume that holds data may be overwritten (`--force`). */
  overwrite?: boolean;
}

export interface ManagerDeps {
  self: PeerIdentity;
  selfUrl(): string;
  blockBytes: number;
  volumes: VolumeStore;
  catalog: Catalog;
  replicationDir: string;
  rcp: RcpServer;
  clock: Clock;
  log: Logger;
  /** Point-in-time images for initial copies. */
  snapshots: SnapshotManager;
  /** Changes a volume's host access and drains host connections that no longer fit it. */
  setAccess(volume: string, access: VolumeAccess): Promise<unknown>;
  /** Hosts' open connections to a volume (NBD). */
  hostConnections(volume: string): number;
}

function checkPolicy(intervalMs: number, highWaterBytes: number, maxRateBytes = 0): void {
  if (intervalMs < 100) throw new FerryError('INVALID_DURATION', 'the interval must be at least 100ms');
  if (highWaterBytes < 1) throw new FerryError('INVALID_SIZE', 'the high-water mark must be at least 1 byte');
  if (!Number.isSafeInteger(maxRateBytes) || (maxRateBytes !== 0 && maxRateBytes < rateLimitBytesMin)) {
    throw new FerryError('INVALID_SIZE', `a rate limit must be at least ${formatSize(rateLimitBytesMin)} per second (0: no limit)`);
  }
}

/** Why a command for a running source cannot be carried out here. */
function notReplicatingHere(pair: PairRecord): FerryError {
  if (pair.role === 'target') return new FerryError('BAD_REQUEST', `volume ${pair.volume} is the target of its pair; run this at the source site (${pair.peerSiteName})`);
  return new FerryError('BAD_REQUEST', `replication of ${pair.volume} is not running here now: ${describeRecovery(pair) || pair.stateReason || pair.state}`);
}

/** The pair is a replica of that site's volume. */
function replicaOf(pair: PairRecord, sourceSiteId: string, sourceVolume: string): boolean {
  return pair.role === 'target' && pair.peerSiteId === sourceSiteId && pair.peerVolume === sourceVolume;
}

/**
 * A target's pair left by a `replicate start` its source did not finish: from the same
 * site and volume, its first copy not done, no role change since.
 */
function unfinishedStart(pair: PairRecord, sourceSiteId: string, sourceVolume: string): boolean {
  return replicaOf(pair, sourceSiteId, sourceVolume) && pair.generation === 1 && pair.recovery === undefined && pair.initialCopy.doneAt === undefined;
}

/**
 * Why a volume cannot become a new pair's target: the pair it is in. A replica of the
 * very volume that asks has lost its source's half (the source asks only when it has
 * no pair): stopped there while this site could not be told. It is ended here first.
 */
function pairInTheWay(pair: PairRecord, sourceSiteId: string, sourceVolume: string, here: string, hereUrl: string): string {
  const which = pair.role === 'target' ? `the replica of ${pair.peerSiteName}:${pair.peerVolume}` : `the source of a pair to ${pair.peerSiteName}:${pair.peerVolume}`;
  const remedy = replicaOf(pair, sourceSiteId, sourceVolume) ? `, a pair its source no longer has (stopped there while ${here} could not be told); end it here first: ferry --site ${hereUrl} replicate stop ${pair.volume}` : '';
  return `volume ${pair.volume} at ${here} is already part of a replication pair: ${which}${remedy}`;
}

/**
 * A pair needs two sites: `url` answered with this site's id. It is this site, or a copy
 * of its directory (a cloned machine), which must be made a site of its own first.
 */
function notAnotherSite(url: string, self: PeerIdentity): FerryError {
  return new FerryError(
    'BAD_REQUEST',
    `${url} answers as this site (${self.siteName}, id ${self.siteId}): replication keeps a copy at another site. If it is a copy of this site's directory (a cloned machine), make a site of its own there with "ferry site init" in an empty directory`,
  );
}

/**
 * All pairs of one site: opens them at start (recovery before anyone is let in),
 * answers peers' sessions, and carries out `replicate start|stop|pause|resume|delta`.
 */
export class ReplicationManager {
  readonly catalog: ReplicationCatalog;
  readonly sources = new Map<string, SourceReplicator>();
  readonly targets = new Map<string, TargetReplica>();
  private readonly starting = new Set<string>();
  /** Volumes this manager is resizing itself (a replicated volume grows with its pair). */
  private readonly resizing = new Set<string>();
  /** Each pair's rate limit, shared by everything that sends for it (delta sets, copies, a resync's). */
  private readonly limiters = new Map<string, RateLimiter>();

  readonly recovery: Recovery;
  readonly defaults = { intervalMs: intervalMsDefault, highWaterBytes: highWaterBytesDefault };

  constructor(readonly deps: ManagerDeps) {
    this.catalog = new ReplicationCatalog(deps.catalog);
    deps.volumes.addUseCheck((name) => {
      const pair = this.catalog.getPair(name);
      if (!pair || this.resizing.has(name)) return undefined;
      return `it is the ${pair.role} of a replication pair (run "ferry replicate stop ${name}" first)`;
    });
    deps.rcp.register(ReplFrame.PairCreate, (c, peer, f) => void this.onCreate(c, peer, f));
    deps.rcp.register(ReplFrame.PairOpen, (c, peer, f) => void this.onOpen(c, peer, f));
    this.recovery = new Recovery(this);
  }

  /** Opens every pair; sources recover their change logs before hosts can write. */
  async load(): Promise<void> {
    await mkdir(this.deps.replicationDir, { recursive: true });
    for (const pair of this.catalog.listPairs()) {
      try {
        const phase = pair.recovery?.phase;
        if (pair.role === 'target') this.targets.set(pair.volume, await this.openTarget(pair));
        else if (phase === 'fenced') await this.deps.setAccess(pair.volume, 'read-only');
        else if (phase === 'failed-over' || phase === 'resync-full') await this.deps.setAccess(pair.volume, 'read-write');
        else if (phase === 'resync' && !resyncCopied(pair) && !(await stat(join(this.pairDir(this.deps.volumes.record(pair.volume).id), 'copy.bitmap')).then(() => true, () => false))) {
          // The resync's intermediate point was not taken yet: Recovery.resumeAll does it.
        } else {
          this.sources.set(pair.volume, await this.openSource(pair));
          // A reversed resync's old source stopped before it could give hosts their writes back.
          if (pair.recovery?.reverse && phase === 'resync') await this.deps.setAccess(pair.volume, 'read-write');
          else if (phase !== 'failing-back' && this.deps.volumes.record(pair.volume).access !== 'read-write') {
            // A failback or a failover --sync held hosts for its last delta set and stopped before the
            // switch: nothing changed hands, so this site is still the source.
            await this.deps.setAccess(pair.volume, 'read-write');
            this.deps.log.warn({ volume: pair.volume }, 'a failback or failover --sync held hosts when this site stopped and did not switch roles: this site is still the source; hosts may write again');
          }
        }
      } catch (err) {
        this.deps.log.error({ err, volume: pair.volume }, 'replication pair could not be opened');
        throw err;
      }
    }
  }

  /** Starts the background work of every pair (after load, once listeners are up). */
  startAll(): void {
    for (const s of this.sources.values()) s.start();
    for (const t of this.targets.values()) t.start();
    this.recovery.resumeAll();
  }

  async close(): Promise<void> {
    await this.recovery.close();
    await Promise.all([...this.sources.values()].map((s) => s.close()));
    await Promise.all([...this.targets.values()].map((t) => t.close()));
  }

  // ---- operator commands ------------------------------------------------------------

  async start(options: StartOptions): Promise<PairRecord> {
    const { volumes, self, log } = this.deps;
    const volume = volumes.get(options.volume);
    const record = volumes.record(options.volume);
    if (this.catalog.getPair(options.volume) || this.starting.has(options.volume)) {
      throw new FerryError('VOLUME_IN_USE', `volume ${options.volume} is already replicated`);
    }
    if (record.access !== 'read-write') throw new FerryError('VOLUME_READ_ONLY', `volume ${options.volume} is ${record.access}; only a read-write volume can be a source`);
    if (options.mode !== 'async') throw new FerryError('BAD_REQUEST', `mode ${options.mode} is not available yet; use --mode async`);
    if (options.saveVolumeBytes < 16 * 1024 * 1024 || options.saveVolumeBytes % 4096 !== 0) {
      throw new FerryError('INVALID_SIZE', 'the save volume must be at least 16M and a multiple of 4K');
    }
    const targetSave = options.targetSaveVolumeBytes;
    if (targetSave !== undefined && (targetSave < options.saveVolumeBytes || targetSave % 4096 !== 0)) {
      throw new FerryError('INVALID_SIZE', `the target's save volume must be a multiple of 4K and at least the source's (${options.saveVolumeBytes} bytes): it must hold any delta set the source can cut`);
    }
    checkPolicy(options.intervalMs, options.highWaterBytes, options.maxRateBytes);
    this.starting.add(options.volume);
    try {
      const pairId = randomUUID();
      const targetVolume = options.targetVolume ?? options.volume;
      const create: PairCreateBody = {
        pairId,
        sourceSiteId: self.siteId,
        sourceSiteName: self.siteName,
        sourceUrl: this.deps.selfUrl(),
        sourceVolume: options.volume,
        targetVolume,
        sizeBytes: volume.sizeBytes,
        blockBytes: volume.blockBytes,
        generation: 1,
        mode: options.mode,
        saveVolumeBytes: options.saveVolumeBytes,
        ...(targetSave !== undefined ? { targetSaveVolumeBytes: targetSave } : {}),
        ...(options.overwrite ? { overwrite: true } : {}),
        intervalMs: options.intervalMs,
        highWaterBytes: options.highWaterBytes,
        maxRateBytes: options.maxRateBytes ?? 0,
      };
      const { connection, peer } = await this.connect(options.to);
      try {
        if (peer.siteId === self.siteId) throw notAnotherSite(options.to, self);
        connection.sendJson(ReplFrame.PairCreate as number, create);
        await expectOpenOk(connection);
      } finally {
        connection.destroy();
      }
      crashPoint('start.target-created');
      const status = nextPairStatus(initialPairStatus, { type: 'start' });
      const pair: PairRecord = {
        volume: options.volume,
        pairId,
        role: 'source',
        mode: options.mode,
        peerUrl: options.to.replace(/\/+$/, ''),
        peerSiteId: peer.siteId,
        peerSiteName: peer.siteName,
        peerVolume: targetVolume,
        state: status.state,
        stateReason: '',
        generation: 1,
        intervalMs: options.intervalMs,
        highWaterBytes: options.highWaterBytes,
        maxRateBytes: options.maxRateBytes ?? 0,
        saveVolumeBytes: options.saveVolumeBytes,
        createdAt: new Date(this.deps.clock.now()).toISOString(),
        initialCopy: { cursorBlock: 0, totalBlocks: volume.blockCount, stampedDeltaSet: 0, startedAt: new Date(this.deps.clock.now()).toISOString(), bytes: 0 },
        ...freshCounters(),
      };
      await this.removeFiles(record.id);
      this.catalog.putPair(pair);
      crashPoint('start.recorded');
      const source = await this.openSource(pair);
      this.sources.set(pair.volume, source);
      try {
        await this.copyPlan(pair);
        crashPoint('start.copy-planned');
      } catch (err) {
        this.sources.delete(pair.volume);
        await source.close();
        this.catalog.deletePair(pair.volume);
        await this.tellTarget(pair, { stop: true }).catch(() => undefined);
        throw err;
      }
      source.start();
      log.info({ volume: pair.volume, to: pair.peerUrl, targetVolume }, 'replication started');
      return pair;
    } finally {
      this.starting.delete(options.volume);
    }
  }

  /**
   * Ends the pair here; returns the volume's access afterwards. A source the pair held
   * read-only for a role change (fenced, or failing back) stays read-only: the other
   * site may be its source now, and only the operator can say otherwise.
   */
  async stop(volumeName: string): Promise<StopResult> {
    const pair = this.requirePair(volumeName);
    const record = this.deps.volumes.record(volumeName);
    let targetNotTold: string | undefined;
    if (pair.role === 'source') {
      const source = this.sources.get(volumeName);
      this.sources.delete(volumeName);
      await source?.close();
      await this.dropCopyImage(pair).catch((err: Error) => this.deps.log.warn({ volume: volumeName, err: err.message }, 'the initial-copy snapshot could not be deleted'));
      this.catalog.deletePair(volumeName);
      await this.tellTarget(pair, { stop: true }).catch((err: Error) => {
        targetNotTold = err.message;
        this.deps.log.warn({ volume: volumeName, err: err.message }, 'the target could not be told that replication stopped; stop it there too');
      });
    } else {
      const target = this.targets.get(volumeName);
      this.targets.delete(volumeName);
      // Stop at the target finishes the delta set being played back (E, "stop" on a secondary).
      await target?.close();
      // One commit: a stop between the two would leave a read-only volume in no pair.
      this.catalog.transaction(() => {
        this.catalog.deletePair(volumeName);
        this.deps.volumes.setAccess(volumeName, 'read-write');
      });
      await this.deps.setAccess(volumeName, 'read-write');
    }
    await this.removeFiles(record.id);
    const access = this.deps.volumes.record(volumeName).access;
    this.deps.log.info({ volume: volumeName, role: pair.role, access }, 'replication stopped');
    return { access, ...(targetNotTold !== undefined ? { targetNotTold: { site: pair.peerSiteName, url: pair.peerUrl, volume: pair.peerVolume, reason: targetNotTold } } : {}) };
  }

  /**
   * `ferry volume resize`: a volume that is not replicated is resized as usual; the
   * source of a pair grows, never shrinks. The target grows first, so no delta set can
   * carry a block it does not have; then this volume and its change log grow with host
   * writes held for that moment. The new blocks read as zeros on both sides, so nothing
   * is copied. A command that fails after the target grew is run again to finish.
   */
  async resizeVolume(volumeName: string, sizeBytes: number, force = false): Promise<VolumeInfo> {
    const pair = this.catalog.getPair(volumeName);
    if (!pair) return this.deps.volumes.resize(volumeName, sizeBytes, force);
    if (pair.role !== 'source') {
      throw new FerryError('BAD_REQUEST', `volume ${volumeName} is the replica of ${pair.peerVolume} at ${pair.peerSiteName}: resize it there, and the replica grows with it`);
    }
    const phase = pair.recovery?.phase;
    if (phase !== undefined && phase !== 'resynced') {
      throw new FerryError('BAD_REQUEST', `volume ${volumeName} cannot be resized during a role change: ${describeRecovery(pair) || phase}`);
    }
    const source = this.sources.get(volumeName);
    if (!source) throw new FerryError('UNAVAILABLE', `replication of ${volumeName} is not running`);
    if (pair.initialCopy.doneAt === undefined) {
      throw new FerryError('BAD_REQUEST', `volume ${volumeName} cannot be resized while its ${pair.initialCopy.catchUp ? 'catch-up' : 'initial'} copy to ${pair.peerSiteName} runs; run this again when it is done`);
    }
    const volume = this.deps.volumes.get(volumeName);
    if (sizeBytes < volume.sizeBytes) {
      throw new FerryError('SHRINK_REFUSED', `volume ${volumeName} is replicated: it can grow, not shrink (run "ferry replicate stop ${volumeName}" first to shrink it)`);
    }
    await this.asPair(volumeName, async () => {
      this.deps.volumes.checkResize(volumeName, sizeBytes);
      await this.tellTarget(pair, { resizeBytes: sizeBytes });
      source.stats.targetVolumeBytes = sizeBytes;
      if (sizeBytes === volume.sizeBytes) return;
      const resume = await volume.quiesce();
      try {
        await this.deps.volumes.resize(volumeName, sizeBytes);
        await source.grow(volume.blockCount);
      } finally {
        resume();
      }
      this.deps.log.info({ volume: volumeName, sizeBytes, target: pair.peerSiteName }, 'replicated volume grown at both sites');
    });
    return this.deps.volumes.show(volumeName);
  }

  /** Runs `fn` with this pair's own hold on resizing `volumeName` lifted (the pair resizes it itself). */
  private async asPair<T>(volumeName: string, fn: () => Promise<T>): Promise<T> {
    this.resizing.add(volumeName);
    try {
      return await fn();
    } finally {
      this.resizing.delete(volumeName);
    }
  }

  /** A copy about to be rebuilt from `peerSite`, where the volume is larger, grows to its size first. */
  async growToMatch(volumeName: string, sizeBytes: number, peerSite: string): Promise<void> {
    await this.asPair(volumeName, () => this.deps.volumes.resize(volumeName, sizeBytes)).catch((err: Error) => {
      const code = err instanceof FerryError ? err.code : 'INTERNAL';
      throw new FerryError(code, `volume ${volumeName} at ${this.deps.self.siteName} must grow to ${sizeBytes} bytes, its size at ${peerSite}, before it is rebuilt: ${err.message}`);
    });
    this.deps.log.warn({ volume: volumeName, sizeBytes, source: peerSite }, 'the volume grew at the other site and not here: grown to match before the resync');
  }

  /** At the target: the replica grows to the source's new size (nothing to do if it has). */
  private async growReplica(target: TargetReplica, sizeBytes: number): Promise<void> {
    const pair = target.pair;
    const volume = this.deps.volumes.get(pair.volume);
    const here = this.deps.self.siteName;
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes < volume.sizeBytes) {
      throw new FerryError('BAD_REQUEST', `volume ${pair.volume} at ${here} holds ${volume.sizeBytes} bytes; a replica does not shrink to ${sizeBytes}`);
    }
    if (sizeBytes === volume.sizeBytes) return;
    if (!target.copyDone || pair.recovery?.phase === 'resync-target') {
      throw new FerryError('BAD_REQUEST', `volume ${pair.volume} at ${here} is still being copied; it cannot grow now`);
    }
    await this.asPair(pair.volume, () => this.deps.volumes.resize(pair.volume, sizeBytes));
    pair.initialCopy.totalBlocks = volume.blockCount;
    this.catalog.putPair(pair);
    this.deps.log.info({ volume: pair.volume, sizeBytes, source: pair.peerSiteName }, 'replica grown with its source');
  }

  /**
   * `ferry replicate set`: the source's cut policy, changed on a running pair, or kept
   * for when replication runs again (a new source waiting for its resync).
   */
  setPolicy(volumeName: string, policy: { intervalMs?: number; highWaterBytes?: number; maxRateBytes?: number }): void {
    const pair = this.requirePair(volumeName);
    const source = this.sources.get(volumeName);
    if (!source && (pair.role !== 'source' || pair.recovery?.phase === 'fenced')) throw notReplicatingHere(pair);
    const intervalMs = policy.intervalMs ?? pair.intervalMs;
    const highWaterBytes = policy.highWaterBytes ?? pair.highWaterBytes;
    const maxRateBytes = policy.maxRateBytes ?? pair.maxRateBytes ?? 0;
    checkPolicy(intervalMs, highWaterBytes, maxRateBytes);
    // A resync's full copy keeps its own copy of the record and writes it as it goes.
    const copying = this.recovery.fullCopies.get(volumeName)?.pair;
    if (source) source.setPolicy({ intervalMs, highWaterBytes }, maxRateBytes);
    else {
      for (const p of [pair, copying]) if (p) Object.assign(p, { intervalMs, highWaterBytes, maxRateBytes });
      this.catalog.putPair(copying ?? pair);
    }
    this.limiters.get(volumeName)?.setRate(maxRateBytes);
    this.deps.log.info({ volume: volumeName, intervalMs, highWaterBytes, maxRateBytes }, 'cut policy and rate limit changed');
  }

  /** The pair's rate limit (one per volume, whatever its role changes), at the rate its record gives. */
  limiter(pair: PairRecord): RateLimiter {
    let limiter = this.limiters.get(pair.volume);
    if (!limiter) {
      limiter = new RateLimiter(this.deps.clock);
      this.limiters.set(pair.volume, limiter);
    }
    if (limiter.configuredRate !== (pair.maxRateBytes ?? 0)) limiter.setRate(pair.maxRateBytes ?? 0);
    return limiter;
  }

  /** Whether the pair's rate limit held a send back within the last 5 s. */
  private throttled(volume: string, nowMs: number): boolean {
    const heldAtMs = this.limiters.get(volume)?.heldAtMs;
    return heldAtMs !== undefined && nowMs - heldAtMs <= throttledWindowMs;
  }

  /** Runs `fn` with the pair's rate limit lifted: hosts are held for a role change and wait on what it sends. */
  async unthrottled<T>(volume: string, fn: () => Promise<T>): Promise<T> {
    const restore = this.limiters.get(volume)?.lift();
    try {
      return await fn();
    } finally {
      restore?.();
    }
  }

  pause(volumeName: string): void {
    this.requireSource(volumeName).pause();
  }

  resume(volumeName: string): void {
    this.requireSource(volumeName).resume();
  }

  /** Cuts a delta set now; a backlog larger than the save volume goes as a catch-up copy instead (its blocks). */
  async delta(volumeName: string): Promise<{ deltaSet: number; catchUpBlocks: number }> {
    const source = this.requireSource(volumeName);
    const catchingUpBefore = source.catchUpBlocks > 0;
    const deltaSet = await source.cutNow();
    return { deltaSet, catchUpBlocks: catchingUpBefore ? 0 : source.catchUpBlocks };
  }

  failover(volumeName: string, mode: FailoverMode): Promise<FailoverResult> {
    return this.recovery.failover(volumeName, mode);
  }

  resync(volumeName: string, reverse = false): Promise<void> {
    return reverse ? this.recovery.resyncReverse(volumeName) : this.recovery.resync(volumeName);
  }

  previewResync(volumeName: string, reverse = false): Promise<ResyncPreview> {
    return this.recovery.previewResync(volumeName, reverse);
  }

  failback(volumeName: string): Promise<void> {
    return this.recovery.failback(volumeName);
  }

  status(volumeName?: string): PairStatusView[] {
    const pairs = volumeName ? [this.requirePair(volumeName)] : this.catalog.listPairs().map((p) => this.requirePair(p.volume));
    return pairs.map((p) => pairStatusView(p, this.catalog.listDeltaSets(p.volume), this.live(p)));
  }

  info(volumeName: string): InfoView {
    const p = this.requirePair(volumeName);
    return infoView(p, this.catalog.listDeltaSets(p.volume), this.live(p));
  }

  private live(pair: PairRecord): LiveFigures {
    const now = this.deps.clock.now();
    const source = this.sources.get(pair.volume);
    if (source) {
      const st = source.stats;
      const copy = source.copyStats;
      return {
        nowMs: now,
        sourceHeardMs: undefined,
        dirtyBlocks: source.dirtyBlocks,
        oldestUnsentWriteMs: source.changeLog.oldestUnsentWriteMs,
        sourceNowMs: now,
        rates: source.rates(),
        copyPace: source.copyPace,
        throttled: this.throttled(pair.volume, now),
        saveVolume: { ...source.saveVolume, full: st.saveVolumeFull },
        connected: st.connected || (copy?.connected ?? false),
        retries: st.retries + (copy?.retries ?? 0),
        corruptFrames: st.corruptFramesResent + (copy?.rewinds ?? 0),
        ioErrors: st.ioErrors,
        lastError: st.lastError || copy?.lastError || '',
        failing: [st.failing, copy?.failing ?? '', this.recovery.failbackFailing(pair.volume)].filter((f) => f !== '').join('; '),
        notice: unfinishedResize(pair, this.deps.volumes.get(pair.volume).sizeBytes, st.targetVolumeBytes),
        currentDeltaSet: st.currentDeltaSet,
        currentChunk: st.currentChunk,
      };
    }
    const full = this.recovery.fullCopies.get(pair.volume);
    if (full) {
      // A resync's full copy: nothing else runs for the pair meanwhile.
      const st = full.copier.stats;
      return {
        nowMs: now,
        sourceHeardMs: undefined,
        dirtyBlocks: 0,
        oldestUnsentWriteMs: undefined,
        sourceNowMs: now,
        rates: full.sent.rates(),
        copyPace: full.copier.pace,
        throttled: this.throttled(pair.volume, now),
        saveVolume: { usedBytes: 0, capacityBytes: pair.saveVolumeBytes, full: false },
        connected: st.connected,
        retries: st.retries,
        corruptFrames: st.rewinds,
        ioErrors: 0,
        lastError: st.lastError,
        failing: st.failing,
        notice: '',
        currentDeltaSet: pair.deltaSetCreated,
        currentChunk: 0,
      };
    }
    const target = this.targets.get(pair.volume);
    const st = target?.stats;
    const heard = st && st.lastSourceHeardLocalMs > 0;
    return {
      nowMs: now,
      sourceHeardMs: heard ? st.lastSourceHeardLocalMs : pair.sourceHeardAtMs,
      // Blocks the source has that are not here (not yet cut, or in delta sets not yet
      // received); at a fenced copy, its writes the other site never got.
      dirtyBlocks: target?.unreceived.blocks ?? this.recovery.fencedUnsentBlocks(pair) ?? 0,
      // Delta sets cut but not yet here hold older writes, of a time not known here.
      oldestUnsentWriteMs: st && st.sourceDeltaSetCreated > pair.deltaSetReceived ? 0 : st?.sourceOldestUnsentWriteMs,
      sourceNowMs: heard ? st.lastSourceNowMs + (now - st.lastSourceHeardLocalMs) : now,
      rates: target?.rates() ?? { current: 0, average: 0 },
      copyPace: target?.copyPace ?? 0,
      throttled: false,
      saveVolume: { ...(target?.saveVolume ?? { usedBytes: 0, capacityBytes: pair.saveVolumeBytes }), full: st?.saveVolumeFull ?? false },
      connected: st?.connected ?? false,
      retries: 0,
      corruptFrames: st?.corruptFramesRejected ?? 0,
      ioErrors: st?.ioErrors ?? 0,
      lastError: st?.lastError ?? '',
      failing: st ? [st.failing.receive, st.failing.copy, st.failing.playback].filter((f) => f !== '').join('; ') : '',
      notice: '',
      currentDeltaSet: Math.max(st?.sourceDeltaSetCreated ?? 0, pair.deltaSetReceived),
      currentChunk: 0,
    };
  }

  /**
   * The other site of a pair is reached at `url` from now on (it moved). The site
   * there must be the pair's other site; the sessions pick the new address up at
   * their next attempt (within seconds).
   */
  async setPeer(volumeName: string, url: string): Promise<PairRecord> {
    const pair = this.requirePair(volumeName);
    if (this.recovery.busy.has(volumeName)) throw new FerryError('VOLUME_IN_USE', `a role change of ${volumeName} is in progress; run this again once it is done`);
    const { connection, peer } = await this.connect(url);
    connection.destroy();
    if (peer.siteId === this.deps.self.siteId) throw notAnotherSite(url, this.deps.self);
    if (peer.siteId !== pair.peerSiteId) {
      throw new FerryError('BAD_REQUEST', `the site at ${url} is ${peer.siteName} (${peer.siteId}), not ${pair.peerSiteName} (${pair.peerSiteId}), the other site of ${volumeName}; nothing was changed`);
    }
    const from = pair.peerUrl;
    pair.peerUrl = url.replace(/\/+$/, '');
    this.catalog.putPair(pair);
    this.deps.log.info({ volume: volumeName, from, to: pair.peerUrl, peer: pair.peerSiteName }, 'the other site of this pair is reached at a new address');
    return pair;
  }

  requirePair(volumeName: string): PairRecord {
    this.deps.volumes.record(volumeName);
    const pair = this.catalog.getPair(volumeName);
    if (!pair) throw new FerryError('NOT_FOUND', `volume ${volumeName} is not replicated`);
    // The record the work under way holds: status and changes go to it.
    return this.sources.get(volumeName)?.pair ?? this.targets.get(volumeName)?.pair ?? this.recovery.fullCopies.get(volumeName)?.pair ?? pair;
  }

  requireSource(volumeName: string): SourceReplicator {
    const pair = this.requirePair(volumeName);
    const source = this.sources.get(volumeName);
    if (!source) throw notReplicatingHere(pair);
    return source;
  }

  freshCounters(): ReturnType<typeof freshCounters> {
    return freshCounters();
  }

  // ---- peers -----------------------------------------------------------------------

  async connect(url: string): Promise<{ connection: RcpConnection; peer: PeerIdentity }> {
    const { host, port } = peerAddress(url);
    return connectRcp(host, port, this.deps.self, sessionOpenTimeoutMs);
  }

  async openSession(pair: PairRecord, channel: 'deltas' | 'copy'): Promise<{ connection: RcpConnection; position: TargetPosition }> {
    const { connection, peer } = await this.connect(pair.peerUrl);
    try {
      if (peer.siteId !== pair.peerSiteId) {
        throw new FerryError('PROTOCOL_ERROR', `the site at ${pair.peerUrl} is ${peer.siteName} (${peer.siteId}), not the pair's target ${pair.peerSiteName} (${pair.peerSiteId})`);
      }
      const open: PairOpenBody = { pairId: pair.pairId, targetVolume: pair.peerVolume, generation: pair.generation, channel, sourceUrl: this.deps.selfUrl() };
      connection.sendJson(ReplFrame.PairOpen as number, open, { generation: BigInt(pair.generation) });
      const position = await expectOpenOk(connection);
      return { connection, position };
    } catch (err) {
      connection.destroy();
      throw err;
    }
  }

  /** Asks the target to end its side of the pair, or to grow its volume: a PairOpen that is not a session. */
  private async tellTarget(pair: PairRecord, what: { stop: true } | { resizeBytes: number }): Promise<void> {
    const { connection } = await this.connect(pair.peerUrl);
    try {
      const body: PairOpenBody & { stop?: boolean } = { pairId: pair.pairId, targetVolume: pair.peerVolume, generation: pair.generation, ...what };
      connection.sendJson(ReplFrame.PairOpen as number, body);
      await expectOpenOk(connection);
    } finally {
      connection.destroy();
    }
  }

  private async onCreate(connection: RcpConnection, peer: PeerIdentity, frame: Frame): Promise<void> {
    try {
      const body = json<PairCreateBody>(frame);
      const { volumes, blockBytes } = this.deps;
      if (typeof body.targetVolume !== 'string' || typeof body.pairId !== 'string' || !Number.isSafeInteger(body.sizeBytes)) {
        throw new FerryError('PROTOCOL_ERROR', 'PairCreate lacks a pair id, target volume or size');
      }
      if (body.blockBytes !== blockBytes) {
        throw new FerryError('BAD_REQUEST', `block sizes differ: the source uses ${body.blockBytes} bytes, this site ${blockBytes}`);
      }
      const here = this.deps.self.siteName;
      if (peer.siteId === this.deps.self.siteId) throw notAnotherSite(body.sourceUrl, this.deps.self);
      const existing = this.catalog.getPair(body.targetVolume);
      const restarted = existing !== undefined && unfinishedStart(existing, peer.siteId, body.sourceVolume);
      if (existing && !restarted) throw new FerryError('VOLUME_IN_USE', pairInTheWay(existing, peer.siteId, body.sourceVolume, here, this.deps.selfUrl()));
      let record;
      if (volumes.has(body.targetVolume)) {
        record = volumes.record(body.targetVolume);
        if (record.sizeBytes !== body.sizeBytes) {
          throw new FerryError('VOLUME_EXISTS', `volume ${body.targetVolume} exists at ${here} with a different size (${record.sizeBytes} bytes, source ${body.sizeBytes})`);
        }
        // The copy turns it raw and overwrites it: not under a host's feet, nor over data unasked.
        const hosts = this.deps.hostConnections(body.targetVolume);
        if (hosts > 0) throw new FerryError('VOLUME_IN_USE', `volume ${body.targetVolume} at ${here} is in use: ${hosts} host connection(s) (NBD) are open to it; disconnect them first`);
        const allocated = volumes.show(body.targetVolume).allocatedBytes;
        if (allocated > 0 && body.overwrite !== true && !restarted) {
          throw new FerryError(
            'VOLUME_EXISTS',
            `volume ${body.targetVolume} exists at ${here} and holds data (${allocated} bytes allocated); the initial copy would overwrite it. Repeat with --force to overwrite it, or choose another volume with --target-volume`,
          );
        }
        this.deps.log.warn({ volume: body.targetVolume, allocatedBytes: allocated }, 'an existing volume becomes a replication target; the initial copy overwrites it');
      } else {
        await volumes.create(body.targetVolume, body.sizeBytes);
        record = volumes.record(body.targetVolume);
      }
      // Until the initial copy completes the volume is not a consistent image: no host access.
      await this.deps.setAccess(body.targetVolume, 'raw');
      const pair: PairRecord = {
        volume: body.targetVolume,
        pairId: body.pairId,
        role: 'target',
        mode: body.mode,
        peerUrl: reachableUrl(body.sourceUrl, connection.socket.remoteAddress),
        peerSiteId: peer.siteId,
        peerSiteName: peer.siteName,
        peerVolume: body.sourceVolume,
        state: 'initial-copying',
        stateReason: '',
        generation: body.generation,
        // Kept for a failover here: the new source cuts as the old one did.
        intervalMs: policyFigure(body.intervalMs),
        highWaterBytes: policyFigure(body.highWaterBytes),
        maxRateBytes: rateLimitFigure(body.maxRateBytes) ?? 0,
        saveVolumeBytes: targetSaveVolumeBytes(body),
        createdAt: new Date(this.deps.clock.now()).toISOString(),
        initialCopy: { cursorBlock: 0, totalBlocks: body.sizeBytes / blockBytes, stampedDeltaSet: 0, startedAt: new Date(this.deps.clock.now()).toISOString(), bytes: 0 },
        ...freshCounters(),
      };
      if (existing) {
        // A start the source did not finish (it stopped, or this answer was lost), asked
        // again: the source has no pair, so that one serves no one and this one takes its
        // place. Its blocks are the same source's, overwritten by the new copy.
        const target = this.targets.get(existing.volume);
        this.targets.delete(existing.volume);
        await target?.close();
        this.deps.log.warn({ volume: existing.volume, from: peer.siteName, pairId: existing.pairId }, 'the source asks again for a pair whose start it did not finish: the new pair replaces it');
      }
      await this.removeFiles(record.id);
      this.catalog.transaction(() => {
        if (existing) this.catalog.deletePair(existing.volume);
        this.catalog.putPair(pair);
      });
      crashPoint('create.recorded');
      const target = await this.openTarget(pair);
      this.targets.set(pair.volume, target);
      target.start();
      this.deps.log.info({ volume: pair.volume, from: peer.siteName, sourceVolume: body.sourceVolume }, 'replication target created');
      connection.sendJson(ReplFrame.PairOpenOk as number, target.position());
      connection.close();
    } catch (err) {
      refuse(connection, err);
    }
  }

  private async onOpen(connection: RcpConnection, peer: PeerIdentity, frame: Frame): Promise<void> {
    try {
      const body = json<PairOpenBody & { stop?: boolean }>(frame);
      if (this.recovery.refusesSessions(body.targetVolume)) throw new FerryError('UNAVAILABLE', `volume ${body.targetVolume} at ${this.deps.self.siteName} is changing roles; try again shortly`);
      const target = this.targets.get(body.targetVolume);
      const here = this.catalog.getPair(body.targetVolume);
      if (!target && here && here.pairId === body.pairId && here.role === 'source' && here.generation > body.generation) {
        // Rule 5: the volume failed over to this site; the old source must stop.
        connection.sendError('STALE_GENERATION', `volume ${body.targetVolume} failed over to ${this.deps.self.siteName} (generation ${here.generation}); generation ${body.generation} is refused: run "ferry resync ${body.targetVolume}" at ${this.deps.self.siteName}`);
        connection.close();
        return;
      }
      if (!target || target.pair.pairId !== body.pairId) {
        throw new FerryError('NOT_FOUND', `no replication pair ${body.pairId} for volume ${body.targetVolume} at ${this.deps.self.siteName}`);
      }
      if (body.generation < target.pair.generation) {
        connection.sendError('STALE_GENERATION', `pair is at generation ${target.pair.generation}; generation ${body.generation} is refused`);
        connection.close();
        return;
      }
      if (typeof body.sourceUrl === 'string' && peer.siteId === target.pair.peerSiteId) this.noteSourceUrl(target.pair, reachableUrl(body.sourceUrl, connection.socket.remoteAddress));
      if (body.stop || body.resizeBytes !== undefined) {
        if (body.stop) await this.stop(body.targetVolume);
        else await this.growReplica(target, body.resizeBytes as number);
        connection.sendJson(ReplFrame.PairOpenOk as number, {});
        connection.close();
        return;
      }
      if (body.channel === 'copy') await target.serveCopy(connection);
      else await target.serve(connection);
    } catch (err) {
      refuse(connection, err);
    }
  }

  /** A target keeps where its source is reached current: a failover or failback here asks it things. */
  private noteSourceUrl(pair: PairRecord, url: string): void {
    if (url === pair.peerUrl) return;
    this.deps.log.info({ volume: pair.volume, from: pair.peerUrl, to: url }, 'the source of this replica is reached at a new address');
    pair.peerUrl = url;
    this.catalog.putPair(pair);
  }

  // ---- initial-copy snapshots ---------------------------------------------------------

  /**
   * Why a snapshot of `volume` must not be deleted by hand now, or undefined: a copy
   * reads it, it holds the replica's consistent image, or a resync needs it. ferry
   * deletes these itself when they are no longer needed.
   */
  snapshotInUse(volume: string, snapshot: string): string | undefined {
    const pair = this.catalog.getPair(volume);
    if (!pair) return undefined;
    const copy = pair.initialCopy;
    if (copy.doneAt === undefined && (snapshot === copy.snapshot || (pair.role === 'source' && snapshot === this.copySnapshotName(pair)))) {
      return `the ${copy.catchUp ? 'catch-up' : pair.recovery ? 'resync' : 'initial'} copy to ${pair.peerSiteName} reads it`;
    }
    if (snapshot === copy.protectiveSnapshot) return 'it holds the replica\'s consistent image until the catch-up copy is complete';
    const r = pair.recovery;
    if (r && (r.phase === 'failed-over' || r.phase === 'resync' || r.phase === 'resync-full')) {
      if (snapshot === r.restartSnapshot) return 'it is the restart point `ferry resync` rebuilds the old source from';
      if (r.intermediateSnapshots?.includes(snapshot)) return 'it is an intermediate point of the resync under way';
    }
    return undefined;
  }

  private copySnapshotName(pair: PairRecord): string {
    return `ferry-initial-copy-${pair.pairId.slice(0, 8)}`;
  }

  /**
   * The snapshot the initial copy reads (E FIG. 11): taken once the change log tracks
   * the volume, stamped with the current delta set; every write after it is in a
   * later delta set. If it is gone (deleted by hand), a new one is taken and stamped
   * anew: the target then stays unreadable until it has played that delta set.
   */
  private async copyImage(pair: PairRecord): Promise<PointInTimeImage> {
    const { snapshots, log } = this.deps;
    const name = this.copySnapshotName(pair);
    if (!snapshots.list(pair.volume).some((s) => s.name === name)) {
      const stamp = pair.deltaSetCreated;
      await snapshots.create(pair.volume, name, { purpose: 'initial copy', pairId: pair.pairId, deltaSet: String(stamp) });
      if (pair.initialCopy.cursorBlock > 0 || stamp !== pair.initialCopy.stampedDeltaSet) {
        log.warn({ volume: pair.volume, snapshot: name, stamp }, 'initial-copy snapshot was missing; a new one was taken and the copy goes on from it');
      }
      pair.initialCopy.stampedDeltaSet = stamp;
      this.catalog.putPair(pair);
    }
    return snapshots.exportView(pair.volume, name);
  }

  /** The copy of a pair: every block of its stamped snapshot (a new remote copy). */
  private async copyPlan(pair: PairRecord): Promise<CopyPlan> {
    const volume = this.deps.volumes.get(pair.volume);
    if ((pair.recovery?.phase === 'resync' || pair.initialCopy.catchUp) && pair.initialCopy.snapshot) {
      // A resync copies only the blocks that differ, a catch-up only its backlog, from
      // the snapshot taken when they were listed.
      const { bits: blocks, report } = await readWorkBitmap(this.copyBitmapPath(pair), volume.blockCount);
      if (wasDamaged(report)) {
        this.deps.log.warn({ volume: pair.volume, headerRebuilt: report.headerRebuilt ?? false, pages: report.corruptPages.length }, 'the copy\'s list of blocks is damaged: the blocks it covered are all copied');
      }
      return {
        copyId: pair.initialCopy.copyId ?? 1,
        image: this.deps.snapshots.exportView(pair.volume, pair.initialCopy.snapshot),
        blockCount: volume.blockCount,
        blockBytes: volume.blockBytes,
        blocks,
        stampedDeltaSet: pair.initialCopy.stampedDeltaSet,
        final: true,
      };
    }
    pair.initialCopy.copyId ??= 1;
    const image = await this.copyImage(pair);
    return {
      copyId: pair.initialCopy.copyId,
      image,
      blockCount: volume.blockCount,
      blockBytes: volume.blockBytes,
      stampedDeltaSet: pair.initialCopy.stampedDeltaSet,
      final: true,
    };
  }

  private async dropCopyImage(pair: PairRecord): Promise<void> {
    const name = pair.initialCopy.catchUp && pair.initialCopy.snapshot ? pair.initialCopy.snapshot : this.copySnapshotName(pair);
    if (this.deps.snapshots.list(pair.volume).some((s) => s.name === name)) await this.deps.snapshots.delete(pair.volume, name);
    if (pair.initialCopy.catchUp) await rm(this.copyBitmapPath(pair), { force: true });
  }

  /** The blocks of a pair's partial copy (a resync's or a catch-up's). */
  copyBitmapPath(pair: PairRecord): string {
    return join(this.pairDir(this.deps.volumes.record(pair.volume).id), 'copy.bitmap');
  }

  /**
   * Rule 8 at the source: the backlog, too large for the save volume, becomes a copy.
   * Its blocks are made durable first, then the snapshot they are read from is taken
   * (after the switch, so no write falls between the two), then the pair's copy record.
   */
  private async catchUp(pair: PairRecord, backlog: PagedBitmap): Promise<void> {
    const { snapshots, clock, log } = this.deps;
    const copyId = (pair.initialCopy.copyId ?? 1) + 1;
    const name = `ferry-catch-up-${pair.pairId.slice(0, 8)}-${copyId}`;
    await writeBitmapFile(this.copyBitmapPath(pair), backlog);
    // A snapshot of this name left by a crash is older than the switch: never reuse it.
    if (snapshots.list(pair.volume).some((s) => s.name === name)) await snapshots.delete(pair.volume, name);
    await snapshots.create(pair.volume, name, { purpose: 'catch-up copy', pairId: pair.pairId, deltaSet: String(pair.deltaSetCreated) });
    pair.initialCopy = {
      cursorBlock: 0,
      totalBlocks: this.deps.volumes.get(pair.volume).blockCount,
      stampedDeltaSet: pair.deltaSetCreated,
      startedAt: new Date(clock.now()).toISOString(),
      bytes: 0,
      copyId,
      snapshot: name,
      plannedBlocks: backlog.count,
      copiedBlocks: 0,
      catchUp: true,
    };
    this.catalog.putPair(pair);
    log.warn({ volume: pair.volume, blocks: backlog.count, snapshot: name, stampedDeltaSet: pair.deltaSetCreated }, 'catch-up copy recorded');
  }

  // ---- files -----------------------------------------------------------------------

  pairDir(volumeId: string): string {
    return join(this.deps.replicationDir, volumeId);
  }

  async removeFiles(volumeId: string): Promise<void> {
    await rm(this.pairDir(volumeId), { recursive: true, force: true });
  }

  async openSource(pair: PairRecord): Promise<SourceReplicator> {
    const { volumes, clock, log } = this.deps;
    const record = volumes.record(pair.volume);
    const volume = volumes.get(pair.volume);
    const dir = this.pairDir(record.id);
    await mkdir(dir, { recursive: true });
    const dirtyPath = join(dir, 'dirty.bitmap');
    const exists = await stat(dirtyPath).then(() => true, () => false);
    let dirty: BitmapFile;
    if (exists) {
      const opened = await BitmapFile.open(dirtyPath, 'fill', volume.blockCount);
      dirty = opened.file;
      const { corruptPages, headerRebuilt } = opened.report;
      if (wasDamaged(opened.report)) {
        log.warn({ volume: pair.volume, headerRebuilt: headerRebuilt ?? false, pages: corruptPages.length }, 'the change log\'s bitmap is damaged: the blocks it covers are treated as changed and sent again');
      }
    } else dirty = await BitmapFile.create(dirtyPath, volume.blockCount);
    // A resize that stopped between the volume and its change log: the new blocks were never written.
    if (dirty.bitmap.bitCount < volume.blockCount) await dirty.resize(volume.blockCount);
    const alStore = await FileActivityLogStore.open(join(dir, 'activity.log'), activityExtentsMaxDefault);
    const { log: al, recovered, damaged } = await ActivityLog.open(alStore);
    if (damaged) {
      // Rule 1: which extents had writes in flight is not known, so every block may have changed.
      log.warn({ volume: pair.volume }, 'the activity log is damaged: every block is treated as changed and sent again (a catch-up copy if it does not fit a delta set)');
      dirty.bitmap.setRange(0, volume.blockCount);
      await dirty.sync();
    }
    const changeLog = new ChangeLog(volume.blockBytes, dirty, al, () => volume.flush());
    const dirtyBlocks = await changeLog.recover(recovered);
    if (exists) log.info({ volume: pair.volume, dirtyBlocks, hotExtents: recovered.length }, 'change log recovered');
    if (changeLog.recoveryNotPersisted) {
      log.warn({ volume: pair.volume, err: changeLog.recoveryNotPersisted }, 'no space for the change log\'s bitmap: the blocks recovered stay tracked in the activity log until it can be written');
    }
    const journal = await JournalFile.open(join(dir, 'save.journal'), pair.saveVolumeBytes);
    const source = new SourceReplicator({
      volume,
      pair,
      catalog: this.catalog,
      changeLog,
      journal,
      clock,
      log,
      openSession: (p, channel) => this.openSession(p, channel),
      limiter: this.limiter(pair),
      copyPlan: (p) => this.copyPlan(p),
      copied: (p) => (p.recovery?.phase === 'resync' ? this.recovery.resyncDone(p) : this.dropCopyImage(p)),
      catchUp: (p, backlog) => this.catchUp(p, backlog),
      fenced: (reason) => void this.recovery.fenceSelf(pair.volume, pair.peerSiteName, reason).catch((err: Error) => log.error({ volume: pair.volume, err: err.message }, 'the volume could not be fenced')),
    });
    source.track();
    return source;
  }

  async openTarget(pair: PairRecord): Promise<TargetReplica> {
    const { volumes, clock, log } = this.deps;
    const record = volumes.record(pair.volume);
    const dir = this.pairDir(record.id);
    await mkdir(dir, { recursive: true });
    const journal = await JournalFile.open(join(dir, 'save.journal'), pair.saveVolumeBytes);
    return TargetReplica.open({
      volume: volumes.get(pair.volume),
      pair,
      catalog: this.catalog,
      journal,
      clock,
      log,
      setAccess: (access) => this.deps.setAccess(pair.volume, access),
      protect: async (name) => {
        if (!this.deps.snapshots.list(pair.volume).some((s) => s.name === name)) {
          await this.deps.snapshots.create(pair.volume, name, { purpose: 'consistent image kept during a catch-up', pairId: pair.pairId, deltaSet: String(pair.deltaSetPlayedBack) });
        }
        return this.deps.snapshots.exportView(pair.volume, name);
      },
      unprotect: async (name) => {
        if (this.deps.snapshots.list(pair.volume).some((s) => s.name === name)) await this.deps.snapshots.delete(pair.volume, name);
      },
    });
  }
}

/** Status words for a replica larger than its source: a resize that did not finish here ('' otherwise). */
function unfinishedResize(pair: PairRecord, sourceBytes: number, targetBytes: number): string {
  if (targetBytes <= sourceBytes) return '';
  return `the replica at ${pair.peerSiteName} holds ${formatSize(targetBytes)} and this volume ${formatSize(sourceBytes)}: a resize did not finish here; run "ferry volume resize ${pair.volume} --size ${targetBytes}" again`;
}

/** The target's save volume: as chosen, else the larger of the source's and the default. */
function targetSaveVolumeBytes(body: PairCreateBody): number {
  const source = Number.isSafeInteger(body.saveVolumeBytes) && body.saveVolumeBytes > 0 ? body.saveVolumeBytes : 0;
  const chosen = body.targetSaveVolumeBytes;
  if (chosen !== undefined && Number.isSafeInteger(chosen) && chosen >= Math.max(source, 16 * 1024 * 1024) && chosen % 4096 === 0) return chosen;
  return Math.max(source, saveVolumeBytesDefault);
}

async function expectOpenOk(connection: RcpConnection): Promise<TargetPosition> {
  const reply = await connection.nextFrame(sessionOpenTimeoutMs);
  if (reply.type === FrameType.Error) {
    const body = json<{ code: string; message: string }>(reply);
    const passed = (['VOLUME_IN_USE', 'VOLUME_EXISTS', 'STALE_GENERATION'] as const).find((c) => c === body.code);
    throw new FerryError(passed ?? 'UNAVAILABLE', `peer refused: ${body.message}`);
  }
  if (reply.type !== ReplFrame.PairOpenOk) throw new FerryError('PROTOCOL_ERROR', `peer answered with frame type ${reply.type}`);
  return json<TargetPosition>(reply);
}

function refuse(connection: RcpConnection, err: unknown): void {
  const e = err instanceof FerryError ? err : new FerryError('INTERNAL', (err as Error).message);
  if (!connection.isClosed) {
    connection.sendError(e.code, e.message);
    connection.close();
  }
}

/** What `replicate stop` left: this volume's access, and a target that could not be told (it keeps its end until stopped there). */
export interface StopResult {
  access: VolumeAccess;
  targetNotTold?: { site: string; url: string; volume: string; reason: string };
}

/** The progress fields of a pair that has not moved yet. */
export function freshCounters(): Pick<PairRecord, 'deltaSetCreated' | 'deltaSetSent' | 'deltaSetAcked' | 'deltaSetReceived' | 'deltaSetPlayedBack' | 'bytesSent' | 'bytesReceived' | 'paused' | 'playedBackCutMs' | 'sourceHeardAtMs'> {
  return { deltaSetCreated: 0, deltaSetSent: 0, deltaSetAcked: 0, deltaSetReceived: 0, deltaSetPlayedBack: 0, bytesSent: 0, bytesReceived: 0, paused: false, playedBackCutMs: 0, sourceHeardAtMs: undefined };
}
