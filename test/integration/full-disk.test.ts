import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, statfs } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { TestSite } from '../helpers/site.js';
import { renderDashboard } from '../helpers/dashboard.js';
import { VolumeModel, pairStatus, waitFor, waitInSync, writeRange } from '../helpers/replication.js';
import { spaceReserveBytes } from '../../src/storage/space-reserve.js';

const MiB = 1024 * 1024;
const execFileP = promisify(execFile);

/**
 * A file system of its own, `bytes` large (tmpfs), for a site to fill. Mounting needs
 * root (or sudo without a password), as CI has.
 */
async function smallFileSystem(bytes: number): Promise<{ dir: string; remove: () => Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-test-fs-'));
  const sudo = process.getuid?.() === 0 ? [] : ['sudo', '-n'];
  const run = (args: string[]): Promise<unknown> => {
    const [command, ...rest] = [...sudo, ...args];
    return execFileP(command as string, rest);
  };
  await run(['mount', '-t', 'tmpfs', '-o', `size=${bytes}`, 'tmpfs', dir]);
  return {
    dir,
    remove: async () => {
      await run(['umount', '-l', dir]);
      await rm(dir, { recursive: true, force: true });
    },
  };
}

interface SiteShow {
  fileSystemAvailableBytes: number;
  spaceReserveBytes: number;
  spaceReserveHeldBytes: number;
}

async function siteShow(site: TestSite): Promise<SiteShow> {
  return (await site.api<SiteShow>('GET', '/api/v1/site')).body;
}

/** Writes `filler` through NBD until the file system refuses (qemu-io reports the failure). */
async function fillUp(site: TestSite, bytes: number): Promise<void> {
  await execFileP('qemu-io', ['-f', 'raw', '-c', `write -P 7 0 ${bytes}`, `nbd://${site.host}:${site.nbdPort}/filler`]).then(
    () => assert.fail('the filler fitted: the file system is not full'),
    (err: { stdout?: string; stderr?: string }) => assert.match(`${err.stdout}${err.stderr}`, /No space left on device/),
  );
}

/**
 * Volumes are thin and snapshots and save volumes grow, so a site's file system can
 * fill. Then the operator frees space with ferry's own commands, which must work even
 * though each records its change first; replication, which could not cut meanwhile,
 * tries again at a growing interval (not hammering the disk and the log) and catches up.
 */
test('a full file system at the source: snapshot and volume deletes and replicate stop still work (the space reserve), cuts back off, and replication catches up once space is freed', async () => {
  const fs = await smallFileSystem(96 * MiB);
  const a = await TestSite.create('full-a', { parentDir: fs.dir });
  const b = await TestSite.create('full-b');
  try {
    const size = 64 * MiB;
    const model = new VolumeModel(size);
    await a.api('POST', '/api/v1/volumes', { name: 'v', size });
    await a.api('POST', '/api/v1/volumes', { name: 'filler', size });
    assert.equal((await siteShow(a)).spaceReserveHeldBytes, spaceReserveBytes, 'the reserve is taken when the site starts');
    // Delta sets only when asked for.
    const start = await a.cli(['replicate', 'start', 'v', '--to', b.url, '--interval', '1h', '--high-water', '1G', '--save-volume', '16M', '--wait']);
    assert.equal(start.code, 0, start.stderr);
    await writeRange(a, model, 0, 8 * MiB, MiB);
    assert.equal((await a.cli(['replicate', 'delta', 'v'])).code, 0);
    await waitInSync(a, b, 'v');
    // A snapshot holding before-images, then a backlog too large for the save volume: it
    // can only go as a catch-up copy, which needs a snapshot of its own.
    assert.equal((await a.cli(['snapshot', 'create', 'v', '--name', 'before'])).code, 0);
    await writeRange(a, model, 0, 20 * MiB, MiB);
    await fillUp(a, size);
    const full = await siteShow(a);
    assert.ok(full.fileSystemAvailableBytes < MiB, `${full.fileSystemAvailableBytes} bytes left`);
    assert.equal(full.spaceReserveHeldBytes, spaceReserveBytes);
    const shown = await renderDashboard(a.url);
    assert.match(shown.space.text, /^file system: [0-9.]+K? free of 96M · volumes [0-9.]+M held of 128M provisioned · FULL: free space/);
    assert.equal(shown.space.className, 'sub err');

    // Nothing can be added: clear errors.
    const refused = await a.cli(['snapshot', 'create', 'v', '--name', 'more']);
    assert.notEqual(refused.code, 0);
    assert.match(refused.stderr, /NO_SPACE/);
    const logMark = a.logs.length;
    const cut = await a.cli(['replicate', 'delta', 'v']);
    assert.notEqual(cut.code, 0);
    assert.match(cut.stderr, /a catch-up copy could not be started .*ENOSPC/);
    const failing = await pairStatus(a, 'v');
    assert.equal(failing.health, 'error');
    assert.match(failing.reason, /a catch-up copy could not be started .*ENOSPC/);

    // The cut asked for stands: it is tried again after 1, 2, 4 ... s, not at every 100 ms poll.
    await new Promise((resolve) => setTimeout(resolve, 4000));
    const attempts = a.logs.slice(logMark).filter((l) => l.msg === 'a catch-up copy could not be started').length;
    assert.ok(attempts >= 3 && attempts <= 4, `${attempts} failed attempts in about 4 s`);

    // Deleting the snapshot frees little (its before-images), not enough to take the reserve again.
    const dropped = await a.cli(['snapshot', 'delete', 'v', 'before']);
    assert.equal(dropped.code, 0, dropped.stderr);
    assert.ok(a.logs.some((l) => l.msg === 'the file system is full: the space reserve is given back so that this command can run' && l.command === 'snapshot delete v before'));
    assert.equal((await siteShow(a)).spaceReserveHeldBytes, 0);
    // Deleting the filler frees the rest.
    const deleted = await a.cli(['volume', 'delete', 'filler']);
    assert.equal(deleted.code, 0, deleted.stderr);
    const freed = await siteShow(a);
    assert.equal(freed.spaceReserveHeldBytes, spaceReserveBytes, 'the reserve is taken again once space is freed');
    assert.ok(freed.fileSystemAvailableBytes > 32 * MiB);
    const roomy = await renderDashboard(a.url);
    assert.doesNotMatch(roomy.space.text, /FULL/);
    assert.equal(roomy.space.className, 'sub');

    // The catch-up goes through by itself, and the replica is the source's image.
    await waitInSync(a, b, 'v', 'v', 60_000);
    assert.equal(await a.digest('v'), model.digest());
    assert.equal(await b.digest('v'), model.digest());
    const after = await pairStatus(a, 'v');
    assert.equal(after.health, 'ok');
    assert.equal(after.reason, '');

    // Full again: ending the pair (its save volume and tracking files go) works too.
    await a.api('POST', '/api/v1/volumes', { name: 'filler', size });
    await fillUp(a, size);
    assert.ok((await statfs(fs.dir)).bavail * (await statfs(fs.dir)).bsize < MiB);
    const stopped = await a.cli(['replicate', 'stop', 'v']);
    assert.equal(stopped.code, 0, stopped.stderr);
    assert.ok(a.logs.some((l) => l.msg === 'the file system is full: the space reserve is given back so that this command can run' && l.command === 'replicate stop v'));
    assert.deepEqual((await a.api<unknown[]>('GET', '/api/v1/status')).body, []);
    assert.deepEqual((await b.api<unknown[]>('GET', '/api/v1/status')).body, [], 'the target was told');
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
    await fs.remove();
  }
});

/**
 * The replica's site fills up (its own hosts' volumes, say): delta sets cannot be stored
 * there. When the source is then lost, the failover must still go through, and must
 * say that the source had writes this site never stored.
 */
test('a full file system at the target: failover still works (the space reserve) and says what the source had that could not be stored here', async () => {
  const fs = await smallFileSystem(128 * MiB);
  const a = await TestSite.create('tfull-a');
  const b = await TestSite.create('tfull-b', { parentDir: fs.dir });
  try {
    const size = 32 * MiB;
    const model = new VolumeModel(size);
    await a.api('POST', '/api/v1/volumes', { name: 'v', size });
    // The first 16 MiB go by the initial copy, straight to B's volume: B's save volume has
    // never held a delta set, so the next one needs new space there (delta sets would
    // have left space in it that a later one reuses).
    await writeRange(a, model, 0, 16 * MiB, MiB);
    const start = await a.cli(['replicate', 'start', 'v', '--to', b.url, '--interval', '300ms', '--save-volume', '16M', '--target-save-volume', '16M', '--wait']);
    assert.equal(start.code, 0, start.stderr);
    await waitInSync(a, b, 'v');
    const restartPoint = model.digest();
    await b.api('POST', '/api/v1/volumes', { name: 'filler', size: 128 * MiB });
    await fillUp(b, 128 * MiB);
    assert.ok((await siteShow(b)).fileSystemAvailableBytes < MiB);

    // 4 MiB more at the source: its delta set cannot be stored at the target.
    await writeRange(a, model, 16 * MiB, 4 * MiB, MiB);
    let seen = '';
    const failing = await waitFor(() => `the target to fail to store a delta set (its status said: ${seen})`, async () => {
      const s = await pairStatus(b, 'v');
      const sa = await pairStatus(a, 'v');
      seen = JSON.stringify({ state: s.state, health: s.health, reason: s.reason, failing: s.failing, received: s.deltaSetReceived, playedBack: s.deltaSetPlayedBack, available: (await siteShow(b)).fileSystemAvailableBytes, source: { state: sa.state, reason: sa.reason, created: sa.deltaSetCreated, acked: sa.deltaSetAcked, lagBlocks: sa.lagBlocks } });
      return /could not be stored in the save volume: ENOSPC/.test(s.reason) ? s : undefined;
    });
    assert.equal(failing.health, 'error');
    // The source keeps saying what it has (heartbeats in every session, which the failing store ends).
    await new Promise((resolve) => setTimeout(resolve, 2000));
    await a.kill('SIGKILL');

    const failover = await b.cli(['failover', 'v', '--json']);
    assert.equal(failover.code, 0, failover.stderr);
    assert.ok(b.logs.some((l) => l.msg === 'the file system is full: the space reserve is given back so that this command can run' && l.command === 'failover v'));
    const result = JSON.parse(failover.stdout) as { generation: number; sourceAhead: { blocks: number; deltaSets: number } };
    assert.equal(result.generation, 2);
    assert.ok(result.sourceAhead.deltaSets >= 1, `delta sets not received: ${result.sourceAhead.deltaSets}`);
    assert.equal(result.sourceAhead.blocks, (4 * MiB) / 8192, 'the blocks of the 4 MiB the source wrote');
    const text = await b.cli(['status', 'v']);
    assert.match(text.stdout, /failed over at generation 2/);
    assert.equal(await b.digest('v'), restartPoint, 'the replica is the image it last played back');

    // Space freed at B: the reserve is taken again, and hosts write there.
    assert.equal((await b.cli(['volume', 'delete', 'filler'])).code, 0);
    assert.equal((await siteShow(b)).spaceReserveHeldBytes, spaceReserveBytes);
    const data = randomBytes(64 * 1024);
    await b.writeData('v', 0, data);
    assert.deepEqual(await b.readData('v', 0, data.length), data);
  } finally {
    await Promise.all([a.destroy(), b.destroy()]);
    await fs.remove();
  }
});
