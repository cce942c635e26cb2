/**
 * How the threads a post-copy fault waits on are scheduled: the fault threads (what a thread
 * reports it got is what the kernel says of it in /proc/self/task/<tid>/stat, and each policy falls
 * back to the next one down) and the waiting vCPU (its nice value while pages are missing); the
 * host CLI passes both choices on and refuses bad ones by name.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync, readdirSync } from 'node:fs';
import { FaultThreadListener, SourceFaultThreads } from '../../src/node/engine/fault-thread.js';
import { FAULT_THREAD_NICE, FAULT_THREAD_RT_PRIORITY, type FaultThreadPriority } from '../../src/node/engine/thread-priority.js';
import { tmpdir } from 'node:os';
import { ferry, withHostStarted } from '../helpers/ferry-cli.js';
import { HostAgent } from '../../src/node/agent/agent.js';
import { InvalidArgumentError } from '../../src/core/errors.js';
import { Vm } from '../../src/node/vm/vm.js';
import { InstrumentCache } from '../../src/node/vm/instrument.js';
import { hammerGuest } from '../helpers/wat.js';

const SCHED_FIFO = 1;

/** This process's threads as the kernel schedules them. */
function threads(): { tid: string; nice: number; policy: number; rtPriority: number }[] {
  const out = [];
  for (const tid of readdirSync('/proc/self/task')) {
    let stat: string;
    try {
      stat = readFileSync(`/proc/self/task/${tid}/stat`, 'utf8');
    } catch {
      continue; // exited meanwhile
    }
    // Fields after the command name (which may hold spaces), numbered from 3 (proc(5)).
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    out.push({ tid, nice: Number(f[19 - 3]), policy: Number(f[41 - 3]), rtPriority: Number(f[40 - 3]) });
  }
  return out;
}

/** What a thread asking for `ask` should get here: root can raise both, and chrt is util-linux's. */
function expected(ask: FaultThreadPriority): FaultThreadPriority {
  const root = process.getuid?.() === 0;
  let chrt = false;
  try {
    execFileSync('chrt', ['--version'], { stdio: 'ignore' });
    chrt = true;
  } catch {
    // not installed
  }
  if (ask === 'realtime' && root && chrt) return 'realtime';
  if (ask !== 'default' && root) return 'nice';
  return 'default';
}

for (const ask of ['realtime', 'nice', 'default'] as const) {
  test(`fault threads asked for '${ask}' report what they got, and the kernel agrees`, async (t) => {
    const before = threads();
    const fifo0 = before.filter((x) => x.policy === SCHED_FIFO).length;
    const nice0 = before.filter((x) => x.nice === FAULT_THREAD_NICE).length;
    const listener = new FaultThreadListener('127.0.0.1', ask);
    const source = new SourceFaultThreads(ask);
    t.after(() => Promise.all([listener.close(), source.close()]));
    assert.equal(listener.priority, 'default', 'not started yet');
    const port = await listener.port();
    // A source's thread lives as long as its session's fault connection: one is open while the
    // kernel is asked (and it says how it is scheduled before it dials).
    const token = 'ab'.repeat(16);
    const session = listener.expect(token);
    const link = await source.open('127.0.0.1', port, token, () => ({ buffer: new SharedArrayBuffer(8), pages: 0 }));
    t.after(() => Promise.all([link.close(), session.close()]));

    const want = expected(ask);
    assert.equal(listener.priority, want);
    assert.equal(source.priority, want);
    const after = threads();
    const fifo = after.filter((x) => x.policy === SCHED_FIFO);
    assert.equal(fifo.length - fifo0, want === 'realtime' ? 2 : 0, JSON.stringify(after));
    for (const x of fifo.slice(fifo0)) assert.equal(x.rtPriority, FAULT_THREAD_RT_PRIORITY);
    // Only the two threads changed: the process itself, and every other thread, kept its policy.
    assert.equal(after.find((x) => x.tid === String(process.pid))?.policy, 0);
    assert.equal(after.filter((x) => x.nice === FAULT_THREAD_NICE).length - nice0, want === 'nice' ? 2 : 0);
  });
}

test('a VM with faultNice runs its vCPU thread at that nice value in the presence variant only, and the kernel agrees', async (t) => {
  const vm = Vm.create({ name: 'nice', module: hammerGuest(16), memoryBytes: 4 << 20, cache: new InstrumentCache(), variants: ['plain', 'dirty', 'presence'], faultNice: -7 });
  t.after(() => vm.dispose());
  await vm.bootCold();
  const own = vm.stat().vcpuNice;
  const at = (nice: number) => threads().filter((x) => x.nice === nice).length;
  const before = at(-7);
  vm.presenceView().fill(1); // every page is there: the guest runs on in the presence variant
  await vm.switchVariant('presence');
  const want = process.getuid?.() === 0 ? -7 : own; // lowering a nice value needs CAP_SYS_NICE
  assert.equal(vm.stat().vcpuNice, want);
  if (want === -7) assert.equal(at(-7) - before, 1, 'exactly one thread, the vCPU, runs at the VM\'s faultNice');
  const p0 = vm.stat().progress;
  for (let i = 0; i < 200 && vm.stat().progress === p0; i++) await new Promise((r) => setTimeout(r, 5));
  assert.ok(vm.stat().progress > p0, 'the guest runs on');
  await vm.switchVariant('plain');
  assert.equal(vm.stat().vcpuNice, own);
  assert.equal(at(-7), before, 'back to its own nice value once every page is there');
});

test('ferry host start --postcopy-vcpu-nice: the value reaches the agent (GET /v1/host); a bad one is refused by name with exit 2', async () => {
  for (const bad of ['-21', '20', 'x', '1.5']) {
    const r = await ferry(['host', 'start', '--name', 'a', '--postcopy-vcpu-nice', bad]);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /a nice value must be an integer from -20 to 19/);
  }
  await withHostStarted('n', ['--postcopy-vcpu-nice', '-5'], (host) => assert.equal(host.vcpuThreads.postcopyNice, -5));
  // The agent itself refuses one by name, before it starts anything.
  for (const bad of [-21, 20, 1.5, Number.NaN]) {
    assert.throws(() => new HostAgent({ name: 'bad', dataDir: tmpdir(), postcopyVcpuNice: bad }), (e: unknown) => e instanceof InvalidArgumentError && /post-copy vCPU nice value/.test(e.message));
  }
});

test('ferry host start --fault-thread-priority: the policy reaches the agent (GET /v1/host); a bad one is refused by name with exit 2', async () => {
  const r = await ferry(['host', 'start', '--name', 'a', '--fault-thread-priority', 'fast']);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /'fast' is not one of realtime, nice, default/);
  const help = await ferry(['host', 'start', '--help']);
  assert.match(help.stdout, /--fault-thread-priority <policy>[\s\S]*default:\s+nice/);
  await withHostStarted('p', ['--fault-thread-priority', 'nice'], (host) => {
    assert.deepEqual(host.faultThreads, { port: null, priority: { asked: 'nice', destination: 'default', source: 'default' } });
  });
});
