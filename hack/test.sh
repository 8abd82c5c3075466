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

results="$ROOT/.cache/test-results"
rm -rf "$results" && mkdir -p "$results"
run_project() {
  vitest run --project "$1" --reporter=default --reporter=json --outputFile.json="$results/$1.json"
}

log "unit tests"
run_project unit
log "integration tests"
run_project integration
log "control plane and node for end-to-end tests"
"$ROOT/hack/cluster.sh" build --with-node
log "the controller's image (hack/image.sh), for the node's end-to-end test"
IMAGE_ARCHIVE="$("$ROOT/hack/image.sh" | tail -n1)"
export IMAGE_ARCHIVE
log "end-to-end tests"
run_project e2e

# One closing line over all three projects, in the plain form CI reads.
node -e '
  const fs = require("node:fs");
  let passed = 0, failed = 0, skipped = 0;
  for (const f of fs.readdirSync(process.argv[1])) {
    const r = JSON.parse(fs.readFileSync(`${process.argv[1]}/${f}`, "utf8"));
    passed += r.numPassedTests; failed += r.numFailedTests; skipped += r.numPendingTests + r.numTodoTests;
  }
  if (passed === 0) { console.error("no test ran"); process.exit(1); }
  console.log(`tests: ${passed} passed, ${failed} failed, ${skipped} skipped`);
  process.exit(failed === 0 ? 0 : 1);
' "$results"
log "all tests passed"
