#!/usr/bin/env bash
# All the tests: lint and format, type check, build, unit, integration (real programs on
# loopback) and end-to-end (a real kube-apiserver). Sets up whatever is missing first.
# A test that cannot run fails; nothing is skipped quietly.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

"$ROOT/hack/setup.sh"

log "lint and format"
npm run --silent lint
log "type check"
npm run --silent typecheck
log "build"
npm run --silent build

log "unit tests"
npx vitest run --project unit
log "integration tests"
npx vitest run --project integration
if compgen -G "test/e2e/*.test.ts" >/dev/null; then
  log "control plane for end-to-end tests"
  "$ROOT/hack/cluster.sh" build
  log "end-to-end tests"
  npx vitest run --project e2e
fi
log "all tests passed"
