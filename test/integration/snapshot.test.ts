import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes, randomInt } from 'node:crypto';
import { open, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { TestSite } from '../helpers/site.js';

let site: TestSite;

before(async () => {
  site = await TestSite.create('snapper');
});

after(async () => {
  await site?.destroy();
});

const mib = 1024 * 1024;

async function snapDigest(s: TestSite, volume: string, snap: string): Promise<{ status: number; sha256?: string; code?: string }> {
  const { status, body } = await s.api<{ sha256?: string; error?: { code: string } }>('GET', `/api/v1/volumes/${volume}/snapshots/${snap}/digest`);
  return { status, ...(body.sha256 ? { sha256: body.sha256 } : {}), ...(body.error ? { code: body.error.code } : {}) };
}

test('CLI: snapshot create, list, diff, restore, delete with --json and human output', async () => {
  assert.equal((await site.cli(['volume', 'create', 'cv', '--size', '4M'])).code, 0);
  await site.writeData('cv', 0, Buffer.alloc(64 * 1024, 1));
  let r = await site.cli(['snapshot', 'create', 'cv', '--name', 'first', '--attr', 'deltaSet=7']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^snapshot cv@first created\n$/);
  const digestFirst = await site.digest('cv');
  await site.writeData('cv', 8192 + 100, Buffer.alloc(20_000, 2));
  r = await site.cli(['snapshot', 'create', 'cv', '--json']);
  const second = JSON.parse(r.stdout) as { name: string; seq: number };
  assert.match(second.name, /^snap-2-/);
  r = await site.cli(['snapshot', 'list', 'cv']);
  assert.match(r.stdout, /^NAME\s+CREATED\s+SAVED\s+STATE\s+ATTRIBUTES$/m);
  assert.match(r.stdout, /^first\s+\S+\s+\S+\s+ok\s+deltaSet=7$/m);
  r = await site.cli(['snapshot', 'diff', 'cv', 'first', 'current', '--json']);
  const diff = JSON.parse(r.stdout) as { changedBytes: number; extents: { offset: number; length: number }[] };
  assert.deepEqual(diff.extents, [{ offset: 8192, length: 3 * 8192 }]);
  r = await site.cli(['snapshot', 'diff', 'cv', 'first', second.name]);
  assert.match(r.stdout, /^1 extent\(s\), 24K \(24576 bytes\) changed from first to snap-2-/);
  r = await site.cli(['snapshot', 'diff', 'cv', second.name, 'first']);
  assert.match(r.stderr, /^ferry: BAD_REQUEST: /);
  r = await site.cli(['snapshot', 'restore', 'cv', 'first']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /restored from first: 3 block\(s\) written, 0 trimmed/);
  assert.equal(await site.digest('cv'), digestFirst);
  r = await site.cli(['volume', 'delete', 'cv']);
  assert.match(r.stderr, /^ferry: VOLUME_IN_USE: volume cv cannot be deleted: it has 2 snapshot\(s\)/);
  r = await site.cli(['snapshot', 'delete', 'cv', 'nope']);
  assert.equal(r.stderr, 'ferry: SNAPSHOT_NOT_FOUND: snapshot cv@nope not found\n');
  r = await site.cli(['snapshot', 'create', 'cv', '--name', 'bad@name']);
  assert.match(r.stderr, /^ferry: INVALID_NAME: /);
  r = await site.cli(['snapshot', 'create', 'cv', '--name', 'ferry-restart-point-g2']);
  assert.match(r.stderr, /^ferry: INVALID_NAME: snapshot names starting with "ferry-" are kept for the snapshots ferry makes itself/);
  r = await site.cli(['snapshot', 'create', 'cv', '--name', 'first']);
  assert.match(r.stderr, /^ferry: SNAPSHOT_EXISTS: /);
  for (const name of ['first', second.name]) assert.equal((await site.cli(['snapshot', 'delete', 'cv', name])).code, 0);
  assert.equal((await site.cli(['volume', 'delete', 'cv'])).code, 0);
  const metrics = await (await fetch(`${site.url}/metrics`)).text();
  assert.match(metrics, /^ferry_snapshots\{/m);
});

test('API: snapshot data and attributes; a snapshot reads as it was while the volume changes', async () => {
  await site.api('POST', '/api/v1/volumes', { name: 'av', size: '1M' });
  const before = randomBytes(100_000);
  await site.writeData('av', 5000, before);
  const created = await site.api<{ name: string }>('POST', '/api/v1/volumes/av/snapshots', { name: 't0', attrs: { a: '1' } });
  assert.equal(created.status, 201);
  await site.writeData('av', 0, randomBytes(200_000));
  const res = await fetch(`${site.url}/api/v1/volumes/av/snapshots/t0/data?offset=5000&length=100000`);
  assert.deepEqual(Buffer.from(await res.arrayBuffer()), before);
  const attrs = await site.api<{ attrs: Record<string, string> }>('POST', '/api/v1/volumes/av/snapshots/t0/attributes', { attrs: { a: null, lastDeltaSet: '42' } });
  assert.deepEqual(attrs.body.attrs, { lastDeltaSet: '42' });
  const bad = await site.api<{ error: { code: string } }>('POST', '/api/v1/volumes/av/snapshots/t0/attributes', { attrs: { 'bad key': 'x' } });
  assert.equal(bad.status, 400);
  assert.equal((await site.api('DELETE', '/api/v1/volumes/av/snapshots/t0')).status, 204);
  assert.equal((await site.api('DELETE', '/api/v1/volumes/av')).status, 204);
});

test('SIGKILL at 24 random moments during heavy writes, snapshot creates and deletes: every snapshot keeps its digest', { timeout: 600_000 }, async () => {
  const volume = 'hv';
  const sizeBytes = 8 * mib;
  await site.api('POST', '/api/v1/volumes', { name: volume, size: sizeBytes });
  const known = new Map<string, string>(); // snapshot → digest at creation
  let counter = 0;
  const rounds = 24;
  for (let round = 0; round < rounds; round++) {
    let stop = false;
    const writer = async (): Promise<void> => {
      while (!stop) {
        const length = 1 + randomInt(64 * 1024);
        const offset = randomInt(sizeBytes - length);
        await site.writeData(volume, offset, randomBytes(length)).catch(() => undefined);
      }
    };
    const pending = new Set<string>();
    const controller = async (): Promise<void> => {
      while (!stop) {
        const names = [...known.keys()];
        if (names.length > 6 || (names.length > 0 && randomInt(3) === 0)) {
          const victim = names[randomInt(names.length)] as string;
          pending.add(victim);
          const r = await site.api('DELETE', `/api/v1/volumes/${volume}/snapshots/${victim}`).catch(() => ({ status: 0 }));
          if (r.status === 204) known.delete(victim);
          // Unanswered (killed): the outcome is unknown until the restart.
          if (r.status !== 0) pending.delete(victim);
        } else {
          const name = `r${round}-${counter++}`;
          pending.add(name);
          const r = await site.api('POST', `/api/v1/volumes/${volume}/snapshots`, { name }).catch(() => ({ status: 0 }));
          if (r.status === 201) {
            // The digest is taken while the writers keep writing: reads race with first writes.
            const d = await snapDigest(site, volume, name).catch(() => undefined);
            if (d?.sha256) {
              known.set(name, d.sha256);
              pending.delete(name);
            }
          } else if (r.status !== 0) pending.delete(name);
        }
        await new Promise((r) => setTimeout(r, randomInt(30)));
      }
    };
    const jobs = [writer(), writer(), writer(), writer(), controller()];
    await new Promise((r) => setTimeout(r, 100 + randomInt(500)));
    await site.kill('SIGKILL');
    stop = true;
    await Promise.all(jobs);
    await site.start();
    const list = (await site.api<{ name: string; state: string }[]>('GET', `/api/v1/volumes/${volume}/snapshots`)).body;
    for (const s of list) {
      assert.equal(s.state, 'ok', `snapshot ${s.name} after restart ${round}`);
      const digest = known.get(s.name);
      const now = await snapDigest(site, volume, s.name);
      assert.equal(now.status, 200, `digest of ${s.name}`);
      if (digest !== undefined) assert.equal(now.sha256, digest, `snapshot ${s.name} changed across SIGKILL ${round}`);
      else {
        // Created or digested just as the site was killed: its digest from now on is its reference.
        assert.ok(pending.has(s.name) || !known.has(s.name), `unexpected snapshot ${s.name}`);
        known.set(s.name, now.sha256 as string);
      }
    }
    for (const name of known.keys()) {
      if (!list.some((s) => s.name === name)) {
        assert.ok(pending.has(name), `snapshot ${name} vanished without a delete in flight`);
        known.delete(name);
      }
    }
  }
  assert.ok(known.size > 0 || counter > 0);
  // Deltas between the surviving snapshots and current equal what full reads say.
  const names = [...known.keys()];
  if (names.length > 0) {
    const from = names[0] as string;
    const diff = (await site.api<{ extents: { offset: number; length: number }[] }>('GET', `/api/v1/volumes/${volume}/snapshots/${from}/diff?to=current`)).body;
    const changed = new Set<number>();
    for (const e of diff.extents) for (let b = e.offset / 8192; b < (e.offset + e.length) / 8192; b++) changed.add(b);
    for (let offset = 0; offset < sizeBytes; offset += 4 * mib) {
      const snapRes = await fetch(`${site.url}/api/v1/volumes/${volume}/snapshots/${from}/data?offset=${offset}&length=${4 * mib}`);
      const a = Buffer.from(await snapRes.arrayBuffer());
      const b = await site.readData(volume, offset, 4 * mib);
      for (let k = 0; k < 4 * mib; k += 8192) {
        const block = (offset + k) / 8192;
        const differs = !a.subarray(k, k + 8192).equals(b.subarray(k, k + 8192));
        // The writers leave every block they touch valid, so differing blocks are all valid now.
        assert.equal(changed.has(block), differs, `block ${block} in diff ${from}→current`);
      }
    }
  }
});

test('a damaged save-volume record on disk: the daemon refuses the snapshot with SNAPSHOT_CORRUPT', async () => {
  await site.api('POST', '/api/v1/volumes', { name: 'dv', size: '1M' });
  await site.writeData('dv', 0, Buffer.alloc(32 * 1024, 7));
  const snap = (await site.api<{ id: string }>('POST', '/api/v1/volumes/dv/snapshots', { name: 'keep' })).body;
  await site.writeData('dv', 0, Buffer.alloc(32 * 1024, 8));
  const good = await snapDigest(site, 'dv', 'keep');
  assert.equal(good.sha256, createHash('sha256').update(Buffer.concat([Buffer.alloc(32 * 1024, 7), Buffer.alloc(mib - 32 * 1024)])).digest('hex'));
  await site.kill('SIGKILL');
  const dir = join(site.dir, 'snapshots');
  assert.ok((await readdir(dir)).includes(`${snap.id}.save`));
  const fh = await open(join(dir, `${snap.id}.save`), 'r+');
  await fh.write(Buffer.from([0xde, 0xad]), 0, 2, 4096 + 32 + 8192 + 32 + 1000); // data of record 1
  await fh.close();
  await site.start();
  const refused = await snapDigest(site, 'dv', 'keep');
  assert.equal(refused.status, 500);
  assert.equal(refused.code, 'SNAPSHOT_CORRUPT');
  const list = (await site.api<{ name: string; state: string; failure?: { code: string } }[]>('GET', '/api/v1/volumes/dv/snapshots')).body;
  assert.equal(list[0]?.state, 'corrupt');
  assert.equal(list[0]?.failure?.code, 'SNAPSHOT_CORRUPT');
  // It is the newest snapshot: a write would need its maps, so writes are refused too.
  const write = await fetch(`${site.url}/api/v1/volumes/dv/data?offset=0`, { method: 'PUT', body: Buffer.alloc(10), headers: { 'content-type': 'application/octet-stream' } });
  assert.equal(write.status, 500);
  assert.equal(((await write.json()) as { error: { code: string } }).error.code, 'SNAPSHOT_CORRUPT');
  let r = await site.cli(['snapshot', 'delete', 'dv', 'keep']);
  assert.match(r.stderr, /^ferry: SNAPSHOT_CORRUPT: .*--force/);
  r = await site.cli(['snapshot', 'delete', 'dv', 'keep', '--force']);
  assert.equal(r.code, 0, r.stderr);
  await site.writeData('dv', 0, Buffer.alloc(10, 9));
});

test('snapshots are NBD exports VOL@SNAP: listed, read-only, and read back equal to the snapshot digest', async () => {
  const { execFile } = await import('node:child_process');
  const { promisify } = await import('node:util');
  const { mkdtemp, readFile, rm } = await import('node:fs/promises');
  const { tmpdir } = await import('node:os');
  const { join } = await import('node:path');
  const { createHash, randomBytes } = await import('node:crypto');
  const run = promisify(execFile);
  const dir = await mkdtemp(join(tmpdir(), 'ferry-snap-nbd-'));
  try {
    assert.equal((await site.api('POST', '/api/v1/volumes', { name: 'nbdsnap', size: '4M' })).status, 201);
    await site.writeData('nbdsnap', 12345, randomBytes(100_000));
    assert.equal((await site.api('POST', '/api/v1/volumes/nbdsnap/snapshots', { name: 's1' })).status, 201);
    const digest = (await site.api<{ sha256: string }>('GET', '/api/v1/volumes/nbdsnap/snapshots/s1/digest')).body.sha256;
    await site.writeData('nbdsnap', 0, randomBytes(200_000)); // the volume moves on; the snapshot does not
    const list = await run('nbdinfo', ['--list', `nbd://127.0.0.1:${site.nbdPort}`]);
    assert.match(list.stdout, /nbdsnap@s1/);
    const out = join(dir, 's1.raw');
    await run('nbdcopy', [`nbd://127.0.0.1:${site.nbdPort}/nbdsnap@s1`, out]);
    assert.equal(createHash('sha256').update(await readFile(out)).digest('hex'), digest);
    await assert.rejects(run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', `nbd://127.0.0.1:${site.nbdPort}/nbdsnap@s1`]), /read-only|not permitted|Permission/i);
    await assert.rejects(run('nbdinfo', [`nbd://127.0.0.1:${site.nbdPort}/nbdsnap@nope`]));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('a full disk: writes to a volume with a snapshot fail with NO_SPACE over the API and ENOSPC over NBD, change nothing, and work again once space is freed', async () => {
  const { execFile } = await import('node:child_process');
  const { promisify } = await import('node:util');
  const run = promisify(execFile);
  const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
  const s = await TestSite.create('nospace');
  try {
    const size = 4 * mib;
    await s.api('POST', '/api/v1/volumes', { name: 'v', size });
    const image = randomBytes(size);
    await s.writeData('v', 0, image);
    assert.equal((await s.cli(['snapshot', 'create', 'v', '--name', 'before'])).code, 0);
    const current = Buffer.from(image);
    const writeMiB = async (at: number): Promise<Response> => {
      const data = randomBytes(mib);
      const res = await fetch(`${s.url}/api/v1/volumes/v/data?offset=${at}`, { method: 'PUT', body: data, headers: { 'content-type': 'application/octet-stream' } });
      if (res.status === 204) data.copy(current, at);
      return res;
    };
    // No file of the site may grow past the volume's size now (RLIMIT_FSIZE: EFBIG, as on a
    // full disk). The snapshot keeps a before-image and a header for each block changed:
    // its save volume runs out of room before the whole volume is rewritten.
    const pid = String(s.proc?.pid);
    await run('prlimit', ['--pid', pid, `--fsize=${size}:unlimited`]);
    let refusedAt = -1;
    try {
      for (let at = 0; at < size && refusedAt < 0; at += mib) {
        const res = await writeMiB(at);
        if (res.status === 204) continue;
        refusedAt = at;
        assert.equal(res.status, 507);
        const body = (await res.json()) as { error: { code: string; message: string } };
        assert.equal(body.error.code, 'NO_SPACE');
        assert.match(body.error.message, /free space on its file system, then try again.*EFBIG/);
      }
      assert.ok(refusedAt > 0, 'some writes fit, then one was refused');
      // The same range through NBD: the host gets ENOSPC.
      const nbd = await run('qemu-io', ['-f', 'raw', '-c', `write -P 7 ${refusedAt} 1M`, `nbd://127.0.0.1:${s.nbdPort}/v`]).then((r) => r.stdout + r.stderr, (e: { stdout?: string; stderr?: string }) => `${e.stdout ?? ''}${e.stderr ?? ''}`);
      assert.match(nbd, /No space left on device/);
      // Nothing of the refused writes reached the volume; the snapshot is as it was taken.
      assert.equal(await s.digest('v'), sha(current));
      assert.equal((await snapDigest(s, 'v', 'before')).sha256, sha(image));
    } finally {
      await run('prlimit', ['--pid', pid, '--fsize=unlimited:unlimited']);
    }
    // Space is freed: the same writes go through, with no restart.
    for (let at = refusedAt; at < size; at += mib) assert.equal((await writeMiB(at)).status, 204);
    assert.equal(await s.digest('v'), sha(current));
    assert.equal((await snapDigest(s, 'v', 'before')).sha256, sha(image));
    // And after a restart, which reads the snapshot's files again.
    await s.restart();
    assert.equal(await s.digest('v'), sha(current));
    assert.equal((await snapDigest(s, 'v', 'before')).sha256, sha(image));
  } finally {
    await s.destroy();
  }
});

test('site capacity: what volumes promise and what the file system has left; on a full disk, creating a volume or a snapshot fails with NO_SPACE and leaves no file behind, and works once run again with space', async () => {
  const { execFile } = await import('node:child_process');
  const { promisify } = await import('node:util');
  const run = promisify(execFile);
  const s = await TestSite.create('nospace-create');
  try {
    // A 1 TiB volume with its last block written: a snapshot's meta bit map has a page
    // 16 MiB into its file.
    const size = 1024 * 1024 * mib;
    assert.equal((await s.api('POST', '/api/v1/volumes', { name: 'v', size })).status, 201);
    await s.writeData('v', size - 8192, randomBytes(8192));
    // What is promised against what is left, at the site.
    const { statfs } = await import('node:fs/promises');
    const fs = await statfs(s.dir);
    const shown = await s.cli(['site', 'show', '--json']);
    const info = JSON.parse(shown.stdout) as { fileSystemBytes: number; fileSystemAvailableBytes: number; volumesProvisionedBytes: number; volumesAllocatedBytes: number };
    assert.equal(info.fileSystemBytes, fs.blocks * fs.bsize);
    assert.ok(info.fileSystemAvailableBytes > 0 && info.fileSystemAvailableBytes <= info.fileSystemBytes);
    assert.deepEqual([info.volumesProvisionedBytes, info.volumesAllocatedBytes], [size, 8192]);
    assert.match((await s.cli(['site', 'show'])).stdout, /^volumesProvisionedBytes:\s+1T$/m);
    assert.match(await (await fetch(`${s.url}/metrics`)).text(), /^ferry_site_file_system_available_bytes\{[^}]*\} [1-9]\d*$/m);
    const files = async (): Promise<string[]> => [...(await readdir(join(s.dir, 'volumes'))), ...(await readdir(join(s.dir, 'snapshots')))].sort();
    const before = await files();
    // No file of the site may grow past 8 MiB now (EFBIG, as on a full disk): a new
    // 64 MiB volume's image, or the snapshot's meta bit map, cannot be written.
    const pid = String(s.proc?.pid);
    await run('prlimit', ['--pid', pid, `--fsize=${8 * mib}:unlimited`]);
    try {
      const created = await s.api<{ error: { code: string } }>('POST', '/api/v1/volumes', { name: 'w', size: 64 * mib });
      assert.equal(created.status, 507);
      assert.equal(created.body.error.code, 'NO_SPACE');
      const snap = await s.cli(['snapshot', 'create', 'v', '--name', 'first']);
      assert.notEqual(snap.code, 0);
      assert.match(snap.stderr, /^ferry: NO_SPACE: .*EFBIG/);
      assert.deepEqual(await files(), before, 'no file left behind');
    } finally {
      await run('prlimit', ['--pid', pid, '--fsize=unlimited:unlimited']);
    }
    assert.deepEqual((await s.api<{ name: string }[]>('GET', '/api/v1/volumes')).body.map((v) => v.name), ['v']);
    assert.equal((await s.api('POST', '/api/v1/volumes', { name: 'w', size: 64 * mib })).status, 201);
    assert.equal((await s.cli(['snapshot', 'create', 'v', '--name', 'first'])).code, 0);
  } finally {
    await s.destroy();
  }
});
