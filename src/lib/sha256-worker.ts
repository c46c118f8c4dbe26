/**
 * The worker thread behind `Sha256InWorker`: hashes what it is sent, in order. Runs of
 * zeros are sent as a length, so a sparse volume's holes cost no copies between threads.
 */
import { createHash } from 'node:crypto';
import { parentPort } from 'node:worker_threads';
import type { ToHasher } from './sha256.js';

const port = parentPort;
if (!port) throw new Error('sha256-worker runs as a worker thread');
const hash = createHash('sha256');
const zeros = Buffer.alloc(4 * 1024 * 1024);
/** A long run of zeros reports progress at least this often. */
const progressBytes = 256 * 1024 * 1024;

port.on('message', (m: ToHasher) => {
  if (m.type === 'data') {
    hash.update(new Uint8Array(m.buffer, m.byteOffset, m.byteLength));
    port.postMessage({ type: 'hashed', bytes: m.byteLength, done: true });
  } else if (m.type === 'zeros') {
    let since = 0;
    for (let left = m.bytes; left > 0; ) {
      const n = Math.min(left, zeros.length);
      hash.update(zeros.subarray(0, n));
      left -= n;
      since += n;
      if (since >= progressBytes && left > 0) {
        port.postMessage({ type: 'hashed', bytes: since, done: false });
        since = 0;
      }
    }
    port.postMessage({ type: 'hashed', bytes: since, done: true });
  } else {
    port.postMessage({ type: 'digest', hex: hash.digest('hex') });
  }
});
