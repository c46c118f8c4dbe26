import { writeSync } from 'node:fs';

/**
 * Named points between the durable steps of the role changes, where a test stops the
 * daemon dead, as a power cut or a SIGKILL would: a daemon started with
 * FERRY_CRASH_AT=<name> kills itself with SIGKILL the first time it reaches that point.
 * Random kills rarely land in a window a few milliseconds wide; these land in every one.
 * Unset (always, in service), a point costs one comparison.
 */
export const crashPoints = [
  // replicate start, at the source
  'start.target-created',
  'start.recorded',
  'start.copy-planned',
  // replicate start, at the target
  'create.recorded',
  // failover, at the target's site
  'failover.restart-point-taken',
  'failover.switched',
  'failover.files-removed',
  'failover.read-write',
  // the old source learning of it
  'fence.hosts-held',
  'fence.recorded',
  // resync, at the site that took over
  'resync.answered',
  'resync.copy-planned',
  'resync.snapshots-dropped',
  'resync.files-removed',
  // a resync that needs a full copy: its first step, at the site that took over
  'resync.first-point-taken',
  'resync.first-copy-done',
  // resync, at the old source
  'rebuild.discard-snapshot-taken',
  'rebuild.undo-recorded',
  'rebuild.raw',
  'rebuild.switched',
  // failback, at the current source
  'failback.hosts-held',
  'failback.recorded',
  'failback.taken-over',
  'failback.files-removed',
  'failback.switched',
  // failback, at the old source taking over
  'takeover.played-back',
  'takeover.files-removed',
  'takeover.switched',
  'takeover.read-write',
  // resync --reverse, at the old source (it keeps its data)
  'reverse.fenced',
  'reverse.own-listed',
  'reverse.files-removed',
  'reverse.switched',
  // resync --reverse, at the site that took over (it is rebuilt)
  'unwind.hosts-held',
  'unwind.discard-snapshot-taken',
  'unwind.listed',
  'unwind.raw',
  'unwind.switched',
  'unwind.restart-point-dropped',
  // a snapshot restore (a failover during a catch-up puts back the image kept for it)
  'restore.part-written',
] as const;

export type CrashPoint = (typeof crashPoints)[number];

const armed = process.env.FERRY_CRASH_AT;

export function crashPoint(name: CrashPoint): void {
  if (armed !== name) return;
  // Said on stderr first, synchronously: the test checks which point it stopped at.
  writeSync(2, `ferry: crash point ${name} reached: killing this daemon (FERRY_CRASH_AT)\n`);
  process.kill(process.pid, 'SIGKILL');
}
