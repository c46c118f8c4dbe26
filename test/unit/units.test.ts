import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { parseSize, formatSize, parseDuration, parseHostPort } from '../../src/lib/units.js';
import { isFerryError } from '../../src/lib/errors.js';

test('sizes parse with binary units', () => {
  assert.equal(parseSize('512'), 512);
  assert.equal(parseSize('64K'), 65536);
  assert.equal(parseSize('8M'), 8 * 1024 * 1024);
  assert.equal(parseSize('10G'), 10 * 1024 ** 3);
  assert.equal(parseSize('1T'), 1024 ** 4);
  assert.equal(parseSize('1.5K'), 1536);
  assert.equal(parseSize('4KiB'), 4096);
  assert.equal(parseSize(8192), 8192);
});

test('bad sizes are refused with INVALID_SIZE', () => {
  for (const bad of ['12Q', '-1', '', 'K', '1.0001K', 'ten', '1e3', '99999999999P']) {
    assert.throws(() => parseSize(bad), (err) => isFerryError(err, 'INVALID_SIZE'), bad);
  }
  assert.throws(() => parseSize(-1), (err) => isFerryError(err, 'INVALID_SIZE'));
  assert.throws(() => parseSize(1.5), (err) => isFerryError(err, 'INVALID_SIZE'));
});

test('sizes format with the largest readable unit', () => {
  assert.equal(formatSize(512), '512');
  assert.equal(formatSize(8192), '8K');
  assert.equal(formatSize(1536 * 1024 * 1024), '1.50G');
  assert.equal(formatSize(1024 ** 4), '1T');
});

test('durations parse to milliseconds', () => {
  assert.equal(parseDuration('500ms'), 500);
  assert.equal(parseDuration('10s'), 10_000);
  assert.equal(parseDuration('5m'), 300_000);
  assert.equal(parseDuration('2'), 2000);
  assert.throws(() => parseDuration('5 weeks'), (err) => isFerryError(err, 'INVALID_DURATION'));
});

test('host:port parses, including IPv6 and port 0', () => {
  assert.deepEqual(parseHostPort('127.0.0.1:7370'), { host: '127.0.0.1', port: 7370 });
  assert.deepEqual(parseHostPort('[::1]:0'), { host: '::1', port: 0 });
  assert.deepEqual(parseHostPort('site-b.example:10809'), { host: 'site-b.example', port: 10809 });
  for (const bad of ['127.0.0.1', ':80', 'host:99999', 'a b:1']) {
    assert.throws(() => parseHostPort(bad), (err) => isFerryError(err, 'INVALID_ADDRESS'), bad);
  }
});

test('a transfer rate: bytes per second over the last 5 s, and on average since the start', async () => {
  const { RateMeter } = await import('../../src/lib/rate.js');
  let now = 1_000_000;
  const meter = new RateMeter({ now: () => now, sleep: async () => undefined });
  assert.deepEqual(meter.rates(), { current: 0, average: 0 });
  meter.start();
  now += 5_000;
  meter.count(10_000_000);
  assert.deepEqual(meter.rates(), { current: 2_000_000, average: 2_000_000 });
  // Quiet for 10 s: nothing now, half of it on average.
  now += 10_000;
  assert.deepEqual(meter.rates(), { current: 0, average: 10_000_000 / 15 });
  // A transfer younger than the window is measured over its age, not the whole window.
  const young = new RateMeter({ now: () => now, sleep: async () => undefined }, 20_000);
  young.start();
  now += 2_000;
  young.count(4_000_000);
  assert.deepEqual(young.rates(), { current: 2_000_000, average: 2_000_000 });
  now += 18_000;
  assert.deepEqual(young.rates(), { current: 200_000, average: 200_000 });
  now += 2_001;
  assert.equal(young.rates().current, 0, 'nothing within the window');
});

test('a rate limit: over any stretch a sender gets at most the rate plus one burst and the send in hand, and no less than the rate allows', async () => {
  const { RateLimiter, rateLimitBurstMs } = await import('../../src/lib/rate.js');
  await fc.assert(
    fc.asyncProperty(fc.integer({ min: 256 * 1024, max: 64 * 1024 * 1024 }), fc.array(fc.integer({ min: 1, max: 4 * 1024 * 1024 }), { minLength: 1, maxLength: 60 }), async (rate, sends) => {
      // Virtual time: a sleep moves the clock on by exactly what was asked.
      let now = 5_000;
      const limiter = new RateLimiter({ now: () => now, sleep: async (ms) => void (now += ms) }, rate);
      const start = now;
      let sent = 0;
      for (const bytes of sends) {
        await limiter.take(bytes);
        assert.ok(sent <= (rate * (now - start)) / 1000 + (rate * rateLimitBurstMs) / 1000 + 1, `${sent} bytes by ${now - start} ms at ${rate}/s`);
        sent += bytes;
      }
      // Never slower than the rate: the last send went as soon as the ones before it were paid for.
      const needMs = ((sent - (sends.at(-1) as number)) * 1000) / rate;
      assert.ok(now - start <= needMs + 2 * sends.length, `${now - start} ms for what needs ${needMs} ms`);
    }),
  );
});

test('a rate limit waiting to send lets go at once when the limit is lifted, removed or the sender stops', async () => {
  const { RateLimiter } = await import('../../src/lib/rate.js');
  // A clock whose time stands still: only a wake-up ends a sleep.
  const clock = { now: () => 1_000, sleep: (_ms: number, wake?: AbortSignal) => new Promise<void>((resolve) => wake?.addEventListener('abort', () => resolve(), { once: true })) };
  const limiter = new RateLimiter(clock, 1024 * 1024);
  await limiter.take(8 * 1024 * 1024); // in debt for 8 s of clock time that never passes
  const waiting = (p: Promise<void>): Promise<boolean> => Promise.race([p.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 50))]);

  const lifted = limiter.take(1);
  assert.equal(await waiting(lifted), false, 'in debt: it waits');
  const restore = limiter.lift();
  assert.equal(await waiting(lifted), true, 'a lift lets it go');
  assert.equal(limiter.rate, 0);
  restore();
  assert.equal(limiter.rate, 1024 * 1024, 'the limit is back once restored');

  const stop = new AbortController();
  const stopped = limiter.take(1, stop.signal);
  assert.equal(await waiting(stopped), false);
  stop.abort();
  assert.equal(await waiting(stopped), true, 'the sender stopping lets it go');

  const removed = limiter.take(1);
  assert.equal(await waiting(removed), false);
  limiter.setRate(0);
  assert.equal(await waiting(removed), true, 'no limit any more');
  assert.throws(() => limiter.setRate(-1));
});
