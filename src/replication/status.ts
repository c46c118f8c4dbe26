import { formatDuration } from '../lib/units.js';
import type { DeltaSetRecord, PairRecord, RecoveryRecord } from '../storage/replication-catalog.js';

/** A target's source silent for longer (5 heartbeats) is reported, and lag counts the silence. */
export const sourceSilentMs = 5_000;

/**
 * How much a pair needs its operator, as arrays and rbd-mirror report pair health:
 *   error   - replication stopped without being asked to, or something is failing here;
 *   warning - the pair does not protect the volume as set up: paused, the source not
 *             heard from, a save volume full, a catch-up or full copy running, no
 *             replica yet after a failover, or this copy fenced until it is resynced;
 *   ok      - everything else, copies running as planned included.
 */
export type PairHealth = 'ok' | 'warning' | 'error';

/** One line of `ferry status --json` (SPEC §5 names the fields). */
export interface PairStatusView {
  volume: string;
  pairId: string;
  role: 'source' | 'target';
  peer: string;
  peerSite: string;
  peerVolume: string;
  mode: string;
  state: string;
  reason: string;
  /** Whether the pair needs its operator (see `PairHealth`); `reason` says why. */
  health: PairHealth;
  generation: number;
  deltaSetCreated: number;
  deltaSetSent: number;
  deltaSetAcked: number;
  deltaSetReceived: number;
  deltaSetPlayedBack: number;
  lagBlocks: number;
  lagSeconds: number;
  bytesSent: number;
  bytesReceived: number;
  /** Bytes per second over the last 5 s: sent (source) or received (target). */
  transferRate: number;
  averageTransferRate: number;
  /** The most the pair may send, bytes per second (`--max-rate`), 0 for no limit; lifted while hosts are held for a role change. */
  maxRate: number;
  /** Source: the rate limit held sending back within the last 5 s (lag may come from it, not from the link). */
  throttled: boolean;
  /** The pair's current or last copy (the new remote copy, a resync's blocks, or a catch-up, rule 8): progress, and when it started and ended (ISO 8601). */
  initialCopy: { done: boolean; percent: number; copiedBlocks: number; totalBlocks: number; bytes: number; etaSeconds: number | null; catchUp: boolean; startedAt: string; doneAt: string | null };
  saveVolume: { usedBytes: number; capacityBytes: number; full: boolean };
  connected: boolean;
  /** Target: when the source was last heard from (ISO 8601; it heartbeats every second while a session is up); null at the source. */
  sourceLastHeard: string | null;
  retries: number;
  corruptFrames: number;
  /** Storage errors met by this end of the pair (save-volume writes, volume flushes, playbacks). */
  ioErrors: number;
  /** A failure going on now at this end (storage, or a copy not moving), '' when none; also shown in `reason`. */
  failing: string;
  lastError: string;
  /** Failover / resync / failback: phase, restart point, whether a full copy was needed, what was discarded. */
  recovery: RecoveryRecord | null;
  /** Source: how long its newest delta set took to build. */
  lastBuild: LastBuild | null;
}

export interface OutstandingDeltaSet {
  n: number;
  state: string;
  createdAt: string;
  /** How long the interval it covers lasted (previous cut to its cut). */
  durationMs: number;
  blocks: number;
  dataBytes: number;
  /** Source: from its cut until it was ready in the save volume (copying the old table's blocks). */
  buildMs: number | null;
  /** Source: from ready until the target acknowledged it, waiting behind earlier delta sets included; null until then. */
  sendMs: number | null;
  /** Target: from received until its playback started (waiting for earlier ones, or a batching policy); null until then. */
  queuedMs: number | null;
  playbackMs: number | null;
}

/** The source's most recent delta set as built: a build longer than the interval delays the next cut. */
export interface LastBuild {
  deltaSet: number;
  blocks: number;
  buildMs: number;
  /** The build took longer than the interval: delta sets are cut late and lag grows past it. */
  slowerThanInterval: boolean;
}

export interface InfoView extends PairStatusView {
  currentDeltaSet: number;
  currentChunk: number;
  blocksDifferent: number;
  outstanding: OutstandingDeltaSet[];
  intervalMs: number;
  highWaterBytes: number;
}

export interface LiveFigures {
  nowMs: number;
  /** Target, this site's clock: when the source was last heard from (undefined: never, or at the source). */
  sourceHeardMs: number | undefined;
  /** Source: dirty blocks not yet in a delta set. Target: blocks the source has that are not here, as it last said. */
  dirtyBlocks: number;
  /**
   * Source clock, ms: when the oldest of those was written (0: not known), if any.
   * Target: as the source last said, or 0 while delta sets it cut are not here yet.
   */
  oldestUnsentWriteMs: number | undefined;
  /** Target: the source's clock as last heard, advanced by local elapsed time. */
  sourceNowMs: number;
  rates: { current: number; average: number };
  /** Bytes per second by which a running copy has lately moved (acknowledged, or written here); 0 when stalled. */
  copyPace: number;
  /** Source: the rate limit held a send back lately. */
  throttled: boolean;
  saveVolume: { usedBytes: number; capacityBytes: number; full: boolean };
  connected: boolean;
  retries: number;
  corruptFrames: number;
  ioErrors: number;
  lastError: string;
  /** A storage failure going on now (target: storing received chunks, playing back), '' when none. */
  failing: string;
  /** Something the operator should finish that is not a failure (a resize left half done), '' when none. */
  notice: string;
  currentDeltaSet: number;
  currentChunk: number;
}

/**
 * When the replica stopped being exact (source clock, ms): the first write of the
 * oldest delta set not played back, else the oldest write not yet in a delta set; 0
 * when not known, undefined when there is none.
 */
function firstMissingWriteMs(unplayed: readonly DeltaSetRecord[], live: LiveFigures): number | undefined {
  const oldest = unplayed.reduce<DeltaSetRecord | undefined>((a, d) => (a && a.n < d.n ? a : d), undefined);
  return oldest ? (oldest.firstWriteMs ?? 0) : live.oldestUnsentWriteMs;
}

/**
 * Lag as the target sees the source, from source-stamped times only (so the two
 * clocks need not agree): the replica reflects the source as of the cut of the last
 * delta set played back, and stays exact until the first write after that cut; lag is
 * the time since that write (since the cut when it is not known). A pair quiet for an
 * hour that takes a write does not report an hour of lag.
 */
export function pairStatusView(pair: PairRecord, rows: DeltaSetRecord[], live: LiveFigures): PairStatusView {
  const unplayed = rows.filter((d) => d.generation === pair.generation && d.n > pair.deltaSetPlayedBack);
  const copyDone = pair.initialCopy.doneAt !== undefined;
  // A resync or a catch-up copies only some blocks: progress counts those.
  const total = pair.initialCopy.plannedBlocks ?? pair.initialCopy.totalBlocks;
  const copied = copyDone ? total : Math.min(total, pair.initialCopy.copiedBlocks ?? pair.initialCopy.cursorBlock);
  const catchUp = pair.initialCopy.catchUp === true || pair.initialCopy.protectiveSnapshot !== undefined;
  // A catch-up's blocks not yet copied are writes the target does not have.
  const lagBlocks = live.dirtyBlocks + unplayed.reduce((s, d) => s + d.blocks, 0) + (catchUp && !copyDone && pair.role === 'source' ? total - copied : 0);
  const cut = pair.playedBackCutMs > 0 ? pair.playedBackCutMs : Date.parse(pair.initialCopy.startedAt);
  const reference = copyDone && !catchUp ? Math.max(cut, firstMissingWriteMs(unplayed, live) ?? cut) : cut;
  const lagSeconds = lagBlocks === 0 && copyDone && (pair.role === 'target' || pair.deltaSetPlayedBack >= pair.deltaSetCreated) ? 0 : Math.max(0, (live.sourceNowMs - reference) / 1000);
  // A target that cannot hear its source does not know what was written there since:
  // the replica may be as far behind as the silence is long, and status says so.
  const silentMs = pair.role === 'target' && copyDone && !live.connected && live.sourceHeardMs !== undefined ? live.nowMs - live.sourceHeardMs : 0;
  const silence = silentMs > sourceSilentMs ? `the source has not been heard from for ${formatDuration(silentMs)} (since ${new Date(live.sourceHeardMs ?? 0).toISOString()}); writes made there since are not known here` : '';
  const remainingBytes = (total - copied) * (total > 0 ? pair.initialCopy.bytes / Math.max(1, copied) : 0);
  const newest = pair.role === 'source' ? rows.filter((d) => d.generation === pair.generation).reduce<DeltaSetRecord | undefined>((a, d) => (a && a.n > d.n ? a : d), undefined) : undefined;
  const buildMs = newest ? newest.sealedAtMs - newest.createdAtMs : 0;
  const lastBuild = newest ? { deltaSet: newest.n, blocks: newest.blocks, buildMs, slowerThanInterval: buildMs > pair.intervalMs } : null;
  const saveVolumeFull = !live.saveVolume.full
    ? ''
    : pair.role === 'source'
      ? 'the save volume is full: changes wait in the change log until the target acknowledges older delta sets'
      : 'the save volume is full: the source is held back until playback frees space';
  const phase = pair.recovery?.phase;
  const health: PairHealth =
    live.failing !== '' || (pair.state === 'suspended' && !pair.paused && phase !== 'failed-over' && phase !== 'fenced')
      ? 'error'
      : live.notice !== '' || pair.paused || pair.state === 'suspending' || phase === 'failed-over' || phase === 'fenced' || phase === 'resync-full' || silence !== '' || saveVolumeFull !== '' || (catchUp && !copyDone)
        ? 'warning'
        : 'ok';
  return {
    volume: pair.volume,
    pairId: pair.pairId,
    role: pair.role,
    peer: pair.peerUrl,
    peerSite: pair.peerSiteName,
    peerVolume: pair.peerVolume,
    mode: pair.mode,
    state: pair.state,
    reason: [pair.stateReason, live.failing, silence, saveVolumeFull, live.notice].filter((r) => r !== '').join('; '),
    health,
    generation: pair.generation,
    deltaSetCreated: pair.role === 'source' ? pair.deltaSetCreated : Math.max(pair.deltaSetReceived, live.currentDeltaSet),
    deltaSetSent: pair.deltaSetSent,
    deltaSetAcked: pair.role === 'source' ? pair.deltaSetAcked : pair.deltaSetReceived,
    deltaSetReceived: pair.deltaSetReceived,
    deltaSetPlayedBack: pair.deltaSetPlayedBack,
    lagBlocks,
    lagSeconds: Math.round(Math.max(lagSeconds, silence ? silentMs / 1000 : 0) * 10) / 10,
    bytesSent: pair.bytesSent,
    bytesReceived: pair.bytesReceived,
    transferRate: Math.round(live.rates.current),
    averageTransferRate: Math.round(live.rates.average),
    maxRate: pair.maxRateBytes ?? 0,
    throttled: live.throttled,
    initialCopy: {
      done: copyDone,
      percent: total > 0 ? Math.floor((copied / total) * 1000) / 10 : 100,
      copiedBlocks: copied,
      totalBlocks: total,
      bytes: pair.initialCopy.bytes,
      // From the copy's own pace, not bytes sent (which counts resends): a stalled copy has no ETA.
      etaSeconds: copyDone ? 0 : live.copyPace > 0 ? Math.round(remainingBytes / live.copyPace) : null,
      catchUp,
      startedAt: pair.initialCopy.startedAt,
      doneAt: pair.initialCopy.doneAt ?? null,
    },
    saveVolume: live.saveVolume,
    connected: live.connected,
    sourceLastHeard: pair.role === 'target' && live.sourceHeardMs !== undefined ? new Date(live.sourceHeardMs).toISOString() : null,
    retries: live.retries,
    corruptFrames: live.corruptFrames,
    ioErrors: live.ioErrors,
    failing: live.failing,
    lastError: live.lastError,
    recovery: pair.recovery ?? null,
    lastBuild,
  };
}

export function infoView(pair: PairRecord, rows: DeltaSetRecord[], live: LiveFigures): InfoView {
  const view = pairStatusView(pair, rows, live);
  const outstanding = rows
    .filter((d) => d.generation === pair.generation && d.n > pair.deltaSetPlayedBack - (pair.role === 'target' ? 4 : 0))
    .map((d) => ({
      n: d.n,
      state: d.state,
      createdAt: new Date(d.createdAtMs).toISOString(),
      durationMs: d.createdAtMs - d.previousCutMs,
      blocks: d.blocks,
      dataBytes: d.dataBytes,
      buildMs: pair.role === 'source' ? d.sealedAtMs - d.createdAtMs : null,
      sendMs: pair.role === 'source' && d.ackedAtMs !== undefined ? d.ackedAtMs - d.sealedAtMs : null,
      queuedMs: pair.role === 'target' && d.receivedAtMs !== undefined && d.playbackStartedAtMs !== undefined ? d.playbackStartedAtMs - d.receivedAtMs : null,
      playbackMs: d.playbackMs ?? null,
    }));
  return {
    ...view,
    currentDeltaSet: live.currentDeltaSet,
    currentChunk: live.currentChunk,
    blocksDifferent: view.lagBlocks,
    outstanding,
    intervalMs: pair.intervalMs,
    highWaterBytes: pair.highWaterBytes,
  };
}
