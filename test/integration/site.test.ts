import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { connect } from 'node:net';
import { randomBytes } from 'node:crypto';
import { mkdtemp, writeFile, rm, readdir, readFile, stat } from 'node:fs/promises';
import { availableParallelism, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { TestSite, ferry, ferryBin } from '../helpers/site.js';
import { connectRcp } from '../../src/transport/connection.js';
import { waitFor } from '../helpers/replication.js';
import { threadPoolSize } from '../../src/cli/thread-pool.cjs';

const execFileP = promisify(execFile);

let site: TestSite;

before(async () => {
  site = await TestSite.create('alpha', { env: { FERRY_FIRST_BYTES_TIMEOUT_MS: '500' } });
});

after(async () => {
  await site?.destroy();
});

test('CLI: create, list, show, resize, delete volumes, human and --json', async () => {
  let r = await site.cli(['volume', 'create', 'cli1', '--size', '64M']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /volume cli1 created \(64M\)/);

  r = await site.cli(['volume', 'list']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^NAME\s+SIZE\s+ALLOCATED\s+ACCESS/m);
  assert.match(r.stdout, /^cli1\s+64M\s+0\s+read-write/m);

  r = await site.cli(['volume', 'show', 'cli1', '--json']);
  const shown = JSON.parse(r.stdout) as { name: string; sizeBytes: number; blockBytes: number };
  assert.equal(shown.name, 'cli1');
  assert.equal(shown.sizeBytes, 64 * 1024 * 1024);
  assert.equal(shown.blockBytes, 8192);

  r = await site.cli(['volume', 'resize', 'cli1', '--size', '32M']);
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /^ferry: SHRINK_REFUSED: /);
  r = await site.cli(['volume', 'resize', 'cli1', '--size', '32M', '--force', '--json']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal((JSON.parse(r.stdout) as { sizeBytes: number }).sizeBytes, 32 * 1024 * 1024);
  r = await site.cli(['volume', 'resize', 'cli1', '--size', '1G']);
  assert.equal(r.code, 0, r.stderr);

  r = await site.cli(['volume', 'delete', 'cli1']);
  assert.equal(r.code, 0, r.stderr);
  r = await site.cli(['volume', 'show', 'cli1']);
  assert.equal(r.code, 1);
  assert.equal(r.stderr, 'ferry: VOLUME_NOT_FOUND: volume cli1 not found\n');
});

test('CLI: FERRY_SITE selects the site and an unreachable site is a one-line error', async () => {
  let r = await ferry(['volume', 'list', '--json'], { FERRY_SITE: site.url });
  assert.equal(r.code, 0, r.stderr);
  assert.ok(Array.isArray(JSON.parse(r.stdout)));
  r = await ferry(['volume', 'list', '--site', 'http://127.0.0.1:1']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^ferry: UNAVAILABLE: cannot reach the site at http:\/\/127\.0\.0\.1:1 .*\n$/);
});

test('one port, two protocols: 100 HTTP requests and 100 RCP handshakes at once, interleaved', async () => {
  const self = { siteId: 'peer-test', siteName: 'peer' };
  const jobs: Promise<void>[] = [];
  for (let i = 0; i < 100; i++) {
    jobs.push(
      (async () => {
        const res = await fetch(`${site.url}/api/v1/site`);
        assert.equal(res.status, 200);
        assert.equal(((await res.json()) as { name: string }).name, 'alpha');
      })(),
    );
    jobs.push(
      (async () => {
        const { connection, peer } = await connectRcp(site.host, site.port, self);
        assert.equal(peer.siteName, 'alpha');
        connection.destroy();
      })(),
    );
  }
  await Promise.all(jobs);
  const metrics = await (await fetch(`${site.url}/metrics`)).text();
  const handshakes = Number(/^ferry_rcp_handshakes_total\{[^}]*\} (\d+)$/m.exec(metrics)?.[1]);
  assert.ok(handshakes >= 100, `handshakes counted: ${handshakes}`);
});

test('persistence: data and catalog survive SIGKILL and restart', async () => {
  await site.api('POST', '/api/v1/volumes', { name: 'keep', size: '16M' });
  await site.api('POST', '/api/v1/volumes', { name: 'keep2', size: '8M' });
  const writes: [number, Buffer][] = [];
  for (let i = 0; i < 20; i++) {
    const offset = Math.floor(Math.random() * (16 * 1024 * 1024 - 70_000));
    const data = randomBytes(1 + Math.floor(Math.random() * 65_536));
    writes.push([offset, data]);
    await site.writeData('keep', offset, data);
  }
  const digest = await site.digest('keep');
  const last = writes[writes.length - 1] as [number, Buffer];
  await site.kill('SIGKILL');
  await site.start();
  assert.equal(await site.digest('keep'), digest);
  assert.deepEqual(await site.readData('keep', last[0], last[1].length), last[1]);
  const list = (await site.api<{ name: string }[]>('GET', '/api/v1/volumes')).body.map((v) => v.name);
  assert.ok(list.includes('keep') && list.includes('keep2'));
  const keep = (await site.api<{ allocatedBytes: number }>('GET', '/api/v1/volumes/keep')).body;
  assert.ok(keep.allocatedBytes > 0, 'allocation map survived');
});

test('lock: a second daemon on the same directory fails with a clear message', async () => {
  const r = await ferry(['site', 'start', '--dir', site.dir]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^ferry: SITE_LOCKED: site directory .* is in use by another ferry daemon \(pid \d+\)\n$/);
  assert.equal((await fetch(`${site.url}/healthz`)).status, 200, 'the first daemon keeps serving');
});

test('site init refuses a directory holding something else, or an existing site', async () => {
  const root = await mkdtemp(join(tmpdir(), 'ferry-init-'));
  try {
    await writeFile(join(root, 'precious.txt'), 'data');
    let r = await ferry(['site', 'init', '--dir', root, '--name', 'x']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /NOT_A_SITE_DIRECTORY/);
    r = await ferry(['site', 'init', '--dir', site.dir, '--name', 'x']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /SITE_EXISTS/);
    r = await ferry(['site', 'init', '--dir', join(root, 'new'), '--name', 'bad name']);
    assert.match(r.stderr, /INVALID_NAME/);
    r = await ferry(['site', 'init', '--dir', join(root, 'new2'), '--name', 'ok', '--block-size', '3000']);
    assert.match(r.stderr, /INVALID_SIZE/);
    r = await ferry(['site', 'start', '--dir', join(root, 'missing')]);
    assert.match(r.stderr, /^ferry: SITE_NOT_FOUND: /);
  } finally {
    await rm(root, { recursive: true, force: true });
  }
});

test('bad input gets the right status and code, and the daemon keeps serving', async () => {
  const post = (body: string, path = '/api/v1/volumes', type = 'application/json'): Promise<Response> =>
    fetch(`${site.url}${path}`, { method: 'POST', body, headers: { 'content-type': type } });
  const expectError = async (res: Response, status: number, code: string): Promise<void> => {
    assert.equal(res.status, status);
    const body = (await res.json()) as { error: { code: string; message: string } };
    assert.equal(body.error.code, code);
    assert.ok(body.error.message.length > 0);
  };
  await expectError(await post('{"name": "x", '), 400, 'BAD_REQUEST');
  await expectError(await post('{"name": "x", "size": "1G", "colour": "blue"}'), 400, 'BAD_REQUEST');
  await expectError(await post('{"name": "x"}'), 400, 'BAD_REQUEST');
  await expectError(await post('{"name": "a/b", "size": "1G"}'), 400, 'INVALID_NAME');
  await expectError(await post('{"name": "x", "size": "12Q"}'), 400, 'INVALID_SIZE');
  await expectError(await post('{"name": "x", "size": -1}'), 400, 'INVALID_SIZE');
  await expectError(await post('{"name": "x", "size": "-1"}'), 400, 'INVALID_SIZE');
  await expectError(await post('{"name": "x", "size": 1000}'), 400, 'INVALID_SIZE');
  await expectError(await post('[1,2,3]'), 400, 'BAD_REQUEST');
  assert.equal((await post('{"name": "dup", "size": "1M"}')).status, 201);
  await expectError(await post('{"name": "dup", "size": "1M"}'), 409, 'VOLUME_EXISTS');
  await expectError(await fetch(`${site.url}/api/v1/nothing-here`), 404, 'NOT_FOUND');
  await expectError(await fetch(`${site.url}/api/v1/volumes/ghost`), 404, 'VOLUME_NOT_FOUND');
  await expectError(await post('{}', '/api/v1/volumes/dup/resize'), 400, 'BAD_REQUEST');
  const big = await rawPost(`${site.url}/api/v1/volumes`, Buffer.from(`{"name": "big", "size": "1G", "pad": "${'x'.repeat(10 * 1024 * 1024)}"}`));
  assert.equal(big.status, 413);
  assert.equal((JSON.parse(big.body) as { error: { code: string } }).error.code, 'PAYLOAD_TOO_LARGE');
  await expectError(await fetch(`${site.url}/api/v1/volumes/dup/data?offset=1048570`, { method: 'PUT', body: Buffer.alloc(100), headers: { 'content-type': 'application/octet-stream' } }), 416, 'OUT_OF_RANGE');
  await expectError(await fetch(`${site.url}/api/v1/volumes/dup/data?offset=-5`, { method: 'PUT', body: Buffer.alloc(1), headers: { 'content-type': 'application/octet-stream' } }), 400, 'BAD_REQUEST');
  await expectError(await post('<volume/>', '/api/v1/volumes', 'application/xml'), 415, 'BAD_REQUEST');
  await expectError(await post('name=x', '/api/v1/volumes', 'text/plain'), 400, 'BAD_REQUEST');

  // A client that connects and stays silent is closed after the first-bytes timeout.
  const silentClosedMs = await new Promise<number>((resolve, reject) => {
    const t0 = Date.now();
    const s = connect(site.port, site.host);
    s.on('close', () => resolve(Date.now() - t0));
    s.on('error', reject);
  });
  assert.ok(silentClosedMs >= 400 && silentClosedMs < 5000, `silent connection closed after ${silentClosedMs} ms`);

  // Binary garbage: closed without an answer. Garbage that looks like HTTP: 400.
  const answer = async (bytes: Buffer): Promise<string> =>
    new Promise((resolve) => {
      const s = connect(site.port, site.host, () => s.write(bytes));
      let got = '';
      s.on('data', (d) => (got += d.toString('latin1')));
      s.on('close', () => resolve(got));
      s.on('error', () => undefined);
    });
  assert.equal(await answer(Buffer.from([0x00, 0xff, 0x13, 0x37, 0x42])), '');
  assert.match(await answer(Buffer.from('GARBAGE LINE WITHOUT PROTOCOL\r\n\r\n')), /^HTTP\/1\.1 400 /);
  // RCP preamble followed by rubbish: the replication side refuses it and closes.
  assert.equal(await answer(Buffer.from('RCP/1.0\nthis is not a frame at all, not even close........')), 'RCP/1.0\n', 'preamble only, no frame, then closed');

  const health = await fetch(`${site.url}/healthz`);
  assert.equal(health.status, 200);
  assert.equal(((await site.api<{ name: string }[]>('GET', '/api/v1/volumes')).body).some((v) => v.name === 'dup'), true);
});

test('SIGTERM drains and exits 0; the dashboard and metrics answer before that', async () => {
  const page = await fetch(`${site.url}/`);
  assert.equal(page.status, 200);
  assert.match(await page.text(), /<title>ferry<\/title>/);
  const metrics = await (await fetch(`${site.url}/metrics`)).text();
  assert.match(metrics, /^ferry_volumes\{site="alpha"\} \d+$/m);
  assert.match(metrics, /^ferry_volume_size_bytes\{volume="keep",site="alpha"\} 16777216$/m);
  assert.match(metrics, /^process_resident_memory_bytes/m);
  // A client polling on one keep-alive connection, as a dashboard or a monitor does,
  // does not hold the drain up: that connection is closed with the others.
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  let answered = 0;
  const poll = setInterval(() => {
    http.get(`${site.url}/api/v1/status`, { agent }, (res) => res.resume().on('end', () => answered++)).on('error', () => undefined);
  }, 100);
  try {
    await waitUntil(() => answered >= 3);
    const stopping = Date.now();
    const exited = await Promise.race([site.kill('SIGTERM'), new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), 10_000))]);
    assert.equal(exited, 0, 'clean exit while the connection was busy');
    assert.ok(Date.now() - stopping < 5_000, `stopped in ${Date.now() - stopping} ms`);
  } finally {
    clearInterval(poll);
    agent.destroy();
    if (site.exitCode === null) await site.kill('SIGKILL');
  }
  assert.ok(site.logs.some((l) => l.msg === 'site stopped'));
  await site.start();
});

async function waitUntil(ok: () => boolean, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 20));
  }
}

/**
 * POSTs a body over a raw socket and resolves with what the server answered. Like curl,
 * it gives the server a moment to answer from the headers alone (a declared length over
 * the limit) before sending the body.
 */
function rawPost(url: string, body: Buffer): Promise<{ status: number; body: string }> {
  const { hostname, port, pathname } = new URL(url);
  return new Promise((resolve) => {
    const s = connect(Number(port), hostname, () => {
      s.write(`POST ${pathname} HTTP/1.1\r\nhost: ${hostname}\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\nconnection: close\r\n\r\n`);
      setTimeout(() => {
        if (got.length === 0) s.write(body);
      }, 300);
    });
    let got = '';
    s.on('data', (d: Buffer) => (got += d.toString('latin1')));
    s.on('error', () => undefined);
    s.on('close', () => {
      const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(got)?.[1] ?? 0);
      const text = got.slice(got.indexOf('\r\n\r\n') + 4);
      resolve({ status, body: text });
    });
  });
}

test('a digest of a large volume is hashed off the event loop: the site answers over HTTP and NBD meanwhile, and a digest whose client goes away stops', async () => {
  // 4 GiB of mostly holes: seconds of hashing on one CPU.
  assert.equal((await site.api('POST', '/api/v1/volumes', { name: 'digested', size: 4 * 1024 ** 3 })).status, 201);
  const data = randomBytes(1024 * 1024);
  await site.writeData('digested', 3 * 1024 ** 3, data);
  let digestDone = false;
  const digest = site.digest('digested').then((d) => {
    digestDone = true;
    return d;
  });
  await new Promise((r) => setTimeout(r, 300));
  // Answered while the digest runs: before, the site answered nothing until it was done.
  assert.equal((await site.api('GET', '/healthz')).status, 200);
  const read = await site.readData('digested', 3 * 1024 ** 3, 4096);
  const nbd = await execFileP('qemu-io', ['-f', 'raw', '-r', '-c', `read -P 0 0 64k`, `nbd://127.0.0.1:${site.nbdPort}/digested`]);
  assert.equal(digestDone, false, 'the digest ended before the site was asked anything: the test proves nothing on this machine');
  assert.ok(read.equals(data.subarray(0, 4096)));
  assert.match(nbd.stdout, /read 65536\/65536 bytes/);
  const sha256 = await digest;
  assert.match(sha256, /^[0-9a-f]{64}$/);

  // The CLI shows progress (a line every 2 s when stderr is not a terminal), then the answer.
  const cli = await site.cli(['volume', 'digest', 'digested']);
  assert.equal(cli.code, 0, cli.stderr);
  assert.equal(cli.stdout, `${sha256}  digested\n`);
  assert.match(cli.stderr, /^\[[#.]{30}\] \d+\.\d% .* of 4G /);
  assert.match(cli.stderr, /\[#{30}\] 100\.0% 4G in /);
  const json = await site.cli(['volume', 'digest', 'digested', '--json']);
  assert.equal((JSON.parse(json.stdout) as { sha256: string }).sha256, sha256);
  assert.equal(json.stderr, '');
  assert.equal((await site.api('GET', '/api/v1/volumes/digested/digest?progress=yes')).status, 400);

  const client = new AbortController();
  const cancelled = fetch(`${site.url}/api/v1/volumes/digested/digest`, { signal: client.signal }).then(() => 'answered', (err: Error) => err.name);
  await new Promise((r) => setTimeout(r, 300));
  client.abort();
  assert.equal(await cancelled, 'AbortError');
  await waitFor('the cancelled digest to be logged', async () => site.logs.some((l) => l.msg === 'digest of digested cancelled: the client went away'), 10_000);
});

test("the daemon's thread pool (its file I/O) is sized to the machine's CPUs, 2 to 4, by the ferry command's entry; an operator's UV_THREADPOOL_SIZE is kept", async () => {
  const expected = process.env.UV_THREADPOOL_SIZE !== undefined ? Number(process.env.UV_THREADPOOL_SIZE) : threadPoolSize(availableParallelism());
  const set = await TestSite.create('pool', { env: { UV_THREADPOOL_SIZE: '7' } });
  try {
    const shown = (await site.api<{ threadPoolSize: number }>('GET', '/api/v1/site')).body;
    assert.equal(shown.threadPoolSize, expected);
    assert.equal((await set.api<{ threadPoolSize: number }>('GET', '/api/v1/site')).body.threadPoolSize, 7);
    assert.ok(set.logs.some((l) => l.msg === 'site started' && l.threadPoolSize === 7));
    // The pool libuv started is that size: the two daemons differ by just those threads.
    const threads = async (t: TestSite): Promise<number> => (await readdir(`/proc/${t.proc?.pid}/task`)).length;
    assert.equal((await threads(set)) - (await threads(site)), 7 - expected);
  } finally {
    await set.destroy();
  }
  assert.deepEqual([1, 2, 3, 4, 16].map(threadPoolSize), [2, 2, 3, 4, 4]);
});

test('npx ferry runs the command from the package (its entry is executable once built); --version and site show give the package version', async () => {
  const root = join(dirname(ferryBin), '..', '..', '..');
  const pkg = JSON.parse(await readFile(join(root, 'package.json'), 'utf8')) as { version: string };
  assert.ok(((await stat(ferryBin)).mode & 0o111) !== 0, `${ferryBin} is executable`);
  const { stdout } = await execFileP('npx', ['--no', '--', 'ferry', '--version'], { cwd: root });
  assert.equal(stdout, `${pkg.version}\n`);
  assert.equal((await ferry(['-V'])).stdout, `${pkg.version}\n`);
  assert.equal((await site.api<{ ferryVersion: string }>('GET', '/api/v1/site')).body.ferryVersion, pkg.version);
  assert.match((await site.cli(['site', 'show'])).stdout, new RegExp(`^ferryVersion:\\s+${pkg.version.replace(/\./g, '\\.')}$`, 'm'));
  assert.ok(site.logs.some((l) => l.msg === 'site started' && l.ferryVersion === pkg.version));
});
