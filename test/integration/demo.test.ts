/**
 * The README's first command, `hack/demo.sh`, end to end on free ports: it checks what it
 * shows itself (read-backs, the incremental reading through to its backing file, the bytes in
 * the image files) and exits non-zero when anything differs. A demo that stopped working
 * would otherwise go unnoticed until a new user runs it.
 */
import { join } from 'node:path';
import { execa } from 'execa';
import { describe, expect, it } from 'vitest';
import { freePortRange, freePorts, REPO_ROOT } from '../support/repo.js';

describe('hack/demo.sh', () => {
  it('serves its three exports, moves data through them, and cleans up', async () => {
    const [nbd, qemu, health] = (await freePorts(3)) as [number, number, number];
    const dedicated = await freePortRange(2);
    const result = await execa(join(REPO_ROOT, 'hack', 'demo.sh'), [], {
      env: {
        NBD_PORT: String(nbd),
        QEMU_PORT: String(qemu),
        HEALTH_PORT: String(health),
        DEDICATED_PORTS: `${dedicated.first}-${dedicated.last}`,
      },
      reject: false,
      all: true,
      timeout: 240_000,
    });
    expect(result.exitCode, result.all).toBe(0);
    expect(result.all).toContain('demo finished');
    // The full backup names maxConnections: a daemon and port of its own.
    expect(result.all).toContain(`nbd://127.0.0.1:${dedicated.first}/backups.vm-1234-disk0-full`);
    expect(result.all).toContain(`nbd://127.0.0.1:${nbd}/backups.scratch-raw`);
  });
});
