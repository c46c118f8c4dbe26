import { randomUUID } from 'node:crypto';
import { createServer } from 'node:http';
import { PassThrough } from 'node:stream';
import Fastify, { LogController, type FastifyBaseLogger, type FastifyError, type FastifyInstance, type FastifyReply } from 'fastify';
import { FerryError, isFerryError, isNoSpace } from '../lib/errors.js';
import { Sha256InWorker } from '../lib/sha256.js';
import { parseDuration, parseSize } from '../lib/units.js';
import { highWaterBytesDefault, intervalMsDefault, saveVolumeBytesDefault } from '../replication/manager.js';
import { checkVolumeName } from '../storage/volume-store.js';
import { dashboardHtml } from '../dashboard/page.js';
import type { Site } from '../site/site.js';
import type { TargetReplica } from '../replication/target.js';
import { ioBytesMax, type Volume } from '../storage/volume.js';
import type { VolumeAccess } from '../storage/catalog.js';
import { createMetrics } from './metrics.js';
import { registerSnapshotRoutes } from './snapshots.js';
import { ferryVersion } from '../lib/version.js';

/** Largest JSON body the API accepts. */
export const jsonBodyBytesMax = 64 * 1024;
/** Largest body or answer of the raw data endpoint. */
export const dataBytesMax = 4 * 1024 * 1024;

const sizeSchema = { anyOf: [{ type: 'string', maxLength: 32 }, { type: 'integer' }] } as const;
const nameParams = {
  type: 'object',
  properties: { name: { type: 'string', maxLength: 256 } },
  required: ['name'],
} as const;

/**
 * The HTTP API (`/api/v1/…`), `/healthz`, `/metrics` and the dashboard, for one site.
 * Fastify never listens itself: the site's listener hands it the connections that
 * look like HTTP (one port, two protocols).
 */
export async function buildApi(site: Site): Promise<FastifyInstance> {
  const app = Fastify({
    serverFactory: (handler) => createServer(handler),
    bodyLimit: jsonBodyBytesMax,
    loggerInstance: site.log.child({ component: 'http' }) as FastifyBaseLogger,
    logController: new LogController({ disableRequestLogging: true }),
    ajv: { customOptions: { removeAdditional: false, coerceTypes: false, allErrors: false } },
  });
  const metrics = createMetrics(site);

  app.addContentTypeParser('application/octet-stream', { parseAs: 'buffer', bodyLimit: dataBytesMax }, (_req, body, done) => done(null, body));

  app.setErrorHandler((err: FastifyError | FerryError | Error, _req, reply) => {
    if (err instanceof FerryError) {
      if (err.httpStatus >= 500) site.log.error({ err }, 'request failed');
      return reply.status(err.httpStatus).send({ error: err.toJSON() });
    }
    const fe = err as FastifyError;
    if (fe.validation) {
      return reply.status(400).send({ error: { code: 'BAD_REQUEST', message: `invalid request ${fe.validationContext ?? ''}: ${fe.message}`.replace(/\s+/g, ' ') } });
    }
    if (fe.statusCode === 413) {
      return reply.status(413).send({ error: { code: 'PAYLOAD_TOO_LARGE', message: `request body too large (limit ${jsonBodyBytesMax} bytes for JSON, ${dataBytesMax} for data)` } });
    }
    if (fe.statusCode !== undefined && fe.statusCode >= 400 && fe.statusCode < 500) {
      return reply.status(fe.statusCode).send({ error: { code: 'BAD_REQUEST', message: fe.message } });
    }
    site.log.error({ err }, 'request failed');
    if (isNoSpace(err)) {
      // Not a fault of the request or of ferry: the site's storage wants space freed.
      const noSpace = new FerryError('NO_SPACE', `no space for this write at this site (free space on its file system, then try again): ${err.message}`);
      return reply.status(noSpace.httpStatus).send({ error: noSpace.toJSON() });
    }
    return reply.status(500).send({ error: { code: 'INTERNAL', message: err.message } });
  });

  app.setNotFoundHandler((req, reply) => {
    void reply.status(404).send({ error: { code: 'NOT_FOUND', message: `no such endpoint: ${req.method} ${req.url}` } });
  });

  app.get('/', async (_req, reply) => reply.type('text/html; charset=utf-8').send(dashboardHtml));

  app.get('/healthz', async () => ({ status: 'ok', site: site.config.name }));

  app.get('/metrics', async (_req, reply) => reply.type(metrics.contentType).send(await metrics.metrics()));

  app.get('/api/v1/site', async () => {
    // Volumes are thin and snapshots grow as blocks change: what is promised against what is left.
    const space = await site.fileSystemSpace();
    const volumes = site.volumes.list();
    return {
      id: site.config.id,
      name: site.config.name,
      blockBytes: site.config.blockBytes,
      listen: site.config.listen,
      nbd: site.config.nbd,
      url: site.url,
      startedAt: site.startedAt.toISOString(),
      pid: process.pid,
      threadPoolSize: site.threadPoolSize,
      version: 1,
      ferryVersion,
      fileSystemBytes: space.sizeBytes,
      fileSystemAvailableBytes: space.availableBytes,
      volumesProvisionedBytes: volumes.reduce((n, v) => n + v.sizeBytes, 0),
      volumesAllocatedBytes: volumes.reduce((n, v) => n + v.allocatedBytes, 0),
      // Held back so that deleting a volume or a snapshot still works on a full file system.
      spaceReserveBytes: site.reserve.targetBytes,
      spaceReserveHeldBytes: site.reserve.heldBytes,
    };
  });

  app.get('/api/v1/volumes', async () => site.volumes.list());

  app.post(
    '/api/v1/volumes',
    {
      schema: {
        body: {
          type: 'object',
          properties: { name: { type: 'string', maxLength: 256 }, size: sizeSchema },
          required: ['name', 'size'],
          additionalProperties: false,
        },
      },
    },
    async (req, reply) => {
      const body = req.body as { name: string; size: string | number };
      const info = await site.volumes.create(body.name, parseSize(body.size));
      return reply.status(201).send(info);
    },
  );

  app.get('/api/v1/volumes/:name', { schema: { params: nameParams } }, async (req) => site.volumes.show((req.params as { name: string }).name));

  app.post(
    '/api/v1/volumes/:name/resize',
    {
      schema: {
        params: nameParams,
        body: {
          type: 'object',
          properties: { size: sizeSchema, force: { type: 'boolean' } },
          required: ['size'],
          additionalProperties: false,
        },
      },
    },
    async (req) => {
      const body = req.body as { size: string | number; force?: boolean };
      return site.replication.resizeVolume((req.params as { name: string }).name, parseSize(body.size), body.force ?? false);
    },
  );

  app.post(
    '/api/v1/volumes/:name/access',
    {
      schema: {
        params: nameParams,
        body: {
          type: 'object',
          properties: { access: { type: 'string', enum: ['read-write', 'read-only', 'raw'] } },
          required: ['access'],
          additionalProperties: false,
        },
      },
    },
    async (req) => {
      const body = req.body as { access: VolumeAccess };
      const name = (req.params as { name: string }).name;
      const pair = site.replication.catalog.getPair(name);
      if (pair) {
        // A replica made writable by hand would diverge from its source without anyone knowing.
        throw new FerryError('VOLUME_IN_USE', `volume ${name} is the ${pair.role} of a replication pair; its access follows the pair (use failover or "replicate stop")`);
      }
      return site.setVolumeAccess(name, body.access);
    },
  );

  app.delete('/api/v1/volumes/:name', { schema: { params: nameParams } }, async (req, reply) => {
    const name = (req.params as { name: string }).name;
    await site.usingReserve(`volume delete ${name}`, () => site.volumes.delete(name));
    return reply.status(204).send();
  });

  const offsetQuery = {
    type: 'object',
    properties: { offset: { type: 'string', pattern: '^[0-9]{1,16}$' }, length: { type: 'string', pattern: '^[0-9]{1,16}$' } },
    additionalProperties: false,
  } as const;

  // Raw data access for operators and tests (small ranges); hosts use NBD.
  app.put('/api/v1/volumes/:name/data', { schema: { params: nameParams, querystring: offsetQuery } }, async (req, reply) => {
    const name = (req.params as { name: string }).name;
    const offset = Number((req.query as { offset?: string }).offset ?? '0');
    if (!Buffer.isBuffer(req.body)) throw new FerryError('BAD_REQUEST', 'send the data as application/octet-stream');
    writableVolume(site, name);
    await site.volumes.get(name).write(offset, req.body);
    return reply.status(204).send();
  });

  app.get('/api/v1/volumes/:name/data', { schema: { params: nameParams, querystring: offsetQuery } }, async (req, reply) => {
    const name = (req.params as { name: string }).name;
    const q = req.query as { offset?: string; length?: string };
    const reader = site.reader(name);
    const offset = Number(q.offset ?? '0');
    const length = Number(q.length ?? String(Math.min(dataBytesMax, Math.max(0, reader.sizeBytes - offset))));
    if (length > dataBytesMax) throw new FerryError('PAYLOAD_TOO_LARGE', `read at most ${dataBytesMax} bytes per request`);
    if (offset + length > reader.sizeBytes) throw new FerryError('OUT_OF_RANGE', `range ${offset}+${length} is past the end of volume ${name}`);
    const buf = Buffer.alloc(length);
    await reader.readInto(buf, offset);
    return reply.type('application/octet-stream').send(buf);
  });

  app.post('/api/v1/volumes/:name/flush', { schema: { params: nameParams } }, async (req, reply) => {
    await site.volumes.get((req.params as { name: string }).name).flush();
    return reply.status(204).send();
  });

  app.get('/api/v1/volumes/:name/digest', { schema: { params: nameParams, querystring: digestQuery } }, async (req, reply) => {
    const name = (req.params as { name: string }).name;
    const progress = (req.query as DigestQuery).progress === 'true';
    const target = site.replication.targets.get(name);
    // A replica changes by whole delta sets while it is read: its digest is of one image of the source, and says which.
    if (target?.holdsImage) {
      const { image, point, done } = await replicaImage(site, target, name, reply.log);
      const answer = (sha256: string): object => ({
        volume: name,
        sizeBytes: image.sizeBytes,
        sha256,
        deltaSet: point.deltaSet,
        ...(point.sourceCutMs > 0 ? { sourceTime: new Date(point.sourceCutMs).toISOString() } : {}),
      });
      return digestAnswer(reply, image, name, progress, answer, done);
    }
    const reader = site.reader(name);
    return digestAnswer(reply, reader, name, progress, (sha256) => ({ volume: name, sizeBytes: reader.sizeBytes, sha256 }));
  });

  // ---- replication -----------------------------------------------------------------
  const durationSchema = { anyOf: [{ type: 'string', maxLength: 32 }, { type: 'integer', minimum: 0 }] } as const;
  const volumeParams = { type: 'object', properties: { volume: { type: 'string', maxLength: 256 } }, required: ['volume'] } as const;

  app.post(
    '/api/v1/replication',
    {
      schema: {
        body: {
          type: 'object',
          properties: {
            volume: { type: 'string', maxLength: 256 },
            to: { type: 'string', maxLength: 2048 },
            targetVolume: { type: 'string', maxLength: 256 },
            mode: { type: 'string', enum: ['async', 'sync'] },
            interval: durationSchema,
            highWater: sizeSchema,
            maxRate: sizeSchema,
            saveVolume: sizeSchema,
            targetSaveVolume: sizeSchema,
            force: { type: 'boolean' },
          },
          required: ['volume', 'to'],
          additionalProperties: false,
        },
      },
    },
    async (req, reply) => {
      const b = req.body as { volume: string; to: string; targetVolume?: string; mode?: 'async' | 'sync'; interval?: string | number; highWater?: string | number; maxRate?: string | number; saveVolume?: string | number; targetSaveVolume?: string | number; force?: boolean };
      if (b.targetVolume !== undefined) checkVolumeName(b.targetVolume);
      const pair = await site.replication.start({
        volume: b.volume,
        to: b.to,
        ...(b.targetVolume !== undefined ? { targetVolume: b.targetVolume } : {}),
        mode: b.mode ?? 'async',
        intervalMs: b.interval !== undefined ? parseDuration(b.interval) : intervalMsDefault,
        highWaterBytes: b.highWater !== undefined ? parseSize(b.highWater) : highWaterBytesDefault,
        ...(b.maxRate !== undefined ? { maxRateBytes: parseSize(b.maxRate) } : {}),
        saveVolumeBytes: b.saveVolume !== undefined ? parseSize(b.saveVolume) : saveVolumeBytesDefault,
        ...(b.targetSaveVolume !== undefined ? { targetSaveVolumeBytes: parseSize(b.targetSaveVolume) } : {}),
        ...(b.force ? { overwrite: true } : {}),
      });
      return reply.status(201).send(site.replication.status(pair.volume)[0]);
    },
  );

  app.post('/api/v1/replication/:volume/stop', { schema: { params: volumeParams } }, async (req) => {
    const volume = (req.params as { volume: string }).volume;
    return { volume, stopped: true, ...(await site.usingReserve(`replicate stop ${volume}`, () => site.replication.stop(volume))) };
  });
  app.post(
    '/api/v1/replication/:volume/peer',
    { schema: { params: volumeParams, body: { type: 'object', properties: { to: { type: 'string', maxLength: 2048 } }, required: ['to'], additionalProperties: false } } },
    async (req) => {
      const volume = (req.params as { volume: string }).volume;
      await site.replication.setPeer(volume, (req.body as { to: string }).to);
      return site.replication.status(volume)[0];
    },
  );
  app.post(
    '/api/v1/replication/:volume/policy',
    { schema: { params: volumeParams, body: { type: 'object', properties: { interval: durationSchema, highWater: sizeSchema, maxRate: sizeSchema }, additionalProperties: false } } },
    async (req) => {
      const volume = (req.params as { volume: string }).volume;
      const b = req.body as { interval?: string | number; highWater?: string | number; maxRate?: string | number };
      site.replication.setPolicy(volume, {
        ...(b.interval !== undefined ? { intervalMs: parseDuration(b.interval) } : {}),
        ...(b.highWater !== undefined ? { highWaterBytes: parseSize(b.highWater) } : {}),
        ...(b.maxRate !== undefined ? { maxRateBytes: parseSize(b.maxRate) } : {}),
      });
      // The info view: it carries the policy now in force.
      return site.replication.info(volume);
    },
  );
  app.post('/api/v1/replication/:volume/pause', { schema: { params: volumeParams } }, async (req) => {
    const volume = (req.params as { volume: string }).volume;
    site.replication.pause(volume);
    return site.replication.status(volume)[0];
  });
  app.post('/api/v1/replication/:volume/resume', { schema: { params: volumeParams } }, async (req) => {
    const volume = (req.params as { volume: string }).volume;
    site.replication.resume(volume);
    return site.replication.status(volume)[0];
  });
  app.post('/api/v1/replication/:volume/delta', { schema: { params: volumeParams } }, async (req) => {
    const volume = (req.params as { volume: string }).volume;
    return { volume, ...(await site.replication.delta(volume)) };
  });
  // ---- disaster recovery (E FIG. 21-33) ------------------------------------------------
  app.post(
    '/api/v1/replication/:volume/failover',
    {
      schema: {
        params: volumeParams,
        body: { type: 'object', properties: { mode: { type: 'string', enum: ['default', 'now', 'sync'] } }, additionalProperties: false },
      },
    },
    async (req) => {
      const volume = (req.params as { volume: string }).volume;
      const mode = ((req.body as { mode?: 'default' | 'now' | 'sync' } | undefined)?.mode ?? 'default');
      const result = await site.usingReserve(`failover ${volume}`, () => site.replication.failover(volume, mode));
      return { ...result, status: site.replication.status(volume)[0] };
    },
  );
  app.post(
    '/api/v1/replication/:volume/resync',
    { schema: { params: volumeParams, body: { type: 'object', nullable: true, properties: { reverse: { type: 'boolean' }, dryRun: { type: 'boolean' } }, additionalProperties: false } } },
    async (req) => {
      const volume = (req.params as { volume: string }).volume;
      const body = (req.body ?? {}) as { reverse?: boolean; dryRun?: boolean };
      if (body.dryRun === true) return { dryRun: await site.replication.previewResync(volume, body.reverse === true) };
      await site.replication.resync(volume, body.reverse === true);
      return site.replication.status(volume)[0];
    },
  );
  app.post('/api/v1/replication/:volume/failback', { schema: { params: volumeParams } }, async (req) => {
    const volume = (req.params as { volume: string }).volume;
    await site.replication.failback(volume);
    return site.replication.status(volume)[0];
  });
  app.get('/api/v1/status', async () => site.replication.status());
  app.get('/api/v1/status/:volume', { schema: { params: volumeParams } }, async (req) => site.replication.status((req.params as { volume: string }).volume));
  app.get('/api/v1/replication/:volume/info', { schema: { params: volumeParams } }, async (req) => site.replication.info((req.params as { volume: string }).volume));
  registerSnapshotRoutes(app, site);

  await app.ready();
  return app;
}

function writableVolume(site: Site, name: string): void {
  const record = site.volumes.record(name);
  if (record.access !== 'read-write') {
    throw new FerryError('VOLUME_READ_ONLY', `volume ${name} is ${record.access}; hosts cannot write to it`);
  }
}

type DigestImage = Pick<Volume, 'sizeBytes' | 'blockStatus' | 'readInto'>;

/**
 * One image of a replica to read whole (a digest), though playback goes on: a snapshot
 * taken between two playbacks, deleted by `done`. At the snapshot limit, playback is
 * held instead until `done`.
 */
async function replicaImage(site: Site, target: TargetReplica, name: string, log: FastifyBaseLogger): Promise<{ image: DigestImage; point: { deltaSet: number; sourceCutMs: number }; done: () => Promise<void> }> {
  const snap = `ferry-digest-${randomUUID().slice(0, 8)}`;
  const drop = async (): Promise<void> => {
    await site.snapshots.delete(name, snap).catch((err: Error) => log.warn({ volume: name, snapshot: snap, err: err.message }, 'the snapshot a digest was read from could not be deleted; delete it by hand'));
  };
  try {
    const point = await target.atBoundary(async (at) => {
      await site.snapshots.create(name, snap, { purpose: 'image of a replica being digested' });
      return at;
    });
    const image = await site.snapshots.image(name, snap).catch(async (err: Error) => {
      await drop();
      throw err;
    });
    return { image, point, done: drop };
  } catch (err) {
    if (!isFerryError(err, 'SNAPSHOT_LIMIT')) throw err;
  }
  let release = (): void => undefined;
  const released = new Promise<void>((resolve) => (release = resolve));
  const point = await new Promise<{ deltaSet: number; sourceCutMs: number }>((resolve, reject) => {
    target.atBoundary(async (at) => {
      resolve(at);
      await released;
    }).catch(reject);
  });
  return { image: site.reader(name), point, done: async () => release() };
}

/** Reads of allocated data while digesting; each is handed to the hashing thread whole. */
const digestReadBytes = 4 * 1024 * 1024;
/** The volume's map is scanned this much at a time, the most one request may span (holes coalesce across pieces). */
const digestScanBytes = ioBytesMax;

export interface DigestOptions {
  /** Stops the digest (the client went away). */
  signal?: AbortSignal;
  onProgress?: (hashedBytes: number) => void;
}

/**
 * SHA-256 of the whole volume, hashed on a worker thread so the site keeps serving
 * meanwhile. Holes are hashed as zeros without reading the file.
 */
export async function digestVolume(volume: Pick<Volume, 'sizeBytes' | 'blockStatus' | 'readInto'>, options: DigestOptions = {}): Promise<string> {
  const hasher = new Sha256InWorker(options.onProgress, options.signal);
  try {
    let zeros = 0;
    for (let offset = 0; offset < volume.sizeBytes; offset += digestScanBytes) {
      for (const e of volume.blockStatus(offset, Math.min(digestScanBytes, volume.sizeBytes - offset))) {
        if (!e.allocated) {
          zeros += e.length;
          continue;
        }
        await hasher.zeros(zeros);
        zeros = 0;
        for (let at = e.offset; at < e.offset + e.length; at += digestReadBytes) {
          // Its own memory, so that it can be handed to the hashing thread without a copy.
          const buf = Buffer.allocUnsafeSlow(Math.min(digestReadBytes, e.offset + e.length - at));
          await volume.readInto(buf, at);
          await hasher.update(buf);
        }
      }
      // A map with nothing allocated is scanned without any other wait.
      await new Promise((resolve) => setImmediate(resolve));
    }
    await hasher.zeros(zeros);
    return await hasher.digest();
  } finally {
    await hasher.close();
  }
}

export const digestQuery = { type: 'object', properties: { progress: { type: 'string', enum: ['true', 'false'] } }, additionalProperties: false } as const;
export interface DigestQuery {
  progress?: 'true' | 'false';
}
/** How often a streamed digest says how far it is. */
const digestProgressMs = 500;

/**
 * Answers a digest request: the answer object, or with `progress` lines of JSON
 * (`application/x-ndjson`), `{hashedBytes, sizeBytes}` every half second, then the answer
 * (or `{error}` if the digest failed once under way). `label` names the image in the log.
 */
export async function digestAnswer(reply: FastifyReply, image: DigestImage, label: string, progress: boolean, answer: (sha256: string) => object, finished?: () => Promise<void>): Promise<unknown> {
  const signal = abortOnHangUp(reply, `digest of ${label}`);
  if (!progress) {
    try {
      return answer(await digestVolume(image, { signal }));
    } finally {
      await finished?.();
    }
  }
  const out = new PassThrough();
  const line = (value: object): void => void out.write(`${JSON.stringify(value)}\n`);
  let saidMs = Date.now();
  const onProgress = (hashedBytes: number): void => {
    if (Date.now() - saidMs < digestProgressMs) return;
    saidMs = Date.now();
    line({ hashedBytes, sizeBytes: image.sizeBytes });
  };
  digestVolume(image, { signal, onProgress })
    .then(
      (sha256) => line(answer(sha256)),
      (err: Error) => line({ error: err instanceof FerryError ? err.toJSON() : { code: 'INTERNAL', message: err.message } }),
    )
    .then(() => finished?.())
    .finally(() => out.end());
  return reply.type('application/x-ndjson').send(out);
}

/** Aborts `what` (logged) when the client of `reply` goes away before its answer is sent. */
export function abortOnHangUp(reply: FastifyReply, what: string): AbortSignal {
  const controller = new AbortController();
  reply.raw.once('close', () => {
    if (reply.raw.writableFinished) return;
    reply.log.info(`${what} cancelled: the client went away`);
    controller.abort();
  });
  return controller.signal;
}
