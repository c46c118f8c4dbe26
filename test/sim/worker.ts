import { parentPort, workerData } from 'node:worker_threads';
import { simulate, type SimOptions, type SimReport } from './replication-sim.js';

/**
 * Runs seeds of the simulator off the test runner's thread: its promise tracking slows
 * the simulator's many small promises down more than twofold.
 */
export type SimMode = 'catch-up' | 'failover';

export interface SimJob {
  mode: SimMode;
  seeds: number[];
}

export type SimResult = { ok: true; reports: SimReport[] } | { ok: false; seed: number; error: string };

/** The fault schedule of a seed in each mode. */
export function simOptions(mode: SimMode, seed: number): SimOptions {
  if (mode === 'catch-up') return { seed, faultMs: 60_000 };
  return { seed, faultMs: seed % 10 === 0 ? 100 + (seed % 7) * 100 : 5_000 + (seed % 20) * 2_000, failover: seed % 3 === 0 ? 'now' : 'default' };
}

async function run(job: SimJob): Promise<SimResult> {
  const reports: SimReport[] = [];
  for (const seed of job.seeds) {
    try {
      reports.push(await simulate(simOptions(job.mode, seed)));
    } catch (err) {
      return { ok: false, seed, error: (err as Error).stack ?? String(err) };
    }
  }
  return { ok: true, reports };
}

if (parentPort && workerData) {
  const port = parentPort;
  void run(workerData as SimJob).then((result) => port.postMessage(result));
}
