# Sourced by the hack/ scripts: one place that knows where the project's tools live.
# shellcheck shell=bash
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODE_VERSION="24.21.0"
TOOLS_DIR="$ROOT/.tools"
NODE_DIR="$TOOLS_DIR/node-$NODE_VERSION"
export PATH="$NODE_DIR/bin:$ROOT/node_modules/.bin:$PATH"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
