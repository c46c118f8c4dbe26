import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { ApiClient } from '../../src/cli/client.js';
import { isFerryError } from '../../src/lib/errors.js';

/** A site stand-in answering every request with `pieces`, written one by one a little apart. */
async function streamingSite(pieces: (string | Buffer)[], contentType = 'application/x-ndjson'): Promise<{ url: string; close(): void }> {
  const server = createServer((_req, res: ServerResponse) => {
    res.writeHead(200, { 'content-type': contentType });
    let i = 0;
    const next = (): void => {
      if (i === pieces.length) return void res.end();
      res.write(pieces[i++]);
      setTimeout(next, 10);
    };
    next();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, close: () => server.close() };
}

test('ApiClient.getStreamed: lines before the last go to onLine as they arrive, split anywhere; the last is the answer', async () => {
  // A line split across writes, two lines in one write, a multi-byte character split in two.
  const euro = Buffer.from('€');
  const site = await streamingSite([
    '{"hashedBytes":1,',
    '"sizeBytes":4}\n{"hashedBytes":2,"sizeBytes":4}\n',
    Buffer.concat([Buffer.from('{"sha256":"ab","note":"'), euro.subarray(0, 1)]),
    Buffer.concat([euro.subarray(1), Buffer.from('"}\n')]),
  ]);
  try {
    const seen: unknown[] = [];
    const answer = await new ApiClient(site.url).getStreamed<{ sha256: string; note: string }>('/x', (line) => seen.push(line));
    assert.deepEqual(seen, [{ hashedBytes: 1, sizeBytes: 4 }, { hashedBytes: 2, sizeBytes: 4 }]);
    assert.deepEqual(answer, { sha256: 'ab', note: '€' });
  } finally {
    site.close();
  }
});

test('ApiClient.getStreamed: an answer that ends with an error line fails with its code', async () => {
  const site = await streamingSite(['{"hashedBytes":1,"sizeBytes":4}\n', '{"error":{"code":"UNAVAILABLE","message":"the digest was cancelled"}}\n']);
  try {
    const seen: unknown[] = [];
    await assert.rejects(new ApiClient(site.url).getStreamed('/x', (line) => seen.push(line)), (err) => isFerryError(err, 'UNAVAILABLE') && /cancelled/.test((err as Error).message));
    assert.equal(seen.length, 1);
  } finally {
    site.close();
  }
});

test('ApiClient.getStreamed: a plain JSON answer (not streamed) is the answer, onLine never called', async () => {
  const site = await streamingSite(['{"sha256":', '"cd"}\n'], 'application/json');
  try {
    const seen: unknown[] = [];
    assert.deepEqual(await new ApiClient(site.url).getStreamed('/x', (line) => seen.push(line)), { sha256: 'cd' });
    assert.equal(seen.length, 0);
  } finally {
    site.close();
  }
});
