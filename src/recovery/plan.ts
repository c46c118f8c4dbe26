import { FerryError } from '../lib/errors.js';
import type { DeltaSetRecord, FailoverMode, PairRecord, RecoveryRecord } from '../storage/replication-catalog.js';

/**
 * Decisions of disaster recovery (E FIG. 21-33), pure: callers bring the records and
 * carry out the result.
 */

/** What the old source can undo from its own records (E FIG. 28 step 531). */
export type UndoSource = { kind: 'delta-sets'; deltaSets: number[] } | { kind: 'full-copy'; reason: string };

/**
 * The delta sets n-x+1 … n an old source must find in its save volume to return to the
 * restart point: every delta set it cut after the restart point, all of them. If any is
 * gone, only a full copy can rebuild it.
 */
export function planUndo(pair: Pick<PairRecord, 'generation' | 'deltaSetCreated'>, restartGeneration: number, restartPoint: number, rows: Pick<DeltaSetRecord, 'generation' | 'n'>[]): UndoSource {
  if (pair.generation !== restartGeneration) {
    return { kind: 'full-copy', reason: `this copy is at generation ${pair.generation}, the restart point at generation ${restartGeneration}` };
  }
  if (restartPoint > pair.deltaSetCreated) {
    return { kind: 'full-copy', reason: `the restart point (delta set ${restartPoint}) is newer than anything this copy created (${pair.deltaSetCreated}); its records were lost` };
  }
  const have = new Set(rows.filter((r) => r.generation === restartGeneration).map((r) => r.n));
  const needed: number[] = [];
  for (let n = restartPoint + 1; n <= pair.deltaSetCreated; n++) {
    if (!have.has(n)) return { kind: 'full-copy', reason: `delta set ${n} (after the restart point ${restartPoint}) is no longer in the save volume` };
    needed.push(n);
  }
  return { kind: 'delta-sets', deltaSets: needed };
}

/** Checks that a target may fail over now. */
export function checkFailover(pair: PairRecord, mode: FailoverMode): void {
  if (pair.role !== 'target') {
    throw new FerryError('BAD_REQUEST', `volume ${pair.volume} is the source of its pair; failover is run at the target's site`);
  }
  // A catch-up being applied leaves the replica's consistent image in its protective snapshot.
  const protectedImage = pair.initialCopy.protectiveSnapshot !== undefined;
  if (!protectedImage && (pair.initialCopy.doneAt === undefined || pair.deltaSetPlayedBack < pair.initialCopy.stampedDeltaSet)) {
    throw new FerryError('BAD_REQUEST', `volume ${pair.volume} holds no consistent image yet (its ${pair.recovery?.phase === 'resync-target' ? 'resync' : 'initial copy'} is not complete); it cannot take over`);
  }
  if (mode !== 'default' && mode !== 'now' && mode !== 'sync') throw new FerryError('BAD_REQUEST', `unknown failover mode ${String(mode)}`);
  if (mode === 'sync' && protectedImage) {
    throw new FerryError('BAD_REQUEST', `volume ${pair.volume} is being caught up by a copy (the source's backlog outgrew its save volume); a --sync failover cannot lose nothing until it is complete: wait for it, or fail over without --sync`);
  }
}

/** The restart-point snapshot's name for the generation a failover starts. */
export function restartSnapshotName(generation: number): string {
  return `ferry-restart-point-g${generation}`;
}

export function discardSnapshotName(generation: number): string {
  return `ferry-discarded-g${generation}`;
}

export function intermediateSnapshotName(generation: number, step: number): string {
  return `ferry-resync-g${generation}-${step}`;
}

/**
 * The resync's copy from its intermediate point is whole, and only its clean-up
 * (`Recovery.resyncDone`) is left. A stop during that clean-up, which removes the copy's
 * list of blocks, must not be taken for a resync whose intermediate point was never taken.
 */
export function resyncCopied(pair: PairRecord): boolean {
  return pair.role === 'source' && pair.recovery?.phase === 'resync' && pair.initialCopy.doneAt !== undefined && pair.initialCopy.snapshot === intermediateSnapshotName(pair.generation, 2);
}

/** A reversed resync says whose writes it discards. */
function resyncName(r: RecoveryRecord): string {
  return r.reverse ? `resync --reverse (the writes made at the other site since the failover are discarded${r.discardSnapshot ? `, kept in its snapshot ${r.discardSnapshot}` : ''})` : 'resync';
}

/** Checks that a reversed resync may start at an old source: it failed over from here and keeps its data. */
export function checkReverseResync(pair: PairRecord): void {
  const phase = pair.recovery?.phase;
  if (pair.role !== 'source' || (phase !== undefined && phase !== 'fenced' && phase !== 'resynced')) {
    const doing = phase === 'resync-target' ? 'it is being rebuilt by a resync from the other site already' : `it is the ${pair.role}${phase ? ` (${phase})` : ''}`;
    throw new FerryError('BAD_REQUEST', `volume ${pair.volume} cannot keep its data with "resync --reverse": ${doing}; it is run at the old source of a pair that failed over, before "ferry resync" is run at the site that took over`);
  }
}

/** What status says about a pair in recovery, in one line. */
export function describeRecovery(pair: PairRecord): string {
  const r = pair.recovery;
  if (!r) return '';
  switch (r.phase) {
    case 'failed-over':
      return `failed over at generation ${pair.generation} (restart point: delta set ${r.restartPoint}, snapshot ${r.restartSnapshot ?? '?'}); run "ferry resync ${pair.volume}" here once ${pair.peerSiteName} is back`;
    case 'fenced':
      return `failed over to ${r.failedOverTo ?? pair.peerSiteName}; this copy is read-only until "ferry resync" is run there (or, to keep this copy's data instead, "ferry resync ${pair.volume} --reverse" here)`;
    case 'resync-full':
      return `${resyncName(r)}: full copy needed (${r.fullCopyReason ?? 'unknown reason'}); copying intermediate snapshot 1`;
    case 'resync':
      return `${resyncName(r)}: copying ${r.resyncBlocks ?? '?'} blocks that differ${r.fullCopy ? ' (after a full copy)' : ''}`;
    case 'resync-target':
      if (pair.initialCopy.doneAt !== undefined && pair.deltaSetPlayedBack >= pair.initialCopy.stampedDeltaSet) return '';
      return `being rebuilt from ${pair.peerSiteName}: no host access until the resync is complete`;
    case 'resynced':
      return '';
    case 'failing-back':
      return `failback to ${pair.peerSiteName} in progress`;
  }
}
