import { test } from 'node:test';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import assert from 'node:assert/strict';
import { crashPoints, type CrashPoint } from '../../src/lib/crash-point.js';
import { TestSite, type CliResult } from '../helpers/site.js';
import { pairStatus, waitFor, waitInSync } from '../helpers/replication.js';
import { MiB, sha, blockWrite, writeApi, writesReplicate, recoveryPhase, startPair, unshippedDeltaSets, waitResynced, snapshotDigest, access } from '../helpers/recovery.js';

/**
 * A whole cycle (a new pair's start, or failover and resync and failback) with one daemon
 * killed (SIGKILL, by itself) at one named point between the durable steps, for every
 * such point. Each command is run again, as an operator would, until its outcome is
 * reached; then nothing acknowledged is lost, the discarded writes are in their
 * snapshot, a full copy is made only where the records allow nothing else, and both
 * volumes are equal.
 */

const size = 16 * MiB;

/**
 * A is the first source and B takes over. Then B rebuilds A and hands the role back
 * ('forward'); or A, with `resync --reverse`, keeps its data and rebuilds B ('reverse').
 * 'start' is a new pair's first copy; 'full' a resync that must copy everything (A lost
 * its save volume with the disaster).
 */
interface Case {
  point: CrashPoint;
  cycle: 'start' | 'forward' | 'reverse' | 'full';
  /** The site armed with the point. */
  victim: 'a' | 'b';
}

function caseOf(point: CrashPoint): Case {
  const step = point.split('.')[0] as string;
  const cycle = step === 'start' || step === 'create' ? 'start' : step === 'reverse' || step === 'unwind' ? 'reverse' : point.startsWith('resync.first-') ? 'full' : 'forward';
  return { point, cycle, victim: ['create', 'failover', 'resync', 'failback', 'unwind'].includes(step) ? 'b' : 'a' };
}

/** Points tested where their step is set up: a restore during a failover that ends a catch-up, in catch-up.test.ts. */
const elsewhere: readonly CrashPoint[] = ['restore.part-written'];

const cases: Case[] = [
  ...crashPoints.filter((p) => !elsewhere.includes(p)).map(caseOf),
  // A resync ends at the site that copies: B in the forward cycle, A after resync --reverse.
  { point: 'resync.snapshots-dropped', cycle: 'reverse', victim: 'a' },
  { point: 'resync.files-removed', cycle: 'reverse', victim: 'a' },
];

class Victim {
  crashed = false;
  constructor(
    readonly site: TestSite,
    private readonly point: CrashPoint,
  ) {}

  /** Restarts the site (unarmed) if it killed itself at the point; a death of any other kind fails the test. */
  async reviveIfDead(): Promise<void> {
    const { site } = this;
    if (site.exitCode === null && site.exitSignal === null) return;
    assert.equal(site.exitSignal, 'SIGKILL', `${site.name} exited with ${site.exitCode}: ${site.stderrTail}`);
    assert.match(site.stderrTail, new RegExp(`crash point ${this.point.replace('.', '\\.')} reached`));
    assert.equal(this.crashed, false, 'the site died twice');
    this.crashed = true;
    site.env = {};
    await site.start();
  }
}

/**
 * Where a host's write accepted at a site during a step belongs (the image it must end
 * up in); undefined: the site must refuse it.
 */
type Images = (site: 'a' | 'b') => Buffer | undefined;

/**
 * Once the victim is back (it cannot die again), a host writes a block at each site
 * between the step's checks: what either site accepts then must not be lost.
 */
async function hostWrites(victim: Victim, a: TestSite, b: TestSite, images: Images): Promise<void> {
  if (!victim.crashed) return;
  for (const [key, site] of [['a', a], ['b', b]] as const) {
    const image = images(key);
    const w = blockWrite(size, undefined, 1);
    let accepted = true;
    try {
      await site.writeData('db', w.offset, w.data);
    } catch {
      accepted = false;
    }
    if (!accepted) continue;
    assert.ok(image, `${site.name} accepted a write while it must refuse them`);
    w.data.copy(image, w.offset);
  }
}

/**
 * Runs `command` and, while `done` says no, revives the victim and runs it again when
 * the last run failed: a role change cut short is re-issued once its site is back.
 */
async function untilDone(what: string, victim: Victim, command: () => Promise<CliResult>, done: () => Promise<boolean>, writes: () => Promise<void>): Promise<void> {
  let last = await command();
  const deadline = Date.now() + 120_000;
  for (;;) {
    await victim.reviveIfDead();
    await writes();
    if (await done().catch(() => false)) return;
    if (Date.now() > deadline) throw new Error(`${what} not done; the last run said: ${last.stderr || last.stdout}`);
    await new Promise((r) => setTimeout(r, 300));
    await victim.reviveIfDead();
    if (last.code !== 0) last = await command();
  }
}

/**
 * The resync from `source` is done: `rebuilt` holds `image`, and the snapshot kept there
 * before it was overwritten holds what it had (`discarded`).
 */
async function resynced(source: TestSite, rebuilt: TestSite, expect: { fullCopy: boolean; image: Buffer; discarded: Buffer }): Promise<void> {
  const status = await waitResynced(source, rebuilt);
  assert.equal(status.recovery?.fullCopy, expect.fullCopy, 'full copy');
  assert.equal(await rebuilt.digest('db'), sha(expect.image));
  const kept = status.recovery?.discardSnapshot;
  assert.ok(kept, 'the rebuilt copy\'s discarded writes are kept in a snapshot');
  assert.equal(await snapshotDigest(rebuilt, kept), sha(expect.discarded), 'the snapshot holds the rebuilt copy as it was');
}

interface Sites {
  a: TestSite;
  b: TestSite;
  victim: Victim;
}

/** Two sites, the victim armed with the point. */
async function twoSites({ point, victim: victimName }: Case): Promise<Sites> {
  const name = point.replace('.', '-');
  const env = { FERRY_CRASH_AT: point };
  const [a, b] = await Promise.all([TestSite.create(`${name}-a`, victimName === 'a' ? { env } : {}), TestSite.create(`${name}-b`, victimName === 'b' ? { env } : {})]);
  return { a, b, victim: new Victim(victimName === 'a' ? a : b, point) };
}

/** A new pair: `replicate start`, re-issued until the copy is whole; B refuses host writes until then. */
async function startCycle({ a, b, victim }: Sites): Promise<void> {
  const image = Buffer.alloc(size);
  assert.equal((await a.api('POST', '/api/v1/volumes', { name: 'db', size })).status, 201);
  await writeApi(a, image, 30);
  await untilDone('replicate start', victim, () => a.cli(['replicate', 'start', 'db', '--to', b.url, '--interval', '500ms', '--wait']), async () => {
    const s = await pairStatus(a, 'db');
    return s.initialCopy.doneAt !== undefined && s.initialCopy.doneAt !== null;
  }, () => hostWrites(victim, a, b, (site) => (site === 'a' ? image : undefined)));
  await waitInSync(a, b, 'db');
  assert.equal(await b.digest('db'), sha(image));
  assert.equal(await access(b), 'read-only');
  await writesReplicate(a, b, image, 10);
}

/** A the source of a pair in sync, with writes B never got: A's image, and B's. */
async function pairWithUnshippedWrites({ a, b }: Sites): Promise<{ aImage: Buffer; bImage: Buffer }> {
  const image = Buffer.alloc(size);
  await startPair(a, b, size, image);
  const bImage = Buffer.from(image);
  // Writes at A that B never gets: a resync discards them, kept in a snapshot at A.
  await unshippedDeltaSets(a, image, 1, new Set());
  return { aImage: image, bImage };
}

/** B takes over; until A learns of it, A's hosts may write, and those writes are A's alone. */
async function failover({ a, b, victim }: Sites, aImage: Buffer, bImage: Buffer): Promise<void> {
  await untilDone('failover', victim, () => b.cli(['failover', 'db']), async () => (await pairStatus(b, 'db')).role === 'source' && (await recoveryPhase(a)) === 'fenced', () => hostWrites(victim, a, b, (site) => (site === 'a' ? aImage : bImage)));
  assert.equal(await access(b), 'read-write');
  assert.equal(await access(a), 'read-only');
  assert.equal(await b.digest('db'), sha(bImage), 'the site that took over holds what it received, and its own writes');
  await writeApi(b, bImage, 20);
}

async function forwardCycle(sites: Sites): Promise<void> {
  const { a, b, victim } = sites;
  const { aImage, bImage } = await pairWithUnshippedWrites(sites);
  await failover(sites, aImage, bImage);
  // The fenced old source refuses writes until it is a replica again.
  const onlyB: Images = (site) => (site === 'a' ? undefined : bImage);
  await untilDone('resync', victim, () => b.cli(['resync', 'db']), async () => (await recoveryPhase(b)) === 'resynced', () => hostWrites(victim, a, b, onlyB));
  await resynced(b, a, { fullCopy: false, image: bImage, discarded: aImage });

  await writeApi(b, bImage, 20);
  // One image: whichever site accepts a write is the source then, and the other gets it.
  await untilDone('failback', victim, () => b.cli(['failback', 'db']), async () => {
    const [sa, sb] = await Promise.all([pairStatus(a, 'db'), pairStatus(b, 'db')]);
    return sa.role === 'source' && sb.role === 'target' && (await access(a)) === 'read-write';
  }, () => hostWrites(victim, a, b, () => bImage));
  await waitInSync(a, b, 'db');
  assert.equal(await a.digest('db'), sha(bImage), 'nothing written at B is lost in the hand-over');
  await writesReplicate(a, b, bImage, 10);
  assert.equal((await pairStatus(a, 'db')).generation, (await pairStatus(b, 'db')).generation);
}

/** After the failover, A keeps its data (`resync --reverse`): B is rebuilt from it, B's writes since kept in a snapshot there. */
async function reverseCycle(sites: Sites): Promise<void> {
  const { a, b, victim } = sites;
  const { aImage, bImage } = await pairWithUnshippedWrites(sites);
  await failover(sites, aImage, bImage);
  // Until A is the source again, a write B accepts is among those discarded, one A accepts must reach B.
  await untilDone('resync --reverse', victim, () => a.cli(['resync', 'db', '--reverse']), async () => (await recoveryPhase(a)) === 'resynced', () => hostWrites(victim, a, b, (site) => (site === 'a' ? aImage : bImage)));
  await resynced(a, b, { fullCopy: false, image: aImage, discarded: bImage });
  await writesReplicate(a, b, aImage, 10);
}

/** A's save volume is lost with it: the resync copies everything, in two steps (E FIG. 28 steps 536-537). */
async function fullCopyResyncCycle(sites: Sites): Promise<void> {
  const { a, b, victim } = sites;
  const { aImage, bImage } = await pairWithUnshippedWrites(sites);
  const volumeId = (await a.api<{ id: string }>('GET', '/api/v1/volumes/db')).body.id;
  await a.kill('SIGKILL');
  await rm(join(a.dir, 'replication', volumeId, 'save.journal'), { force: true });
  assert.equal((await b.cli(['failover', 'db'])).code, 0);
  await writeApi(b, bImage, 20);
  await a.start();
  await waitFor('old source fenced', async () => (await recoveryPhase(a)) === 'fenced', 30_000);
  await untilDone('resync', victim, () => b.cli(['resync', 'db']), async () => (await recoveryPhase(b)) === 'resynced', () => hostWrites(victim, a, b, (site) => (site === 'a' ? undefined : bImage)));
  // A full copy: the old source cannot list its changes.
  await resynced(b, a, { fullCopy: true, image: bImage, discarded: aImage });
  await writesReplicate(b, a, bImage, 10);
}

const cycles = { start: startCycle, forward: forwardCycle, reverse: reverseCycle, full: fullCopyResyncCycle };
const cycleNames = { start: 'replicate start', forward: 'failover, resync, failback', reverse: 'failover, resync --reverse', full: 'failover, full-copy resync' };

for (const c of cases) {
  test(`SIGKILL at ${c.point} (${c.victim === 'a' ? 'A, the first source' : 'B, the first target'}; ${cycleNames[c.cycle]}): every command, re-issued, completes; nothing acknowledged is lost, no full copy`, { timeout: 300_000 }, async () => {
    const sites = await twoSites(c);
    try {
      await cycles[c.cycle](sites);
      assert.ok(sites.victim.crashed, `${sites.victim.site.name} never reached ${c.point}`);
    } finally {
      await Promise.all([sites.a.destroy(), sites.b.destroy()]);
    }
  });
}
