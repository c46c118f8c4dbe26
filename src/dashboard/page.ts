/**
 * The web dashboard: one self-contained page that polls the JSON API. No build step,
 * no external assets (sites often run on isolated management networks).
 */
export const dashboardHtml = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>ferry</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 2rem; color: #1d2733; }
  h1 { font-size: 1.4rem; margin: 0 0 .2rem; }
  .sub { color: #5b6b7c; margin-bottom: 1.5rem; }
  table { border-collapse: collapse; min-width: 40rem; }
  th, td { text-align: left; padding: .35rem .8rem; border-bottom: 1px solid #dde3ea; }
  th { background: #f3f6f9; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  .err { color: #b00020; }
  .warn { color: #8a5300; }
</style>
</head>
<body>
<h1 id="title">ferry</h1>
<div class="sub" id="site"></div>
<div class="sub" id="space"></div>
<h2>Volumes</h2>
<table>
  <thead><tr><th>name</th><th>size</th><th>allocated</th><th>access</th><th>created</th></tr></thead>
  <tbody id="volumes"><tr><td colspan="5">loading…</td></tr></tbody>
</table>
<h2>Replication</h2>
<table>
  <thead><tr><th>volume</th><th>role</th><th>other site</th><th>health</th><th>state</th><th>generation</th><th>delta sets created / acked / played</th><th>lag</th><th>copy</th><th>rate</th><th>last build</th><th>recovery</th></tr></thead>
  <tbody id="pairs"><tr><td colspan="12">loading…</td></tr></tbody>
</table>
<p class="err" id="error"></p>
<script>
function size(n) {
  const u = ['', 'K', 'M', 'G', 'T', 'P']; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (Number.isInteger(n) ? n : n.toFixed(1)) + u[i];
}
function cell(text, cls) { const td = document.createElement('td'); td.textContent = text; if (cls) td.className = cls; return td; }
async function refresh() {
  try {
    const site = await (await fetch('/api/v1/site')).json();
    document.getElementById('title').textContent = 'ferry — site ' + site.name;
    document.getElementById('site').textContent = 'id ' + site.id + ' · block size ' + size(site.blockBytes) + ' · up since ' + site.startedAt;
    // Thin volumes, growing snapshots and save volumes: a full file system stops writes.
    const space = document.getElementById('space');
    const full = site.fileSystemAvailableBytes < site.spaceReserveBytes || site.spaceReserveHeldBytes < site.spaceReserveBytes;
    space.textContent = 'file system: ' + size(site.fileSystemAvailableBytes) + ' free of ' + size(site.fileSystemBytes) + ' · volumes ' + size(site.volumesAllocatedBytes) + ' held of ' + size(site.volumesProvisionedBytes) + ' provisioned' + (full ? ' · FULL: free space (delete snapshots or volumes)' : '');
    space.className = full ? 'sub err' : 'sub';
    const volumes = await (await fetch('/api/v1/volumes')).json();
    const body = document.getElementById('volumes');
    body.replaceChildren();
    for (const v of volumes) {
      const tr = document.createElement('tr');
      tr.append(cell(v.name), cell(size(v.sizeBytes), 'num'), cell(size(v.allocatedBytes), 'num'), cell(v.failure ? 'failed: ' + v.failure.message : v.access), cell(v.createdAt));
      body.append(tr);
    }
    if (volumes.length === 0) body.innerHTML = '<tr><td colspan="5">no volumes</td></tr>';
    const pairs = await (await fetch('/api/v1/status')).json();
    const rows = document.getElementById('pairs');
    rows.replaceChildren();
    for (const p of pairs) {
      const tr = document.createElement('tr');
      const copy = p.initialCopy.done ? 'done' : p.initialCopy.percent + '%' + (p.initialCopy.etaSeconds === null ? '' : ', ' + p.initialCopy.etaSeconds + ' s left') + (p.initialCopy.catchUp ? ' (catch-up)' : '');
      const build = p.lastBuild ? (p.lastBuild.buildMs / 1000).toFixed(1) + ' s for ' + p.lastBuild.blocks + ' blocks' + (p.lastBuild.slowerThanInterval ? ' — LONGER than the interval' : '') : '-';
      const r = p.recovery;
      const recovery = r
        ? r.phase + (r.reverse ? ' (reverse)' : '') + (r.fullCopy ? ', full copy' : '') + (r.sourceAhead && r.sourceAhead.blocks > 0 ? ', ' + r.sourceAhead.blocks + ' blocks not taken over' : '') + (r.discardedBlocks ? ', ' + r.discardedBlocks + ' blocks discarded (snapshot ' + r.discardSnapshot + ')' : '')
        : '-';
      const health = p.health === 'error' ? 'err' : p.health === 'warning' ? 'warn' : '';
      tr.append(
        cell(p.volume), cell(p.role), cell(p.peerSite + ' / ' + p.peerVolume), cell(p.health, health), cell(p.reason ? p.state + ': ' + p.reason : p.state, health),
        cell(String(p.generation), 'num'), cell(p.deltaSetCreated + ' / ' + p.deltaSetAcked + ' / ' + p.deltaSetPlayedBack, 'num'),
        cell(p.lagSeconds + ' s, ' + p.lagBlocks + ' blocks', 'num'), cell(copy), cell(size(p.transferRate) + '/s' + (p.maxRate > 0 ? ' (limit ' + size(p.maxRate) + '/s' + (p.throttled ? ', holding back' : '') + ')' : ''), 'num'), cell(build, p.lastBuild && p.lastBuild.slowerThanInterval ? 'err' : ''), cell(recovery),
      );
      rows.append(tr);
    }
    if (pairs.length === 0) rows.innerHTML = '<tr><td colspan="12">no replicated volumes</td></tr>';
    document.getElementById('error').textContent = '';
  } catch (e) {
    document.getElementById('error').textContent = 'cannot reach the site: ' + e;
  }
}
refresh();
setInterval(refresh, 2000);
</script>
</body>
</html>
`;
