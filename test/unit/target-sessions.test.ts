import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { createServer, connect, type AddressInfo, type Server } from 'node:net';
import { pino } from 'pino';
import { crc32c } from '../../src/lib/checksum.js';
import { systemClock } from '../../src/lib/clock.js';
import type { PairRecord } from '../../src/storage/replication-catalog.js';
import { RcpConnection } from '../../src/transport/connection.js';
import { rcpPreamble, type Frame } from '../../src/transport/frame.js';
import { encodeChunk, encodeChunkParts } from '../../src/replication/chunk.js';
import { ReplFrame, copyFramePrefix, encodeChunkFrameParts, headerCrcFields, json, type AckBody, type CopyAckBody, type DeltaSetHeaderBody, type TargetPosition } from '../../src/replication/protocol.js';
import { TargetReplica } from '../../src/replication/target.js';
import { openPairEnv } from '../helpers/pair-env.js';

/**
 * The receiver against a stalled disk, found by the simulator (test/sim/): what the
 * target does while a chunk's write and fsync have not returned.
 */
const log = pino({ level: 'silent' });
const bb = 4096;
const blocks = 256;

interface Env {
  target: TargetReplica;
  pair: PairRecord;
  /** The save volume's next fsync fails with EIO. */
  failNextSync(): void;
  /** Holds the next journal fsyncs until `release` is called; resolves `stalled` when one is held. */
  stallSync(): { stalled: Promise<void>; release: () => void };
  /** Opens a session (of the delta sets, or the copy's) as the source does and returns the target's position. */
  session(channel?: 'deltas' | 'copy'): Promise<{ conn: RcpConnection; position: TargetPosition; frames: Frame[] }>;
  /** The volume's next flush fails with EIO (as fdatasync does after a failed writeback); resolves once it has. */
  failNextFlush(): Promise<void>;
  /** The volume's batch write after `skip` more fails with EIO; resolves once it has. */
  failWrite(skip: number): Promise<void>;
  /** What readers of the replica see (the volume, with a delta set under playback laid over it). */
  visibleDigest(): Promise<string>;
  digest(): Promise<string>;
  close(): Promise<void>;
}

async function openEnv(options: { copyDone?: boolean } = {}): Promise<Env> {
  const env = await openPairEnv({ role: 'target', blockBytes: bb, blocks, copyDone: options.copyDone !== false });
  const { volume, replication, pair, journal } = env;
  let gate: { held: () => void; wait: Promise<void> } | undefined;
  const sync = journal.sync.bind(journal);
  let syncFails = false;
  journal.sync = async () => {
    if (syncFails) {
      syncFails = false;
      throw Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' });
    }
    const g = gate;
    if (g) {
      g.held();
      await g.wait;
    }
    return sync();
  };
  const target = await TargetReplica.open({
    volume,
    pair,
    catalog: replication,
    journal,
    clock: systemClock,
    log,
    setAccess: async () => undefined,
    protect: () => Promise.reject(new Error('no catch-up here')),
    unprotect: async () => undefined,
  });
  target.start();
  let failFlush: (() => void) | undefined;
  const flush = volume.flush.bind(volume);
  let failWrite: { skip: number; failed: () => void } | undefined;
  const writeMany = volume.writeMany.bind(volume);
  volume.writeMany = async (writes) => {
    if (failWrite && failWrite.skip-- === 0) {
      const { failed } = failWrite;
      failWrite = undefined;
      setImmediate(failed);
      throw Object.assign(new Error('EIO: i/o error, write'), { code: 'EIO' });
    }
    return writeMany(writes);
  };
  volume.flush = async () => {
    const failed = failFlush;
    if (failed) {
      failFlush = undefined;
      setImmediate(failed);
      throw Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' });
    }
    return flush();
  };
  let nextChannel: 'deltas' | 'copy' = 'deltas';
  const server: Server = createServer((socket) => {
    const conn = new RcpConnection(socket);
    conn.on('error', () => undefined);
    conn.on('socket-error', () => undefined);
    socket.write(rcpPreamble);
    void (nextChannel === 'copy' ? target.serveCopy(conn) : target.serve(conn));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    target,
    pair,
    stallSync() {
      let held!: () => void;
      let release!: () => void;
      const stalled = new Promise<void>((r) => (held = r));
      const wait = new Promise<void>((r) => (release = r));
      gate = { held, wait };
      return {
        stalled,
        release: () => {
          gate = undefined;
          release();
        },
      };
    },
    failNextSync() {
      syncFails = true;
    },
    failNextFlush() {
      return new Promise<void>((resolve) => (failFlush = resolve));
    },
    failWrite(skip: number) {
      return new Promise<void>((resolve) => (failWrite = { skip, failed: resolve }));
    },
    async visibleDigest() {
      const buf = Buffer.alloc(blocks * bb);
      await target.readInto(buf, 0);
      return createHash('sha256').update(buf).digest('hex');
    },
    async session(channel = 'deltas') {
      nextChannel = channel;
      const socket = connect({ host: '127.0.0.1', port });
      const conn = new RcpConnection(socket);
      conn.on('error', () => undefined);
      conn.on('socket-error', () => undefined);
      const frames: Frame[] = [];
      const opened = new Promise<TargetPosition>((resolve) => {
        conn.on('frame', (f: Frame) => {
          if (f.type === ReplFrame.PairOpenOk) resolve(json<TargetPosition>(f));
          else frames.push(f);
        });
      });
      socket.write(rcpPreamble);
      return { conn, position: await opened, frames };
    },
    async digest() {
      const buf = Buffer.alloc(blocks * bb);
      await volume.readInto(buf, 0);
      return createHash('sha256').update(buf).digest('hex');
    },
    async close() {
      server.close();
      await target.close();
      await env.close();
    },
  };
}

async function withEnv(options: { copyDone?: boolean }, body: (env: Env) => Promise<void>): Promise<void> {
  const env = await openEnv(options);
  try {
    await body(env);
  } finally {
    await env.close();
  }
}

/** Delta set `n`: `chunks` chunks of one block each, block i holding byte (n * 16 + i). */
function deltaSet(n: number, chunks: number, afterCopy?: number): { frames: [Buffer, Buffer][]; header: DeltaSetHeaderBody; expect: Map<number, number> } {
  const frames: [Buffer, Buffer][] = [];
  let dataCrc = 0;
  const expect = new Map<number, number>();
  for (let i = 0; i < chunks; i++) {
    const data = Buffer.alloc(bb, n * 16 + i);
    dataCrc = crc32c(data, dataCrc);
    expect.set(n * 16 + i, n * 16 + i);
    frames.push(encodeChunkFrameParts(n, i, encodeChunk({ extents: [{ block: n * 16 + i, count: 1, zero: false }], data })));
  }
  const fields = { deltaSet: n, chunkCount: chunks, blockCount: chunks, dataBytes: chunks * bb, dataCrc, createdAtMs: Date.now(), previousCutMs: 0, ...(afterCopy !== undefined ? { afterCopy } : {}) };
  return { frames, header: { ...fields, headerCrc: crc32c(headerCrcFields(fields)) }, expect };
}

async function until(what: string, fn: () => boolean, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!fn()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Sends chunks [from, to) of a delta set, then (with `header`) its header. */
function send(conn: RcpConnection, ds: ReturnType<typeof deltaSet>, from = 0, to = ds.frames.length, header = true): void {
  for (const f of ds.frames.slice(from, to)) conn.send(ReplFrame.Chunk, f, { generation: 1n });
  if (header) conn.sendJson(ReplFrame.DeltaSetHeader as number, ds.header, { generation: 1n });
}

/** True once an acknowledgement among `frames` satisfies `test`. */
function acked(frames: Frame[], test: (ack: AckBody) => boolean): boolean {
  return frames.some((f) => f.type === ReplFrame.Ack && test(json<AckBody>(f)));
}

function expectedDigest(sets: Map<number, number>[]): string {
  const buf = Buffer.alloc(blocks * bb);
  for (const set of sets) for (const [block, byte] of set) buf.fill(byte, block * bb, (block + 1) * bb);
  return createHash('sha256').update(buf).digest('hex');
}

/**
 * Delta set 1 resumed on a new session: the target says it holds `stored` chunks, the
 * rest is sent, and the delta set seals, plays back and reads back whole.
 */
async function resumeAndPlayBack(env: Env, ds: ReturnType<typeof deltaSet>, stored: number, why: string, session = env.session()): Promise<void> {
  const { conn, position, frames } = await session;
  assert.equal(position.chunksStored, stored, why);
  send(conn, ds, stored);
  await until('delta set 1 sealed', () => acked(frames, (a) => a.sealed));
  await until('delta set 1 played back', () => env.pair.deltaSetPlayedBack === 1);
  assert.equal(await env.digest(), expectedDigest([ds.expect]));
  conn.destroy();
}

test('a new session waits for the chunk the old one is still storing: it resumes after it, the chunk is stored once, and the delta set seals and plays back', () =>
  withEnv({}, async (env) => {
    const ds = deltaSet(1, 3);
    const first = await env.session();
    assert.equal(first.position.chunksStored, 0);
    first.conn.send(ReplFrame.Chunk, ds.frames[0] as [Buffer, Buffer], { generation: 1n });
    await until('chunk 0 acknowledged', () => acked(first.frames, (a) => a.chunksStored === 1));
    // Chunk 1's fsync stalls, and the connection drops meanwhile.
    const stall = env.stallSync();
    first.conn.send(ReplFrame.Chunk, ds.frames[1] as [Buffer, Buffer], { generation: 1n });
    await stall.stalled;
    first.conn.destroy();
    let answered = false;
    const second = env.session().then((s) => {
      answered = true;
      return s;
    });
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(answered, false, 'the new session was answered while a chunk of the old one was still being stored');
    stall.release();
    await resumeAndPlayBack(env, ds, 2, 'the new session resumes after the chunk the old one stored', second);
  }));

test('a playback that ends while a chunk of the next delta set is being written does not free that chunk\'s space', () =>
  withEnv({}, async (env) => {
    const one = deltaSet(1, 2);
    const two = deltaSet(2, 2);
    const { conn, frames } = await env.session();
    // Delta set 1 is sealed; its playback is held back by a stalled fsync of delta set 2's first chunk.
    send(conn, one, 0, one.frames.length, false);
    await until('delta set 1 stored', () => acked(frames, (a) => a.chunksStored === 2));
    const stall = env.stallSync();
    conn.sendJson(ReplFrame.DeltaSetHeader as number, one.header, { generation: 1n });
    conn.send(ReplFrame.Chunk, two.frames[0] as [Buffer, Buffer], { generation: 1n });
    await stall.stalled;
    await until('delta set 1 played back', () => env.pair.deltaSetPlayedBack === 1);
    // Nothing else is live: what is still in use is the chunk being written.
    assert.ok(env.target.saveVolume.usedBytes > 0, 'the space of the chunk being written was freed by the playback');
    stall.release();
    send(conn, two, 1);
    await until('delta set 2 played back', () => env.pair.deltaSetPlayedBack === 2);
    assert.equal(await env.digest(), expectedDigest([one.expect, two.expect]));
    conn.destroy();
  }));

test('playback before a failover does not wait for delta sets that need a copy this side never got: they stay unplayed, the rest is played', () =>
  withEnv({}, async (env) => {
    const one = deltaSet(1, 1);
    // Cut after the source recorded catch-up copy 2, which never arrives here.
    const two = deltaSet(2, 1, 2);
    const { conn, frames } = await env.session();
    for (const ds of [one, two]) send(conn, ds);
    await until('both delta sets sealed', () => frames.filter((f) => f.type === ReplFrame.Ack && json<AckBody>(f).sealed).length === 2);
    const started = Date.now();
    await env.target.finishPlayback(5_000);
    assert.ok(Date.now() - started < 4_000, `finishPlayback waited ${Date.now() - started} ms for a delta set it cannot play`);
    assert.equal(env.pair.deltaSetPlayedBack, 1);
    assert.equal(env.target.unplayedDeltaSets(), 1);
    assert.equal(await env.digest(), expectedDigest([one.expect]));
    conn.destroy();
  }));

test('a failed flush during a copy is not papered over by a later one: the session ends, and the copy resumes from its last durable point', () =>
  withEnv({ copyDone: false }, async (env) => {
    const pieceBlocks = 64;
    const piece = (from: number): Buffer[] => [copyFramePrefix(1, from, from + pieceBlocks), ...encodeChunkParts({ extents: [{ block: from, count: pieceBlocks, zero: false }], data: Buffer.alloc(pieceBlocks * bb, 1 + from / pieceBlocks) })];
    // A second after the target opened, the first piece is due for a background flush; it fails.
    await new Promise((r) => setTimeout(r, 1_100));
    void env.failNextFlush();
    const first = await env.session('copy');
    assert.equal(first.position.copyCursorBlock, 0);
    first.conn.send(ReplFrame.CopyData, piece(0), { generation: 1n });
    await until('the target ends the session', () => first.conn.isClosed);
    assert.match(env.target.stats.lastError, /copy's data could not be flushed.*EIO/);
    const second = await env.session('copy');
    assert.equal(second.position.copyCursorBlock, 0, 'resumes from the durable cursor, not past blocks whose flush failed');
    for (let from = 0; from < blocks; from += pieceBlocks) second.conn.send(ReplFrame.CopyData, piece(from), { generation: 1n });
    second.conn.sendJson(ReplFrame.CopyDone as number, { copyId: 1, stampedDeltaSet: 0, final: true }, { generation: 1n });
    await until('the copy is complete', () => second.frames.some((f) => f.type === ReplFrame.CopyAck && json<CopyAckBody>(f).done === true));
    assert.ok(env.pair.initialCopy.doneAt);
    assert.equal(env.pair.initialCopy.cursorBlock, blocks);
    const expected = new Map<number, number>();
    for (let b = 0; b < blocks; b++) expected.set(b, 1 + Math.floor(b / pieceBlocks));
    assert.equal(await env.digest(), expectedDigest([expected]));
    second.conn.destroy();
  }));

test('a playback that fails on an I/O error goes on showing readers the whole delta set, and is redone', () =>
  withEnv({}, async (env) => {
    const ds = deltaSet(1, 3);
    // The second chunk's write fails: the volume holds the first chunk of the delta set only.
    const failed = env.failWrite(1);
    const { conn, frames } = await env.session();
    send(conn, ds);
    await until('delta set 1 sealed', () => acked(frames, (a) => a.sealed));
    await failed;
    await until('the failed playback has returned', () => env.target.stats.playing === 0);
    assert.equal(env.pair.deltaSetPlayedBack, 0);
    assert.match(env.target.stats.lastError, /playback of delta set 1 failed .*EIO/, 'status tells of the failure');
      assert.equal(env.target.stats.ioErrors, 1);
    assert.equal(await env.visibleDigest(), expectedDigest([ds.expect]), 'readers see the whole delta set, not the part written');
    await until('delta set 1 played back on the retry', () => env.pair.deltaSetPlayedBack === 1, 15_000);
    assert.equal(await env.digest(), expectedDigest([ds.expect]));
    assert.equal(await env.visibleDigest(), expectedDigest([ds.expect]));
    conn.destroy();
  }));

test('a chunk whose fsync fails leaves no hole in the save volume: sent again, the delta set seals and plays back', () =>
  withEnv({}, async (env) => {
    const ds = deltaSet(1, 3);
    const first = await env.session();
    first.conn.send(ReplFrame.Chunk, ds.frames[0] as [Buffer, Buffer], { generation: 1n });
    await until('chunk 0 stored', () => acked(first.frames, (a) => a.chunksStored === 1));
    env.failNextSync();
    first.conn.send(ReplFrame.Chunk, ds.frames[1] as [Buffer, Buffer], { generation: 1n });
    await until('the target ends the session', () => first.conn.isClosed);
    assert.match(env.target.stats.lastError, /chunk 1 of delta set 1 could not be stored.*EIO/);
    await resumeAndPlayBack(env, ds, 1, 'the chunk whose fsync failed is not counted');
  }));

test('chunks written under one sync (group commit) are all dropped when it fails, and sent again: no hole, the delta set seals', () =>
  withEnv({}, async (env) => {
    const ds = deltaSet(1, 4);
    const first = await env.session();
    first.conn.send(ReplFrame.Chunk, ds.frames[0] as [Buffer, Buffer], { generation: 1n });
    await until('chunk 0 stored', () => acked(first.frames, (a) => a.chunksStored === 1));
    env.failNextSync();
    // Two chunks in one write: the second is queued when the first is written, so one sync covers both.
    first.conn.socket.cork();
    first.conn.send(ReplFrame.Chunk, ds.frames[1] as [Buffer, Buffer], { generation: 1n });
    first.conn.send(ReplFrame.Chunk, ds.frames[2] as [Buffer, Buffer], { generation: 1n });
    first.conn.socket.uncork();
    await until('the target ends the session', () => first.conn.isClosed);
    assert.match(env.target.stats.lastError, /chunks 1-2 of delta set 1 could not be stored.*EIO/);
    assert.ok(!acked(first.frames, (a) => a.chunksStored > 1), 'neither chunk was acknowledged');
    await resumeAndPlayBack(env, ds, 1, 'neither chunk of the failed sync is counted');
  }));

test('a snapshot of the replica is taken between playbacks only: refused without a consistent image or in a playback that keeps failing; none starts while it is taken', async () => {
  await withEnv({ copyDone: false }, async (env) => {
    await assert.rejects(env.target.atBoundary(async () => assert.fail('taken')), /holds no consistent image until its initial copy is complete/);
  });
  await withEnv({}, async (env) => {
    // Delta set 1's playback fails after its first chunk: the volume holds part of it.
    const ds1 = deltaSet(1, 3);
    const failed = env.failWrite(1);
    const { conn, frames } = await env.session();
    send(conn, ds1);
    await failed;
    await until('the failed playback has returned', () => env.target.stats.playing === 0);
    await assert.rejects(env.target.atBoundary(async () => assert.fail('taken'), 300), /in the middle of playing back delta set 1, which keeps failing \(playback of delta set 1 failed/);
    // Once redone, the image is whole, and that is what is taken.
    const taken = await env.target.atBoundary(async (image) => ({ image, digest: await env.digest() }), 15_000);
    assert.deepEqual([taken.image.deltaSet, taken.digest], [1, expectedDigest([ds1.expect])]);
    // Delta set 2 arrives while a snapshot is being taken: it waits for the snapshot.
    const ds2 = deltaSet(2, 2);
    let release!: () => void;
    const held = env.target.atBoundary(() => new Promise<void>((r) => (release = r)));
    await until('the snapshot is being taken', () => release !== undefined);
    send(conn, ds2);
    await until('delta set 2 sealed', () => acked(frames, (a) => a.sealed && a.deltaSet === 2));
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(env.pair.deltaSetPlayedBack, 1, 'no playback while the snapshot is taken');
    assert.equal(await env.digest(), expectedDigest([ds1.expect]));
    release();
    await held;
    await until('delta set 2 played back', () => env.pair.deltaSetPlayedBack === 2);
    assert.equal(await env.digest(), expectedDigest([ds1.expect, ds2.expect]));
    conn.destroy();
  });
});
