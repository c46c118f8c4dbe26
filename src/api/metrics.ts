import { Registry, Gauge, collectDefaultMetrics } from 'prom-client';
import type { Site } from '../site/site.js';
import { pairStates } from '../replication/pair-state.js';
import type { PairStatusView } from '../replication/status.js';

/** A Prometheus registry per site (not the global one), so several sites can share a process in tests. */
export function createMetrics(site: Site): Registry {
  const register = new Registry();
  register.setDefaultLabels({ site: site.config.name });
  collectDefaultMetrics({ register });
  new Gauge({
    name: 'ferry_volumes',
    help: 'Number of volumes on this site',
    registers: [register],
    collect() {
      this.set(site.volumes.list().length);
    },
  });
  new Gauge({
    name: 'ferry_volume_size_bytes',
    help: 'Provisioned size of each volume',
    labelNames: ['volume'],
    registers: [register],
    collect() {
      this.reset();
      for (const v of site.volumes.list()) this.set({ volume: v.name }, v.sizeBytes);
    },
  });
  new Gauge({
    name: 'ferry_volume_allocated_bytes',
    help: 'Bytes of each volume that may hold data (allocated blocks)',
    labelNames: ['volume'],
    registers: [register],
    collect() {
      this.reset();
      for (const v of site.volumes.list()) this.set({ volume: v.name }, v.allocatedBytes);
    },
  });
  new Gauge({
    name: 'ferry_site_file_system_available_bytes',
    help: 'Bytes left on the file system of the site directory (volumes are thin; snapshots and save volumes grow into it)',
    registers: [register],
    async collect() {
      this.set((await site.fileSystemSpace()).availableBytes);
    },
  });
  new Gauge({
    name: 'ferry_site_space_reserve_held_bytes',
    help: 'Bytes of the space reserve held now; 0 once given back on a full file system so that commands freeing space could run',
    registers: [register],
    collect() {
      this.set(site.reserve.heldBytes);
    },
  });
  new Gauge({
    name: 'ferry_rcp_handshakes_total',
    help: 'Replication-protocol handshakes accepted since start',
    registers: [register],
    collect() {
      this.set(site.rcp.handshakes);
    },
  });
  new Gauge({
    name: 'ferry_nbd_connections',
    help: 'Open NBD connections of hosts, by export (a volume, or VOL@SNAP)',
    labelNames: ['export'],
    registers: [register],
    collect() {
      this.reset();
      for (const [name, n] of site.nbd?.connectionsByExport() ?? []) this.set({ export: name }, n);
    },
  });
  const nbdGauge = (name: string, help: string, value: (s: NonNullable<Site['nbd']>['stats']) => number): void => {
    new Gauge({
      name,
      help,
      registers: [register],
      collect() {
        const nbd = site.nbd;
        if (nbd) this.set(value(nbd.stats));
      },
    });
  };
  nbdGauge('ferry_nbd_connections_total', 'NBD connections accepted since start', (s) => s.connections);
  nbdGauge('ferry_nbd_requests_total', 'NBD requests served since start', (s) => s.requests);
  nbdGauge('ferry_nbd_errors_total', 'NBD requests answered with an error since start', (s) => s.errors);
  nbdGauge('ferry_nbd_read_bytes_total', 'Bytes read by hosts over NBD since start', (s) => s.bytesRead);
  nbdGauge('ferry_nbd_written_bytes_total', 'Bytes written by hosts over NBD since start', (s) => s.bytesWritten);
  const pairGauge = (name: string, help: string, value: (p: PairStatusView) => number): void => {
    new Gauge({
      name,
      help,
      labelNames: ['volume', 'role', 'peer'],
      registers: [register],
      collect() {
        this.reset();
        for (const p of site.replication.status()) this.set({ volume: p.volume, role: p.role, peer: p.peerSite }, value(p));
      },
    });
  };
  pairGauge('ferry_replication_lag_seconds', 'How far the replica is behind its source: time since the first write it does not have (source-stamped times)', (p) => p.lagSeconds);
  pairGauge('ferry_replication_lag_blocks', 'Blocks written at the source not yet played back at the target', (p) => p.lagBlocks);
  pairGauge('ferry_replication_bytes_sent_total', 'Bytes sent for this pair (frames included)', (p) => p.bytesSent);
  pairGauge('ferry_replication_bytes_received_total', 'Bytes received for this pair', (p) => p.bytesReceived);
  pairGauge('ferry_replication_transfer_rate_bytes', 'Bytes per second over the last 5 s: sent (source) or received (target)', (p) => p.transferRate);
  pairGauge('ferry_replication_max_rate_bytes', 'The most this pair may send per second (--max-rate); 0: no limit', (p) => p.maxRate);
  pairGauge('ferry_replication_delta_set_created', 'Last delta set cut at the source', (p) => p.deltaSetCreated);
  pairGauge('ferry_replication_delta_set_acked', 'Last delta set acknowledged by the target', (p) => p.deltaSetAcked);
  pairGauge('ferry_replication_delta_set_played_back', 'Last delta set played back at the target', (p) => p.deltaSetPlayedBack);
  pairGauge('ferry_replication_retries_total', 'Failed sessions retried', (p) => p.retries);
  pairGauge('ferry_replication_corrupt_frames_total', 'Damaged frames refused or resent', (p) => p.corruptFrames);
  pairGauge('ferry_replication_io_errors_total', 'Storage errors met by this end of the pair (save-volume writes, volume flushes, playbacks); the last one is in status as lastError', (p) => p.ioErrors);
  pairGauge('ferry_replication_initial_copy_ratio', 'Progress of the copy that makes the target whole (initial copy, resync or catch-up), 0 to 1', (p) => p.initialCopy.percent / 100);
  pairGauge('ferry_replication_copy_bytes', 'Data bytes of that copy the target has acknowledged (this end: acknowledged, or written at the target), each block once; resends are in bytes_sent_total', (p) => p.initialCopy.bytes);
  pairGauge('ferry_replication_copy_eta_seconds', 'Seconds that copy needs at its pace over the last 20 s; 0 once done; NaN when not known (nothing acknowledged lately: stalled, or not started)', (p) => p.initialCopy.etaSeconds ?? Number.NaN);
  pairGauge('ferry_replication_catch_up', '1 while a catch-up copy runs (the backlog outgrew the save volume; the target serves a protective snapshot)', (p) => (p.initialCopy.catchUp && !p.initialCopy.done ? 1 : 0));
  pairGauge('ferry_replication_last_build_seconds', 'Time the newest delta set took to build at the source; above the interval, cuts come late and lag grows', (p) => (p.lastBuild ? p.lastBuild.buildMs / 1000 : 0));
  pairGauge('ferry_replication_failing', '1 while this end of the pair is failing (a storage error, or a copy not moving); the reason is in status', (p) => (p.failing !== '' ? 1 : 0));
  new Gauge({
    name: 'ferry_replication_state',
    help: 'The pair state: 1 for the current one, 0 for the others',
    labelNames: ['volume', 'role', 'peer', 'state'],
    registers: [register],
    collect() {
      this.reset();
      for (const p of site.replication.status()) {
        for (const state of pairStates) this.set({ volume: p.volume, role: p.role, peer: p.peerSite, state }, p.state === state ? 1 : 0);
      }
    },
  });
  pairGauge('ferry_replication_health', 'Whether the pair needs its operator: 0 ok, 1 warning (not protecting as set up: paused, source silent, save volume full, catch-up or full copy, awaiting resync), 2 error (stopped by a failure, or failing); the reason is in status', (p) => ({ ok: 0, warning: 1, error: 2 })[p.health]);
  pairGauge('ferry_replication_generation', 'Generation of the pair (incremented by every failover and failback)', (p) => p.generation);
  pairGauge('ferry_recovery_full_copy', '1 if the last resync had to copy the whole volume', (p) => (p.recovery?.fullCopy ? 1 : 0));
  pairGauge('ferry_recovery_discarded_blocks', 'Blocks overwritten by the resync, kept in a snapshot where they were: written at the old source after the restart point, or (resync --reverse) at the site that took over since the failover', (p) => p.recovery?.discardedBlocks ?? 0);
  pairGauge('ferry_recovery_source_ahead_blocks', 'At the last failover: blocks the old source had that were not received here, as it last said (-1: not known)', (p) => (p.recovery?.failedOverAt ? (p.recovery.sourceAhead?.blocks ?? -1) : 0));
  pairGauge('ferry_recovery_resync_blocks', 'Blocks the resync copies (those that differ, or the whole volume)', (p) => p.recovery?.resyncBlocks ?? 0);
  pairGauge('ferry_replication_save_volume_used_bytes', 'Bytes of the save volume holding delta sets', (p) => p.saveVolume.usedBytes);
  pairGauge('ferry_replication_save_volume_full', '1 while the save volume is full (changes tracked in the bitmap)', (p) => (p.saveVolume.full ? 1 : 0));
  pairGauge('ferry_replication_connected', '1 while a replication session is up', (p) => (p.connected ? 1 : 0));
  new Gauge({
    name: 'ferry_snapshots',
    help: 'Number of snapshots of each volume',
    labelNames: ['volume'],
    registers: [register],
    collect() {
      this.reset();
      for (const s of site.snapshots.stats()) this.set({ volume: s.volume }, s.snapshots);
    },
  });
  new Gauge({
    name: 'ferry_snapshot_save_bytes',
    help: 'Bytes of save volumes (before-images) held by the snapshots of each volume',
    labelNames: ['volume'],
    registers: [register],
    collect() {
      this.reset();
      for (const s of site.snapshots.stats()) this.set({ volume: s.volume }, s.saveBytes);
    },
  });
  return register;
}
