import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { TestSite } from '../helpers/site.js';
import { RawNbdClient } from '../helpers/nbd-client.js';
import { cmd, cmdFlag, nbdErrno, txFlag } from '../../src/nbd/protocol.js';

const execFileP = promisify(execFile);
const MiB = 1024 * 1024;

let site: TestSite;
let work: string;

before(async () => {
  site = await TestSite.create('nbd');
  work = await mkdtemp(join(tmpdir(), 'ferry-nbd-'));
});

after(async () => {
  await site?.destroy();
  if (work) await rm(work, { recursive: true, force: true });
});

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a real client; never throws on a non-zero exit (the test asserts). */
async function run(file: string, args: string[], timeoutMs = 60_000): Promise<Run> {
  try {
    const { stdout, stderr } = await execFileP(file, args, { timeout: timeoutMs, maxBuffer: 64 * MiB });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof e.code === 'number' ? e.code : 1, stdout: e.stdout ?? '', stderr: e.stderr ?? String(err) };
  }
}

async function ok(file: string, args: string[]): Promise<string> {
  const r = await run(file, args);
  assert.equal(r.code, 0, `${file} ${args.join(' ')} failed:\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

function uri(name: string): string {
  return `nbd://127.0.0.1:${site.nbdPort}/${name}`;
}

async function createVolume(name: string, size: string): Promise<void> {
  const r = await site.cli(['volume', 'create', name, '--size', size]);
  assert.equal(r.code, 0, r.stderr);
}

function sha256(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

/** A raw image: random data in a few places, holes elsewhere. */
async function sparseImage(path: string, sizeBytes: number): Promise<Buffer> {
  const img = Buffer.alloc(sizeBytes);
  for (const [offset, length] of [
    [0, 3 * MiB + 4097],
    [9 * MiB + 5, 777_777],
    [sizeBytes - 2 * MiB, 2 * MiB],
  ] as const) {
    randomBytes(length).copy(img, offset);
  }
  await writeFile(path, img);
  // Punch the zero ranges back out so the source is sparse as well.
  await ok('fallocate', ['--dig-holes', path]);
  return img;
}

test('the site logs its NBD address and serves the volumes; nbdinfo plain, --list and --map; qemu-img info and map', async () => {
  assert.ok(site.nbdPort > 0, 'nbd address in the "site started" log line');
  await createVolume('info', '64M');
  await ok('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 8M 1M', '-c', 'write -P 0x6b 40M 3M', uri('info')]);

  const plain = JSON.parse(await ok('nbdinfo', ['--json', uri('info')])) as { exports: Record<string, unknown>[]; protocol: string };
  const e = plain.exports[0] as Record<string, unknown>;
  assert.equal(plain.protocol, 'newstyle-fixed');
  assert.equal(e['export-size'], 64 * MiB);
  assert.equal(e.is_read_only, false);
  assert.equal(e.can_multi_conn, true);
  assert.equal(e.can_flush, true);
  assert.equal(e.can_fua, true);
  assert.equal(e.can_trim, true);
  assert.equal(e.can_zero, true);
  assert.equal(e.can_fast_zero, true);
  assert.equal(e.can_cache, true);
  assert.equal(e.block_size_maximum, 32 * MiB);
  assert.deepEqual(e.contexts, ['base:allocation']);

  await createVolume('listed2', '8M');
  const list = JSON.parse(await ok('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${site.nbdPort}`])) as { exports: { 'export-name': string; description: string }[] };
  const names = list.exports.map((x) => x['export-name']);
  assert.ok(names.includes('info') && names.includes('listed2'), names.join(','));
  assert.match(list.exports.find((x) => x['export-name'] === 'info')?.description ?? '', /ferry volume, 64M, read-write/);

  const map = JSON.parse(await ok('nbdinfo', ['--map', '--json', uri('info')])) as { offset: number; length: number; type: number }[];
  assert.deepEqual(
    map.map((m) => [m.offset, m.length, m.type]),
    [
      [0, 8 * MiB, 3],
      [8 * MiB, 1 * MiB, 0],
      [9 * MiB, 31 * MiB, 3],
      [40 * MiB, 3 * MiB, 0],
      [43 * MiB, 21 * MiB, 3],
    ],
  );

  const info = JSON.parse(await ok('qemu-img', ['info', '--output=json', '-f', 'raw', uri('info')])) as { 'virtual-size': number; format: string };
  assert.equal(info['virtual-size'], 64 * MiB);
  assert.equal(info.format, 'raw');
  const qmap = JSON.parse(await ok('qemu-img', ['map', '--output=json', '-f', 'raw', uri('info')])) as { start: number; length: number; data: boolean; zero: boolean }[];
  assert.deepEqual(
    qmap.map((m) => [m.start, m.length, m.data, m.zero]),
    [
      [0, 8 * MiB, false, true],
      [8 * MiB, 1 * MiB, true, false],
      [9 * MiB, 31 * MiB, false, true],
      [40 * MiB, 3 * MiB, true, false],
      [43 * MiB, 21 * MiB, false, true],
    ],
  );
});

test('qemu-io: patterns at odd offsets and sizes, discard, write -z, flush, and 64 aio requests in flight, verified byte for byte', async () => {
  const size = 16 * MiB;
  await createVolume('qio', '16M');
  const expected = Buffer.alloc(size);
  const cmds: string[] = [];
  const writeP = (pattern: number, offset: number, length: number): void => {
    cmds.push(`write -P 0x${pattern.toString(16)} ${offset} ${length}`);
    expected.fill(pattern, offset, offset + length);
  };
  writeP(0x11, 1, 4095);
  writeP(0x22, 8191, 3);
  writeP(0x33, 100_001, 777_777);
  writeP(0x44, 2 * MiB - 1, 2 * MiB + 2);
  writeP(0x55, size - 511, 511);
  cmds.push('discard 2M 1M');
  expected.fill(0, 2 * MiB, 3 * MiB);
  cmds.push('write -z 200003 50001');
  expected.fill(0, 200_003, 250_004);
  cmds.push('flush');
  for (let i = 0; i < 64; i++) {
    const offset = 5 * MiB + i * 65_536 + 13;
    cmds.push(`aio_write -P 0x${(0x80 + i).toString(16)} ${offset} 5000`);
    expected.fill(0x80 + i, offset, offset + 5000);
  }
  cmds.push('aio_flush');
  const out = await ok('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), uri('qio')]);
  assert.doesNotMatch(out, /fail|error/i);

  const verify = [
    'read -P 0x11 1 4095',
    'read -P 0 0 1',
    'read -P 0x22 8191 3',
    'read -P 0x33 100001 99999',
    'read -P 0 200003 50001',
    'read -P 0x33 250004 627774',
    'read -P 0x44 3145728 1048577',
    'read -P 0 2M 1M',
    `read -P 0x55 ${size - 511} 511`,
  ];
  for (let i = 0; i < 64; i++) verify.push(`aio_read -P 0x${(0x80 + i).toString(16)} ${5 * MiB + i * 65_536 + 13} 5000`);
  verify.push('aio_flush');
  const checked = await ok('qemu-io', ['-f', 'raw', ...verify.flatMap((c) => ['-c', c]), uri('qio')]);
  assert.doesNotMatch(checked, /fail|error/i);
  assert.equal((checked.match(/^read \d+\/\d+ bytes/gm) ?? []).length, verify.length - 1);
  assert.equal(await site.digest('qio'), sha256(expected));
});

test('qemu-img convert a raw image into an export and back out, byte-identical and sparse', async () => {
  const size = 32 * MiB;
  await createVolume('conv', '32M');
  const src = join(work, 'conv-in.img');
  const img = await sparseImage(src, size);
  await ok('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, uri('conv')]);
  assert.equal(await site.digest('conv'), sha256(img));
  const dst = join(work, 'conv-out.img');
  await ok('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri('conv'), dst]);
  assert.equal(sha256(await readFile(dst)), sha256(img));
  const shown = (await site.api<{ allocatedBytes: number }>('GET', '/api/v1/volumes/conv')).body;
  assert.ok(shown.allocatedBytes < 8 * MiB, `holes stayed holes (allocated ${shown.allocatedBytes})`);
});

test('nbdcopy in both directions, multi-connection and sparse', async () => {
  const size = 32 * MiB;
  await createVolume('copy', '32M');
  const src = join(work, 'copy-in.img');
  const img = await sparseImage(src, size);
  await ok('nbdcopy', ['--connections=4', '--requests=16', '--flush', src, uri('copy')]);
  assert.equal(await site.digest('copy'), sha256(img));
  const shown = (await site.api<{ allocatedBytes: number }>('GET', '/api/v1/volumes/copy')).body;
  assert.ok(shown.allocatedBytes < 8 * MiB, `holes stayed holes (allocated ${shown.allocatedBytes})`);
  const dst = join(work, 'copy-out.img');
  await ok('nbdcopy', ['--connections=4', uri('copy'), dst]);
  assert.equal(sha256(await readFile(dst)), sha256(img));
  // Export to export over two connections to the same daemon.
  await createVolume('copy2', '32M');
  await ok('nbdcopy', ['--connections=2', uri('copy'), uri('copy2')]);
  assert.equal(await site.digest('copy2'), sha256(img));
  assert.ok(site.logs.some((l) => l.msg === 'nbd transmission started'), 'connections logged');
});

/** A site-wide NBD counter from /metrics. */
async function nbdMetric(name: string): Promise<number> {
  const text = await (await fetch(`${site.url}/metrics`)).text();
  const value = new RegExp(`^${name}\\{[^}]*\\} (\\d+)$`, 'm').exec(text)?.[1];
  assert.ok(value !== undefined, `${name} is in the metrics`);
  return Number(value);
}

test('fio --ioengine=nbd: random writes then crc32c verify, zero errors; the NBD metrics count them', async () => {
  await createVolume('fio', '32M');
  const [written, read, requests] = [await nbdMetric('ferry_nbd_written_bytes_total'), await nbdMetric('ferry_nbd_read_bytes_total'), await nbdMetric('ferry_nbd_requests_total')];
  const out = await ok('fio', [
    '--name=verify',
    '--ioengine=nbd',
    `--uri=${uri('fio')}`,
    '--rw=randwrite',
    '--bssplit=4k/50:64k/30:1m/20',
    '--size=32M',
    '--iodepth=32',
    '--verify=crc32c',
    '--do_verify=1',
    '--verify_fatal=1',
    '--verify_state_save=0', // else fio leaves a state file in the working directory
    '--output-format=json',
  ]);
  const job = (JSON.parse(out.slice(out.indexOf('{'))) as { jobs: { error: number; write: { io_bytes: number }; read: { io_bytes: number } }[] }).jobs[0];
  assert.equal(job?.error, 0);
  assert.equal(job?.write.io_bytes, 32 * MiB);
  assert.equal(job?.read.io_bytes, 32 * MiB, 'everything written was read back and verified');
  assert.equal((await nbdMetric('ferry_nbd_written_bytes_total')) - written, 32 * MiB);
  assert.equal((await nbdMetric('ferry_nbd_read_bytes_total')) - read, 32 * MiB);
  assert.ok((await nbdMetric('ferry_nbd_requests_total')) - requests >= 2 * (32 * MiB) / MiB, 'at least one request per MiB each way');
});

test('ext4: made with mkfs.ext4 -d, copied into a volume over NBD and back out, fsck clean and files identical', async () => {
  const tree = join(work, 'tree');
  await mkdir(join(tree, 'sub', 'deeper'), { recursive: true });
  const files: [string, Buffer][] = [
    ['a.bin', randomBytes(1_234_567)],
    ['empty', Buffer.alloc(0)],
    ['sub/b.txt', Buffer.from('ferry keeps a copy\n'.repeat(1000))],
    ['sub/deeper/c.bin', randomBytes(5 * MiB + 3)],
  ];
  for (const [name, data] of files) await writeFile(join(tree, name), data);
  await symlink('sub/b.txt', join(tree, 'link'));
  const fsImg = join(work, 'fs.img');
  await ok('mkfs.ext4', ['-q', '-F', '-d', tree, fsImg, '48M']);
  await createVolume('ext4', '48M');
  await ok('nbdcopy', [fsImg, uri('ext4')]);
  const back = join(work, 'fs-back.img');
  await ok('nbdcopy', [uri('ext4'), back]);
  const fsck = await run('e2fsck', ['-fn', back]);
  assert.equal(fsck.code, 0, `e2fsck: ${fsck.stdout}${fsck.stderr}`);
  const outDir = join(work, 'tree-back');
  await mkdir(outDir);
  await ok('debugfs', ['-R', `rdump / ${outDir}`, back]);
  for (const [name, data] of files) assert.ok((await readFile(join(outDir, name))).equals(data), `${name} identical`);
  assert.equal(sha256(await readFile(back)), sha256(await readFile(fsImg)));
});

test('read-only exports: READ_ONLY flag, reads work, writes, trims and zeroes fail with EPERM', async () => {
  await createVolume('ro', '8M');
  await ok('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 0 64K', uri('ro')]);
  const digest = await site.digest('ro');
  const r = await site.cli(['volume', 'access', 'ro', 'read-only']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /volume ro is now read-only/);

  const info = JSON.parse(await ok('nbdinfo', ['--json', uri('ro')])) as { exports: { is_read_only: boolean }[] };
  assert.equal(info.exports[0]?.is_read_only, true);
  await ok('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x77 0 64K', uri('ro')]);
  const q = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 4K', uri('ro')]);
  assert.notEqual(q.code, 0);
  assert.match(q.stdout + q.stderr, /read-only|not permitted|permission denied/i);

  for (const structured of [true, false]) {
    const c = await RawNbdClient.open(site.nbdPort, 'ro', { structured });
    assert.ok(c.flags & txFlag.readOnly);
    c.sendRequest({ type: cmd.write, cookie: 1n, offset: 0, length: 4096, payload: Buffer.alloc(4096, 1) });
    c.sendRequest({ type: cmd.trim, cookie: 2n, offset: 0, length: 8192 });
    c.sendRequest({ type: cmd.writeZeroes, cookie: 3n, offset: 0, length: 8192 });
    c.sendRequest({ type: cmd.read, cookie: 4n, offset: 0, length: 16 });
    const replies = new Map<bigint, { error: number; message?: string; data?: Buffer }>();
    for (let i = 0; i < 3; i++) {
      const rep = await c.reply();
      replies.set(rep.cookie, rep);
    }
    const read = await c.reply(16);
    assert.equal(read.error, 0);
    assert.ok(read.data?.equals(Buffer.alloc(16, 0x77)));
    for (const cookie of [1n, 2n, 3n]) assert.equal(replies.get(cookie)?.error, nbdErrno.EPERM);
    if (structured) assert.match(replies.get(1n)?.message ?? '', /read-only/);
    c.close();
  }
  assert.equal(await site.digest('ro'), digest);
});

test('a refused (raw) export fails option negotiation with a clear message and is not listed', async () => {
  await createVolume('rebuilding', '8M');
  const r = await site.cli(['volume', 'access', 'rebuilding', 'raw']);
  assert.equal(r.code, 0, r.stderr);
  // libnbd shows the server's message in its debug output only.
  const info = await run('env', ['LIBNBD_DEBUG=1', 'nbdinfo', uri('rebuilding')]);
  assert.notEqual(info.code, 0);
  assert.match(info.stderr, /server error message: export "rebuilding" is refused: the volume is being rebuilt/);
  const q = await run('qemu-io', ['-f', 'raw', '-c', 'read 0 4K', uri('rebuilding')]);
  assert.notEqual(q.code, 0);
  assert.match(q.stderr, /being rebuilt/);
  const list = await ok('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${site.nbdPort}`]);
  assert.doesNotMatch(list, /"rebuilding"/);
  const missing = await run('qemu-io', ['-f', 'raw', '-c', 'read 0 4K', uri('no-such-volume')]);
  assert.notEqual(missing.code, 0);
  assert.match(missing.stderr, /no export named "no-such-volume"/);
  // Back to read-write: served again.
  assert.equal((await site.cli(['volume', 'access', 'rebuilding', 'read-write'])).code, 0);
  await ok('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 4K', uri('rebuilding')]);
});

test('bad requests get the spec errors, a client vanishing mid-write changes nothing, and other connections carry on', async () => {
  await createVolume('bad', '8M');
  const size = 8 * MiB;
  const bystander = await RawNbdClient.open(site.nbdPort, 'bad');
  const c = await RawNbdClient.open(site.nbdPort, 'bad');
  const expectError = async (r: Parameters<RawNbdClient['sendRequest']>[0], errno: number, message?: RegExp): Promise<void> => {
    c.sendRequest(r);
    const rep = await c.reply();
    assert.equal(rep.cookie, r.cookie);
    assert.equal(rep.error, errno, `cookie ${r.cookie}: ${rep.message}`);
    if (message) assert.match(rep.message ?? '', message);
  };
  await expectError({ type: cmd.read, cookie: 1n, offset: size - 10, length: 11 }, nbdErrno.EINVAL, /past the end/);
  await expectError({ type: cmd.read, cookie: 2n, offset: 2n ** 64n - 512n, length: 512 }, nbdErrno.EINVAL);
  await expectError({ type: cmd.read, cookie: 3n, offset: 0, length: 32 * MiB + 1 }, nbdErrno.EINVAL, /exceeds/);
  await expectError({ type: cmd.write, cookie: 4n, offset: size - 1, length: 2, payload: Buffer.alloc(2, 9) }, nbdErrno.ENOSPC);
  await expectError({ type: cmd.trim, cookie: 5n, offset: size, length: 8192 }, nbdErrno.ENOSPC);
  await expectError({ type: cmd.write, cookie: 6n, offset: 0, length: 32 * MiB + 4096, payload: Buffer.alloc(32 * MiB + 4096, 3) }, nbdErrno.EINVAL, /exceeds/);
  await expectError({ type: 42, cookie: 7n, offset: 0, length: 0 }, nbdErrno.EINVAL, /unknown/);
  await expectError({ type: cmd.read, cookie: 8n, offset: 0, length: 512, flags: 1 << 9 }, nbdErrno.EINVAL, /flags/);
  await expectError({ type: cmd.write, cookie: 9n, offset: 0, length: 1, flags: cmdFlag.reqOne, payload: Buffer.alloc(1) }, nbdErrno.EINVAL);
  await expectError({ type: cmd.blockStatus, cookie: 10n, offset: 0, length: 512 }, nbdErrno.EINVAL, /base:allocation/);
  await expectError({ type: cmd.flush, cookie: 11n, offset: 1, length: 0 }, nbdErrno.EINVAL);
  await expectError({ type: cmd.writeZeroes, cookie: 12n, offset: 0, length: 8192, flags: cmdFlag.noHole | cmdFlag.fastZero }, nbdErrno.ENOTSUP);
  // Still usable after all that, and nothing was written by the refused requests.
  c.sendRequest({ type: cmd.read, cookie: 13n, offset: 0, length: 4096 });
  const clean = await c.reply();
  assert.equal(clean.error, 0);
  assert.ok(clean.data?.equals(Buffer.alloc(4096)));

  // Many requests in flight at once on one connection, answered (in any order) by cookie.
  const pattern = randomBytes(256 * 1024);
  for (let i = 0; i < 64; i++) c.sendRequest({ type: cmd.write, cookie: 1000n + BigInt(i), offset: i * 4096, length: 4096, payload: pattern.subarray(i * 4096, (i + 1) * 4096) });
  const seen = new Set<bigint>();
  for (let i = 0; i < 64; i++) {
    const rep = await c.reply();
    assert.equal(rep.error, 0);
    seen.add(rep.cookie);
  }
  assert.equal(seen.size, 64);
  assert.ok((await site.readData('bad', 0, pattern.length)).equals(pattern));

  // A WRITE whose payload never fully arrives is never applied.
  const before = await site.digest('bad');
  const vanishing = await RawNbdClient.open(site.nbdPort, 'bad');
  const header = Buffer.alloc(28);
  header.writeUInt32BE(0x25609513, 0);
  header.writeUInt16BE(cmd.write, 6);
  header.writeBigUInt64BE(77n, 8);
  header.writeBigUInt64BE(1n * BigInt(MiB), 16);
  header.writeUInt32BE(MiB, 24);
  vanishing.send(Buffer.concat([header, Buffer.alloc(MiB / 2 + 3, 0xee)]));
  await new Promise((r) => setTimeout(r, 100));
  vanishing.close();
  await vanishing.closed;

  // Wrong magic: the server closes that connection (the stream cannot be resynchronised).
  const garbage = await RawNbdClient.open(site.nbdPort, 'bad');
  garbage.sendRequest({ type: cmd.read, cookie: 1n, offset: 0, length: 512, magic: 0xdeadbeef });
  await garbage.closed;

  // The bystander never noticed, and the daemon is healthy.
  bystander.sendRequest({ type: cmd.flush, cookie: 5n, offset: 0, length: 0 });
  assert.equal((await bystander.reply()).error, 0);
  assert.equal(await site.digest('bad'), before);
  assert.equal((await fetch(`${site.url}/healthz`)).status, 200);

  // DISC: outstanding requests are answered, then the server closes.
  bystander.sendRequest({ type: cmd.read, cookie: 6n, offset: 0, length: 4096 });
  bystander.sendRequest({ type: cmd.disc, cookie: 7n, offset: 0, length: 0 });
  const last = await bystander.reply();
  assert.equal(last.cookie, 6n);
  assert.ok(last.data?.equals(pattern.subarray(0, 4096)));
  await bystander.closed;
  c.close();
});

test('BLOCK_STATUS with REQ_ONE, and a structured READ of a hole', async () => {
  await createVolume('bs', '8M');
  await site.writeData('bs', 1 * MiB, Buffer.alloc(8192, 1));
  const c = await RawNbdClient.open(site.nbdPort, 'bs', { baseAllocation: true });
  c.sendRequest({ type: cmd.blockStatus, cookie: 1n, offset: 0, length: 8 * MiB });
  const all = await c.reply();
  const descriptors = (p: Buffer): number[][] => {
    const out: number[][] = [];
    for (let at = 4; at < p.length; at += 8) out.push([p.readUInt32BE(at), p.readUInt32BE(at + 4)]);
    return out;
  };
  assert.deepEqual(descriptors(all.chunks?.[0]?.payload as Buffer), [
    [MiB, 3],
    [8192, 0],
    [7 * MiB - 8192, 3],
  ]);
  c.sendRequest({ type: cmd.blockStatus, cookie: 2n, offset: 0, length: 8 * MiB, flags: cmdFlag.reqOne });
  assert.deepEqual(descriptors((await c.reply()).chunks?.[0]?.payload as Buffer), [[MiB, 3]]);
  c.sendRequest({ type: cmd.read, cookie: 3n, offset: MiB - 100, length: 200, flags: cmdFlag.df });
  const read = await c.reply();
  assert.ok(read.data?.equals(Buffer.concat([Buffer.alloc(100), Buffer.alloc(100, 1)])));
  c.close();
});

test('changing a volume to read-only drains its open connections; reconnecting clients see READ_ONLY', async () => {
  await createVolume('live', '8M');
  const c = await RawNbdClient.open(site.nbdPort, 'live');
  assert.equal(c.flags & txFlag.readOnly, 0);
  c.sendRequest({ type: cmd.write, cookie: 1n, offset: 0, length: 4096, payload: Buffer.alloc(4096, 0x42) });
  assert.equal((await c.reply()).error, 0);
  const r = await site.cli(['volume', 'access', 'live', 'read-only']);
  assert.equal(r.code, 0, r.stderr);
  await c.closed;
  const again = await RawNbdClient.open(site.nbdPort, 'live');
  assert.ok(again.flags & txFlag.readOnly);
  again.sendRequest({ type: cmd.write, cookie: 2n, offset: 0, length: 1, payload: Buffer.alloc(1) });
  assert.equal((await again.reply()).error, nbdErrno.EPERM);
  again.close();
  assert.ok((await site.readData('live', 0, 4096)).equals(Buffer.alloc(4096, 0x42)));
});

test('SIGTERM drains NBD connections: every write that was answered is there after a restart', async () => {
  await createVolume('drain', '8M');
  const c = await RawNbdClient.open(site.nbdPort, 'drain');
  const block = (i: number): Buffer => Buffer.alloc(65_536, i + 1);
  for (let i = 0; i < 16; i++) c.sendRequest({ type: cmd.write, cookie: BigInt(i), offset: i * 65_536, length: 65_536, payload: block(i) });
  for (let i = 0; i < 16; i++) assert.equal((await c.reply()).error, 0);
  for (let i = 16; i < 48; i++) c.sendRequest({ type: cmd.write, cookie: BigInt(i), offset: i * 65_536, length: 65_536, payload: block(i) });
  const answered: number[] = [];
  const collecting = (async () => {
    for (;;) {
      const rep = await c.reply().catch(() => undefined);
      if (!rep) return;
      assert.equal(rep.error, 0);
      answered.push(Number(rep.cookie));
    }
  })();
  assert.equal(await site.kill('SIGTERM'), 0, 'clean exit');
  await collecting;
  await c.closed;
  await site.start();
  for (const i of [...Array(16).keys(), ...answered]) {
    assert.ok((await site.readData('drain', i * 65_536, 65_536)).equals(block(i)), `write ${i} kept`);
  }
});
