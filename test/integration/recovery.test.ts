import { test } from 'node:test';
import { createHash, randomBytes } from 'node:crypto';
import { readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import assert from 'node:assert/strict';
import { TestSite } from '../helpers/site.js';
import { pairStatus, waitFor, waitInSync, type PairStatus } from '../helpers/replication.js';
import { FaultProxy, noFaults, type FaultPlan } from '../helpers/fault-proxy.js';
import { renderDashboard } from '../helpers/dashboard.js';
import { ReplFrame } from '../../src/replication/protocol.js';
import { MiB, bs, execFileP, sites, sha, writeApi, advertisedProxy, writesReplicate, writeNbd, recoveryPhase, startPair, startFullPair, unshippedDeltaSets, waitResynced, snapshotNames, snapshotDigest, access } from '../helpers/recovery.js';

/**
 * Volume db of `size` at A, replicated to B with no cut coming by itself: 12 writes stay
 * in A's change log, and B knows how many blocks they are from A's heartbeats. Returns
 * the blocks written (`image` has the writes).
 */
async function writesNotCut(a: TestSite, b: TestSite, size: number, image: Buffer): Promise<Set<number>> {
  assert.equal((await a.api('POST', '/api/v1/volumes', { name: 'db', size })).status, 201);
  const start = await a.cli(['replicate', 'start', 'db', '--to', b.url, '--interval', '1h', '--high-water', '1G', '--wait']);
  assert.equal(start.code, 0, start.stderr);
  const touched = new Set<number>();
  await writeApi(a, image, 12, touched);
  await waitFor('B to learn how far behind it is', async () => (await pairStatus(b, 'db')).lagBlocks === touched.size, 10_000);
  return touched;
}

test('a fenced copy whose change tracking is damaged counts every block as its lag, leaves the file as it is, and its resync still ends with both sites equal', async () => {
  const [a, b] = await sites('dmgtrack');
  try {
    const size = 8 * MiB;
    const touched = await writesNotCut(a, b, size, Buffer.alloc(size));
    assert.equal((await b.cli(['failover', 'db'])).code, 0);
    await waitFor('A, fenced, to count its writes', async () => (await pairStatus(a, 'db')).lagBlocks === touched.size, 10_000);

    // Bit rot in the one page of A's change-log bit map that holds bits.
    const volumeId = (await a.api<{ id: string }>('GET', '/api/v1/volumes/db')).body.id;
    const path = join(a.dir, 'replication', volumeId, 'dirty.bitmap');
    await a.kill('SIGKILL');
    const file = await readFile(path);
    const pageHeader = 4096;
    assert.ok(file.length > pageHeader + 32 && file.readUInt32LE(pageHeader) !== 0, 'the page with the bits is written');
    file[pageHeader + 32] = (file[pageHeader + 32] as number) ^ 0x40;
    await writeFile(path, file);
    await a.start();
    await waitFor('A to count every block, not knowing which changed', async () => (await pairStatus(a, 'db')).lagBlocks === size / bs, 10_000);
    assert.ok((await readFile(path)).equals(file), 'counting changed nothing on disk');

    // The resync reads the damage as "every block of the page changed": more is copied, nothing is missed.
    assert.equal((await b.cli(['resync', 'db'])).code, 0);
    await waitResynced(b, a);
    assert.equal((await pairStatus(b, 'db')).recovery?.fullCopy, false);
    assert.equal(await a.digest('db'), await b.digest('db'));
    assert.equal(await b.digest('db'), sha(Buffer.alloc(size)), 'B holds the restart point: none of the discarded writes');
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('failover, resync and failback: the whole cycle through NBD, digests at every stable point, no full copy', async () => {
  const [a, b] = await sites('cycle');
  try {
    const size = 64 * MiB;
    const image = Buffer.alloc(size);
    await startPair(a, b, size, image);
    await writeNbd(a, image, 20);
    await waitInSync(a, b, 'db');
    const restart = Buffer.from(image);
    const restartPlayed = (await pairStatus(b, 'db')).deltaSetPlayedBack;

    // x = 3 delta sets the target never plays back, plus writes not yet in any delta set.
    const aTouched = new Set<number>();
    await unshippedDeltaSets(a, image, 3, aTouched);
    await writeApi(a, image, 5, aTouched);
    const aImage = Buffer.from(image);
    await a.kill('SIGKILL');

    // B cannot hear A: it says since when, and counts the silence as lag, also after B is
    // killed and restarted (then from when it last recorded hearing A: no later than the truth).
    const heard = (await pairStatus(b, 'db')).sourceLastHeard;
    assert.ok(heard !== null);
    await b.restart();
    await waitFor('B to report the silence', async () => /^the source has not been heard from for .* writes made there since are not known here$/.test((await pairStatus(b, 'db')).reason), 20_000);
    const silent = await pairStatus(b, 'db');
    assert.equal(silent.health, 'warning');
    assert.ok(silent.sourceLastHeard !== null && silent.sourceLastHeard <= heard, `last heard ${silent.sourceLastHeard}, in fact ${heard}`);
    assert.ok(silent.lagSeconds >= (Date.now() - Date.parse(heard)) / 1000 - 1, `lag ${silent.lagSeconds}s counts the silence since ${heard}`);

    // Failover at B with A down: B holds the restart point and becomes read/write.
    const fo = await b.cli(['failover', 'db', '--json']);
    assert.equal(fo.code, 0, fo.stderr);
    const result = JSON.parse(fo.stdout) as { generation: number; restartPoint: number; restartSnapshot: string; sourceFenced: boolean; sourceAhead: unknown };
    assert.equal(result.restartPoint, restartPlayed);
    assert.equal(result.sourceAhead, null, 'B restarted since it last heard A: what A had is not known');
    assert.equal(result.generation, 2);
    assert.equal(result.sourceFenced, false);
    assert.equal(await b.digest('db'), sha(restart));
    const snaps = await b.api<{ name: string; attrs: Record<string, string> }[]>('GET', '/api/v1/volumes/db/snapshots');
    const rp = snaps.body.find((s) => s.name === result.restartSnapshot);
    assert.equal(rp?.attrs.deltaSet, String(restartPlayed));
    // The resync needs the restart point: deleting it by hand is refused and changes nothing.
    const del = await b.cli(['snapshot', 'delete', 'db', result.restartSnapshot]);
    assert.notEqual(del.code, 0);
    assert.match(del.stderr, /SNAPSHOT_IN_USE|in use/);
    const delApi = await b.api<{ error: { code: string } }>('DELETE', `/api/v1/volumes/db/snapshots/${result.restartSnapshot}`);
    assert.equal(delApi.status, 409);
    assert.equal(delApi.body.error.code, 'SNAPSHOT_IN_USE');
    assert.ok((await b.api<{ name: string }[]>('GET', '/api/v1/volumes/db/snapshots')).body.some((s) => s.name === result.restartSnapshot));
    let sb = await pairStatus(b, 'db');
    assert.equal(sb.role, 'source');
    assert.equal(sb.recovery?.phase, 'failed-over');
    // No replica until the resync: not protected as set up.
    assert.equal(sb.health, 'warning');

    // The new source takes writes through NBD.
    const bImage = Buffer.from(restart);
    const bTouched = new Set<number>();
    await writeNbd(b, bImage, 25, bTouched);
    assert.equal(await b.digest('db'), sha(bImage));

    // The old source returns: it learns of the failover and refuses read/write.
    await a.start();
    await waitFor('old source fenced', async () => (await recoveryPhase(a)) === 'fenced', 30_000);
    const sa = await pairStatus(a, 'db');
    assert.match(sa.reason, /failed over/);
    assert.equal(sa.health, 'warning');
    const denied = await fetch(`${a.url}/api/v1/volumes/db/data?offset=0`, { method: 'PUT', body: Buffer.alloc(bs), headers: { 'content-type': 'application/octet-stream' } });
    assert.equal(denied.status, 409);
    await assert.rejects(execFileP('qemu-io', ['-f', 'raw', '-c', 'write 0 4096', `nbd://127.0.0.1:${a.nbdPort}/db`]), /read-only|Operation not permitted|EPERM|Permission/i);
    assert.equal(await a.digest('db'), sha(aImage), 'the old source keeps its writes until the resync');

    // Resync while the new source keeps being written.
    const rs = await b.cli(['resync', 'db', '--json']);
    assert.equal(rs.code, 0, rs.stderr);
    await writeApi(b, bImage, 30, bTouched);
    sb = await waitResynced(b, a);
    assert.equal(await b.digest('db'), sha(bImage));
    assert.equal(await a.digest('db'), sha(bImage));
    // The old source had no host access ("raw") while it was rebuilt, then became a read-only replica.
    const access = a.logs.filter((l) => l.msg === 'volume access changed' && l.volume === 'db').map((l) => l.access);
    assert.deepEqual(access.slice(-2), ['raw', 'read-only']);
    const r = sb.recovery;
    assert.ok(r);
    assert.equal(r.fullCopy, false, `no full copy: ${JSON.stringify(r)}`);
    assert.ok((r.discardedBlocks ?? 0) >= aTouched.size, `discarded ${r.discardedBlocks} blocks, the old source wrote ${aTouched.size}`);
    assert.ok(sb.initialCopy.bytes < size / 2, `resync copied ${sb.initialCopy.bytes} bytes of a ${size}-byte volume`);
    // Rule 6: the discarded writes are kept in a snapshot at the old source.
    assert.ok(r.discardSnapshot);
    const kept = await a.cli(['snapshot', 'digest', 'db', r.discardSnapshot, '--json']);
    assert.equal(kept.code, 0, kept.stderr);
    assert.equal((JSON.parse(kept.stdout) as { sha256: string }).sha256, sha(aImage));
    // The restart-point and intermediate snapshots are gone once the resync is done.
    const after = await b.api<{ name: string }[]>('GET', '/api/v1/volumes/db/snapshots');
    assert.deepEqual(after.body.map((s) => s.name), []);

    // Failback: A is the source again, B its replica; no full copy.
    await writeApi(b, bImage, 10);
    const fb = await b.cli(['failback', 'db', '--json']);
    assert.equal(fb.code, 0, fb.stderr);
    const na = await pairStatus(a, 'db');
    const nb = await pairStatus(b, 'db');
    assert.equal(na.role, 'source');
    assert.equal(nb.role, 'target');
    assert.equal(na.generation, 3);
    assert.equal(nb.generation, 3);
    assert.equal(await a.digest('db'), sha(bImage));
    await writeNbd(a, bImage, 15);
    await writeApi(a, bImage, 10);
    await waitInSync(a, b, 'db');
    assert.equal(await a.digest('db'), sha(bImage));
    assert.equal(await b.digest('db'), sha(bImage));
    assert.equal(na.initialCopy.bytes, 0, 'failback copies nothing');
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('failover --sync loses nothing; --now skips the received delta sets; failback with no failure', async () => {
  const [a, b] = await sites('modes');
  try {
    const size = 32 * MiB;
    const image = Buffer.alloc(size);
    await startPair(a, b, size, image);

    // Planned switchover: failback with no failure at all, then back again.
    await writeApi(a, image, 10);
    const fb = await a.cli(['failback', 'db', '--json']);
    assert.equal(fb.code, 0, fb.stderr);
    assert.equal((await pairStatus(b, 'db')).role, 'source');
    assert.equal(await b.digest('db'), sha(image));
    await writesReplicate(b, a, image, 10);
    assert.equal((await b.cli(['failback', 'db'])).code, 0);
    assert.equal((await pairStatus(a, 'db')).role, 'source');
    assert.equal((await pairStatus(a, 'db')).generation, 3);

    // --sync with the source up: everything written at A is in B after the switch.
    await writeApi(a, image, 20);
    const fo = await b.cli(['failover', 'db', '--sync', '--json']);
    assert.equal(fo.code, 0, fo.stderr);
    assert.equal(await b.digest('db'), sha(image), 'failover --sync lost a write');
    assert.equal(await recoveryPhase(a), 'fenced');
    const denied = await fetch(`${a.url}/api/v1/volumes/db/data?offset=0`, { method: 'PUT', body: Buffer.alloc(bs), headers: { 'content-type': 'application/octet-stream' } });
    assert.equal(denied.status, 409);
    // Nothing differs, so the resync sends (almost) nothing and needs no full copy.
    assert.equal((await b.cli(['resync', 'db'])).code, 0);
    const sb = await waitResynced(b, a);
    assert.equal(sb.recovery?.fullCopy, false);
    assert.equal(sb.recovery?.discardedBlocks, 0);
    assert.equal(await a.digest('db'), sha(image));
    assert.equal((await b.cli(['failback', 'db'])).code, 0);
    assert.equal((await pairStatus(a, 'db')).role, 'source');

    // --sync with the source down fails cleanly and changes nothing.
    await a.kill('SIGKILL');
    const refused = await b.cli(['failover', 'db', '--sync']);
    assert.notEqual(refused.code, 0);
    assert.equal((await pairStatus(b, 'db')).role, 'target');
    await a.start();
    await writeApi(a, image, 5);
    await waitInSync(a, b, 'db');

    // --now: delta sets received but not played back are skipped (and counted).
    const gen = (await pairStatus(b, 'db')).generation;
    const played = (await pairStatus(b, 'db')).deltaSetPlayedBack;
    const fn = await b.cli(['failover', 'db', '--now', '--json']);
    assert.equal(fn.code, 0, fn.stderr);
    const res = JSON.parse(fn.stdout) as { generation: number; restartPoint: number; skippedDeltaSets: number; sourceFenced: boolean };
    assert.equal(res.generation, gen + 1);
    assert.equal(res.restartPoint, played);
    assert.equal(res.sourceFenced, true);
    assert.equal(await b.digest('db'), sha(image));

    // Ending the pair at the fenced old source keeps its volume read-only and says how to write to it anyway.
    const stop = await a.cli(['replicate', 'stop', 'db']);
    assert.equal(stop.code, 0, stop.stderr);
    assert.match(stop.stdout, /stays read-only/);
    assert.equal((await a.api<{ access: string }>('GET', '/api/v1/volumes/db')).body.access, 'read-only');
    assert.equal((await a.cli(['volume', 'access', 'db', 'read-write'])).code, 0);
    await a.writeData('db', 0, Buffer.alloc(bs, 7));
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('a failover says what the source had that this site did not receive, and the resync discards exactly that', async () => {
  const [a, b] = await sites('ahead');
  try {
    const size = 8 * MiB;
    const touched = await writesNotCut(a, b, size, Buffer.alloc(size));
    const fo = await b.cli(['failover', 'db']);
    assert.equal(fo.code, 0, fo.stderr);
    assert.match(fo.stdout, new RegExp(`^NOT here: ${touched.size} block\\(s\\) written at the source, as of its last word at \\S+ \\([0-9.]+m?s ago\\); of writes made there after that nothing is known here. They stay at the old source, and its resync keeps them in a snapshot there$`, 'm'));
    assert.match(fo.stdout, /^the old source was made read-only$/m);
    // The old source, fenced, counts those writes as its lag, also after a restart (the resync discards them).
    await waitFor('A to count its writes B never got', async () => (await pairStatus(a, 'db')).lagBlocks === touched.size, 10_000);
    await a.restart();
    await waitFor('A, restarted, to count them again', async () => (await pairStatus(a, 'db')).lagBlocks === touched.size, 10_000);
    // The status keeps it.
    const ahead = (await pairStatus(b, 'db')).recovery?.sourceAhead;
    assert.deepEqual([ahead?.blocks, ahead?.deltaSets], [touched.size, 0]);
    assert.match(await (await fetch(`${b.url}/metrics`)).text(), new RegExp(`^ferry_recovery_source_ahead_blocks\\{volume="db"[^}]*\\} ${touched.size}$`, 'm'));
    assert.ok(Date.now() - Date.parse(ahead?.lastHeard ?? '') < 10_000);
    assert.equal(await b.digest('db'), sha(Buffer.alloc(size)), 'B holds the restart point: none of those writes');
    // Until the resync, neither site replicates, and each says why; the new source's policy can be set meanwhile.
    assert.match((await b.cli(['replicate', 'pause', 'db'])).stderr, /^ferry: BAD_REQUEST: replication of db is not running here now: failed over at generation 2 .*run "ferry resync db" here once ahead-a is back\n$/);
    assert.match((await a.cli(['replicate', 'delta', 'db'])).stderr, /^ferry: BAD_REQUEST: replication of db is not running here now: failed over to ahead-b; this copy is read-only until "ferry resync" is run there \(or, to keep this copy's data instead, "ferry resync db --reverse" here\)\n$/);
    assert.match((await a.cli(['replicate', 'set', 'db', '--interval', '1s'])).stderr, /not running here now: failed over to ahead-b/);
    assert.equal((await b.cli(['replicate', 'set', 'db', '--interval', '300ms'])).code, 0);
    assert.equal((await b.cli(['resync', 'db'])).code, 0);
    await waitResynced(b, a);
    assert.match((await b.cli(['info', 'db'])).stdout, /^policy:\s+interval 300ms, high water 1G$/m);
    assert.equal((await pairStatus(b, 'db')).recovery?.discardedBlocks, touched.size);
    // The dashboard shows both figures beside the phase.
    const [row] = (await renderDashboard(b.url)).tables.pairs ?? [];
    assert.equal(row?.[11], `resynced, ${touched.size} blocks not taken over, ${touched.size} blocks discarded (snapshot ferry-discarded-g2)`);
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('sites listening on every address: the other site reaches them where their connections come from, or at --advertise, also after they move', async () => {
  // A listens on 0.0.0.0 (reachable at 127.0.0.1 and 127.0.0.5 alike); B only on 127.0.0.1.
  const [a, b] = await Promise.all([TestSite.create('wild-a', { listenHost: '0.0.0.0' }), TestSite.create('wild-b')]);
  try {
    const size = 8 * MiB;
    const image = Buffer.alloc(size);
    await startPair(a, b, size, image);
    // A says it is at http://0.0.0.0:PORT, which means nothing at another site: B uses the
    // address A's connection came from.
    assert.equal((await pairStatus(b, 'db')).peer, `http://127.0.0.1:${a.port}`);

    // A moves (here: advertises another address it answers at); B learns it from A's next session.
    a.advertise = `http://127.0.0.5:${a.port}`;
    await a.restart();
    assert.equal((await a.api<{ url: string }>('GET', '/api/v1/site')).body.url, a.advertise);
    await writeApi(a, image, 5);
    await waitInSync(a, b, 'db');
    await waitFor('B to note where A is now', async () => (await pairStatus(b, 'db')).peer === a.advertise, 10_000);

    // A failover at B reaches A there: A is fenced, and the cycle completes.
    const fo = await b.cli(['failover', 'db', '--json']);
    assert.equal(fo.code, 0, fo.stderr);
    assert.equal((JSON.parse(fo.stdout) as { sourceFenced: boolean }).sourceFenced, true);
    assert.equal(await recoveryPhase(a), 'fenced');
    await writeApi(b, image, 5);
    assert.equal((await b.cli(['resync', 'db'])).code, 0);
    await waitResynced(b, a);
    const fb = await b.cli(['failback', 'db']);
    assert.equal(fb.code, 0, fb.stderr);
    // Back at A, whose peer is B where B answers; B's peer is A as advertised.
    const [sa, sb] = [await pairStatus(a, 'db'), await pairStatus(b, 'db')];
    assert.deepEqual([sa.role, sa.peer, sb.role, sb.peer], ['source', b.url, 'target', a.advertise]);
    await writeApi(a, image, 5);
    await waitInSync(a, b, 'db');
    assert.equal(await a.digest('db'), sha(image));
    assert.equal(await b.digest('db'), sha(image));
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('a failback the other site would refuse changes nothing here: hosts keep writing', async () => {
  const [a, b] = await sites('refused');
  try {
    const size = 16 * MiB;
    const image = Buffer.alloc(size);
    await startPair(a, b, size, image);
    // The pair is ended at the target; the source has not noticed yet (still duplex).
    assert.equal((await b.cli(['replicate', 'stop', 'db'])).code, 0);
    assert.equal((await pairStatus(a, 'db')).state, 'duplex');
    const fb = await a.cli(['failback', 'db']);
    assert.notEqual(fb.code, 0);
    assert.match(fb.stderr, /no replication pair/);
    const st = await pairStatus(a, 'db');
    assert.equal(st.role, 'source');
    assert.equal(st.recovery?.phase, undefined, 'no failback is left in progress');
    const vol = await a.api<{ access: string }>('GET', '/api/v1/volumes/db');
    assert.equal(vol.body.access, 'read-write');
    await writeApi(a, image, 5);
    assert.equal(await a.digest('db'), sha(image));
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('a resize the source\'s disk refused finishes when run again; one left unfinished when the source is lost is finished by the resync, which grows the old source', async () => {
  const [a, b] = await sites('grow');
  try {
    const MiB16 = 16 * MiB;
    const image = Buffer.alloc(MiB16);
    a.fileSizeLimit = 4096 * MiB;
    await a.restart();
    await startPair(a, b, MiB16, image);
    const size = async (site: TestSite): Promise<number> => (await site.api<{ sizeBytes: number }>('GET', '/api/v1/volumes/db')).body.sizeBytes;
    /** A resize to `bytes` that B takes and A's disk refuses (its files may not grow past 20 MiB). */
    const refusedAtSource = async (bytes: string): Promise<void> => {
      await execFileP('prlimit', ['--pid', String(a.proc?.pid), `--fsize=${20 * MiB}:unlimited`]);
      const r = await a.cli(['volume', 'resize', 'db', '--size', bytes]);
      await execFileP('prlimit', ['--pid', String(a.proc?.pid), '--fsize=unlimited:unlimited']);
      assert.notEqual(r.code, 0);
      assert.match(r.stderr, /EFBIG|too large/i);
    };
    await refusedAtSource('32M');
    assert.deepEqual([await size(a), await size(b)], [MiB16, 32 * MiB]);
    // Status says what is left to do, here and after a restart (from the target's answer).
    for (const restart of [false, true]) {
      if (restart) await a.restart();
      await waitFor('the unfinished resize in status', async () => {
        const st = await pairStatus(a, 'db');
        return st.health === 'warning' && /a resize did not finish here; run "ferry volume resize db --size 33554432" again/.test(st.reason);
      }, 30_000);
    }
    assert.equal((await a.cli(['volume', 'resize', 'db', '--size', '32M'])).code, 0, 'run again, it finishes');
    assert.deepEqual([await size(a), await size(b)], [32 * MiB, 32 * MiB]);
    assert.equal((await pairStatus(a, 'db')).health, 'ok');
    const grown = Buffer.alloc(48 * MiB);
    image.copy(grown);
    await waitInSync(a, b, 'db');

    // Again, and this time A is lost before the resize is run again.
    await refusedAtSource('48M');
    await a.kill('SIGKILL');
    const fo = await b.cli(['failover', 'db']);
    assert.equal(fo.code, 0, fo.stderr);
    const late = randomBytes(4 * MiB);
    await b.writeData('db', 40 * MiB, late);
    late.copy(grown, 40 * MiB);
    a.fileSizeLimit = undefined;
    await a.start();
    await waitFor('old source fenced', async () => (await recoveryPhase(a)) === 'fenced', 30_000);
    const rs = await b.cli(['resync', 'db']);
    assert.equal(rs.code, 0, rs.stderr);
    const sb = await waitResynced(b, a);
    assert.equal(sb.recovery?.fullCopy, false);
    assert.equal(await size(a), 48 * MiB);
    assert.equal(await a.digest('db'), sha(grown));
    assert.ok(a.logs.some((l) => l.msg === 'the volume grew at the other site and not here: grown to match before the resync'));
    assert.equal((await b.cli(['failback', 'db'])).code, 0);
    await writesReplicate(a, b, grown, 10);
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('a DR test without failing over: a qcow2 overlay on a snapshot of the replica boots and writes while replication goes on untouched', async () => {
  const [a, b] = await sites('drill');
  const overlay = join(b.dir, 'drill.qcow2');
  try {
    const size = 16 * MiB;
    const image = Buffer.alloc(size);
    await startPair(a, b, size, image);
    const snap = await b.cli(['snapshot', 'create', 'db', '--name', 'drill', '--json']);
    assert.equal(snap.code, 0, snap.stderr);
    const atSnapshot = Buffer.from(image);
    const base = `nbd://127.0.0.1:${b.nbdPort}/db@drill`;
    await execFileP('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', overlay]);
    // The test system writes into its overlay while production writes go on at A.
    await execFileP('qemu-io', ['-f', 'qcow2', '-c', `write -P 0xd7 ${4 * MiB} ${MiB}`, overlay]);
    await writeApi(a, image, 20);
    await waitInSync(a, b, 'db');
    assert.equal(await b.digest('db'), sha(image), 'the replica follows the source');
    assert.equal((await pairStatus(b, 'db')).health, 'ok');
    // The overlay reads the snapshot's image where it was not written, its own writes elsewhere.
    const read = join(b.dir, 'drill.raw');
    await execFileP('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', overlay, read]);
    const expected = Buffer.from(atSnapshot);
    expected.fill(0xd7, 4 * MiB, 5 * MiB);
    assert.equal(createHash('sha256').update(await readFile(read)).digest('hex'), sha(expected));
    assert.equal((await b.api<{ sha256: string }>('GET', '/api/v1/volumes/db/snapshots/drill/digest')).body.sha256, sha(atSnapshot), 'the snapshot is untouched');
    // The drill ends: the overlay goes, then the snapshot; the pair never left duplex.
    await rm(overlay);
    assert.equal((await b.cli(['snapshot', 'delete', 'db', 'drill'])).code, 0);
    assert.equal((await pairStatus(a, 'db')).state, 'duplex');
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

/** A pair from A to B through `proxy`, whose failback is stuck at its hand-over (the proxy cuts the takeover request): A's hosts are held. */
async function stuckFailback(a: TestSite, b: TestSite, proxy: FaultProxy, size: number): Promise<Buffer> {
  const image = Buffer.alloc(size);
  await startPair(a, b, size, image, proxy.url);
  proxy.cutRequest = (frame) => {
    if (frame.type !== ReplFrame.RecoveryRequest) return false;
    const body = JSON.parse(frame.payload.toString()) as { op: string; check?: boolean };
    return body.op === 'takeover' && body.check !== true;
  };
  const fb = await a.cli(['failback', 'db']);
  assert.notEqual(fb.code, 0);
  assert.match(fb.stderr, /has not taken over.*retried/);
  return image;
}

test('a failback stuck at its hand-over says why (health error, hosts held read-only) and completes by itself once the other site answers', async () => {
  const [a, b] = await sites('fbstuck');
  // A reaches B through a proxy that can lose the hand-over request with its connection.
  const proxy = new FaultProxy(b.host, b.port, 5);
  await proxy.start();
  try {
    const image = await stuckFailback(a, b, proxy, 16 * MiB);
    assert.ok(proxy.cutRequests >= 1);
    // The hand-over keeps failing: status says so, as an error, while hosts are held.
    await new Promise((r) => setTimeout(r, 1500));
    const st = await pairStatus(a, 'db');
    assert.equal(st.recovery?.phase, 'failing-back');
    assert.equal(st.health, 'error');
    assert.match(st.reason, /failback to .* in progress; the other site has not taken over/);
    assert.ok(proxy.cutRequests >= 2, `the hand-over was retried (${proxy.cutRequests} requests cut)`);
    assert.equal((await a.api<{ access: string }>('GET', '/api/v1/volumes/db')).body.access, 'read-only');
    const attention = await a.cli(['status', '-x']);
    assert.equal(attention.code, 1);
    assert.match(attention.stdout, /has not taken over/);
    assert.equal((await pairStatus(b, 'db')).role, 'target');
    // The other site answers again: the failback completes with no one re-issuing it.
    proxy.cutRequest = undefined;
    await waitFor('failback done by itself', async () => (await pairStatus(a, 'db')).role === 'target', 30_000, 200);
    const nb = await pairStatus(b, 'db');
    assert.equal(nb.role, 'source');
    assert.equal(nb.health, 'ok');
    assert.equal((await pairStatus(a, 'db')).reason, '');
    assert.equal((await b.api<{ access: string }>('GET', '/api/v1/volumes/db')).body.access, 'read-write');
    assert.equal(await b.digest('db'), sha(image));
    await writesReplicate(b, a, image, 10);
  } finally {
    await proxy.close();
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('a failback whose hand-over answer is lost (the other site took over) completes: this site becomes the replica, not a fenced source', async () => {
  const [a, b] = await sites('fblost');
  const proxy = new FaultProxy(b.host, b.port, 17);
  await proxy.start();
  try {
    const size = 16 * MiB;
    const image = Buffer.alloc(size);
    await startPair(a, b, size, image, proxy.url);
    // B says it would take over, and takes over; that answer never reaches A, for a while.
    let replies = 0;
    proxy.dropReply = (frame) => frame.type === ReplFrame.RecoveryReply && ++replies > 1;
    const fb = await a.cli(['failback', 'db']);
    assert.notEqual(fb.code, 0);
    await waitFor('B to take over', async () => (await pairStatus(b, 'db')).role === 'source', 30_000);
    // Meanwhile A's replication hears of the newer generation at B.
    await new Promise((r) => setTimeout(r, 3000));
    proxy.dropReply = undefined;
    let last: PairStatus | undefined;
    await waitFor(() => `A to be the replica (A: ${JSON.stringify([last?.role, last?.recovery?.phase, last?.reason])})`, async () => (last = await pairStatus(a, 'db')).role === 'target', 30_000, 200);
    await writesReplicate(b, a, image, 10);
    assert.equal(await access(a), 'read-only');
  } finally {
    await proxy.close();
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('a resync whose answer from the old source is lost: the old source waits as a raw target, both sites say so, and the resync run again completes with no full copy', async () => {
  const [a, b] = await sites('rslost');
  // B reaches A through a proxy that can lose A's answers.
  const proxy = await advertisedProxy(a, 19);
  try {
    const size = 16 * MiB;
    const image = Buffer.alloc(size);
    await startPair(a, b, size, image);
    await writeApi(a, image, 5);
    await waitInSync(a, b, 'db');
    const fo = await b.cli(['failover', 'db']);
    assert.equal(fo.code, 0, fo.stderr);
    await waitFor('A fenced', async () => (await recoveryPhase(a)) === 'fenced', 30_000);
    await writeApi(b, image, 10);
    proxy.dropReply = (frame) => frame.type === ReplFrame.RecoveryReply;
    const rs = await b.cli(['resync', 'db']);
    assert.notEqual(rs.code, 0);
    proxy.dropReply = undefined;
    assert.match(rs.stderr, /no answer from rslost-a .*it may have started its part .*run "ferry resync db" again/);
    // A acted on it: a raw target being rebuilt. B took over and waits for the resync.
    const [sa, sb] = [await pairStatus(a, 'db'), await pairStatus(b, 'db')];
    assert.deepEqual([sa.role, sa.recovery?.phase, await access(a)], ['target', 'resync-target', 'raw']);
    assert.match(sa.reason, /being rebuilt from rslost-b/);
    assert.deepEqual([sb.role, sb.recovery?.phase, await access(b)], ['source', 'failed-over', 'read-write']);
    const again = await b.cli(['resync', 'db']);
    assert.equal(again.code, 0, again.stderr);
    const done = await waitResynced(b, a);
    assert.equal(done.recovery?.fullCopy, false);
    assert.equal(await a.digest('db'), sha(image));
  } finally {
    await proxy.close();
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('SIGKILL of either site while a failover --sync or a failback holds the source\'s hosts: hosts write again (at once if the target died), and the command run again completes', async () => {
  const [a, b] = await sites('held');
  // A's delta sets reach B through a proxy that stalls them, so hosts stay held long enough to kill a site then.
  const proxy = new FaultProxy(b.host, b.port, 9);
  await proxy.start();
  const slow = { ...noFaults, stallProbability: 1, stallMs: 300 };
  /** Runs `command`, SIGKILLs `victim` once A holds its hosts (read-only); returns how long the command took after the kill. */
  const killWhileHeld = async (command: () => Promise<{ code: number | null; stderr: string }>, victim: TestSite): Promise<{ stderr: string; afterKillMs: number }> => {
    proxy.plan = slow;
    let ended = '';
    const run = command().then((r) => {
      ended = `it ended first: exit ${r.code}, ${r.stderr}`;
      return r;
    });
    await waitFor('A to hold its hosts', async () => ended !== '' || (await access(a)) === 'read-only', 30_000, 5);
    assert.equal(ended, '', 'the site is killed while A holds its hosts');
    await victim.kill('SIGKILL');
    const killed = Date.now();
    proxy.plan = noFaults;
    const r = await run;
    assert.notEqual(r.code, 0);
    return { stderr: r.stderr, afterKillMs: Date.now() - killed };
  };
  try {
    const size = 16 * MiB;
    const image = Buffer.alloc(size);
    await startPair(a, b, size, image, proxy.url);
    // No cut comes by itself: each command's last delta set holds the writes made before
    // it, so there is something to wait for while A holds its hosts and a site is killed.
    assert.equal((await a.cli(['replicate', 'set', 'db', '--interval', '1h'])).code, 0);

    // failover --sync at B: A holds its hosts for the last delta set and dies before it is shipped.
    await writeApi(a, image, 5);
    await killWhileHeld(() => b.cli(['failover', 'db', '--sync']), a);
    await a.start();
    let sa = await pairStatus(a, 'db');
    assert.deepEqual([sa.role, sa.recovery?.phase], ['source', undefined]);
    assert.equal(await access(a), 'read-write', 'hosts at the source are given back their writes');
    assert.deepEqual([(await pairStatus(b, 'db')).role, (await pairStatus(b, 'db')).recovery?.phase], ['target', undefined], 'the failover changed nothing at B');
    await writeNbd(a, image, 5);
    await waitInSync(a, b, 'db');
    assert.equal(await b.digest('db'), sha(image));

    // failback at A (a planned switchover): A dies with its hosts held, before the hand-over.
    await writeApi(a, image, 5);
    await killWhileHeld(() => a.cli(['failback', 'db']), a);
    await a.start();
    sa = await pairStatus(a, 'db');
    assert.deepEqual([sa.role, sa.recovery?.phase], ['source', undefined]);
    assert.equal(await access(a), 'read-write');
    assert.ok(a.logs.some((l) => /hosts may write again/.test(String(l.msg))), 'the restart says why access changed');
    await writeNbd(a, image, 5);
    await waitInSync(a, b, 'db');
    assert.equal(await b.digest('db'), sha(image));

    // failback at A, and B dies while A's hosts wait for it: they are given back once the link is
    // counted failed, not after the two-minute catch-up limit.
    await writeApi(a, image, 5);
    const lost = await killWhileHeld(() => a.cli(['failback', 'db']), b);
    assert.match(lost.stderr, /the other site was lost before it caught up: target unreachable/);
    assert.ok(lost.afterKillMs < 30_000, `hosts were held ${lost.afterKillMs} ms after the target died`);
    assert.equal(await access(a), 'read-write');
    assert.deepEqual([(await pairStatus(a, 'db')).role, (await pairStatus(a, 'db')).recovery?.phase], ['source', undefined]);
    await writeApi(a, image, 5);
    await b.start();
    await waitInSync(a, b, 'db');
    assert.equal(await b.digest('db'), sha(image));

    const fb = await a.cli(['failback', 'db']);
    assert.equal(fb.code, 0, fb.stderr);
    assert.equal((await pairStatus(b, 'db')).role, 'source');
    assert.equal(await b.digest('db'), sha(image));
    await writesReplicate(b, a, image, 5);
  } finally {
    await proxy.close();
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('a failover that comes while a failover --sync holds the source\'s hosts for its last delta set: a second fence waits its turn, and the source, fenced by the new generation, keeps its hosts held', async () => {
  const [a, b] = await sites('fencerace');
  // B reaches A through one proxy (its requests can be cut), A reaches B through another (its acknowledgements can be lost).
  const toA = await advertisedProxy(a, 23);
  const toB = new FaultProxy(b.host, b.port, 29);
  await toB.start();
  try {
    const size = 16 * MiB;
    const image = Buffer.alloc(size);
    await startPair(a, b, size, image, toB.url);
    // A's delta sets from now on cannot be acknowledged (on connections made from now on): the first
    // failover --sync holds A's hosts and waits.
    toB.dropReply = (frame) => frame.type === ReplFrame.Ack;
    toB.dropAll();
    await writeApi(a, image, 20);
    await waitFor('A to send again', async () => (await pairStatus(a, 'db')).connected, 30_000, 50);
    const first = b.cli(['failover', 'db', '--sync']);
    await waitFor('A to hold its hosts', async () => (await access(a)) === 'read-only', 30_000, 20);
    // B's request is lost with its connection: the command fails at B, while A still waits for its delta set.
    toA.dropAll();
    const r = await first;
    assert.notEqual(r.code, 0);
    assert.deepEqual([await recoveryPhase(a), await access(a)], [undefined, 'read-only'], 'A is still the source, shipping its last delta set');
    // Run again, it waits its turn at A: nothing else holds or gives back A's hosts meanwhile.
    const second = await b.cli(['failover', 'db', '--sync']);
    assert.notEqual(second.code, 0);
    assert.match(second.stderr, /a role change of db is in progress at fencerace-a; try again/);
    // The operator gives up on --sync: B takes over at what it has. A learns of generation 2 from B's
    // refusals and is fenced; its first request's delta set then fails, and its hosts stay held.
    const plain = await b.cli(['failover', 'db']);
    assert.equal(plain.code, 0, plain.stderr);
    await waitFor('A fenced', async () => (await recoveryPhase(a)) === 'fenced', 60_000, 100);
    const heldStays = (): boolean => a.logs.some((l) => /fenced meanwhile: hosts stay read-only/.test(String(l.msg)));
    await waitFor("the first request's end at A", async () => heldStays() || (await access(a)) === 'read-write', 60_000, 100);
    assert.equal(await access(a), 'read-only', 'a fenced copy must not take writes: B is the source');
    assert.ok(heldStays(), 'A says why its hosts stay held');
    // The resync rebuilds A from B, keeping what A had that B did not in a snapshot.
    toB.dropReply = undefined;
    await writeApi(b, image, 5);
    const rs = await b.cli(['resync', 'db']);
    assert.equal(rs.code, 0, rs.stderr);
    const done = await waitResynced(b, a);
    assert.equal(done.recovery?.fullCopy, false);
    assert.equal(await a.digest('db'), await b.digest('db'));
  } finally {
    await Promise.all([toA.close(), toB.close()]);
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('a failover --sync that stops after fencing the source (its answer lost): the source takes writes again by itself; run again, the failover completes and the source stays fenced', async () => {
  const [a, b] = await sites('unfence');
  // B reaches A through a proxy that can lose A's answers.
  const proxy = await advertisedProxy(a, 11);
  try {
    const size = 16 * MiB;
    const image = Buffer.alloc(size);
    await startPair(a, b, size, image);
    assert.equal((await pairStatus(b, 'db')).peer, proxy.url);
    await writeApi(a, image, 5);

    proxy.dropReply = (frame) => frame.type === ReplFrame.RecoveryReply;
    const fo = await b.cli(['failover', 'db', '--sync']);
    assert.notEqual(fo.code, 0);
    assert.ok(proxy.droppedReplies >= 1);
    proxy.dropReply = undefined;
    // A shipped its last writes and fenced itself; B never switched: no site takes writes.
    const sb = await pairStatus(b, 'db');
    assert.deepEqual([sb.role, sb.recovery?.phase, await access(b)], ['target', undefined, 'read-only']);
    assert.equal(await recoveryPhase(a), 'fenced');
    assert.equal(await access(a), 'read-only');
    // A asks B where the pair stands, sees no one took over, and is the source again.
    const fenced = Date.now();
    await waitFor('A to take writes again', async () => (await access(a)) === 'read-write', 30_000, 100);
    const tookMs = Date.now() - fenced;
    const sa = await pairStatus(a, 'db');
    assert.deepEqual([sa.role, sa.recovery?.phase, sa.generation], ['source', undefined, 1]);
    assert.ok(a.logs.some((l) => /the failover that fenced this volume did not happen/.test(String(l.msg))), 'A says why it takes writes again');
    assert.ok(tookMs < 15_000, `A took writes again ${tookMs} ms after the failover stopped`);
    await writeNbd(a, image, 5);
    await waitInSync(a, b, 'db');
    assert.equal(await b.digest('db'), sha(image));

    // Run again, the failover completes and loses nothing; A stays fenced (B took over).
    const again = await b.cli(['failover', 'db', '--sync']);
    assert.equal(again.code, 0, again.stderr);
    assert.equal((await pairStatus(b, 'db')).role, 'source');
    assert.equal(await b.digest('db'), sha(image));
    await new Promise((r) => setTimeout(r, 7_000));
    assert.equal(await recoveryPhase(a), 'fenced');
    assert.equal(await access(a), 'read-only');
    await writeApi(b, image, 5);
    assert.equal((await b.cli(['resync', 'db'])).code, 0);
    await waitResynced(b, a);
    assert.equal(await a.digest('db'), sha(image));
  } finally {
    await proxy.close();
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('a failback stuck at its hand-over whose pair is then stopped at the other site is abandoned: hosts write again here, status says the other site has no pair', async () => {
  const [a, b] = await sites('fbgone');
  const proxy = new FaultProxy(b.host, b.port, 13);
  await proxy.start();
  try {
    const image = await stuckFailback(a, b, proxy, 16 * MiB);
    assert.equal(await recoveryPhase(a), 'failing-back');
    assert.equal(await access(a), 'read-only');
    // The pair is ended at B while A's hosts are held: B can never take over.
    assert.equal((await b.cli(['replicate', 'stop', 'db'])).code, 0);
    proxy.cutRequest = undefined;
    await waitFor('A to give its hosts back', async () => (await access(a)) === 'read-write', 30_000, 100);
    const sa = await pairStatus(a, 'db');
    assert.deepEqual([sa.role, sa.recovery?.phase], ['source', undefined]);
    assert.ok(a.logs.some((l) => /failback abandoned/.test(String(l.msg))), 'the site says it gave up');
    await waitFor('A to say B has no pair', async () => /no replication pair/.test((await pairStatus(a, 'db')).reason), 30_000);
    assert.notEqual((await pairStatus(a, 'db')).health, 'ok');
    await writeNbd(a, image, 5);
    assert.equal(await a.digest('db'), sha(image));
    const again = await a.cli(['failback', 'db']);
    assert.notEqual(again.code, 0);
    assert.equal(await access(a), 'read-write');
  } finally {
    await proxy.close();
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('a failback stuck at its hand-over while the other site takes over by a failover of its own: this site is fenced, not made a replica of a source that waits for a resync, and the resync from there completes', async () => {
  const [a, b] = await sites('fbovertaken');
  const proxy = new FaultProxy(b.host, b.port, 31);
  await proxy.start();
  try {
    const image = await stuckFailback(a, b, proxy, 16 * MiB);
    assert.equal(await recoveryPhase(a), 'failing-back');
    // B's operator fails over instead: B is the source at the generation the failback would have made.
    const fo = await b.cli(['failover', 'db']);
    assert.equal(fo.code, 0, fo.stderr);
    const sb = await pairStatus(b, 'db');
    assert.deepEqual([sb.role, sb.generation, sb.recovery?.phase], ['source', 2, 'failed-over']);
    await writeApi(b, image, 10);
    // The hand-over reaches B now: refused, B did not take over by it. A is fenced, hosts still held.
    proxy.cutRequest = undefined;
    await waitFor('A fenced', async () => (await recoveryPhase(a)) === 'fenced', 30_000, 100);
    const sa = await pairStatus(a, 'db');
    assert.deepEqual([sa.role, await access(a)], ['source', 'read-only']);
    assert.match(sa.reason, /resync/);
    assert.ok(a.logs.some((l) => /failback overtaken/.test(String(l.msg))), 'A says why');
    const again = await a.cli(['failback', 'db']);
    assert.notEqual(again.code, 0);
    assert.equal(await access(a), 'read-only');
    // The resync from B rebuilds A with no full copy: A had shipped everything before its hosts were held.
    const rs = await b.cli(['resync', 'db']);
    assert.equal(rs.code, 0, rs.stderr);
    const done = await waitResynced(b, a);
    assert.equal(done.recovery?.fullCopy, false);
    assert.equal(done.recovery?.discardedBlocks ?? 0, 0, 'nothing of A\'s is discarded');
    assert.equal(await b.digest('db'), sha(image));
    assert.equal(await a.digest('db'), sha(image));
  } finally {
    await proxy.close();
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('a resync the old source could not start (its disk failing) is re-issued once the cause is cleared, and completes', async () => {
  const [a, b] = await sites('rsdisk');
  try {
    const size = 16 * MiB;
    const image = Buffer.alloc(size);
    a.fileSizeLimit = 4096 * MiB;
    await a.restart();
    await startPair(a, b, size, image);
    const fo = await b.cli(['failover', 'db']);
    assert.equal(fo.code, 0, fo.stderr);
    await writeApi(b, image, 10);
    // A cannot create the save volume of its new role (1 GiB) while its files may not grow past 24 MiB.
    await execFileP('prlimit', ['--pid', String(a.proc?.pid), `--fsize=${24 * MiB}:unlimited`]);
    const refused = await b.cli(['resync', 'db']);
    assert.notEqual(refused.code, 0);
    assert.match(refused.stderr, /EFBIG/);
    await execFileP('prlimit', ['--pid', String(a.proc?.pid), '--fsize=unlimited:unlimited']);
    const again = await b.cli(['resync', 'db']);
    assert.equal(again.code, 0, again.stderr);
    const sb = await waitResynced(b, a);
    assert.equal(sb.recovery?.fullCopy, false);
    assert.equal(await a.digest('db'), sha(image));
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('a replica whose playback fails: a failback to it and a failover at it stop at once and change nothing; run again once the cause is cleared, the failover loses nothing', async () => {
  const [a, b] = await sites('fodisk');
  try {
    const size = 16 * MiB;
    const image = Buffer.alloc(size);
    b.fileSizeLimit = 4096 * MiB;
    await b.restart();
    await startPair(a, b, size, image);
    // B receives a delta set into its save volume but cannot write it into the volume's last MiBs.
    await execFileP('prlimit', ['--pid', String(b.proc?.pid), `--fsize=${10 * MiB}:unlimited`]);
    const data = randomBytes(512 * 1024);
    await a.writeData('db', 14 * MiB, data);
    data.copy(image, 14 * MiB);
    await a.api('POST', '/api/v1/replication/db/delta');
    const created = (await pairStatus(a, 'db')).deltaSetCreated;
    await waitFor('delta set received, playback failing', async () => {
      const s = await pairStatus(b, 'db');
      return s.deltaSetReceived >= created && /playback of delta set .* failed/.test(s.failing);
    }, 30_000);
    // A failback to B is refused before A's hosts are held.
    const fb = await a.cli(['failback', 'db']);
    assert.notEqual(fb.code, 0);
    assert.match(fb.stderr, /cannot take over now: playback of delta set \d+ failed.*EFBIG/);
    const started = Date.now();
    const fo = await b.cli(['failover', 'db']);
    assert.notEqual(fo.code, 0);
    assert.ok(Date.now() - started < 30_000, `the failover took ${Date.now() - started} ms to fail`);
    assert.match(fo.stderr, /nothing was changed: playback of delta set \d+ failed.*EFBIG/);
    assert.match(fo.stderr, /ferry failover db --now/);
    // Nothing changed at either site: B is still the read-only target, A the writable source, not fenced.
    const sb = await pairStatus(b, 'db');
    assert.equal(sb.role, 'target');
    assert.equal(sb.recovery?.phase, undefined);
    assert.equal((await b.api<{ access: string }>('GET', '/api/v1/volumes/db')).body.access, 'read-only');
    const sa = await pairStatus(a, 'db');
    assert.equal(sa.role, 'source');
    assert.equal(sa.recovery?.phase, undefined, 'the source was not fenced');
    assert.equal((await a.api<{ access: string }>('GET', '/api/v1/volumes/db')).body.access, 'read-write');
    // Once B's files may grow again, the same failover completes with every received write.
    await execFileP('prlimit', ['--pid', String(b.proc?.pid), '--fsize=unlimited:unlimited']);
    const again = await b.cli(['failover', 'db', '--json']);
    assert.equal(again.code, 0, again.stderr);
    assert.equal(JSON.parse(again.stdout).skippedDeltaSets, 0);
    assert.equal(await b.digest('db'), sha(image));
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('a failover that cannot keep its restart point (the volume has the most snapshots it may have) changes nothing; with one deleted it completes', async () => {
  const [a, b] = await sites('folimit');
  try {
    const size = 16 * MiB;
    const image = Buffer.alloc(size);
    await startPair(a, b, size, image);
    // Backups taken at the replica, never pruned.
    for (let n = 0; ; n++) {
      const r = await b.api<{ error?: { code: string } }>('POST', '/api/v1/volumes/db/snapshots', { name: `backup-${n}` });
      if (r.status === 201) continue;
      assert.equal(r.body.error?.code, 'SNAPSHOT_LIMIT');
      break;
    }
    const fo = await b.cli(['failover', 'db']);
    assert.notEqual(fo.code, 0);
    assert.match(fo.stderr, /SNAPSHOT_LIMIT: failover of db keeps a restart-point snapshot, and the volume has \d+ snapshots, the most it may have: delete one and run it again; nothing was changed/);
    // Nothing changed: A is the writable source and replicates to B as before.
    assert.equal((await pairStatus(a, 'db')).recovery?.phase, undefined);
    assert.equal((await pairStatus(b, 'db')).role, 'target');
    await writesReplicate(a, b, image, 10);
    assert.equal((await b.cli(['snapshot', 'delete', 'db', 'backup-0'])).code, 0);
    const again = await b.cli(['failover', 'db', '--json']);
    assert.equal(again.code, 0, again.stderr);
    assert.equal(JSON.parse(again.stdout).sourceFenced, true);
    assert.equal(await b.digest('db'), sha(image));
    assert.equal((await a.api<{ access: string }>('GET', '/api/v1/volumes/db')).body.access, 'read-only');

    // At the limit again (the restart point took the freed place): a resync either way is
    // refused before anything changes at either site, and runs once one is deleted.
    const bImage = Buffer.from(image);
    await writeApi(b, bImage, 10);
    const rs = await b.cli(['resync', 'db']);
    assert.notEqual(rs.code, 0);
    assert.match(rs.stderr, /SNAPSHOT_LIMIT: resync of db takes an intermediate snapshot here, and the volume has \d+ snapshots, the most it may have: delete one and run it again; nothing was changed/);
    const rv = await a.cli(['resync', 'db', '--reverse']);
    assert.notEqual(rv.code, 0);
    assert.match(rv.stderr, /SNAPSHOT_LIMIT: .*keeps its writes since the failover in a snapshot.*nothing was changed/);
    assert.deepEqual([await recoveryPhase(a), await access(a), await recoveryPhase(b), await access(b)], ['fenced', 'read-only', 'failed-over', 'read-write']);
    assert.equal((await b.cli(['snapshot', 'delete', 'db', 'backup-1'])).code, 0);
    assert.equal((await b.cli(['resync', 'db'])).code, 0);
    await waitResynced(b, a);
    assert.equal(await a.digest('db'), sha(bImage));
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

/**
 * A pair whose source is lost with its save volume: A makes two delta sets B never gets,
 * is killed, its save volume deleted; B takes over and writes; A returns, fenced.
 * Returns A's image (its writes kept on disk) and B's.
 */
async function failoverLosingSaveVolume(a: TestSite, b: TestSite, size: number): Promise<{ aImage: Buffer; bImage: Buffer }> {
  const image = Buffer.alloc(size);
  await startPair(a, b, size, image);
  const restart = Buffer.from(image);
  await unshippedDeltaSets(a, image, 2, new Set());
  const volumeId = (await a.api<{ id: string }>('GET', '/api/v1/volumes/db')).body.id;
  await a.kill('SIGKILL');
  // The disaster took the old source's save volume with it.
  await rm(join(a.dir, 'replication', volumeId, 'save.journal'), { force: true });
  assert.equal((await b.cli(['failover', 'db'])).code, 0);
  const bImage = Buffer.from(restart);
  await writeApi(b, bImage, 10);
  await a.start();
  await waitFor('old source fenced', async () => (await recoveryPhase(a)) === 'fenced', 30_000);
  return { aImage: image, bImage };
}

test('resync falls back to a full copy, with a warning and a status flag, when the old save volume is gone', async () => {
  const [a, b] = await sites('fallback');
  try {
    const { bImage } = await failoverLosingSaveVolume(a, b, 32 * MiB);
    assert.equal((await b.cli(['resync', 'db'])).code, 0);
    await writeApi(b, bImage, 10);
    const sb = await waitResynced(b, a);
    assert.equal(sb.recovery?.fullCopy, true);
    assert.match(sb.recovery?.fullCopyReason ?? '', /save volume/);
    assert.ok(b.logs.some((l) => /FULL COPY/.test(String(l.msg))), 'a full copy is announced in the log');
    assert.equal(await a.digest('db'), sha(bImage));
    assert.equal(await b.digest('db'), sha(bImage));
    assert.ok(sb.recovery?.discardSnapshot, 'the old source was snapshotted before being overwritten');
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('the old source moves during a full-copy resync: set-peer at the new source, and the copy carries on at the new address', async () => {
  const [a, b] = await sites('fbmove');
  // A is reached through a proxy at first (it advertises the proxy's URL): its "old address".
  const proxy = await advertisedProxy(a, 11);
  try {
    const size = 32 * MiB;
    const image = Buffer.alloc(size);
    await startPair(a, b, size, image);
    assert.equal((await pairStatus(b, 'db')).peer, proxy.url);
    await unshippedDeltaSets(a, image, 2, new Set());
    const volumeId = (await a.api<{ id: string }>('GET', '/api/v1/volumes/db')).body.id;
    await a.kill('SIGKILL');
    await rm(join(a.dir, 'replication', volumeId, 'save.journal'), { force: true });
    assert.equal((await b.cli(['failover', 'db'])).code, 0);
    await writeApi(b, Buffer.from(image), 10);
    await a.start();
    await waitFor('old source fenced', async () => (await recoveryPhase(a)) === 'fenced', 30_000);
    // The old address is slow past each connection's first MiB (the resync's request and
    // answer pass), then gone: the full copy is under way there when A moves.
    proxy.plan = { ...noFaults, cleanBytes: MiB, stallProbability: 1, stallMs: 100 };
    assert.equal((await b.cli(['resync', 'db'])).code, 0);
    await waitFor('the full copy to be under way', async () => (await pairStatus(b, 'db')).recovery?.phase === 'resync-full', 10_000);
    await proxy.close();
    // The copy cannot go on, and status says so.
    const stuck = await waitFor('B to say the copy is not moving', async () => {
      const s = await pairStatus(b, 'db');
      return /the copy is not moving/.test(s.failing) ? s : undefined;
    }, 30_000);
    assert.equal(stuck.health, 'error');
    assert.equal(stuck.connected, false);
    assert.ok(stuck.retries >= 3);
    assert.ok(stuck.initialCopy.percent < 100);
    const moved = await b.cli(['replicate', 'set-peer', 'db', '--to', a.url]);
    assert.equal(moved.code, 0, moved.stderr);
    const sb = await waitResynced(b, a);
    assert.equal(sb.recovery?.fullCopy, true);
    assert.equal(sb.peer, a.url);
    assert.equal(await a.digest('db'), await b.digest('db'));
  } finally {
    await proxy.close();
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('SIGKILL of either site during resync and during failback: it resumes, correct result, no full copy', async () => {
  const [a, b] = await sites('crash');
  try {
    const size = 64 * MiB;
    const image = Buffer.alloc(size);
    await startPair(a, b, size, image);
    const restart = Buffer.from(image);
    const aTouched = new Set<number>();
    await unshippedDeltaSets(a, image, 2, aTouched);
    await a.kill('SIGKILL');
    assert.equal((await b.cli(['failover', 'db'])).code, 0);
    // Many changes at B, so the resync copy takes a while.
    const bImage = Buffer.from(restart);
    assert.equal(await b.digest('db'), sha(bImage));
    for (let i = 0; i < 40; i++) {
      const w = { offset: i * MiB, data: randomBytes(512 * 1024) };
      await b.writeData('db', w.offset, w.data);
      w.data.copy(bImage, w.offset);
    }
    // With the old source still down, a resync fails cleanly and leaves nothing behind
    // (the intermediate point it took meanwhile is dropped).
    const early = await b.cli(['resync', 'db']);
    assert.notEqual(early.code, 0, 'resync with the old source down must fail');
    assert.equal(await recoveryPhase(b), 'failed-over');
    const snaps = (await b.api<{ name: string }[]>('GET', '/api/v1/volumes/db/snapshots')).body.map((s) => s.name);
    assert.ok(!snaps.some((n) => n.startsWith('ferry-resync')), `snapshots left: ${snaps.join(', ')}`);
    await a.start();
    await waitFor('old source fenced', async () => (await recoveryPhase(a)) === 'fenced', 30_000);
    assert.equal((await b.cli(['resync', 'db'])).code, 0);
    // Kill the old source mid-copy, then the new source, and let both come back.
    await waitFor('copy under way', async () => (await pairStatus(b, 'db')).initialCopy.copiedBlocks > 0, 30_000, 20);
    await a.kill('SIGKILL');
    await writeApi(b, bImage, 5);
    await a.start();
    await b.kill('SIGKILL');
    await b.start();
    await writeApi(b, bImage, 5);
    const sb = await waitResynced(b, a);
    assert.equal(sb.recovery?.fullCopy, false);
    assert.ok(sb.initialCopy.bytes <= 48 * MiB, `resync copied ${sb.initialCopy.bytes} bytes`);
    assert.equal(await a.digest('db'), sha(bImage));

    // Failback interrupted by a SIGKILL of the old source during the hand-over: re-issued, it completes.
    await writeApi(b, bImage, 10);
    const fb = b.cli(['failback', 'db']);
    await new Promise((r) => setTimeout(r, 50 + Math.random() * 200));
    await a.kill('SIGKILL');
    await a.start();
    await fb;
    await waitFor('failback done', async () => {
      const s = await pairStatus(a, 'db');
      if (s.role === 'source') return true;
      await b.cli(['failback', 'db']);
      return false;
    }, 60_000, 500);
    assert.equal((await pairStatus(b, 'db')).role, 'target');
    assert.equal(await a.digest('db'), sha(bImage));
    await writesReplicate(a, b, bImage, 10);
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('resync sends only the blocks that differ: copy bytes within 1.1x of the differing blocks', async () => {
  const [a, b] = await sites('bytes');
  try {
    const size = 64 * MiB;
    const image = await startFullPair(a, b, size);
    const restart = Buffer.from(image);
    // The old source writes after the restart point: delta sets never shipped, and unsent changes.
    await unshippedDeltaSets(a, image, 2, new Set());
    await writeApi(a, image, 20);
    const aImage = Buffer.from(image);
    // Failover with the old source up (a partition healed, say): it is fenced cleanly.
    const fo = await b.cli(['failover', 'db', '--json']);
    assert.equal(fo.code, 0, fo.stderr);
    assert.equal((JSON.parse(fo.stdout) as { sourceFenced: boolean }).sourceFenced, true);
    assert.equal(await recoveryPhase(a), 'fenced');
    const bImage = Buffer.from(restart);
    await writeApi(b, bImage, 40);
    let differ = 0;
    for (let blk = 0; blk < size / bs; blk++) if (!aImage.subarray(blk * bs, (blk + 1) * bs).equals(bImage.subarray(blk * bs, (blk + 1) * bs))) differ++;
    assert.equal((await b.cli(['resync', 'db'])).code, 0);
    const sb = await waitResynced(b, a);
    assert.equal(await a.digest('db'), sha(bImage));
    assert.equal(sb.recovery?.fullCopy, false);
    const ratio = sb.initialCopy.bytes / (differ * bs);
    assert.ok(ratio >= 1 && ratio <= 1.1, `resync copied ${sb.initialCopy.bytes} bytes for ${differ} differing blocks (ratio ${ratio.toFixed(3)})`);
    const blocksRatio = (sb.recovery?.resyncBlocks ?? 0) / differ;
    assert.ok(blocksRatio >= 1 && blocksRatio <= 1.1, `resync planned ${sb.recovery?.resyncBlocks} blocks for ${differ} differing`);
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('resync --reverse at the old source keeps its data: the site that took over is rebuilt from it, only the blocks that differ, its own writes kept in a snapshot there', async () => {
  const [a, b] = await sites('reverse');
  try {
    const size = 32 * MiB;
    const image = await startFullPair(a, b, size);
    const restart = Buffer.from(image);
    // The old source writes after the restart point: delta sets never shipped, and unsent changes.
    const aTouched = new Set<number>();
    await unshippedDeltaSets(a, image, 2, aTouched);
    await writeApi(a, image, 10, aTouched);
    const aImage = Buffer.from(image);
    // A failover with the old source up (a partition that healed, a drill that went too far).
    const fo = await b.cli(['failover', 'db', '--json']);
    assert.equal(fo.code, 0, fo.stderr);
    assert.equal(await recoveryPhase(a), 'fenced');
    const bImage = Buffer.from(restart);
    const bTouched = new Set<number>();
    await writeNbd(b, bImage, 25, bTouched);
    assert.equal(await b.digest('db'), sha(bImage));

    // The old source's status names the way back with its own data; run at the wrong site, or the
    // other way round, it is refused and changes nothing.
    assert.match((await pairStatus(a, 'db')).reason, /"ferry resync db --reverse" here/);
    const wrongSite = await b.cli(['resync', 'db', '--reverse']);
    assert.notEqual(wrongSite.code, 0);
    assert.match(wrongSite.stderr, /cannot keep its data with "resync --reverse": it is the source \(failed-over\); it is run at the old source/);
    assert.match((await a.cli(['resync', 'db'])).stderr, /has not failed over to this site/);
    // A dry run each way says whose writes would go and what would be copied; nothing changes.
    const dry = await a.cli(['resync', 'db', '--reverse', '--dry-run', '--json']);
    assert.equal(dry.code, 0, dry.stderr);
    const preview = JSON.parse(dry.stdout) as { discardSite: string; discardBlocks: number; copyFrom: string; copyBlocks: number; fullCopy: boolean };
    assert.deepEqual([preview.discardSite, preview.discardBlocks, preview.copyFrom, preview.fullCopy], ['reverse-b', bTouched.size, 'reverse-a', false]);
    const dryOther = await b.cli(['resync', 'db', '--dry-run']);
    assert.equal(dryOther.code, 0, dryOther.stderr);
    assert.match(dryOther.stdout, new RegExp(`^${aTouched.size} blocks \\([^)]*\\) written at reverse-a after the restart point would be discarded \\(kept in a snapshot there\\)$`, 'm'));
    assert.match(dryOther.stdout, new RegExp(`^${preview.copyBlocks} blocks \\([^)]*\\) would be copied from reverse-b$`, 'm'));
    assert.equal((await b.api('POST', '/api/v1/replication/db/resync', { dryRun: 'yes' })).status, 400);
    assert.equal(await recoveryPhase(b), 'failed-over');
    assert.equal(await access(b), 'read-write');
    assert.equal(await access(a), 'read-only');

    let differ = 0;
    for (let blk = 0; blk < size / bs; blk++) if (!aImage.subarray(blk * bs, (blk + 1) * bs).equals(bImage.subarray(blk * bs, (blk + 1) * bs))) differ++;
    const rs = await a.cli(['resync', 'db', '--reverse']);
    assert.equal(rs.code, 0, rs.stderr);
    assert.match(rs.stdout, new RegExp(`^resync --reverse of db → reverse-b:db: resync`, 'm'));
    assert.match(rs.stdout, new RegExp(`^${bTouched.size} blocks written at reverse-b since the failover were discarded; kept in snapshot db@ferry-discarded-g3 there$`, 'm'));
    // The site that took over serves no host while it is rebuilt; the old source takes writes again.
    const sb = await pairStatus(b, 'db');
    assert.deepEqual([sb.role, sb.generation, sb.recovery?.phase, sb.recovery?.reverse], ['target', 3, 'resync-target', true]);
    await waitFor('the old source writable', async () => (await access(a)) === 'read-write', 30_000);
    await writeNbd(a, aImage, 10);

    const sa = await waitResynced(a, b);
    assert.deepEqual([sa.role, sa.generation], ['source', 3]);
    assert.equal(await a.digest('db'), sha(aImage), 'the old source kept all its writes');
    assert.equal(await b.digest('db'), sha(aImage));
    const r = sa.recovery;
    assert.ok(r);
    assert.deepEqual([r.reverse, r.fullCopy, r.discardedBlocks, r.discardSnapshot, r.resyncBlocks], [true, false, bTouched.size, 'ferry-discarded-g3', preview.copyBlocks]);
    const [row] = (await renderDashboard(a.url)).tables.pairs ?? [];
    assert.equal(row?.[11], `resynced (reverse), ${bTouched.size} blocks discarded (snapshot ferry-discarded-g3)`);
    // Only the blocks that differ went over the wire.
    const blocksRatio = (r.resyncBlocks ?? 0) / differ;
    assert.ok(blocksRatio >= 1 && blocksRatio <= 1.1, `resync planned ${r.resyncBlocks} blocks for ${differ} differing`);
    const ratio = sa.initialCopy.bytes / (differ * bs);
    assert.ok(ratio >= 1 && ratio <= 1.1, `resync copied ${sa.initialCopy.bytes} bytes for ${differ} differing blocks (ratio ${ratio.toFixed(3)})`);
    // Rule 6: what the site that took over wrote is kept there; the restart point and intermediate points are gone.
    assert.deepEqual(await snapshotNames(b), ['ferry-discarded-g3']);
    assert.equal(await snapshotDigest(b, 'ferry-discarded-g3'), sha(bImage));
    assert.deepEqual(await snapshotNames(a), []);
    const accessAtB = b.logs.filter((l) => l.msg === 'volume access changed' && l.volume === 'db').map((l) => l.access);
    assert.deepEqual(accessAtB.slice(-3), ['read-only', 'raw', 'read-only']);

    // An ordinary pair again: writes replicate, and a planned switchover works.
    await writesReplicate(a, b, aImage, 10);
    const fb = await a.cli(['failback', 'db']);
    assert.equal(fb.code, 0, fb.stderr);
    assert.equal((await pairStatus(b, 'db')).role, 'source');
    await writesReplicate(b, a, aImage, 10);
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('resync --reverse falls back to a full copy, with a warning and a status flag, when the old source cannot list its own changes (its save volume is gone)', async () => {
  const [a, b] = await sites('revfull');
  try {
    const { aImage, bImage } = await failoverLosingSaveVolume(a, b, 16 * MiB);
    const rs = await a.cli(['resync', 'db', '--reverse']);
    assert.equal(rs.code, 0, rs.stderr);
    assert.match(rs.stdout, /^WARNING: a full copy was needed: .*save volume/m);
    assert.ok(a.logs.some((l) => /FULL COPY/.test(String(l.msg))), 'a full copy is announced in the log');
    // The first intermediate snapshot takes every write: hosts write at once.
    assert.equal(await access(a), 'read-write');
    await writeApi(a, aImage, 10);
    const sa = await waitResynced(a, b);
    assert.deepEqual([sa.recovery?.reverse, sa.recovery?.fullCopy], [true, true]);
    assert.match(sa.recovery?.fullCopyReason ?? '', /save volume/);
    assert.equal(await a.digest('db'), sha(aImage));
    assert.equal(await b.digest('db'), sha(aImage));
    assert.equal(await snapshotDigest(b, 'ferry-discarded-g3'), sha(bImage));
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('resync --reverse whose answer is lost, then SIGKILL of either site during its copy: re-issued, it completes, no full copy', async () => {
  const [a, b] = await sites('revcrash');
  // A reaches B through a proxy that can lose B's answer after B acted on the request.
  const proxy = new FaultProxy(b.host, b.port, 7);
  await proxy.start();
  try {
    const size = 64 * MiB;
    const image = Buffer.alloc(size);
    await startPair(a, b, size, image, proxy.url);
    const restart = Buffer.from(image);
    await unshippedDeltaSets(a, image, 2, new Set());
    await writeApi(a, image, 10);
    const aImage = Buffer.from(image);
    await a.kill('SIGKILL');
    assert.equal((await b.cli(['failover', 'db'])).code, 0);
    // Many changes at B, so the copy back takes a while.
    const bImage = Buffer.from(restart);
    for (let i = 0; i < 40; i++) {
      const w = { offset: i * MiB, data: randomBytes(512 * 1024) };
      await b.writeData('db', w.offset, w.data);
      w.data.copy(bImage, w.offset);
    }
    await a.start();
    await waitFor('old source fenced', async () => (await recoveryPhase(a)) === 'fenced', 30_000);

    // B turns into the target and answers with its list; the answer is lost on the way.
    proxy.dropReply = (frame) => frame.type === ReplFrame.RecoveryReply && ((JSON.parse(frame.payload.toString()) as { frames?: number }).frames ?? 0) > 0;
    const lost = await a.cli(['resync', 'db', '--reverse']);
    assert.notEqual(lost.code, 0);
    assert.equal(proxy.droppedReplies, 1);
    const sb = await pairStatus(b, 'db');
    assert.deepEqual([sb.role, sb.recovery?.phase, await access(b)], ['target', 'resync-target', 'raw']);
    assert.deepEqual([await recoveryPhase(a), await access(a)], ['fenced', 'read-only']);
    proxy.dropReply = undefined;
    // Run again after a restart: B answers from what it kept, and the copy starts.
    await a.kill('SIGKILL');
    await a.start();
    const again = await a.cli(['resync', 'db', '--reverse']);
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stdout, /^\d+ blocks written at revcrash-b since the failover were discarded; kept in snapshot db@ferry-discarded-g3 there$/m);
    // Kill the old source mid-copy, then the other site, and let both come back.
    await waitFor('copy under way', async () => (await pairStatus(a, 'db')).initialCopy.copiedBlocks > 0, 30_000, 20);
    await a.kill('SIGKILL');
    await a.start();
    await b.kill('SIGKILL');
    await b.start();
    await waitFor('the old source writable', async () => (await access(a)) === 'read-write', 60_000);
    await writeApi(a, aImage, 10);
    const sa = await waitResynced(a, b);
    assert.equal(sa.recovery?.fullCopy, false);
    assert.ok(sa.initialCopy.bytes <= 48 * MiB, `resync copied ${sa.initialCopy.bytes} bytes`);
    assert.equal(await a.digest('db'), sha(aImage));
    assert.equal(await b.digest('db'), sha(aImage));
    assert.equal(await snapshotDigest(b, 'ferry-discarded-g3'), sha(bImage));
    await writesReplicate(a, b, aImage, 10);
  } finally {
    await proxy.close();
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('resync at the site that took over and resync --reverse at the old source, run at the same moment: one copy wins whole, the other\'s writes are kept in its snapshot', async () => {
  const [a, b] = await sites('race');
  try {
    const size = 16 * MiB;
    const image = Buffer.alloc(size);
    await startPair(a, b, size, image);
    const restart = Buffer.from(image);
    await unshippedDeltaSets(a, image, 2, new Set());
    await writeApi(a, image, 10);
    const aImage = Buffer.from(image);
    assert.equal((await b.cli(['failover', 'db'])).code, 0);
    const bImage = Buffer.from(restart);
    await writeApi(b, bImage, 20);

    const [reverse, forward] = await Promise.all([a.cli(['resync', 'db', '--reverse']), b.cli(['resync', 'db'])]);
    assert.ok(reverse.code !== 0 || forward.code !== 0, `both were accepted: ${reverse.stdout} / ${forward.stdout}`);
    for (const r of [reverse, forward]) if (r.code !== 0) assert.match(r.stderr, /role change of db is already in progress|cannot keep its data|has not failed over|STALE_GENERATION|is the target/);
    // Both refused (each saw the other's under way): run one again.
    if (reverse.code !== 0 && forward.code !== 0) assert.equal((await b.cli(['resync', 'db'])).code, 0);
    const aWon = (await pairStatus(a, 'db')).role === 'source';
    const [winner, loser, kept, lost] = aWon ? [a, b, aImage, bImage] : [b, a, bImage, aImage];
    await waitResynced(winner, loser);
    assert.equal(await winner.digest('db'), sha(kept));
    assert.equal(await loser.digest('db'), sha(kept));
    const discarded = (await pairStatus(winner, 'db')).recovery?.discardSnapshot;
    assert.ok(discarded);
    assert.equal(await snapshotDigest(loser, discarded), sha(lost), `the writes of ${loser.name} are kept in ${discarded}`);
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('a 1 TiB sparse volume replicates, fails over, resyncs and fails back, sending only what was written and staying sparse at both sites', async () => {
  const [a, b] = await sites('tib');
  try {
    const size = 1024 ** 4;
    const blocks = size / bs;
    /** What each written region must hold, by offset: regions never overlap. */
    const expected = new Map<number, Buffer>();
    const write = async (site: TestSite, block: number, count: number): Promise<void> => {
      const data = randomBytes(count * bs);
      await site.writeData('db', block * bs, data);
      expected.set(block * bs, data);
    };
    const region = (offsets: number[], block: number, count: number): number[] => [...offsets, ...Array.from({ length: count }, (_, i) => block + i)];
    const map = async (site: TestSite): Promise<string> => (await execFileP('nbdinfo', ['--map', '--json', `nbd://127.0.0.1:${site.nbdPort}/db`], { maxBuffer: 16 * MiB })).stdout;
    const check = async (label: string): Promise<void> => {
      for (const [offset, data] of expected) {
        for (const site of [a, b]) assert.ok((await site.readData('db', offset, data.length)).equals(data), `${label}: ${site.name} at ${offset}`);
      }
      // Between the regions the volume reads as zeros, and neither site holds data there.
      for (const hole of [size / 2 - 4 * MiB, size - 64 * MiB]) {
        for (const site of [a, b]) assert.ok((await site.readData('db', hole, MiB)).equals(Buffer.alloc(MiB)), `${label}: ${site.name} hole at ${hole}`);
      }
      assert.equal(await map(b), await map(a), `${label}: allocation maps differ`);
    };
    const allocated = async (site: TestSite): Promise<number> => (await site.api<{ allocatedBytes: number }>('GET', '/api/v1/volumes/db')).body.allocatedBytes;

    assert.equal((await a.api('POST', '/api/v1/volumes', { name: 'db', size })).status, 201);
    let written: number[] = [];
    for (const [block, count] of [[0, 128], [blocks / 2 + 3, 64], [blocks - 128, 128]] as const) {
      await write(a, block, count);
      written = region(written, block, count);
    }
    const start = await a.cli(['replicate', 'start', 'db', '--to', b.url, '--interval', '500ms', '--wait']);
    assert.equal(start.code, 0, start.stderr);
    await waitInSync(a, b, 'db');
    const copied = (await pairStatus(a, 'db')).initialCopy.bytes;
    assert.ok(copied >= written.length * bs && copied <= written.length * bs * 1.1, `the new copy sent ${copied} bytes for ${written.length * bs} written`);
    await check('after the new copy');
    assert.equal(await allocated(b), written.length * bs);

    // The old source writes after the restart point (never shipped), then the site that took over writes.
    assert.equal((await a.cli(['replicate', 'pause', 'db'])).code, 0);
    const discarded = Math.floor(blocks / 3);
    await write(a, discarded, 32);
    const aOnly = expected.get(discarded * bs);
    expected.delete(discarded * bs);
    const fo = await b.cli(['failover', 'db', '--json']);
    assert.equal(fo.code, 0, fo.stderr);
    const bWrites: number[] = [];
    for (const block of [Math.floor(blocks / 5), Math.floor(blocks / 7)]) {
      await write(b, block, 64);
      bWrites.push(...region([], block, 64));
    }
    assert.equal((await b.cli(['resync', 'db'])).code, 0);
    const sb = await waitResynced(b, a);
    assert.equal(sb.recovery?.fullCopy, false);
    // The old source's writes went where the restart point has a hole: those blocks go back
    // as zero extents, without data.
    const differ = 32 + bWrites.length;
    const planned = sb.recovery?.resyncBlocks ?? 0;
    assert.ok(planned >= differ && planned <= differ * 1.1, `the resync planned ${planned} blocks for ${differ} that differ`);
    assert.ok(sb.initialCopy.bytes >= bWrites.length * bs && sb.initialCopy.bytes <= bWrites.length * bs * 1.1, `the resync sent ${sb.initialCopy.bytes} bytes of data for ${bWrites.length} blocks written at the site that took over`);
    expected.set(discarded * bs, Buffer.alloc(32 * bs));
    await check('after the resync');
    expected.delete(discarded * bs);
    // The old source's discarded writes are kept in its snapshot; its volume no longer holds them.
    const kept = sb.recovery?.discardSnapshot;
    assert.ok(kept && aOnly, 'the resync names the snapshot holding the discarded writes');
    assert.equal(sb.recovery?.discardedBlocks, 32);
    const snapData = await fetch(`${a.url}/api/v1/volumes/db/snapshots/${kept}/data?offset=${discarded * bs}&length=${32 * bs}`);
    assert.ok(Buffer.from(await snapData.arrayBuffer()).equals(aOnly), 'the discarded writes are in the snapshot');

    const fb = await b.cli(['failback', 'db']);
    assert.equal(fb.code, 0, fb.stderr);
    await write(a, Math.floor(blocks / 11), 16);
    await waitInSync(a, b, 'db');
    await check('after the failback');
    assert.equal(await allocated(a), await allocated(b));
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

/** Rounds of the role-change soak: 3 in the suite, more from `npm run soak` (a tenth of FERRY_SOAK_KILLS: three kills a round). */
const roleSoakRounds = process.env.FERRY_SOAK_KILLS ? Math.max(3, Math.round(Number(process.env.FERRY_SOAK_KILLS) / 10)) : 3;

test(`SIGKILL of either site at random moments of failover --sync, resync and failback, ${roleSoakRounds} rounds: each completes (re-issued where cut short), nothing acknowledged is lost, no full copy`, { timeout: 1_800_000 }, async () => {
  await roleSoak('rolesoak', roleSoakRounds);
});

test(`SIGKILL at random moments of role changes over links that drop, stall and flip bits, ${Math.ceil(roleSoakRounds / 2)} rounds: each completes, nothing acknowledged is lost, no full copy`, { timeout: 1_800_000 }, async () => {
  await roleSoak('faultsoak', Math.ceil(roleSoakRounds / 2), { flipProbability: 0.02, cleanBytes: 512, dropProbability: 0.005, stallProbability: 0.01, stallMs: 200 });
});

/**
 * Rounds of failover (--sync, or a disaster), resync and failback with a SIGKILL of
 * a random site at a random moment of each; with `faults`, every connection between
 * the sites (both ways) goes through a fault proxy with that plan.
 */
async function roleSoak(name: string, rounds: number, faults?: FaultPlan): Promise<void> {
  const [a, b] = await sites(name);
  const proxies: FaultProxy[] = [];
  let seed = Number(process.env.FERRY_SOAK_SEED ?? Date.now() % 100_000);
  const random = (): number => {
    seed = (seed * 1103515245 + 12345) % 2147483648;
    return seed / 2147483648;
  };
  const steps: string[] = [];
  /** Runs `command` at `at`, SIGKILLs a random site after a random delay (the command may have ended) and starts it again at once. */
  const killDuring = async (what: string, at: TestSite, args: string[], maxDelayMs: number): Promise<void> => {
    const victim = random() < 0.5 ? a : b;
    const delay = Math.floor(random() * maxDelayMs);
    steps.push(`${what}: kill ${victim === a ? 'A' : 'B'} after ${delay} ms`);
    const run = at.cli(args);
    await new Promise((r) => setTimeout(r, delay));
    await victim.kill('SIGKILL');
    await victim.start();
    const r = await run;
    steps.push(`exit ${r.code}${r.code ? `: ${r.stderr.trim()}` : ''}`);
  };
  /** Re-issues `args` at `at` until `done` holds (a run cut short by the kill, or refused while the other site restarts). */
  const until = async (what: string, at: TestSite, args: string[], done: () => Promise<boolean>): Promise<void> => {
    let last = '';
    await waitFor(() => `${what} (steps: ${steps.join('; ')}; last run: ${last})`, async () => {
      if (await done()) return true;
      const r = await at.cli(args);
      last = `exit ${r.code}: ${r.stderr.trim()}`;
      return done();
    }, 120_000, 500);
  };
  const writable = async (site: TestSite): Promise<boolean> => (await access(site)) === 'read-write';
  try {
    const size = 32 * MiB;
    const image = Buffer.alloc(size);
    if (faults) {
      // B reaches A at A's advertised address, A reaches B where the pair was started to.
      proxies.push(await advertisedProxy(a, seed));
      const toB = new FaultProxy(b.host, b.port, seed + 1);
      proxies.push(toB);
      await toB.start();
    }
    await startPair(a, b, size, image, proxies[1]?.url ?? b.url);
    for (const p of proxies) p.plan = faults ?? noFaults;
    if (faults) {
      // Faults fall per read through the proxy, and a fast machine makes few, large reads:
      // hosts write until the links have done damage at least once, so every run has some.
      await waitFor('the links to do damage', async () => {
        await writeApi(a, image, 5);
        return proxies.some((p) => p.flips + p.drops > 0);
      }, 60_000, 0);
    }
    for (let round = 0; round < rounds; round++) {
      steps.push(`round ${round} (seed ${seed})`);
      await writeApi(a, image, 20);
      if (round % 2 === 0) {
        // Failover --sync at B: every write A acknowledged reaches B, wherever the kill falls.
        await killDuring('failover --sync', b, ['failover', 'db', '--sync'], 600);
        await until('B to take over', b, ['failover', 'db', '--sync'], async () => (await pairStatus(b, 'db')).role === 'source');
        assert.equal(await b.digest('db'), sha(image), `failover --sync lost a write (steps: ${steps.join('; ')})`);
      } else {
        // A disaster: A dies with a delta set and writes B never got; B takes over at its restart
        // point, and the resync must undo A's writes.
        await unshippedDeltaSets(a, image, 1, new Set());
        await writeApi(a, image, 5);
        await a.kill('SIGKILL');
        const fo = await b.cli(['failover', 'db']);
        assert.equal(fo.code, 0, fo.stderr);
        for (let off = 0; off < size; off += MiB) (await b.readData('db', off, MiB)).copy(image, off);
        await a.start();
      }
      assert.ok(await writable(b));
      await waitFor('A fenced', async () => (await recoveryPhase(a)) === 'fenced', 30_000);
      assert.equal(await access(a), 'read-only');

      // Resync at B while B's hosts write, killed anywhere in it.
      await writeApi(b, image, 20);
      await killDuring('resync', b, ['resync', 'db'], 1500);
      await writeApi(b, image, 10);
      await until('the resync to be under way', b, ['resync', 'db'], async () => (await recoveryPhase(b)) !== 'failed-over');
      const sb = await waitResynced(b, a);
      assert.equal(sb.recovery?.fullCopy, false, `a full copy (steps: ${steps.join('; ')})`);
      assert.equal(await a.digest('db'), sha(image));

      // Failback at B, killed anywhere in it: A is the source again and has every write.
      await writeApi(b, image, 20);
      await killDuring('failback', b, ['failback', 'db'], 800);
      await until('the failback', b, ['failback', 'db'], async () => (await pairStatus(a, 'db')).role === 'source' && (await pairStatus(b, 'db')).role === 'target');
      await waitFor('A writable', () => writable(a), 30_000);
      assert.equal(await access(b), 'read-only');
      assert.equal(await a.digest('db'), sha(image), `the failback lost a write (steps: ${steps.join('; ')})`);
      await writesReplicate(a, b, image, 10);
    }
    if (faults) assert.ok(proxies.reduce((n, p) => n + p.flips + p.drops, 0) > 0, 'the links were faulty');
  } finally {
    await Promise.all(proxies.map((p) => p.close()));
    await Promise.all([a.destroy(), b.destroy()]);
  }
}
