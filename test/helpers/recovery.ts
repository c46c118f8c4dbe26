import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { promisify } from 'node:util';
import assert from 'node:assert/strict';
import { TestSite } from './site.js';
import { pairStatus, waitFor, waitInSync, type PairStatus } from './replication.js';
import { FaultProxy } from './fault-proxy.js';

/** Two-site scenarios for the role-change tests: a pair on volume `db`, writes tracked in an image of it. */

export const MiB = 1024 * 1024;
export const bs = 8192;
export const execFileP = promisify(execFile);

export async function sites(name: string): Promise<[TestSite, TestSite]> {
  return Promise.all([TestSite.create(`${name}-a`), TestSite.create(`${name}-b`)]);
}

export function sha(buf: Buffer): string {
  return createHash('sha256').update(buf).digest('hex');
}

/** A write of whole blocks with random data; `touched` collects its blocks. */
export function blockWrite(size: number, touched?: Set<number>, maxBlocks = 4): { offset: number; data: Buffer } {
  const blocks = 1 + Math.floor(Math.random() * maxBlocks);
  const first = Math.floor(Math.random() * (size / bs - blocks));
  for (let b = first; b < first + blocks; b++) touched?.add(b);
  return { offset: first * bs, data: randomBytes(blocks * bs) };
}

export async function writeApi(site: TestSite, image: Buffer, n: number, touched?: Set<number>): Promise<void> {
  for (let i = 0; i < n; i++) {
    const w = blockWrite(image.length, touched);
    await site.writeData('db', w.offset, w.data);
    w.data.copy(image, w.offset);
  }
}

/** A fault proxy in front of `site`, which advertises it (restarted to do so): the other site reaches it only through the proxy. */
export async function advertisedProxy(site: TestSite, seed: number): Promise<FaultProxy> {
  const proxy = new FaultProxy(site.host, site.port, seed);
  await proxy.start();
  try {
    site.advertise = proxy.url;
    await site.restart();
  } catch (err) {
    await proxy.close();
    throw err;
  }
  return proxy;
}

/** `n` writes at `source` reach `target`: in sync, and its digest is `image` (the writes applied to it). */
export async function writesReplicate(source: TestSite, target: TestSite, image: Buffer, n: number): Promise<void> {
  await writeApi(source, image, n);
  await waitInSync(source, target, 'db');
  assert.equal(await target.digest('db'), sha(image));
}

/** Writes through NBD with qemu-io (patterned blocks), applied to `image` too. */
export async function writeNbd(site: TestSite, image: Buffer, n: number, touched?: Set<number>): Promise<void> {
  const cmds: string[] = [];
  for (let i = 0; i < n; i++) {
    const blocks = 1 + Math.floor(Math.random() * 4);
    const first = Math.floor(Math.random() * (image.length / bs - blocks));
    const pattern = 1 + Math.floor(Math.random() * 254);
    for (let b = first; b < first + blocks; b++) touched?.add(b);
    image.fill(pattern, first * bs, (first + blocks) * bs);
    cmds.push('-c', `write -P ${pattern} ${first * bs} ${blocks * bs}`);
  }
  await execFileP('qemu-io', ['-f', 'raw', ...cmds, `nbd://127.0.0.1:${site.nbdPort}/db`]);
}

export async function recoveryPhase(site: TestSite): Promise<string | undefined> {
  return (await pairStatus(site, 'db')).recovery?.phase;
}

/** `to`: where A reaches B (a proxy, say). */
export async function startPair(a: TestSite, b: TestSite, size: number, image: Buffer, to = b.url): Promise<void> {
  assert.equal((await a.api('POST', '/api/v1/volumes', { name: 'db', size })).status, 201);
  await writeApi(a, image, 30);
  const start = await a.cli(['replicate', 'start', 'db', '--to', to, '--interval', '500ms', '--wait', '--json']);
  assert.equal(start.code, 0, start.stderr);
  await waitInSync(a, b, 'db');
  assert.equal(await b.digest('db'), sha(image));
}

/** A pair whose every block holds data (so each differing block costs its bytes on the wire), in sync; returns the image. */
export async function startFullPair(a: TestSite, b: TestSite, size: number): Promise<Buffer> {
  const image = Buffer.alloc(size);
  await startPair(a, b, size, image);
  for (let off = 0; off < size; off += 4 * MiB) {
    const data = randomBytes(4 * MiB);
    await a.writeData('db', off, data);
    data.copy(image, off);
  }
  await waitInSync(a, b, 'db');
  return image;
}

/** Pauses sending at the source, then makes `deltaSets` delta sets there that the target never gets. */
export async function unshippedDeltaSets(a: TestSite, image: Buffer, deltaSets: number, touched: Set<number>): Promise<void> {
  assert.equal((await a.cli(['replicate', 'pause', 'db'])).code, 0);
  for (let k = 0; k < deltaSets; k++) {
    const before = (await pairStatus(a, 'db')).deltaSetCreated;
    await writeApi(a, image, 5, touched);
    await a.api('POST', '/api/v1/replication/db/delta');
    await waitFor('delta set cut', async () => (await pairStatus(a, 'db')).deltaSetCreated > before);
  }
}

export async function waitResynced(b: TestSite, a: TestSite): Promise<PairStatus> {
  let last: PairStatus | undefined;
  await waitFor(() => `resync done (last: ${JSON.stringify(last)}; the old source's exit code ${a.exitCode}, its stderr: ${a.stderrTail}, its last log lines: ${JSON.stringify(a.logs.slice(-15).map((l) => [l.msg, l.err]))})`, async () => {
    last = await pairStatus(b, 'db');
    return last.recovery?.phase === 'resynced';
  }, 120_000, 200).catch(async (err: Error) => {
    // Who holds the old source's port, and does it answer: for a failure seen now and then.
    const sockets = await execFileP('ss', ['-tanpe', `( sport = :${a.port} or dport = :${a.port} )`]).then((r) => r.stdout, (e: Error) => e.message);
    const api = await a.api('GET', '/api/v1/status/db').then((r) => `HTTP ${r.status}`, (e: Error) => e.message);
    throw new Error(`${err.message}\nthe old source's port ${a.port}, its API: ${api}; sockets:\n${sockets}\nthe new source's last log lines: ${JSON.stringify(b.logs.slice(-15).map((l) => [l.msg, l.err]))}`);
  });
  await waitInSync(b, a, 'db', 'db', 120_000);
  // The rebuilt old source is a read-only replica again, and its status no longer says it is being rebuilt.
  const rebuilt = await pairStatus(a, 'db');
  assert.equal(rebuilt.reason, '', `the rebuilt old source says: ${rebuilt.reason}`);
  assert.equal(rebuilt.health, 'ok');
  assert.equal((await a.api<{ access: string }>('GET', '/api/v1/volumes/db')).body.access, 'read-only');
  return pairStatus(b, 'db');
}

/** Snapshot names of a volume at a site. */
export async function snapshotNames(site: TestSite): Promise<string[]> {
  return (await site.api<{ name: string }[]>('GET', '/api/v1/volumes/db/snapshots')).body.map((s) => s.name);
}

export async function snapshotDigest(site: TestSite, name: string): Promise<string> {
  const r = await site.cli(['snapshot', 'digest', 'db', name, '--json']);
  assert.equal(r.code, 0, r.stderr);
  return (JSON.parse(r.stdout) as { sha256: string }).sha256;
}

export async function access(site: TestSite): Promise<string> {
  return (await site.api<{ access: string }>('GET', '/api/v1/volumes/db')).body.access;
}
