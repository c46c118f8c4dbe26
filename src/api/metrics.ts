import { Registry, Gauge, collectDefaultMetrics } from 'prom-client';
import type { Site } from '../site/site.js';

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
    name: 'ferry_rcp_handshakes_total',
    help: 'Replication-protocol handshakes accepted since start',
    registers: [register],
    collect() {
      this.set(site.rcp.handshakes);
    },
  });
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
