/**
 * The simulator's node edge: scenario and trace files in, results JSON and SVG charts out.
 */
import { readFileSync } from 'node:fs';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { decodeTrace, type Trace } from '../../core/sim/trace-format.js';
import { parseScenario, ScenarioError, type Scenario } from '../../core/sim/scenario.js';
import { runScenario, type ScenarioResult, type WorldEnv } from '../../core/sim/world.js';
import { scenarioCharts } from '../../core/sim/charts.js';
import { FerryError } from '../../core/errors.js';

/** Reads a trace file. */
export async function readTrace(file: string): Promise<Trace> {
  return decodeTrace(new Uint8Array(await readFile(file)));
}

/** Trace files named in a scenario resolve against the scenario's directory. */
export function fileEnv(scenarioFile: string): WorldEnv {
  const base = dirname(resolve(scenarioFile));
  const cache = new Map<string, Trace>();
  return {
    loadTrace(file) {
      const p = isAbsolute(file) ? file : join(base, file);
      let t = cache.get(p);
      if (!t) {
        let bytes: Uint8Array;
        try {
          bytes = new Uint8Array(readFileSync(p));
        } catch (e) {
          throw new ScenarioError(`cannot read trace '${file}' (${p}): ${(e as Error).message}`, { cause: e });
        }
        cache.set(p, (t = decodeTrace(bytes)));
      }
      return t;
    },
  };
}

export async function loadScenarioFile(file: string): Promise<Scenario> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    throw new FerryError('ERR_NOT_FOUND', `cannot read scenario '${file}': ${(e as Error).message}`, { cause: e });
  }
  return parseScenario(text, file);
}

export interface RunFileOptions {
  /** Results JSON. */
  out?: string;
  /** Directory for SVG charts. */
  svgDir?: string;
}

export interface RunFileResult {
  result: ScenarioResult;
  wallMs: number;
  charts: string[];
}

/** Runs a scenario file; writes JSON and charts when asked. */
export async function runScenarioFile(file: string, options: RunFileOptions = {}): Promise<RunFileResult> {
  const scenario = await loadScenarioFile(file);
  const t0 = performance.now();
  const result = runScenario(scenario, fileEnv(file));
  const wallMs = performance.now() - t0;
  if (options.out) {
    await mkdir(dirname(resolve(options.out)), { recursive: true });
    await writeFile(options.out, resultsJson(result));
  }
  const charts: string[] = [];
  if (options.svgDir) {
    await mkdir(options.svgDir, { recursive: true });
    for (const c of scenarioCharts(result)) {
      const p = join(options.svgDir, c.file);
      await writeFile(p, c.svg);
      charts.push(p);
    }
  }
  return { result, wallMs, charts };
}

/** Stable JSON (non-finite numbers become null). */
export function resultsJson(r: ScenarioResult): string {
  return JSON.stringify(r, (_k, v: unknown) => (typeof v === 'number' && !Number.isFinite(v) ? null : v), 2) + '\n';
}
