#!/usr/bin/env bash
# Runs one benchmark on the project's Node, from TypeScript: bench/run.sh controller-scale [ARGS...]
set -euo pipefail
source "$(dirname "$0")/../hack/lib.sh"
name="${1:?usage: bench/run.sh NAME [ARGS...] (NAME: a bench/*.ts file without .ts)}"
shift
exec node --import "$ROOT/bench/register-ts.mjs" "$ROOT/bench/$name.ts" "$@"
