import type { PairStatusView } from '../../src/replication/status.js';
import { createHash, randomBytes } from 'node:crypto';
import type { TestSite } from './site.js';

/** One line of `ferry status --json`, as the product defines it. */
export type PairStatus = PairStatusView;

export async function pairStatus(site: TestSite, volume: string): Promise<PairStatus> {
  const { status, body } = await site.api<PairStatus[]>('GET', `/api/v1/status/${volume}`);
  if (status !== 200 || !body[0]) throw new Error(`status of ${volume} at ${site.name}: HTTP ${status} ${JSON.stringify(body)}`);
  return body[0];
}

export async function waitFor<T>(what: string | (() => string), fn: () => Promise<T | undefined | false>, timeoutMs = 60_000, everyMs = 100): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined && v !== false) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${typeof what === 'function' ? (what as () => string)() : what}${last ? `: ${(last as Error).message}` : ''}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** Waits until the source has nothing dirty and the target has played back every delta set. */
export async function waitInSync(source: TestSite, target: TestSite, volume: string, targetVolume = volume, timeoutMs = 60_000): Promise<void> {
  let last = '';
  await waitFor(() => `${volume} in sync (last seen: ${last})`, async () => {
    const s = await pairStatus(source, volume);
    last = JSON.stringify(s);
    if (!s.initialCopy.done || s.lagBlocks > 0 || s.deltaSetAcked < s.deltaSetCreated) {
      if (s.lagBlocks > 0 && s.deltaSetAcked === s.deltaSetCreated) await source.api('POST', `/api/v1/replication/${volume}/delta`).catch(() => undefined);
      return false;
    }
    const t = await pairStatus(target, targetVolume);
    last = `${JSON.stringify(s)} / target ${JSON.stringify(t)}`;
    return t.deltaSetPlayedBack >= s.deltaSetCreated && t.deltaSetReceived === t.deltaSetPlayedBack;
  }, timeoutMs, 200);
}

/** An in-memory image of a volume, updated as the test writes, with digests. */
export class VolumeModel {
  readonly bytes: Buffer;
  constructor(sizeBytes: number) {
    this.bytes = Buffer.alloc(sizeBytes);
  }

  digest(): string {
    return createHash('sha256').update(this.bytes).digest('hex');
  }

  randomWrite(maxBytes = 64 * 1024): { offset: number; data: Buffer } {
    const length = 1 + Math.floor(Math.random() * maxBytes);
    const offset = Math.floor(Math.random() * (this.bytes.length - length));
    return { offset, data: randomBytes(length) };
  }

  /** `count` writes in distinct slots of the volume, so their order does not matter. */
  disjointWrites(count: number, maxBytes: number): { offset: number; data: Buffer }[] {
    const slotBytes = Math.floor(this.bytes.length / Math.max(count, 16));
    const slots = new Set<number>();
    while (slots.size < count) slots.add(Math.floor(Math.random() * Math.floor(this.bytes.length / slotBytes)));
    return [...slots].map((slot) => {
      const length = 1 + Math.floor(Math.random() * Math.min(maxBytes, slotBytes - 1));
      const offset = slot * slotBytes + Math.floor(Math.random() * (slotBytes - length));
      return { offset, data: randomBytes(length) };
    });
  }

  apply(offset: number, data: Buffer): void {
    data.copy(this.bytes, offset);
  }
}

/** Writes `bytes` of random data at `offset` of volume `v` through the API, `step` at a time, into `model` too. */
export async function writeRange(site: TestSite, model: VolumeModel, offset: number, bytes: number, step = 256 * 1024): Promise<void> {
  for (let at = offset; at < offset + bytes; at += step) {
    const data = randomBytes(Math.min(step, offset + bytes - at));
    model.apply(at, data);
    await site.writeData('v', at, data);
  }
}
