import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { TestSite } from '../helpers/site.js';
import { FaultProxy } from '../helpers/fault-proxy.js';
import { ReplFrame } from '../../src/replication/protocol.js';
import type { Frame } from '../../src/transport/frame.js';
import { VolumeModel, pairStatus, waitFor, waitInSync, writeRange } from '../helpers/replication.js';

const MiB = 1024 * 1024;
const execFileP = promisify(execFile);
/**
 * Slows the pair's copy connection to 512 KiB/s, whatever the size of the reads the
 * machine delivers, while delta sets go at full speed: a catch-up of tens of MiB lasts
 * long enough to watch it, fill both save volumes and crash either site in the middle.
 */
const slowCopy = {
  match: (frame: Frame) => frame.type === ReplFrame.PairOpen && (JSON.parse(frame.payload.toString()) as { channel?: string }).channel === 'copy',
  bytesPerSecond: 512 * 1024,
};

async function sites(name: string): Promise<[TestSite, TestSite]> {
  return Promise.all([TestSite.create(`${name}-a`), TestSite.create(`${name}-b`)]);
}

async function snapshotNames(site: TestSite): Promise<string[]> {
  const { body } = await site.api<{ name: string }[]>('GET', '/api/v1/volumes/v/snapshots');
  return body.map((s) => s.name);
}

/**
 * A paused pair whose backlog has outgrown the 16 MiB save volume: phase 1 (4 MiB) is a
 * delta set, phase 2 (`backlogMiB`) only a bitmap. Returns the image at the end of phase 1.
 */
async function backlogPastSaveVolume(a: TestSite, b: TestSite, proxy: FaultProxy, model: VolumeModel, backlogMiB: number): Promise<string> {
  await a.api('POST', '/api/v1/volumes', { name: 'v', size: model.bytes.length });
  const start = await a.cli(['replicate', 'start', 'v', '--to', proxy.url, '--interval', '60s', '--high-water', '1G', '--save-volume', '16M', '--target-save-volume', '16M', '--wait']);
  assert.equal(start.code, 0, start.stderr);
  await writeRange(a, model, 0, 2 * MiB);
  await waitInSync(a, b, 'v');
  assert.equal((await a.cli(['replicate', 'pause', 'v'])).code, 0);
  await writeRange(a, model, 0, 4 * MiB);
  assert.equal((await a.cli(['replicate', 'delta', 'v'])).code, 0);
  const boundary = model.digest();
  await writeRange(a, model, 8 * MiB, backlogMiB * MiB);
  const cut = await a.cli(['replicate', 'delta', 'v']);
  assert.equal(cut.code, 0, cut.stderr);
  assert.match(cut.stdout, new RegExp(`backlog of v \\(${(backlogMiB * MiB) / 8192} blocks\\) is larger than the save volume: it goes to the other site as a catch-up copy`));
  const s = await pairStatus(a, 'v');
  assert.equal(s.initialCopy.catchUp, true, 'the backlog goes as a copy');
  assert.equal(s.initialCopy.done, false);
  assert.equal(s.initialCopy.totalBlocks, (backlogMiB * MiB) / 8192, 'the copy holds exactly the backlog');
  assert.ok(s.lagBlocks >= s.initialCopy.totalBlocks, 'lag counts the blocks still to copy');
  assert.ok(a.logs.some((l) => l.msg === 'the backlog outgrew the save volume: catching up by a copy of its blocks'));
  return boundary;
}

/** Resumes over a slow link and waits until the target applies the catch-up under its protective snapshot. */
async function catchUpUnderway(a: TestSite, b: TestSite, proxy: FaultProxy): Promise<void> {
  proxy.slowConnections = slowCopy;
  assert.equal((await a.cli(['replicate', 'resume', 'v'])).code, 0);
  await waitFor('the catch-up to reach the target', async () => {
    const t = await pairStatus(b, 'v');
    return t.initialCopy.catchUp && !t.initialCopy.done && t.initialCopy.copiedBlocks > 0;
  }, 60_000, 50);
  assert.equal((await pairStatus(a, 'v')).state, 'duplex-pending');
  for (const site of [a, b]) {
    const metrics = await (await fetch(`${site.url}/metrics`)).text();
    assert.match(metrics, /^ferry_replication_catch_up\{[^}]*volume="v"[^}]*\} 1$/m, `${site.name} exports the catch-up in its metrics`);
  }
}

test('a backlog larger than the save volume catches up by copy: the target serves its protected image, both save volumes fill, crashes of either site resume', async () => {
  const [a, b] = await sites('catchup');
  const proxy = new FaultProxy(b.host, b.port, 3);
  await proxy.start();
  try {
    const model = new VolumeModel(160 * MiB);
    const boundary = await backlogPastSaveVolume(a, b, proxy, model, 48);
    await catchUpUnderway(a, b, proxy);
    assert.equal(await b.digest('v'), boundary, 'readers see the consistent image kept before the catch-up');
    assert.ok((await snapshotNames(b)).some((n) => n.startsWith('ferry-catch-up-')));
    // Neither the image being copied nor the one readers are served may be deleted by hand.
    for (const site of [a, b]) {
      for (const name of (await snapshotNames(site)).filter((n) => n.startsWith('ferry-catch-up-'))) {
        const del = await site.api<{ error: { code: string; message: string } }>('DELETE', `/api/v1/volumes/v/snapshots/${name}`);
        assert.equal(del.status, 409, `${site.name}: ${name}`);
        assert.equal(del.body.error.code, 'SNAPSHOT_IN_USE');
      }
    }
    assert.equal((await snapshotNames(a)).filter((n) => n.startsWith('ferry-catch-up-')).length, 1, 'the source keeps its catch-up snapshot');

    // Writes during the catch-up go into delta sets the target holds until the copy is
    // whole: its save volume fills, then the source's, then the bitmap takes the rest.
    let seen = '';
    let at = 64 * MiB;
    await waitFor(() => `both save volumes to fill (last: ${seen})`, async () => {
      await writeRange(a, model, at, 2 * MiB);
      at = at + 2 * MiB < 112 * MiB ? at + 2 * MiB : 64 * MiB;
      await a.cli(['replicate', 'delta', 'v']); // refused once the source's save volume is full
      const [s, t] = await Promise.all([pairStatus(a, 'v'), pairStatus(b, 'v')]);
      seen = JSON.stringify({ source: s.saveVolume, target: t.saveVolume, copy: t.initialCopy });
      return s.saveVolume.full && t.saveVolume.full;
    }, 60_000, 10);
    const t = await pairStatus(b, 'v');
    assert.equal(t.initialCopy.done, false, 'the catch-up is still under way');
    assert.ok(t.deltaSetReceived > t.deltaSetPlayedBack, 'delta sets after the catch-up wait for it');
    assert.equal(await b.digest('v'), boundary);
    // Host writes are never refused meanwhile.
    await writeRange(a, model, 120 * MiB, MiB);

    // A crash of the target mid catch-up: after the restart readers still get the kept image.
    await b.restart();
    assert.equal(await b.digest('v'), boundary, 'the protection survives a restart');
    // And of the source: the catch-up carries on from its snapshot and bitmap, no new copy.
    await a.restart();
    const resumed = await pairStatus(a, 'v');
    assert.equal(resumed.initialCopy.catchUp, true);
    assert.equal(resumed.initialCopy.done, false);
    assert.equal(await b.digest('v'), boundary);
    // Once more, with the list of the catch-up's blocks damaged: it copies every block
    // rather than fail, or miss the blocks the list held (they left the change log for it).
    const volumeId = (await a.api<{ id: string }>('GET', '/api/v1/volumes/v')).body.id;
    await a.kill('SIGKILL');
    const fh = await open(join(a.dir, 'replication', volumeId, 'copy.bitmap'), 'r+');
    await fh.write(randomBytes(64), 0, 64, 0);
    await fh.close();
    await a.start();
    await waitFor(() => `the damaged list to be reported (last log lines: ${JSON.stringify(a.logs.slice(-12).map((l) => l.msg))})`, async () => a.logs.some((l) => /the copy's list of blocks is damaged/.test(String(l.msg))), 30_000);

    proxy.slowConnections = undefined;
    await waitInSync(a, b, 'v', 'v', 180_000);
    assert.equal(await b.digest('v'), model.digest(), 'no write lost');
    assert.equal(await a.digest('v'), model.digest());
    const s = await pairStatus(a, 'v');
    assert.equal(s.state, 'duplex');
    assert.equal(s.initialCopy.done, true);
    assert.equal(s.saveVolume.full, false);
    assert.equal(s.lagBlocks, 0);
    assert.deepEqual((await snapshotNames(a)).filter((n) => n.startsWith('ferry-')), [], 'the catch-up snapshot is gone at the source');
    assert.deepEqual((await snapshotNames(b)).filter((n) => n.startsWith('ferry-')), [], 'and the protective one at the target');
  } finally {
    await proxy.close();
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('failover during a catch-up restores the protected image; resync then undoes the backlog at the old source', async () => {
  const [a, b] = await sites('catchfo');
  const proxy = new FaultProxy(b.host, b.port, 5);
  await proxy.start();
  try {
    const model = new VolumeModel(96 * MiB);
    const boundary = await backlogPastSaveVolume(a, b, proxy, model, 40);
    await catchUpUnderway(a, b, proxy);
    await a.kill('SIGKILL');
    proxy.slowConnections = undefined;
    const fo = await b.cli(['failover', 'v', '--json']);
    assert.equal(fo.code, 0, fo.stderr);
    assert.equal(await b.digest('v'), boundary, 'the half-applied catch-up is rolled back to the kept image');
    assert.deepEqual((await snapshotNames(b)).filter((n) => n.startsWith('ferry-catch-up-')), []);
    assert.ok(b.logs.some((l) => l.msg === 'failover during a catch-up: the volume is back at the consistent image kept before it'));

    // The new source writes; the old one returns and is rebuilt without a full copy.
    const image = new VolumeModel(96 * MiB);
    for (let at = 0; at < 96 * MiB; at += 4 * MiB) image.apply(at, await b.readData('v', at, 4 * MiB));
    await writeRange(b, image, 60 * MiB, 2 * MiB);
    await a.start();
    await waitFor('the old source to learn of the failover', async () => (await pairStatus(a, 'v')).recovery?.phase === 'fenced', 30_000);
    const rs = await b.cli(['resync', 'v']);
    assert.equal(rs.code, 0, rs.stderr);
    await waitFor('resync done', async () => (await pairStatus(b, 'v')).recovery?.phase === 'resynced', 120_000);
    await waitInSync(b, a, 'v', 'v', 60_000);
    const done = await pairStatus(b, 'v');
    assert.equal(done.recovery?.fullCopy ?? false, false, 'no full copy');
    assert.ok((done.recovery?.discardedBlocks ?? 0) >= (40 * MiB) / 8192, 'the backlog the target never had is on the undo list');
    assert.equal(await a.digest('v'), image.digest());
    assert.equal(await b.digest('v'), image.digest());
  } finally {
    await proxy.close();
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('SIGKILL of the target while a failover restores the image a catch-up kept: opened again, it serves that image, and the catch-up, started over, makes it equal to its source', async () => {
  // B kills itself once the restore has put part of the kept image back (crash point).
  const [a, b] = await Promise.all([TestSite.create('catchkill-a'), TestSite.create('catchkill-b', { env: { FERRY_CRASH_AT: 'restore.part-written' } })]);
  const proxy = new FaultProxy(b.host, b.port, 7);
  await proxy.start();
  try {
    const model = new VolumeModel(96 * MiB);
    const boundary = await backlogPastSaveVolume(a, b, proxy, model, 40);
    // Most of the backlog is applied (the restore has much to put back); the rest trickles.
    proxy.slowConnections = { ...slowCopy, bytesPerSecond: 8 * MiB };
    assert.equal((await a.cli(['replicate', 'resume', 'v'])).code, 0);
    await waitFor('most of the catch-up applied', async () => {
      const t = (await pairStatus(b, 'v')).initialCopy;
      return t.catchUp && !t.done && t.copiedBlocks >= (32 * MiB) / 8192;
    }, 60_000, 20);
    proxy.slowConnections = { ...slowCopy, bytesPerSecond: 64 * 1024 };
    // A partition: A stays up; B dies part way into putting the kept image back.
    const fo = await b.api('POST', '/api/v1/replication/v/failover', {}).catch((e: Error) => e);
    assert.ok(fo instanceof Error, 'the failover was cut short');
    assert.ok(await b.waitExit(30_000), 'B stopped at the crash point');
    assert.equal(b.exitSignal, 'SIGKILL');
    assert.match(b.stderrTail, /crash point restore\.part-written reached/);
    b.env = {};
    await b.start();
    // Still the target: readers get the consistent image kept for the catch-up ...
    assert.equal((await pairStatus(b, 'v')).role, 'target');
    assert.equal(await b.digest('v'), boundary);
    // ... and the catch-up is redone whole: the replica ends equal to its source.
    proxy.slowConnections = undefined;
    await waitInSync(a, b, 'v', 'v', 120_000);
    assert.equal(await a.digest('v'), model.digest());
    assert.equal(await b.digest('v'), model.digest(), 'the replica equals its source once the catch-up is done');
  } finally {
    await proxy.close();
    await Promise.all([a.destroy(), b.destroy()]);
  }
});

test('a full disk at the target during a catch-up: both sites say why, readers keep the protected image, and the catch-up completes once space is freed', async () => {
  const [a, b] = await sites('catchfull');
  try {
    const model = new VolumeModel(32 * MiB);
    await a.api('POST', '/api/v1/volumes', { name: 'v', size: model.bytes.length });
    await writeRange(a, model, 0, 24 * MiB);
    const start = await a.cli(['replicate', 'start', 'v', '--to', b.url, '--interval', '60s', '--high-water', '1G', '--save-volume', '16M', '--target-save-volume', '16M', '--wait']);
    assert.equal(start.code, 0, start.stderr);
    const boundary = model.digest();
    assert.equal((await a.cli(['replicate', 'pause', 'v'])).code, 0);
    await writeRange(a, model, 0, 24 * MiB);
    const cut = await a.cli(['replicate', 'delta', 'v']);
    assert.match(cut.stdout, /it goes to the other site as a catch-up copy/);
    // B's files may not grow past 17 MiB now (EFBIG, as on a full disk): the protective
    // snapshot's save volume, a before-image and a header for each block the catch-up
    // rewrites, runs out of room before the 24 MiB are copied.
    const pid = String(b.proc?.pid);
    await execFileP('prlimit', ['--pid', pid, `--fsize=${17 * MiB}:unlimited`]);
    try {
      assert.equal((await a.cli(['replicate', 'resume', 'v'])).code, 0);
      const refused = /could not be written .*EFBIG/;
      await waitFor('both sites to say the catch-up is not moving and why', async () => {
        const [s, t] = await Promise.all([pairStatus(a, 'v'), pairStatus(b, 'v')]);
        return /the copy is not moving/.test(s.reason) && refused.test(s.reason) && refused.test(t.reason) && t.health === 'error';
      }, 60_000, 200);
      // The pieces are sent again and again, but a copy that does not move has no ETA.
      const stalled = await waitFor('the stalled copy to lose its ETA', async () => {
        const s = await pairStatus(a, 'v');
        return s.initialCopy.etaSeconds === null ? s : undefined;
      }, 60_000, 500);
      for (let i = 0; i < 12; i++) {
        await new Promise((resolve) => setTimeout(resolve, 500));
        assert.equal((await pairStatus(a, 'v')).initialCopy.etaSeconds, null, 'no ETA while resends go out');
      }
      assert.match(await (await fetch(`${a.url}/metrics`)).text(), /^ferry_replication_copy_eta_seconds\{[^}]*volume="v"[^}]*\} NaN$/im, 'nor in the metrics');
      assert.ok(stalled.initialCopy.percent < 100);
      assert.ok(stalled.initialCopy.bytes < 24 * MiB, `progress counts what the target acknowledged, not resends (${stalled.initialCopy.bytes} bytes)`);
      assert.equal(await b.digest('v'), boundary, 'readers get the image kept before the catch-up');
    } finally {
      await execFileP('prlimit', ['--pid', pid, '--fsize=unlimited:unlimited']);
    }
    // Space is freed: the catch-up carries on in the same daemons.
    await waitInSync(a, b, 'v', 'v', 120_000);
    assert.equal(await b.digest('v'), model.digest());
    const [done, written] = await Promise.all([pairStatus(a, 'v'), pairStatus(b, 'v')]);
    assert.equal(done.initialCopy.bytes, 24 * MiB, 'the source counts each block copied once');
    assert.equal(written.initialCopy.bytes, 24 * MiB, 'and so does the target');
    assert.ok(done.bytesSent > 24 * MiB, 'the wire carried the resends');
    const metrics = await (await fetch(`${a.url}/metrics`)).text();
    assert.match(metrics, new RegExp(`^ferry_replication_copy_bytes\\{[^}]*volume="v"[^}]*\\} ${24 * MiB}$`, 'm'));
    assert.match(metrics, /^ferry_replication_copy_eta_seconds\{[^}]*volume="v"[^}]*\} 0$/m);
    for (const site of [a, b]) {
      const s = await pairStatus(site, 'v');
      assert.equal(s.reason, '', site.name);
      assert.equal(s.health, 'ok', site.name);
      assert.deepEqual((await snapshotNames(site)).filter((n) => n.startsWith('ferry-')), [], `${site.name}: the catch-up's snapshot is gone`);
    }
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
  }
});
