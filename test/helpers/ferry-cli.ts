/** Runs the real `ferry` command line (bin/ferry.js) as a child process. */
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';
import { http, type Reply } from './agents.js';

const exec = promisify(execFile);
export const ferryBin = fileURLToPath(new URL('../../../bin/ferry.js', import.meta.url));

export async function ferry(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await exec(process.execPath, [ferryBin, ...args]);
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
}

/** A long-running `ferry …` child (with --json), once it printed its "started" event. */
export interface StartedFerry<T> {
  proc: ChildProcess;
  started: T;
  /** Resolves with the exit code. */
  exit: Promise<number>;
}

/** Runs `ferry <args>` in the background; resolves with its "started" JSON event, rejects if it exits first. */
export function ferryStarted<T>(args: string[]): Promise<StartedFerry<T>> {
  const proc = spawn(process.execPath, [ferryBin, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (d) => (stderr += d));
  const exit = new Promise<number>((r) => proc.on('exit', (code) => r(code ?? -1)));
  return new Promise((resolve, reject) => {
    const rl = createInterface({ input: proc.stdout! });
    rl.on('line', (line) => {
      const ev = JSON.parse(line) as T & { event: string };
      if (ev.event === 'started') resolve({ proc, started: ev, exit });
    });
    void exit.then((code) => reject(new Error(`ferry ${args.slice(0, 2).join(' ')} exited with ${code} before starting: ${stderr}`)));
  });
}

/**
 * `ferry host start --json --name <name> <flags>` with its data and state in a temporary
 * directory: `check` gets the host's GET /v1/host and its "started" event; then the host is
 * stopped (SIGTERM, exit code 0 asserted) and the directory removed.
 */
export async function withHostStarted<T extends { control: string }>(name: string, flags: string[], check: (host: Reply, started: T) => void | Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), `ferry-host-${name}-`));
  try {
    const h = await ferryStarted<T>(['host', 'start', '--json', '--name', name, ...flags, '--data-dir', join(dir, name), '--state-dir', join(dir, 'state')]);
    try {
      await check((await http(`${h.started.control}/v1/host`, 'GET')).json, h.started);
    } finally {
      h.proc.kill('SIGTERM');
      assert.equal(await h.exit, 0);
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
