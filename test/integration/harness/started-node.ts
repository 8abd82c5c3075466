/**
 * One plain-host controller for a test file: created and started before its tests, destroyed
 * (with its servers and files) after them. `onStarted` receives it, so the file keeps a plain
 * `node` variable.
 */
import { afterAll, beforeAll } from 'vitest';
import { PlainHostNode } from './plain-host-controller.js';

export function useStartedNode(onStarted: (node: PlainHostNode) => void): void {
  let node: PlainHostNode | undefined;
  beforeAll(async () => {
    node = await PlainHostNode.create();
    await node.start();
    onStarted(node);
  });
  afterAll(async () => {
    await node?.destroy();
  });
}
