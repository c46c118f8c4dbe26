#!/usr/bin/env node
import { resolve } from 'node:path';
import { Command, Option } from 'commander';
import { FerryError } from '../lib/errors.js';
import { formatDuration, formatSize, parseDuration, parseSize, parseHostPort } from '../lib/units.js';
import type { InfoView, LastBuild, PairStatusView } from '../replication/status.js';
import type { StopResult } from '../replication/manager.js';
import type { ResyncPreview } from '../recovery/recovery.js';
import type { SourceAhead } from '../storage/replication-catalog.js';
import type { VolumeInfo } from '../storage/volume-store.js';
import type { SnapshotInfo } from '../snapshot/manager.js';
import { ApiClient, defaultSiteUrl, volumePath } from './client.js';
import { ProgressBar, keyValues, table } from './format.js';
import { checkAdvertisedUrl } from '../transport/peer-url.js';
import { ferryVersion } from '../lib/version.js';

interface GlobalOptions {
  json?: boolean;
  site?: string;
}

const program = new Command();
program
  .name('ferry')
  .description('Storage replication and disaster recovery: volumes over NBD, snapshots, remote copies, failover and failback.')
  .version(ferryVersion, '-V, --version', 'print the version of this ferry')
  .option('--json', 'machine-readable output')
  .option('--site <url>', `site API URL (default $FERRY_SITE, else ${defaultSiteUrl})`)
  .showHelpAfterError();

function globals(cmd: Command): GlobalOptions {
  return cmd.optsWithGlobals<GlobalOptions>();
}

function client(cmd: Command): ApiClient {
  return new ApiClient(globals(cmd).site ?? process.env.FERRY_SITE ?? defaultSiteUrl);
}

function print(cmd: Command, value: unknown, human: () => string): void {
  if (globals(cmd).json) process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
  else {
    const text = human();
    if (text.length > 0) process.stdout.write(`${text}\n`);
  }
}

function volumeDetails(v: VolumeInfo): string {
  return keyValues([
    ['name', v.name],
    ['id', v.id],
    ['size', `${formatSize(v.sizeBytes)} (${v.sizeBytes} bytes)`],
    ['allocated', `${formatSize(v.allocatedBytes)} (${v.allocatedBytes} bytes)`],
    ['block size', formatSize(v.blockBytes)],
    ['access', v.access],
    ['created', v.createdAt],
    ...(v.failure ? ([['failure', `${v.failure.code}: ${v.failure.message}`]] as [string, string][]) : []),
  ]);
}

// ---- site ------------------------------------------------------------------
const site = program.command('site').description('initialise, start and inspect a site');

site
  .command('init')
  .description('create a site data directory')
  .requiredOption('--dir <dir>', 'data directory')
  .requiredOption('--name <name>', 'site name')
  .option('--listen <host:port>', 'HTTP API and replication listener', '127.0.0.1:7370')
  .option('--nbd <host:port>', 'NBD listener', '127.0.0.1:10809')
  .option('--block-size <size>', 'block size', '8K')
  .option('--advertise <url>', 'the URL other sites reach this one at, if not the listener (e.g. it listens on 0.0.0.0, or behind NAT)')
  .action(async (opts: { dir: string; name: string; listen: string; nbd: string; blockSize: string; advertise?: string }, cmd: Command) => {
    parseHostPort(opts.listen);
    parseHostPort(opts.nbd);
    if (opts.advertise !== undefined) checkAdvertisedUrl(opts.advertise);
    const { initSiteDir } = await import('../storage/site-dir.js');
    const config = await initSiteDir({
      dir: resolve(opts.dir),
      name: opts.name,
      listen: opts.listen,
      nbd: opts.nbd,
      ...(opts.advertise !== undefined ? { advertise: opts.advertise } : {}),
      blockBytes: parseSize(opts.blockSize),
    });
    print(cmd, config, () => `site ${config.name} (${config.id}) initialised in ${resolve(opts.dir)}\nstart it with: ferry site start --dir ${opts.dir}`);
  });

site
  .command('start')
  .description('run the site daemon in the foreground (SIGTERM/SIGINT stop it cleanly)')
  .requiredOption('--dir <dir>', 'data directory')
  .option('--listen <host:port>', 'override the configured listener (port 0: any free port)')
  .option('--nbd <host:port>', 'override the configured NBD listener (port 0: any free port)')
  .option('--advertise <url>', 'override the configured URL other sites reach this one at')
  .action(async (opts: { dir: string; listen?: string; nbd?: string; advertise?: string }) => {
    if (opts.listen !== undefined) parseHostPort(opts.listen);
    if (opts.nbd !== undefined) parseHostPort(opts.nbd);
    if (opts.advertise !== undefined) checkAdvertisedUrl(opts.advertise);
    // Loaded here: the daemon's modules (catalog, HTTP server, metrics) would slow every
    // other command, which only talks to a daemon over HTTP.
    const { runDaemon } = await import('./daemon.js');
    await runDaemon(resolve(opts.dir), opts.listen, opts.nbd, opts.advertise);
  });

site
  .command('show')
  .description('identity and configuration of the running site')
  .action(async (_opts: unknown, cmd: Command) => {
    const info = await client(cmd).get<Record<string, string | number>>('/api/v1/site');
    print(cmd, info, () => keyValues(Object.entries(info).map(([k, v]) => [k, k.endsWith('Bytes') && typeof v === 'number' ? formatSize(v) : String(v)])));
  });

// ---- volume ----------------------------------------------------------------
const volume = program.command('volume').description('create, list, resize and delete volumes');

volume
  .command('create <name>')
  .description('create a volume (sparse; size a multiple of the block size)')
  .requiredOption('--size <size>', 'size, e.g. 10G')
  .action(async (name: string, opts: { size: string }, cmd: Command) => {
    const info = await client(cmd).post<VolumeInfo>('/api/v1/volumes', { name, size: parseSize(opts.size) });
    print(cmd, info, () => `volume ${info.name} created (${formatSize(info.sizeBytes)})`);
  });

volume
  .command('list')
  .description('list volumes')
  .action(async (_opts: unknown, cmd: Command) => {
    const list = await client(cmd).get<VolumeInfo[]>('/api/v1/volumes');
    print(cmd, list, () =>
      list.length === 0
        ? 'no volumes'
        : table(
            ['NAME', 'SIZE', 'ALLOCATED', 'ACCESS', 'CREATED'],
            list.map((v) => [v.name, formatSize(v.sizeBytes), formatSize(v.allocatedBytes), v.failure ? `failed (${v.failure.code})` : v.access, v.createdAt]),
          ),
    );
  });

volume
  .command('show <name>')
  .description('details of one volume')
  .action(async (name: string, _opts: unknown, cmd: Command) => {
    const info = await client(cmd).get<VolumeInfo>(volumePath(name));
    print(cmd, info, () => volumeDetails(info));
  });

volume
  .command('resize <name>')
  .description('grow a volume (shrinking needs --force and discards data past the new end)')
  .requiredOption('--size <size>', 'new size')
  .option('--force', 'allow shrinking')
  .action(async (name: string, opts: { size: string; force?: boolean }, cmd: Command) => {
    const info = await client(cmd).post<VolumeInfo>(volumePath(name, '/resize'), { size: parseSize(opts.size), force: opts.force ?? false });
    print(cmd, info, () => `volume ${info.name} is now ${formatSize(info.sizeBytes)}`);
  });

volume
  .command('delete <name>')
  .description('delete a volume and its data')
  .action(async (name: string, _opts: unknown, cmd: Command) => {
    await client(cmd).delete(volumePath(name));
    print(cmd, { deleted: name }, () => `volume ${name} deleted`);
  });

volume
  .command('access <name> <access>')
  .description('set who may use a volume: read-write, read-only (hosts may only read) or raw (no host access)')
  .action(async (name: string, access: string, _opts: unknown, cmd: Command) => {
    if (!['read-write', 'read-only', 'raw'].includes(access)) {
      throw new FerryError('BAD_REQUEST', `invalid access "${access}": use read-write, read-only or raw`);
    }
    const info = await client(cmd).post<VolumeInfo>(volumePath(name, '/access'), { access });
    print(cmd, info, () => `volume ${info.name} is now ${info.access}`);
  });

volume
  .command('digest <name>')
  .description('SHA-256 of the whole volume (to compare copies)')
  .action(async (name: string, _opts: unknown, cmd: Command) => {
    const d = await digestWithProgress<{ volume: string; sizeBytes: number; sha256: string; deltaSet?: number; sourceTime?: string }>(cmd, volumePath(name, '/digest'));
    // A replica's digest is of the image after one delta set: it says which.
    print(cmd, d, () => `${d.sha256}  ${d.volume}${d.deltaSet !== undefined ? ` (replica at delta set ${d.deltaSet}${d.sourceTime ? `, source time ${d.sourceTime}` : ''})` : ''}`);
  });

/** A digest, with a progress bar (it hashes the whole image: minutes for a large volume). */
async function digestWithProgress<T>(cmd: Command, path: string): Promise<T> {
  const bar = new ProgressBar(!globals(cmd).json);
  const startedAtMs = Date.now();
  let sizeBytes = 0;
  const answer = await client(cmd).getStreamed<T>(`${path}?progress=true`, (line) => {
    const p = line as { hashedBytes?: number; sizeBytes?: number };
    if (p.hashedBytes === undefined || !p.sizeBytes) return;
    sizeBytes = p.sizeBytes;
    const rate = p.hashedBytes / Math.max(0.001, (Date.now() - startedAtMs) / 1000);
    bar.update(p.hashedBytes / p.sizeBytes, `${formatSize(p.hashedBytes)} of ${formatSize(p.sizeBytes)} ${formatSize(rate)}/s ETA ${formatDuration(((p.sizeBytes - p.hashedBytes) / rate) * 1000)}`);
  });
  // A digest long enough to have shown progress shows its end too.
  if (sizeBytes > 0) bar.update(1, `${formatSize(sizeBytes)} in ${formatDuration(Date.now() - startedAtMs)}`, true);
  bar.end();
  return answer;
}

// ---- replication -----------------------------------------------------------------
const replicate = program.command('replicate').description('keep a copy of a volume at another site');

replicate
  .command('start <volume>')
  .description('start replicating VOLUME to the site at PEER_URL (new remote copy while the source stays writable)')
  .requiredOption('--to <peer_url>', 'the target site, e.g. http://site-b:7370')
  .option('--target-volume <name>', 'volume name at the target (default: the same name)')
  .option('--mode <mode>', 'async (delta sets) or sync', 'async')
  .option('--interval <duration>', 'cut a delta set at least this often', '10s')
  .option('--high-water <size>', 'cut a delta set once this much is modified', '64M')
  .option('--max-rate <size>', 'send at most this much per second over the link, copies included (e.g. 50M; 0: no limit)', '0')
  .option('--save-volume <size>', 'size of the save volume buffering delta sets at the source', '1G')
  .option('--target-save-volume <size>', "size of the target's save volume (default: the larger of the source's and 1G)")
  .option('--force', 'overwrite a target volume that already exists and holds data')
  .option('--wait', 'show the initial copy with a progress bar and return when it is complete')
  .action(async (volume: string, opts: { to: string; targetVolume?: string; mode: string; interval: string; highWater: string; maxRate: string; saveVolume: string; targetSaveVolume?: string; force?: boolean; wait?: boolean }, cmd: Command) => {
    const api = client(cmd);
    const status = await api.post<PairStatusView>('/api/v1/replication', {
      volume,
      to: opts.to,
      ...(opts.targetVolume ? { targetVolume: opts.targetVolume } : {}),
      mode: opts.mode,
      interval: String(parseDuration(opts.interval)) + 'ms',
      highWater: parseSize(opts.highWater),
      maxRate: parseSize(opts.maxRate),
      saveVolume: parseSize(opts.saveVolume),
      ...(opts.targetSaveVolume !== undefined ? { targetSaveVolume: parseSize(opts.targetSaveVolume) } : {}),
      ...(opts.force ? { force: true } : {}),
    });
    if (opts.wait) {
      const final = await waitForCopy(api, volume, !globals(cmd).json);
      print(cmd, final, () => `initial copy of ${volume} complete: ${formatSize(final.initialCopy.bytes)} copied; state ${final.state}`);
    } else {
      print(cmd, status, () => `replication of ${volume} to ${status.peerSite}:${status.peerVolume} started (${status.state}); follow it with: ferry status ${volume}`);
    }
  });

/** A stop that leaves the volume read-only says why, and how to make it writable. */
function stopped(volume: string, result: Record<string, unknown>): string {
  const access = String(result.access);
  const lines = [
    access === 'read-write'
      ? `replication of ${volume} stopped`
      : `replication of ${volume} stopped; the volume stays ${access}, as the role change in progress left it (the other site may be its source now). To write to this copy anyway: ferry volume access ${volume} read-write`,
  ];
  const target = result.targetNotTold as StopResult['targetNotTold'];
  if (target) {
    lines.push(
      `WARNING: the target site ${target.site} could not be told (${target.reason}); its volume ${target.volume} stays a read-only replica of this pair until it is stopped there too: ferry --site ${target.url} replicate stop ${target.volume}`,
    );
  }
  return lines.join('\n');
}

function cutDescription(volume: string, result: Record<string, unknown>): string {
  const blocks = Number(result.catchUpBlocks ?? 0);
  if (blocks > 0) return `the backlog of ${volume} (${blocks} blocks) is larger than the save volume: it goes to the other site as a catch-up copy (see ferry status)`;
  return `delta set ${String(result.deltaSet)} of ${volume} is ready`;
}

replicate
  .command('set <volume>')
  .description('change when a running pair cuts delta sets and how fast it may send (at the source; the target keeps them for a failover)')
  .option('--interval <duration>', 'cut a delta set at least this often')
  .option('--high-water <size>', 'cut a delta set once this much is modified')
  .option('--max-rate <size>', 'send at most this much per second, from now on (0: no limit)')
  .action(async (volume: string, opts: { interval?: string; highWater?: string; maxRate?: string }, cmd: Command) => {
    if (opts.interval === undefined && opts.highWater === undefined && opts.maxRate === undefined) throw new FerryError('BAD_REQUEST', 'give --interval, --high-water, --max-rate or several');
    const info = await client(cmd).post<InfoView>(`/api/v1/replication/${encodeURIComponent(volume)}/policy`, {
      ...(opts.interval !== undefined ? { interval: `${parseDuration(opts.interval)}ms` } : {}),
      ...(opts.highWater !== undefined ? { highWater: parseSize(opts.highWater) } : {}),
      ...(opts.maxRate !== undefined ? { maxRate: parseSize(opts.maxRate) } : {}),
    });
    print(cmd, info, () => `${volume}: a delta set is cut every ${formatDuration(info.intervalMs)} or once ${formatSize(info.highWaterBytes)} is modified, whichever comes first; ${describeRateLimit(info.maxRate)}`);
  });

/** A pair's rate limit in words. */
function describeRateLimit(maxRate: number): string {
  return maxRate > 0 ? `it sends at most ${formatSize(maxRate)}/s (at full speed while hosts are held for a role change)` : 'it sends with no rate limit';
}

replicate
  .command('set-peer <volume>')
  .description("the pair's other site moved: reach it at PEER_URL from now on (it must be the same site)")
  .requiredOption('--to <peer_url>', 'where the other site is now, e.g. http://10.0.0.7:7370')
  .action(async (volume: string, opts: { to: string }, cmd: Command) => {
    const s = await client(cmd).post<PairStatusView>(`/api/v1/replication/${encodeURIComponent(volume)}/peer`, { to: opts.to });
    print(cmd, s, () => `${volume}: ${s.peerSite} is reached at ${s.peer} from now on`);
  });

for (const [name, description] of [
  ['stop', 'end the replication relationship (at the target: after the delta set being played back)'],
  ['pause', 'suspend sending (changes keep being tracked)'],
  ['resume', 'resume a suspended pair'],
  ['delta', 'cut a delta set now'],
] as const) {
  replicate
    .command(`${name} <volume>`)
    .description(description)
    .action(async (volume: string, _opts: unknown, cmd: Command) => {
      const result = await client(cmd).post<Record<string, unknown>>(`/api/v1/replication/${encodeURIComponent(volume)}/${name}`);
      print(cmd, result, () =>
        name === 'delta' ? cutDescription(volume, result) : name === 'stop' ? stopped(volume, result) : `${volume}: ${String(result.state)}`,
      );
    });
}

// ---- disaster recovery ---------------------------------------------------------------

program
  .command('failover <volume>')
  .description('make this site (the target) the source: play back what was received, keep a restart-point snapshot, go read/write')
  .option('--sync', 'the source must be up: it turns read-only and ships everything first (nothing lost)')
  .option('--now', 'do not play back the delta sets received but not yet applied')
  .action(async (volume: string, opts: { sync?: boolean; now?: boolean }, cmd: Command) => {
    if (opts.sync && opts.now) throw new FerryError('BAD_REQUEST', '--sync and --now exclude each other');
    const mode = opts.sync ? 'sync' : opts.now ? 'now' : 'default';
    const r = await client(cmd).post<{ generation: number; restartPoint: number; restartSnapshot: string; skippedDeltaSets: number; sourceAhead?: SourceAhead | null; sourceFenced: boolean; tookMs: number }>(
      `/api/v1/replication/${encodeURIComponent(volume)}/failover`,
      { mode },
    );
    print(cmd, r, () =>
      [
        `${volume} is read/write here (generation ${r.generation}) after ${formatDuration(r.tookMs)}`,
        `restart point: delta set ${r.restartPoint}, snapshot ${volume}@${r.restartSnapshot}`,
        r.skippedDeltaSets > 0 ? `${r.skippedDeltaSets} received delta sets were NOT played back (${mode === 'now' ? '--now' : 'they were cut during a catch-up copy this site did not get whole'})` : '',
        mode === 'sync' ? 'nothing written at the source is missing here (--sync)' : describeSourceAhead(r.sourceAhead ?? null),
        r.sourceFenced ? 'the old source was made read-only' : 'the old source could not be reached; it will be fenced when it returns',
        `when the old source is back: ferry resync ${volume}`,
      ]
        .filter(Boolean)
        .join('\n'),
    );
  });

program
  .command('resync <volume>')
  .description('rebuild the old source from the blocks that differ (run at the current source, after failover); with --reverse, run at the old source: keep its data and rebuild the site that took over')
  .option('--reverse', 'run at the old source: it keeps its writes and becomes the source again; the writes made at the site that took over since the failover are discarded (kept in a snapshot there)')
  .option('--wait', 'show progress and return when the other site is a consistent replica again')
  .option('--dry-run', 'change nothing: say whose writes would be discarded and how many blocks would be copied (with and without --reverse, to choose which copy to keep)')
  .action(async (volume: string, opts: { wait?: boolean; reverse?: boolean; dryRun?: boolean }, cmd: Command) => {
    const api = client(cmd);
    const path = `/api/v1/replication/${encodeURIComponent(volume)}/resync`;
    if (opts.dryRun) {
      const { dryRun: p } = await api.post<{ dryRun: ResyncPreview }>(path, { reverse: opts.reverse === true, dryRun: true });
      print(cmd, p, () =>
        [
          `resync${p.reverse ? ' --reverse' : ''} of ${volume} (dry run: nothing was changed)`,
          `${p.discardBlocks} blocks (${formatSize(p.discardBlocks * p.blockBytes)}) written at ${p.discardSite} ${p.reverse ? 'since the failover' : 'after the restart point'} would be discarded (kept in a snapshot there)`,
          p.fullCopy ? `WARNING: a full copy would be needed: ${p.fullCopyReason ?? ''}` : '',
          `${p.copyBlocks} blocks (${formatSize(p.copyBlocks * p.blockBytes)}) would be copied from ${p.copyFrom}${p.fullCopy ? ' (the whole volume)' : ''}`,
        ]
          .filter(Boolean)
          .join('\n'),
      );
      return;
    }
    const status = await api.post<PairStatusView>(path, opts.reverse ? { reverse: true } : undefined);
    const describe = (s: PairStatusView): string => {
      const r = s.recovery;
      const lines = [`resync${r?.reverse ? ' --reverse' : ''} of ${volume} → ${s.peerSite}:${s.peerVolume}: ${r?.phase ?? s.state}`];
      if (r?.fullCopy) lines.push(`WARNING: a full copy was needed: ${r.fullCopyReason ?? ''}`);
      const discarded = r?.reverse ? 'since the failover' : 'after the restart point';
      if (r?.discardSnapshot) lines.push(`${r.discardedBlocks ?? 0} blocks written at ${s.peerSite} ${discarded} were discarded; kept in snapshot ${s.peerVolume}@${r.discardSnapshot} there`);
      if (r?.resyncBlocks !== undefined) lines.push(`${r.resyncBlocks} blocks to send`);
      return lines.join('\n');
    };
    if (!opts.wait) {
      print(cmd, status, () => describe(status));
      return;
    }
    const final = await waitForCopy(api, volume, !globals(cmd).json);
    print(cmd, final, () => `${describe(final)}\nresync complete: ${formatSize(final.initialCopy.bytes)} copied`);
  });

program
  .command('failback <volume>')
  .description('hand the source role back to the other site without a full copy (also a planned switchover)')
  .action(async (volume: string, _opts: unknown, cmd: Command) => {
    const s = await client(cmd).post<PairStatusView>(`/api/v1/replication/${encodeURIComponent(volume)}/failback`);
    print(cmd, s, () => `${volume} is now the read-only replica of ${s.peerSite}:${s.peerVolume} (generation ${s.generation})`);
  });

program
  .command('status [volume]')
  .description('one line per replication pair')
  .option('-x, --problems', 'only the pairs whose health is not ok; exit status 1 if there are any (for monitoring scripts)')
  .action(async (volume: string | undefined, opts: { problems?: boolean }, cmd: Command) => {
    const all = await client(cmd).get<PairStatusView[]>(volume ? `/api/v1/status/${encodeURIComponent(volume)}` : '/api/v1/status');
    const list = opts.problems ? all.filter((p) => p.health !== 'ok') : all;
    print(cmd, list, () =>
      list.length === 0
        ? opts.problems
          ? `all ${all.length} replication pair(s) are healthy`
          : 'no replication pairs'
        : table(
            ['VOLUME', 'ROLE', 'PEER', 'HEALTH', 'STATE', 'GEN', 'CREATED', 'ACKED', 'PLAYED', 'LAG', 'LAG BLOCKS', 'RATE', 'REASON'],
            list.map((p) => [
              p.volume,
              p.role,
              `${p.peerSite}:${p.peerVolume}`,
              p.health,
              p.state === 'initial-copying'
                ? `initial-copying ${p.initialCopy.percent}%`
                : p.initialCopy.catchUp && !p.initialCopy.done
                  ? `${p.state} (catch-up copy ${p.initialCopy.percent}%)`
                  : p.state,
              String(p.generation),
              String(p.deltaSetCreated),
              String(p.deltaSetAcked),
              String(p.deltaSetPlayedBack),
              `${p.lagSeconds}s`,
              String(p.lagBlocks),
              `${formatSize(p.transferRate)}/s`,
              // Last: it can be long, and the columns before it stay aligned.
              p.reason || '-',
            ]),
          ),
    );
    if (opts.problems && list.length > 0) {
      const errors = list.filter((p) => p.health === 'error').length;
      throw new FerryError('UNHEALTHY', `${list.length} replication pair(s) need attention (${errors} error, ${list.length - errors} warning)`);
    }
  });

program
  .command('info <volume>')
  .description('replication details, in the spirit of fs_replicate -info')
  .option('-v, --verbose', 'list the outstanding delta sets')
  .action(async (volume: string, opts: { verbose?: boolean }, cmd: Command) => {
    const info = await client(cmd).get<InfoView>(`/api/v1/replication/${encodeURIComponent(volume)}/info`);
    print(cmd, info, () => {
      const lines = keyValues([
        ['volume', `${info.volume} (${info.role})`],
        ['peer', `${info.peerSite} ${info.peer} volume ${info.peerVolume}`],
        ['state', info.reason ? `${info.state}: ${info.reason}` : info.state],
        ['health', info.health],
        ['generation', String(info.generation)],
        ['current delta set', String(info.currentDeltaSet)],
        ['current block number', String(info.currentChunk)],
        [
          'delta sets',
          info.role === 'source'
            ? `created ${info.deltaSetCreated}, sent ${info.deltaSetSent}, acked ${info.deltaSetAcked}, played back ${info.deltaSetPlayedBack}`
            : `created ${info.deltaSetCreated} (at the source, as it last said), received ${info.deltaSetReceived}, played back ${info.deltaSetPlayedBack}`,
        ],
        ['transfer rate', `${formatSize(info.transferRate)}/s current, ${formatSize(info.averageTransferRate)}/s average (${info.role === 'source' ? 'sent' : 'received'})`],
        ['rate limit', info.maxRate > 0 ? `${formatSize(info.maxRate)}/s${info.role === 'target' ? " (the source's: this site sends so if it takes over)" : info.throttled ? ' (holding sending back now)' : ''}` : 'none'],
        ['lag', `${info.lagSeconds}s, ${info.blocksDifferent} blocks different`],
        [info.initialCopy.catchUp ? 'catch-up copy' : info.recovery ? 'last copy' : 'initial copy', describeCopy(info.initialCopy)],
        ['save volume', `${formatSize(info.saveVolume.usedBytes)} of ${formatSize(info.saveVolume.capacityBytes)} used${info.saveVolume.full ? ' (FULL: tracking in the bitmap)' : ''}`],
        [
          'policy',
          info.intervalMs > 0
            ? `interval ${formatDuration(info.intervalMs)}, high water ${formatSize(info.highWaterBytes)}${info.role === 'target' ? " (the source's: this site cuts so if it takes over)" : ''}`
            : '-',
        ],
        ...(info.lastBuild ? [['last build', describeBuild(info.lastBuild)] as [string, string]] : []),
        ['errors', `${info.retries} retries, ${info.corruptFrames} damaged frames, ${info.ioErrors} storage errors${info.lastError ? `, last: ${info.lastError}` : ''}`],
      ]);
      if (!opts.verbose) return lines;
      const ms = (v: number | null): string => (v === null ? '-' : formatDuration(v));
      // Where a delta set's time went: built at the source, sent and acknowledged, queued and played back at the target.
      const rows = info.outstanding.map((d) => [String(d.n), d.state, d.createdAt, formatDuration(d.durationMs), String(d.blocks), ms(d.buildMs), ms(d.sendMs), ms(d.queuedMs), ms(d.playbackMs)]);
      return `${lines}\n\n${rows.length === 0 ? 'no outstanding delta sets' : table(['DELTA SET', 'STATE', 'CREATED', 'DURATION', 'BLOCKS', 'BUILD', 'SEND', 'QUEUED', 'PLAYBACK'], rows)}`;
    });
  });

/** What a failover left behind at the source, as far as this site knew. */
function describeSourceAhead(a: SourceAhead | null): string {
  if (a === null) return 'what the source had that this site did not receive is not known: it was not heard from since this site started';
  const since = `as of its last word at ${a.lastHeard} (${formatDuration(Math.max(0, Date.now() - Date.parse(a.lastHeard)))} ago); of writes made there after that nothing is known here`;
  if (a.blocks === 0 && a.deltaSets === 0) return `the source had nothing this site did not receive, ${since}`;
  const cut = a.deltaSets > 0 ? ` (${a.deltaSets} delta set(s) cut there were not received)` : '';
  return `NOT here: ${a.blocks} block(s) written at the source${cut}, ${since}. They stay at the old source, and its resync keeps them in a snapshot there`;
}

function describeBuild(b: LastBuild): string {
  const line = `delta set ${b.deltaSet}: ${b.blocks} blocks copied into the save volume in ${formatDuration(b.buildMs)}`;
  return b.slowerThanInterval ? `${line} (LONGER than the interval: the next cut waits for it, so lag grows past the interval)` : line;
}

function describeCopy(c: PairStatusView['initialCopy']): string {
  const started = `started ${c.startedAt}`;
  if (c.done) return `complete: ${formatSize(c.bytes)} bytes of data sent in ${c.doneAt ? formatDuration(Date.parse(c.doneAt) - Date.parse(c.startedAt)) : '?'} (${started})`;
  const eta = c.etaSeconds === null ? '' : `, ETA ${formatDuration(c.etaSeconds * 1000)}`;
  return `${c.percent}% (${formatSize(c.bytes)}, ${c.copiedBlocks} of ${c.totalBlocks} blocks${eta}; ${started})`;
}

/** How often `--wait` asks for the copy's progress: often at first (a short copy ends soon), then calmly. */
function waitPollMs(elapsedMs: number): number {
  return elapsedMs < 10_000 ? 100 : 500;
}

/** Polls status until the initial copy is done, drawing a progress bar on a terminal. */
async function waitForCopy(api: ApiClient, volume: string, draw: boolean): Promise<PairStatusView> {
  const bar = new ProgressBar(draw);
  const startedAtMs = Date.now();
  for (;;) {
    const [s] = await api.get<PairStatusView[]>(`/api/v1/status/${encodeURIComponent(volume)}`);
    if (!s) throw new FerryError('NOT_FOUND', `volume ${volume} is not replicated`);
    const eta = s.initialCopy.etaSeconds === null ? '--' : formatDuration(s.initialCopy.etaSeconds * 1000);
    bar.update(s.initialCopy.percent / 100, `${formatSize(s.initialCopy.bytes)} ${formatSize(s.transferRate)}/s ETA ${eta}`, s.initialCopy.done);
    if (s.initialCopy.done && (s.recovery === null || s.recovery.phase === 'resynced' || s.recovery.phase === 'resync-target')) {
      bar.end();
      return s;
    }
    if (s.state === 'suspended' && s.reason && s.recovery?.phase !== 'failed-over') throw new FerryError('UNAVAILABLE', `replication of ${volume} is suspended: ${s.reason}`);
    await new Promise((r) => setTimeout(r, waitPollMs(Date.now() - startedAtMs)));
  }
}

// ---- snapshot --------------------------------------------------------------
const snapshot = program.command('snapshot').description('point-in-time snapshots of a volume: create, list, delete, restore, diff');

function snapshotPath(vol: string, snap?: string, suffix = ''): string {
  return volumePath(vol, `/snapshots${snap === undefined ? '' : `/${encodeURIComponent(snap)}`}${suffix}`);
}

snapshot
  .command('create <volume>')
  .description('take a snapshot of the volume now (copy-on-first-write: instant, costs space only as blocks change)')
  .option('--name <snap>', 'snapshot name (default: generated)')
  .option('--attr <key=value...>', 'free attributes')
  .action(async (vol: string, opts: { name?: string; attr?: string[] }, cmd: Command) => {
    const attrs: Record<string, string> = {};
    for (const kv of opts.attr ?? []) {
      const at = kv.indexOf('=');
      if (at <= 0) throw new FerryError('BAD_REQUEST', `attribute "${kv}" must be KEY=VALUE`);
      attrs[kv.slice(0, at)] = kv.slice(at + 1);
    }
    const info = await client(cmd).post<SnapshotInfo>(snapshotPath(vol), { ...(opts.name !== undefined ? { name: opts.name } : {}), attrs });
    print(cmd, info, () => `snapshot ${info.volume}@${info.name} created`);
  });

snapshot
  .command('list <volume>')
  .description("list the volume's snapshots, oldest first")
  .action(async (vol: string, _opts: unknown, cmd: Command) => {
    const list = await client(cmd).get<SnapshotInfo[]>(snapshotPath(vol));
    print(cmd, list, () =>
      list.length === 0
        ? `volume ${vol} has no snapshots`
        : table(
            ['NAME', 'CREATED', 'SAVED', 'STATE', 'ATTRIBUTES'],
            list.map((s) => [
              s.name,
              s.createdAt,
              formatSize(s.saveBytes),
              s.failure ? `${s.state} (${s.failure.code})` : s.state,
              Object.entries(s.attrs)
                .map(([k, v]) => `${k}=${v}`)
                .join(' '),
            ]),
          ),
    );
  });

snapshot
  .command('delete <volume> <snap>')
  .description('delete a snapshot (before-images older snapshots still need are kept)')
  .option('--force', 'delete a damaged snapshot; older snapshots that read through it are marked damaged')
  .action(async (vol: string, snap: string, opts: { force?: boolean }, cmd: Command) => {
    await client(cmd).delete(snapshotPath(vol, snap, opts.force ? '?force=true' : ''));
    print(cmd, { deleted: `${vol}@${snap}` }, () => `snapshot ${vol}@${snap} deleted`);
  });

snapshot
  .command('restore <volume> <snap>')
  .description('make the volume byte-identical to the snapshot (changed blocks are written and tracked)')
  .action(async (vol: string, snap: string, _opts: unknown, cmd: Command) => {
    const r = await client(cmd).post<{ blocksWritten: number; blocksTrimmed: number }>(snapshotPath(vol, snap, '/restore'));
    print(cmd, r, () => `volume ${vol} restored from ${snap}: ${r.blocksWritten} block(s) written, ${r.blocksTrimmed} trimmed`);
  });

snapshot
  .command('diff <volume> <from> <to>')
  .description(`extents changed from snapshot FROM to snapshot TO (or "current"), in block order`)
  .action(async (vol: string, from: string, to: string, _opts: unknown, cmd: Command) => {
    const d = await client(cmd).get<{ changedBytes: number; extents: { offset: number; length: number }[]; truncated: boolean }>(
      snapshotPath(vol, from, `/diff?to=${encodeURIComponent(to)}`),
    );
    print(cmd, d, () =>
      [
        `${d.extents.length} extent(s), ${formatSize(d.changedBytes)} (${d.changedBytes} bytes) changed from ${from} to ${to}${d.truncated ? ' (list truncated)' : ''}`,
        ...(d.extents.length > 0 ? [table(['OFFSET', 'LENGTH'], d.extents.map((e) => [String(e.offset), String(e.length)]))] : []),
      ].join('\n'),
    );
  });

snapshot
  .command('digest <volume> <snap>')
  .description('SHA-256 of the snapshot image')
  .action(async (vol: string, snap: string, _opts: unknown, cmd: Command) => {
    const d = await digestWithProgress<{ sha256: string }>(cmd, snapshotPath(vol, snap, '/digest'));
    print(cmd, d, () => `${d.sha256}  ${vol}@${snap}`);
  });

program.addOption(new Option('--debug', 'print stack traces on errors').hideHelp());

program.parseAsync(process.argv).catch((err: unknown) => {
  if (err instanceof FerryError) {
    process.stderr.write(`ferry: ${err.code}: ${err.message}\n`);
  } else {
    const e = err as Error;
    process.stderr.write(`ferry: INTERNAL: ${e.message}\n`);
    if (program.opts<{ debug?: boolean }>().debug) process.stderr.write(`${e.stack ?? ''}\n`);
  }
  process.exit(1);
});
