import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { ferry, ferryBin } from '../helpers/site.js';
import { waitFor } from '../helpers/replication.js';

const execFileP = promisify(execFile);
const demoBin = join(dirname(ferryBin), 'demo.js');
const MiB = 1024 * 1024;

/** A base port whose next one is free too, for a site pair's HTTP or NBD ports. */
async function freePortPair(): Promise<number> {
  const free = (port: number): Promise<boolean> =>
    new Promise((resolve) => {
      const server = createServer();
      server.once('error', () => resolve(false));
      server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
    });
  for (;;) {
    const base = 20_000 + Math.floor(Math.random() * 40_000);
    if ((await free(base)) && (await free(base + 1))) return base;
  }
}

/** The demo's output so far, and a wait for a line matching `pattern`. */
class Output {
  text = '';
  constructor(proc: ChildProcess) {
    proc.stdout?.on('data', (d: Buffer) => (this.text += d.toString()));
  }
  until(what: string, pattern: RegExp, timeoutMs = 30_000): Promise<RegExpExecArray> {
    return waitFor(() => `${what}; the demo printed:\n${this.text}`, async () => pattern.exec(this.text) ?? undefined, timeoutMs);
  }
}

async function qemuIo(url: string, command: string, readOnly = false): Promise<string> {
  const { stdout } = await execFileP('qemu-io', ['-f', 'raw', ...(readOnly ? ['-r'] : []), '-c', command, url]);
  return stdout;
}

async function digest(site: string): Promise<string> {
  const r = await fetch(`${site}/api/v1/volumes/demo/digest`);
  assert.equal(r.status, 200);
  return ((await r.json()) as { sha256: string }).sha256;
}

test('npm start: the demo runs two replicating sites, keeps one going when the other is killed, and its printed way back (failover, restart, resync, failback) works as printed', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-demo-'));
  const [httpPort, nbdPort] = [await freePortPair(), await freePortPair()];
  const demo = spawn(process.execPath, [demoBin], { env: { ...process.env, FERRY_DEMO_DIR: dir, FERRY_DEMO_HTTP_PORT: String(httpPort), FERRY_DEMO_NBD_PORT: String(nbdPort) }, stdio: ['ignore', 'pipe', 'pipe'] });
  const out = new Output(demo);
  const exited = new Promise<number | null>((resolve) => demo.once('exit', (code) => resolve(code)));
  let restarted: ChildProcess | undefined;
  const A = `http://127.0.0.1:${httpPort}`;
  const B = `http://127.0.0.1:${httpPort + 1}`;
  const nbdA = `nbd://127.0.0.1:${nbdPort}/demo`;
  const nbdB = `nbd://127.0.0.1:${nbdPort + 1}/demo`;
  try {
    await out.until('the banner', /Ctrl-C stops the sites the demo started/);
    const pidA = Number((await out.until('site-a\'s pid', /site-a .* pid (\d+)/))[1]);
    // The way back, as printed: each line a command and its comment.
    const recipe = out.text.slice(out.text.indexOf('A disaster and the way back:')).split('\n').slice(1).map((l) => /^ {2}(\S.*?)\s+# /.exec(l)?.[1]).filter((c): c is string => c !== undefined);
    assert.deepEqual(recipe.map((c) => c.split(' ').slice(0, 3).join(' ')), [`kill -9 ${pidA}`, 'npx ferry failover', 'npx ferry site', 'npx ferry resync', 'npx ferry failback']);
    const cli = (line: string): string[] => line.replace(/^npx ferry /, '').split(' ');

    // Replicated data at both sites, then writes site-b never gets.
    await qemuIo(nbdA, 'write -P 0x5a 0 1M');
    assert.equal((await ferry(['replicate', 'delta', 'demo', '--site', A])).code, 0);
    await waitFor('site-b to hold site-a\'s data', async () => (await digest(A)) === (await digest(B)), 30_000);
    assert.equal((await ferry(['replicate', 'pause', 'demo', '--site', A])).code, 0);
    await qemuIo(nbdA, 'write -P 0x11 2M 1M');

    // 1. site-a is lost: the demo says so and site-b goes on.
    process.kill(pidA, 'SIGKILL');
    await out.until('the demo to report site-a lost', new RegExp(`site-a \\(pid ${pidA}\\) stopped \\(SIGKILL\\); site-b goes on`));
    assert.equal((await fetch(`${B}/healthz`)).status, 200);
    // 2. failover at site-b; it takes writes.
    const fo = await ferry(cli(recipe[1] as string));
    assert.equal(fo.code, 0, fo.stderr);
    await qemuIo(nbdB, 'write -P 0x22 4M 1M');
    // 3. site-a returns, started by hand as printed: its copy is not writable.
    const [command, ...args] = recipe[2]!.split(' ');
    assert.equal(command, 'npx');
    restarted = spawn(process.execPath, [ferryBin, ...args.slice(1)], { stdio: 'ignore' });
    await waitFor('site-a to answer again', async () => (await fetch(`${A}/healthz`).then((r) => r.status === 200, () => false)) || undefined, 20_000);
    await waitFor('site-a to learn it failed over', async () => {
      const [pair] = (await (await fetch(`${A}/api/v1/status`)).json()) as { recovery: { phase: string } | null; lagBlocks: number }[];
      return pair?.recovery?.phase === 'fenced' && pair.lagBlocks > 0 ? pair : undefined;
    }, 30_000);
    await assert.rejects(qemuIo(nbdA, 'write -P 0x33 6M 1M'));
    // 4. resync, 5. failback: site-a is the source again, with site-b's writes and without its own unsent ones.
    const rs = await ferry(cli(recipe[3] as string));
    assert.equal(rs.code, 0, rs.stderr);
    const fb = await ferry(cli(recipe[4] as string));
    assert.equal(fb.code, 0, fb.stderr);
    const [pair] = (await (await fetch(`${A}/api/v1/status`)).json()) as { role: string }[];
    assert.equal(pair?.role, 'source');
    await qemuIo(nbdA, 'read -P 0x5a 0 1M', true);
    await qemuIo(nbdA, 'read -P 0 2M 1M', true);
    await qemuIo(nbdA, 'read -P 0x22 4M 1M', true);
    await qemuIo(nbdA, 'write -P 0x44 8M 1M');
    assert.equal((await ferry(['replicate', 'delta', 'demo', '--site', A])).code, 0);
    await waitFor('site-b to hold site-a\'s data again', async () => (await digest(A)) === (await digest(B)), 30_000);
  } finally {
    restarted?.kill('SIGKILL');
    demo.kill('SIGINT');
    const code = await exited;
    await rm(dir, { recursive: true, force: true });
    assert.equal(code, 0, 'Ctrl-C stops the site the demo still runs');
  }
});

test('npm start with a port that is not one says so and creates nothing', async () => {
  const dir = join(tmpdir(), `ferry-demo-bad-${process.pid}`);
  const r = await execFileP(process.execPath, [demoBin], { env: { ...process.env, FERRY_DEMO_DIR: dir, FERRY_DEMO_NBD_PORT: '70000' } }).then(
    () => assert.fail('the demo started'),
    (err: { code: number; stderr: string }) => err,
  );
  assert.equal(r.code, 1);
  assert.equal(r.stderr, 'ferry: BAD_REQUEST: FERRY_DEMO_NBD_PORT=70000 is not a port from 1 to 65534 (site B takes the next one); nothing was created\n');
  await assert.rejects(stat(dir), { code: 'ENOENT' });
});
