import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import { promisify } from 'node:util';

const here = dirname(fileURLToPath(import.meta.url));
/** The built CLI entry point (tests run from dist/test/…). */
export const ferryBin = join(here, '..', '..', 'src', 'cli', 'ferry.cjs');

const execFileP = promisify(execFile);

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs the real `ferry` CLI. Never throws on a non-zero exit; the caller asserts. */
export async function ferry(args: string[], env: Record<string, string> = {}): Promise<CliResult> {
  try {
    const { stdout, stderr } = await execFileP(process.execPath, [ferryBin, ...args], { env: { ...process.env, ...env }, maxBuffer: 64 * 1024 * 1024 });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof e.code === 'number' ? e.code : 1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

export interface LogLine {
  msg?: string;
  level?: number;
  [key: string]: unknown;
}

/**
 * A real site daemon in its own process, on free loopback ports. `kill()` sends a
 * signal and waits for exit; `restart()` starts the same directory again.
 */
export class TestSite {
  proc: ChildProcess | undefined;
  url = '';
  host = '127.0.0.1';
  port = 0;
  nbdPort = 0;
  logs: LogLine[] = [];
  /** The end of what the daemon wrote to stderr (a crash's stack, say). */
  stderrTail = '';
  exitCode: number | null = null;
  /** The signal that ended the daemon, if one did. */
  exitSignal: NodeJS.Signals | null = null;
  /** If set, the daemon runs with this file size limit (RLIMIT_FSIZE): writes past it fail with EFBIG, as on a full disk. */
  fileSizeLimit: number | undefined;
  /** If set, the daemon is started with `--advertise` this URL. */
  advertise: string | undefined;
  private exited: Promise<void> = Promise.resolve();

  private constructor(
    readonly dir: string,
    readonly name: string,
    private readonly root: string,
    /** Environment for the daemon, over the test's own (read at each start). */
    public env: Record<string, string>,
  ) {}

  /**
   * `listenHost`: the address the site listens on (default 127.0.0.1; 0.0.0.0 for every address).
   * `parentDir`: where the site's directory is made (default the system's temporary directory).
   */
  static async create(name = 'site', options: { env?: Record<string, string>; blockSize?: string; listenHost?: string; parentDir?: string } = {}): Promise<TestSite> {
    const root = await mkdtemp(join(options.parentDir ?? tmpdir(), `ferry-test-${name}-`));
    const dir = join(root, 'data');
    const init = await ferry(['site', 'init', '--dir', dir, '--name', name, '--listen', `${options.listenHost ?? '127.0.0.1'}:0`, '--nbd', '127.0.0.1:0', ...(options.blockSize ? ['--block-size', options.blockSize] : [])]);
    if (init.code !== 0) throw new Error(`site init failed: ${init.stderr}`);
    const site = new TestSite(dir, name, root, options.env ?? {});
    await site.start();
    return site;
  }

  async start(): Promise<void> {
    this.logs = [];
    this.exitCode = null;
    this.exitSignal = null;
    // A restarted site keeps its address, as a real one would, so peers find it again.
    const listen = this.port > 0 ? ['--listen', `${this.host}:${this.port}`] : [];
    if (this.nbdPort > 0) listen.push('--nbd', `${this.host}:${this.nbdPort}`);
    if (this.advertise !== undefined) listen.push('--advertise', this.advertise);
    // FERRY_CPU_PROF_DIR (benchmarks): each daemon writes a V8 CPU profile there when stopped by destroy().
    const profile = process.env.FERRY_CPU_PROF_DIR ? ['--cpu-prof', `--cpu-prof-dir=${process.env.FERRY_CPU_PROF_DIR}`] : [];
    const daemon = [process.execPath, ...profile, ferryBin, 'site', 'start', '--dir', this.dir, ...listen];
    const argv = this.fileSizeLimit !== undefined ? ['prlimit', `--fsize=${this.fileSizeLimit}:unlimited`, '--', ...daemon] : daemon;
    const proc = spawn(argv[0] as string, argv.slice(1), {
      env: { ...process.env, FERRY_LOG_LEVEL: 'debug', ...this.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.proc = proc;
    this.exited = new Promise((resolve) => proc.once('exit', (code, signal) => {
      this.exitCode = code;
      this.exitSignal = signal;
      resolve();
    }));
    let stderr = '';
    this.stderrTail = '';
    proc.stderr?.on('data', (d: Buffer) => {
      stderr += d.toString();
      this.stderrTail = stderr.slice(-4096);
    });
    const lines = createInterface({ input: proc.stdout! });
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`site ${this.name} did not start in time; stderr: ${stderr}`)), 20_000);
      lines.on('line', (text) => {
        let line: LogLine;
        try {
          line = JSON.parse(text) as LogLine;
        } catch {
          return;
        }
        this.logs.push(line);
        if (line.msg === 'site started') {
          const [host, port] = String(line.listen).split(/:(?=\d+$)/);
          this.host = host ?? '127.0.0.1';
          this.port = Number(port);
          if (typeof line.nbd === 'string') this.nbdPort = Number(line.nbd.split(':').pop());
          this.url = `http://${this.host}:${this.port}`;
          clearTimeout(timer);
          resolve();
        }
      });
      proc.once('exit', (code) => {
        clearTimeout(timer);
        reject(new Error(`site ${this.name} exited with ${code} before starting; stderr: ${stderr}`));
      });
    });
  }

  /** Sends `signal` and waits for the process to exit. */
  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<number | null> {
    if (!this.proc || this.proc.exitCode !== null || this.proc.signalCode !== null) return this.exitCode;
    this.proc.kill(signal);
    await this.exited;
    return this.exitCode;
  }

  /** Waits up to `timeoutMs` for the daemon to exit by itself; true if it did. */
  async waitExit(timeoutMs: number): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<false>((resolve) => (timer = setTimeout(() => resolve(false), timeoutMs)));
    try {
      return await Promise.race([this.exited.then(() => true), timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  async restart(): Promise<void> {
    await this.kill('SIGKILL');
    await this.start();
  }

  /** Runs the CLI against this site. */
  cli(args: string[]): Promise<CliResult> {
    return ferry([...args, '--site', this.url]);
  }

  async api<T = unknown>(method: string, path: string, body?: unknown): Promise<{ status: number; body: T }> {
    const res = await fetch(`${this.url}${path}`, {
      method,
      ...(body !== undefined ? { body: JSON.stringify(body), headers: { 'content-type': 'application/json' } } : {}),
    });
    const text = await res.text();
    return { status: res.status, body: (text ? JSON.parse(text) : undefined) as T };
  }

  async writeData(volume: string, offset: number, data: Buffer): Promise<void> {
    const res = await fetch(`${this.url}/api/v1/volumes/${volume}/data?offset=${offset}`, {
      method: 'PUT',
      body: data,
      headers: { 'content-type': 'application/octet-stream' },
    });
    if (res.status !== 204) throw new Error(`write failed: ${res.status} ${await res.text()}`);
  }

  async readData(volume: string, offset: number, length: number): Promise<Buffer> {
    const res = await fetch(`${this.url}/api/v1/volumes/${volume}/data?offset=${offset}&length=${length}`);
    if (res.status !== 200) throw new Error(`read failed: ${res.status} ${await res.text()}`);
    return Buffer.from(await res.arrayBuffer());
  }

  async digest(volume: string): Promise<string> {
    const { status, body } = await this.api<{ sha256: string }>('GET', `/api/v1/volumes/${volume}/digest`);
    if (status !== 200) throw new Error(`digest failed: ${status}`);
    return body.sha256;
  }

  async destroy(): Promise<void> {
    // A profiled daemon writes its profile only on an orderly exit.
    await this.kill(process.env.FERRY_CPU_PROF_DIR ? 'SIGTERM' : 'SIGKILL');
    await rm(this.root, { recursive: true, force: true });
  }
}
