import { defineConfig } from 'vitest/config';

// Three projects: unit (pure, fast, parallel), integration (real nbd-server, qemu-img,
// qemu-storage-daemon and NBD clients on loopback) and e2e (a real kube-apiserver).
// Integration and e2e run one file at a time: they start servers and share two cores.
export default defineConfig({
  test: {
    projects: [
      { test: { name: 'unit', include: ['test/unit/**/*.test.ts'] } },
      {
        test: {
          name: 'integration',
          include: ['test/integration/**/*.test.ts'],
          fileParallelism: false,
          // Above the tests' own waits (120 s), so a stuck wait reports what it waited for.
          testTimeout: 300_000,
          hookTimeout: 120_000,
        },
      },
      {
        test: {
          name: 'e2e',
          include: ['test/e2e/**/*.test.ts'],
          fileParallelism: false,
          testTimeout: 300_000,
          hookTimeout: 600_000,
        },
      },
    ],
  },
});
