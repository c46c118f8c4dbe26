import type { FastifyInstance } from 'fastify';
import { FerryError } from '../lib/errors.js';
import type { Site } from '../site/site.js';
import { digestAnswer, digestQuery, type DigestQuery } from './server.js';

/** Extents listed at most by one diff answer (the rest is counted, and `truncated` set). */
export const diffExtentsMax = 100_000;
/** Largest answer of the snapshot data endpoint. */
const snapshotDataBytesMax = 4 * 1024 * 1024;

const snapParams = {
  type: 'object',
  properties: { name: { type: 'string', maxLength: 256 }, snap: { type: 'string', maxLength: 256 } },
  required: ['name', 'snap'],
} as const;
const nameParams = {
  type: 'object',
  properties: { name: { type: 'string', maxLength: 256 } },
  required: ['name'],
} as const;
const attrsSchema = { type: 'object', maxProperties: 64, additionalProperties: { anyOf: [{ type: 'string', maxLength: 1024 }, { type: 'null' }] } } as const;

interface SnapParams {
  name: string;
  snap: string;
}

/** Snapshot routes under /api/v1/volumes/:name/snapshots (SPEC §5, C3). */
export function registerSnapshotRoutes(app: FastifyInstance, site: Site): void {
  const snapshots = site.snapshots;

  app.get('/api/v1/volumes/:name/snapshots', { schema: { params: nameParams } }, async (req) => snapshots.list((req.params as { name: string }).name));

  app.post(
    '/api/v1/volumes/:name/snapshots',
    {
      schema: {
        params: nameParams,
        body: {
          anyOf: [
            { type: 'object', properties: { name: { type: 'string', maxLength: 256 }, attrs: attrsSchema }, additionalProperties: false },
            { type: 'null' },
          ],
        },
      },
    },
    async (req, reply) => {
      const body = (req.body ?? {}) as { name?: string; attrs?: Record<string, string> };
      // Failover, resync and copies find their snapshots by these names.
      if (body.name?.startsWith('ferry-')) throw new FerryError('INVALID_NAME', `snapshot names starting with "ferry-" are kept for the snapshots ferry makes itself; choose another name than ${body.name}`);
      for (const v of Object.values(body.attrs ?? {})) if (typeof v !== 'string') throw new FerryError('BAD_REQUEST', 'attribute values must be strings');
      const volume = (req.params as { name: string }).name;
      const pair = site.replication.catalog.getPair(volume);
      if (pair?.role !== 'target') return reply.status(201).send(await snapshots.create(volume, body.name, body.attrs ?? {}));
      // A replica (a backup at the remote site): taken between two playbacks, never in
      // the middle of one, and it says which point of the source it holds.
      const target = site.replication.targets.get(volume);
      if (!target) throw new FerryError('UNAVAILABLE', `volume ${volume} is a replica whose replication is not open here; see the site's log`);
      const info = await target.atBoundary(({ deltaSet, sourceCutMs }) =>
        snapshots.create(volume, body.name, {
          ...body.attrs,
          replicaOf: `${pair.peerSiteName}:${pair.peerVolume}`,
          generation: String(pair.generation),
          deltaSet: String(deltaSet),
          ...(sourceCutMs > 0 ? { sourceTime: new Date(sourceCutMs).toISOString() } : {}),
        }),
      );
      return reply.status(201).send(info);
    },
  );

  app.get('/api/v1/volumes/:name/snapshots/:snap', { schema: { params: snapParams } }, async (req) => {
    const p = req.params as SnapParams;
    return snapshots.show(p.name, p.snap);
  });

  app.delete(
    '/api/v1/volumes/:name/snapshots/:snap',
    { schema: { params: snapParams, querystring: { type: 'object', properties: { force: { type: 'string', enum: ['true', 'false'] } }, additionalProperties: false } } },
    async (req, reply) => {
      const p = req.params as SnapParams;
      const inUse = site.replication.snapshotInUse(p.name, p.snap);
      if (inUse) throw new FerryError('SNAPSHOT_IN_USE', `snapshot ${p.name}@${p.snap} is in use: ${inUse}; ferry deletes it when it is no longer needed`);
      await site.usingReserve(`snapshot delete ${p.name} ${p.snap}`, () => snapshots.delete(p.name, p.snap, { force: (req.query as { force?: string }).force === 'true' }));
      return reply.status(204).send();
    },
  );

  app.post('/api/v1/volumes/:name/snapshots/:snap/restore', { schema: { params: snapParams } }, async (req) => {
    const p = req.params as SnapParams;
    const record = site.volumes.record(p.name);
    if (record.access !== 'read-write') throw new FerryError('VOLUME_READ_ONLY', `volume ${p.name} is ${record.access}; it cannot be restored`);
    const result = await snapshots.restore(p.name, p.snap);
    return { volume: p.name, snapshot: p.snap, ...result };
  });

  app.post(
    '/api/v1/volumes/:name/snapshots/:snap/attributes',
    { schema: { params: snapParams, body: { type: 'object', properties: { attrs: attrsSchema }, required: ['attrs'], additionalProperties: false } } },
    async (req) => {
      const p = req.params as SnapParams;
      return snapshots.setAttributes(p.name, p.snap, (req.body as { attrs: Record<string, string | null> }).attrs);
    },
  );

  app.get(
    '/api/v1/volumes/:name/snapshots/:snap/diff',
    { schema: { params: snapParams, querystring: { type: 'object', properties: { to: { type: 'string', maxLength: 256 } }, required: ['to'], additionalProperties: false } } },
    async (req) => {
      const p = req.params as SnapParams;
      const to = (req.query as { to: string }).to;
      const extents: { offset: number; length: number }[] = [];
      let changedBytes = 0;
      let extentCount = 0;
      const list = async (): Promise<void> => {
        for await (const e of snapshots.delta(p.name, p.snap, to)) {
          extentCount++;
          changedBytes += e.length;
          // Merge with the previous extent when adjacent (delta pieces are bounded in size).
          const last = extents[extents.length - 1];
          if (last && last.offset + last.length === e.offset) last.length += e.length;
          else if (extents.length < diffExtentsMax) extents.push({ offset: e.offset, length: e.length });
        }
      };
      // A replica's current image changes by whole delta sets: compared between two playbacks.
      const target = to === 'current' ? site.replication.targets.get(p.name) : undefined;
      await (target ? target.atBoundary(list) : list());
      return { volume: p.name, from: p.snap, to, changedBytes, extents, truncated: extents.length >= diffExtentsMax && extentCount > extents.length };
    },
  );

  app.get('/api/v1/volumes/:name/snapshots/:snap/digest', { schema: { params: snapParams, querystring: digestQuery } }, async (req, reply) => {
    const p = req.params as SnapParams;
    const image = await snapshots.image(p.name, p.snap);
    return digestAnswer(reply, image, `${p.name}@${p.snap}`, (req.query as DigestQuery).progress === 'true', (sha256) => ({ volume: p.name, snapshot: p.snap, sizeBytes: image.sizeBytes, sha256 }));
  });

  app.get(
    '/api/v1/volumes/:name/snapshots/:snap/data',
    {
      schema: {
        params: snapParams,
        querystring: {
          type: 'object',
          properties: { offset: { type: 'string', pattern: '^[0-9]{1,16}$' }, length: { type: 'string', pattern: '^[0-9]{1,16}$' } },
          additionalProperties: false,
        },
      },
    },
    async (req, reply) => {
      const p = req.params as SnapParams;
      const q = req.query as { offset?: string; length?: string };
      const image = await snapshots.image(p.name, p.snap);
      const offset = Number(q.offset ?? '0');
      const length = Number(q.length ?? String(Math.min(snapshotDataBytesMax, Math.max(0, image.sizeBytes - offset))));
      if (length > snapshotDataBytesMax) throw new FerryError('PAYLOAD_TOO_LARGE', `read at most ${snapshotDataBytesMax} bytes per request`);
      return reply.type('application/octet-stream').send(await image.read(offset, length));
    },
  );
}
