/**
 * A destination fault thread for a test, with a source of the test's own joined to it on a real
 * socket (the test plays the source's side frame by frame). Both end with the test.
 */
import type { TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { FramedConnection } from '../../src/core/transport/framed.js';
import { FaultThreadListener, type FaultLinkShape, type NodeDestinationFaultLink } from '../../src/node/engine/fault-thread.js';
import { tcp } from '../../src/node/transport/tcp.js';

export async function joinedFaultThread(t: TestContext, token: string, shape: FaultLinkShape | null = null, detach = true): Promise<{ link: NodeDestinationFaultLink; source: FramedConnection }> {
  const listener = new FaultThreadListener('127.0.0.1');
  listener.shape = shape;
  listener.detach = detach;
  t.after(() => listener.close());
  const port = await listener.port();
  const link = listener.expect(token) as NodeDestinationFaultLink;
  const source = new FramedConnection(await tcp().dial(`127.0.0.1:${port}`));
  t.after(() => source.abort());
  await source.send({ type: 'JOIN', token, stream: 0, role: 'fault' });
  assert.equal((await source.next())?.type, 'ACK');
  return { link, source };
}
