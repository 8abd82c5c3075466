#!/usr/bin/env bash
# Runs the README's test command (.ci/run) N times in a row, each on a fresh clone of one
# commit, as CI would: the proof that the suite does not flake. Not part of the test command.
# One summary line per run goes to OUT/summary.txt, each run's output to OUT/run-<i>.log.
#
#   hack/repeat-suite.sh [N=10] [COMMIT=HEAD] [OUT=.cache/repeat-suite]
#
# Runs one after another (the end-to-end node test uses fixed host ports and paths), each
# bounded by CI's 90 minutes; a clone is removed after its run.
set -uo pipefail
source "$(dirname "$0")/lib.sh"
runs="${1:-10}"
commit="$(git -C "$ROOT" rev-parse "${2:-HEAD}")"
out="${3:-$ROOT/.cache/repeat-suite}"
mkdir -p "$out"
for i in $(seq 1 "$runs"); do
  clone="$(mktemp -d /tmp/nbdx-repeat-suite-XXXXXX)"
  git clone -q "$ROOT" "$clone" && git -C "$clone" checkout -q "$commit"
  started=$(date +%s)
  (cd "$clone" && CI=true timeout 5400 bash .ci/run) >"$out/run-$i.log" 2>&1
  rc=$?
  echo "run $i commit ${commit:0:7} exit $rc seconds $(($(date +%s) - started)) $(grep -E '^tests:' "$out/run-$i.log" | tail -n1)" |
    tee -a "$out/summary.txt"
  rm -rf "$clone"
done
