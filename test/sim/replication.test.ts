import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Worker } from 'node:worker_threads';
import type { SimReport } from './replication-sim.js';
import type { SimJob, SimMode, SimResult } from './worker.js';

/**
 * Seeded fault schedules over ferry's delta-set bookkeeping (see replication-sim.ts).
 * A failure names its seed: `FERRY_SIM_SEED=<seed> node --test dist/test/sim/` replays it.
 * `FERRY_SIM_SEEDS=<n>` runs more.
 */
const only = process.env.FERRY_SIM_SEED !== undefined ? Number(process.env.FERRY_SIM_SEED) : undefined;
const seeds = Number(process.env.FERRY_SIM_SEEDS ?? 200);
const firstSeed = Number(process.env.FERRY_SIM_FIRST_SEED ?? 1);

/** Runs the seeds in two workers, half each. */
async function runSeeds(mode: SimMode): Promise<SimReport[]> {
  const list = only !== undefined ? [only] : Array.from({ length: seeds }, (_, i) => firstSeed + i);
  const halves = [list.filter((_, i) => i % 2 === 0), list.filter((_, i) => i % 2 === 1)].filter((h) => h.length > 0);
  const results = await Promise.all(
    halves.map(
      (half) =>
        new Promise<SimResult>((resolve, reject) => {
          const job: SimJob = { mode, seeds: half };
          const worker = new Worker(new URL('./worker.js', import.meta.url), { workerData: job, env: process.env });
          worker.once('message', (r: SimResult) => resolve(r));
          worker.once('error', reject);
          worker.once('exit', (code) => code !== 0 && reject(new Error(`simulator worker exited with ${code}`)));
        }),
    ),
  );
  const reports: SimReport[] = [];
  for (const r of results) {
    if (!r.ok) assert.fail(`${mode}, seed ${r.seed} (replay: FERRY_SIM_SEED=${r.seed}): ${r.error}`);
    reports.push(...r.reports);
  }
  return reports;
}

function sum(reports: SimReport[], key: keyof SimReport): number {
  return reports.reduce((s, r) => s + (typeof r[key] === 'number' ? (r[key] as number) : 0), 0);
}

test('simulated pair: a new remote copy, then delta sets and catch-up copies, through crashes, power losses and failed writes, cut and damaged connections, partitions, pauses and full save volumes; the target is always at a consistent point and catches up exactly', async () => {
  const reports = await runSeeds('catch-up');
  // The schedules really exercised the faults they are meant to (else the test proves little).
  if (only === undefined) {
    for (const key of ['sourceCrashes', 'targetCrashes', 'targetPowerLosses', 'connectionsCut', 'framesDamaged', 'retransmits', 'suspendedByFailure', 'sourceSaveVolumeFull', 'targetSaveVolumeFull', 'catchUps', 'storeErrors'] as const) {
      assert.ok(sum(reports, key) > seeds / 2, `${key}: ${sum(reports, key)} over ${seeds} seeds`);
    }
    assert.ok(sum(reports, 'deltaSetsPlayed') > seeds * 10, `delta sets played: ${sum(reports, 'deltaSetsPlayed')}`);
    assert.ok(sum(reports, 'copyRewinds') > seeds / 4, `copy rewinds: ${sum(reports, 'copyRewinds')}`);
    assert.ok(reports.filter((r) => r.copyDoneAtMs > 1_000).length > seeds / 10, 'copies that ran into faults');
  }
});

test('simulated failover in the middle of faults: refused until the copy is whole; then the restart point is a boundary, and the undo list covers every block the old source changed after it (default: never a full copy; --now: only if a skipped delta set was freed)', async () => {
  const reports = await runSeeds('failover');
  if (only === undefined) {
    const withChanges = reports.filter((r) => r.failover?.plan === 'delta-sets' && r.failover.changedBlocks > 0);
    assert.ok(withChanges.length > seeds / 2, `failovers with writes to undo: ${withChanges.length}`);
    assert.ok(reports.some((r) => r.failoverRefused), 'no failover came during the copy');
    assert.ok(reports.some((r) => (r.failover?.skippedDeltaSets ?? 0) > 0 && r.seed % 3 !== 0), 'no failover came during a catch-up');
  }
});
