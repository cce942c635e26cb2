/**
 * How a VM's clients reach it. A VM's `--expose` endpoint lives on its *home* host for good; the
 * VM itself may run elsewhere. Two kinds of link route the records:
 *
 * - {@link HomeLink}, on the home: the endpoint, and where its client records go — the VM running
 *   here, or a {@link Relay} to the host running it. Guest records come back from either.
 * - {@link RemoteLink}, on a host running a VM whose home is elsewhere: the relay to the home.
 *
 * Around a switchover nothing may be lost or answered twice. Records the VM took before it paused
 * travel inside its device state. After the pause the leaving side holds new input (the home's
 * endpoint holds; a remote host buffers what the relay brings). Once the VM runs at the
 * destination, held input goes there: from a home to a relay (on RUNNING), or — when the VM comes
 * home — the home fences the old relay (FENCE), receives whatever the old host buffered (RETURN)
 * before anything it held itself, and only then (FENCE_ACK) opens the endpoint to the local VM.
 */
import type { NetRecordData } from '../../core/net-ring.js';
import type { ExposeEndpoint } from '../net/expose.js';
import type { Relay, RelayHello } from '../net/relay.js';
import type { Vm } from '../vm/vm.js';

export interface NetLink {
  readonly kind: 'home' | 'remote';
  /** Keep client input away from the VM (nested). */
  hold(): void;
  release(): void;
  /** Records the guest produced. */
  toClients(records: NetRecordData[]): void;
  /** The VM took `bytes` of client data into its rx ring. */
  credit(bytes: number): void;
  /** The client endpoint, host:port. */
  endpoint(): string | null;
  /** The host the endpoint lives on (null: this one). */
  endpointHost(): string | null;
}

type Target = { kind: 'vm'; vm: Vm } | { kind: 'relay'; relay: Relay; host: string } | { kind: 'none' };

export class HomeLink implements NetLink {
  readonly kind = 'home';
  private target: Target = { kind: 'none' };
  /** Guest output of the local VM kept back while a fence is in progress. */
  private gated: NetRecordData[] | null = null;
  private fencing: { relay: Relay; vm: Vm } | null = null;
  private ep!: ExposeEndpoint;

  /**
   * @param onLost called when the VM's host goes away (its relay ended without a fence): the
   *   endpoint is closed, the clients are disconnected.
   */
  constructor(readonly guest: string, private readonly onLost: (link: HomeLink, err: Error | undefined) => void) {}

  /** The endpoint is created with `onRecords: (r) => link.toGuest(r)`, then bound here. */
  bind(ep: ExposeEndpoint, vm: Vm | null): void {
    this.ep = ep;
    if (vm) this.target = { kind: 'vm', vm };
  }

  get endpointObject(): ExposeEndpoint {
    return this.ep;
  }

  /** Where client records go now: 'vm', 'relay' (with the host's name) or 'none'. */
  describe(): string {
    return this.target.kind === 'relay' ? `relay:${this.target.host}` : this.target.kind;
  }

  toGuest(records: NetRecordData[]): void {
    const t = this.target;
    if (t.kind === 'vm') t.vm.deliverNet(records);
    else if (t.kind === 'relay') t.relay.sendRecords(records);
  }

  hold(): void {
    this.ep.hold();
  }

  release(): void {
    this.ep.release();
  }

  toClients(records: NetRecordData[]): void {
    if (this.gated) this.gated.push(...records);
    else this.ep.deliver(records);
  }

  credit(bytes: number): void {
    this.ep.credit(bytes);
  }

  endpoint(): string | null {
    const a = this.ep.address();
    return `${a.host}:${a.port}`;
  }

  endpointHost(): string | null {
    return null;
  }

  /**
   * Installs the home side's handlers on a relay this home dialled for a migration.
   * `onRunning` fires when the destination reports the VM running.
   */
  adopt(relay: Relay, onRunning: () => void): void {
    relay.start({
      records: (r) => this.ep.deliver(r),
      credit: (n) => this.ep.credit(n),
      running: onRunning,
      returned: (r) => this.onReturned(relay, r),
      fenceAck: () => this.finishFence(relay),
      end: (err) => this.onRelayEnd(relay, err),
    });
  }

  /** The VM runs at the relay's host now: client records go there (idempotent). */
  forwardTo(relay: Relay, host: string): void {
    if (this.target.kind === 'relay' && this.target.relay === relay) return;
    this.target = { kind: 'relay', relay, host };
  }

  /**
   * The VM arrived back here and runs: fence the relay it came from, then point the endpoint at
   * the local VM. Client input stays held, and the local VM's output stays gated (so the old
   * host's last replies reach the clients first), until FENCE_ACK.
   */
  comeHome(vm: Vm): void {
    const t = this.target;
    if (t.kind !== 'relay') {
      this.target = { kind: 'vm', vm };
      return;
    }
    this.ep.hold();
    this.gated = [];
    this.fencing = { relay: t.relay, vm };
    t.relay.send('FENCE');
    if (t.relay.failed) this.finishFence(t.relay);
  }

  private onReturned(relay: Relay, records: NetRecordData[]): void {
    if (this.fencing?.relay === relay) this.fencing.vm.deliverNet(records);
  }

  private finishFence(relay: Relay): void {
    const f = this.fencing;
    if (!f || f.relay !== relay) return;
    this.fencing = null;
    this.target = { kind: 'vm', vm: f.vm };
    const gated = this.gated ?? [];
    this.gated = null;
    if (gated.length) this.ep.deliver(gated);
    this.ep.release();
    void relay.close();
  }

  private onRelayEnd(relay: Relay, err: Error | undefined): void {
    if (this.fencing?.relay === relay) {
      // The old host went away mid-fence: what it held is lost with it; carry on locally.
      this.finishFence(relay);
      return;
    }
    if (this.target.kind === 'relay' && this.target.relay === relay) {
      this.target = { kind: 'none' };
      this.onLost(this, err);
    }
  }

  async close(): Promise<void> {
    const t = this.target;
    if (t.kind === 'relay') t.relay.abort();
    this.target = { kind: 'none' };
    await this.ep.close();
  }
}

export class RemoteLink implements NetLink {
  readonly kind = 'remote';
  private vm: Vm | null = null;
  private holds = 0;
  private buffer: NetRecordData[] = [];
  private fenced = false;
  private ended = false;

  constructor(readonly relay: Relay, readonly hello: RelayHello, onEnd: (link: RemoteLink, err: Error | undefined) => void) {
    relay.start({
      records: (r) => this.fromHome(r),
      fence: () => this.onFence(),
      end: (err) => {
        this.ended = true;
        onEnd(this, err);
      },
    });
  }

  /** The VM that receives client records from now on. */
  bindVm(vm: Vm): void {
    this.vm = vm;
  }

  get alive(): boolean {
    return !this.ended;
  }

  /** Tell the home the VM runs here. */
  running(): void {
    this.relay.send('RUNNING');
  }

  private fromHome(records: NetRecordData[]): void {
    if (this.fenced) this.relay.sendReturned(records);
    else if (this.holds > 0 || !this.vm) this.buffer.push(...records);
    else this.vm.deliverNet(records);
  }

  private onFence(): void {
    this.fenced = true;
    const b = this.buffer;
    this.buffer = [];
    this.relay.sendReturned(b);
    this.relay.send('FENCE_ACK');
    void this.relay.close();
  }

  hold(): void {
    this.holds++;
  }

  release(): void {
    if (this.holds === 0) return;
    this.holds--;
    if (this.holds === 0 && !this.fenced && this.vm && this.buffer.length) {
      const b = this.buffer;
      this.buffer = [];
      this.vm.deliverNet(b);
    }
  }

  toClients(records: NetRecordData[]): void {
    if (!this.ended) this.relay.sendRecords(records);
  }

  credit(bytes: number): void {
    if (!this.ended) this.relay.sendCredit(bytes);
  }

  endpoint(): string | null {
    return this.hello.endpoint;
  }

  endpointHost(): string | null {
    return this.hello.home;
  }

  async close(): Promise<void> {
    this.relay.abort();
  }
}
