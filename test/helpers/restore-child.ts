/**
 * Run as a separate process by the snapshot test: restores a snapshot, runs a number of quanta,
 * and prints the memory digest — proving a snapshot carries the whole machine across processes.
 * argv: <snapshot> <quanta> <fixedBudget>
 */
import { restoreSnapshot } from '../../src/node/vm/snapshot.js';
import { InstrumentCache } from '../../src/node/vm/instrument.js';

const [path, quanta, budget] = process.argv.slice(2);
const { vm } = await restoreSnapshot(path, { cache: new InstrumentCache(), fixedBudget: Number(budget), pauseAfterQuanta: Number(quanta) });
await vm.whenPaused();
console.log(JSON.stringify({ digest: vm.digest(), quanta: vm.stat().quanta }));
await vm.stop();
