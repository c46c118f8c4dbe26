/**
 * bench/digest — run by hand: `npm run bench:digest`.
 *
 * `ferry volume digest` of a sparse volume (BENCH_DIGEST_GIB, default 8 GiB, with
 * BENCH_DIGEST_DATA_GIB, default 1 GiB, of data) against `openssl dgst -sha256` and
 * `sha256sum` of a raw file with the same content, and how long the site takes to answer `/healthz` meanwhile (the
 * digest is hashed on a worker thread; on the event loop the site would answer nothing
 * until the digest ended).
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { TestSite } from '../test/helpers/site.js';
import { table, timed } from './report.js';

const run = promisify(execFile);
const GiB = 1024 ** 3;
const volumeBytes = Number(process.env.BENCH_DIGEST_GIB ?? 8) * GiB;
const dataBytes = Number(process.env.BENCH_DIGEST_DATA_GIB ?? 1) * GiB;

async function main(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-bench-digest-'));
  const site = await TestSite.create('bench-digest');
  try {
    await site.api('POST', '/api/v1/volumes', { name: 'v', size: volumeBytes });
    const raw = await open(join(dir, 'v.raw'), 'w');
    await raw.truncate(volumeBytes);
    // The data in 64 MiB pieces spread over the volume, the same at both.
    const piece = 64 * 1024 * 1024;
    const pieces = Math.max(1, Math.floor(dataBytes / piece));
    const stride = Math.floor(volumeBytes / pieces / piece) * piece;
    for (let i = 0; i < pieces; i++) {
      const data = randomBytes(piece);
      await raw.write(data, 0, piece, i * stride);
      for (let at = 0; at < piece; at += 4 * 1024 * 1024) await site.writeData('v', i * stride + at, data.subarray(at, at + 4 * 1024 * 1024));
    }
    await raw.close();
    await run('sync');
    const [refSeconds, ref] = await timed(() => run('sha256sum', [join(dir, 'v.raw')]));
    // OpenSSL hashes with the CPU's SHA instructions, as Node's crypto (OpenSSL too) does.
    const [sslSeconds, ssl] = await timed(() => run('openssl', ['dgst', '-sha256', '-r', join(dir, 'v.raw')]));
    const latencies: number[] = [];
    let done = false;
    const probe = (async () => {
      while (!done) {
        const [s] = await timed(() => site.api('GET', '/healthz'));
        latencies.push(s * 1000);
        await new Promise((r) => setTimeout(r, 100));
      }
    })();
    const [ferrySeconds, sha] = await timed(() => site.digest('v'));
    done = true;
    await probe;
    const same = ref.stdout.split(' ')[0] === sha && ssl.stdout.split(' ')[0] === sha;
    const workload = `${(volumeBytes / GiB).toFixed(0)} GiB sparse, ${((pieces * piece) / GiB).toFixed(1)} GiB of data`;
    const rows = [
      ['digest vs openssl dgst -sha256 of a raw file', workload, `${ferrySeconds.toFixed(2)} s (${(volumeBytes / ferrySeconds / 1e9).toFixed(2)} GB/s)`, `${sslSeconds.toFixed(2)} s`, (ferrySeconds / sslSeconds).toFixed(2), `digests ${same ? 'equal' : 'DIFFER'}`],
      ['digest vs sha256sum of a raw file', workload, `${ferrySeconds.toFixed(2)} s`, `${refSeconds.toFixed(2)} s`, (ferrySeconds / refSeconds).toFixed(2), 'coreutils sha256sum'],
      ['/healthz while the digest runs', `${latencies.length} requests`, `max ${Math.max(...latencies).toFixed(0)} ms, median ${latencies.sort((x, y) => x - y)[Math.floor(latencies.length / 2)]?.toFixed(0)} ms`, '', '', 'the site keeps answering'],
    ];
    process.stdout.write(`${table(['case', 'workload', 'ferry', 'reference', 'ratio', 'notes'], rows)}\n`);
  } finally {
    await site.destroy();
    await rm(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
  process.exit(1);
});
