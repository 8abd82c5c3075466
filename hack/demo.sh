#!/usr/bin/env bash
# The local demo: serves real NBD exports from a directory of NbdExport YAML files.
#   1. sets up what is missing (Debian packages, Node 24, npm packages) and builds;
#   2. makes a 64 MiB QCOW2 "full backup" of random data, as the backup platform would,
#      then starts the controller in plain-host mode on a temporary directory with
#      NbdExports for that full backup, an incremental it creates on top, and a raw file;
#   3. waits for them to be Ready, writes data through NBD, reads it back and prints
#      the checksums and the served exports;
#   4. stops everything it started and removes the temporary directory.
# Ports: NBD_PORT (default 10809), QEMU_PORT (10810), DEDICATED_PORTS (10900-10999: the full
# backup names maxConnections, so it gets a qemu-storage-daemon and port of its own under the
# host firewall's rules), HEALTH_PORT (18080). KEEP=1 keeps the directory.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

"$ROOT/hack/setup.sh"
log "building"
npm run --silent build

NBD_PORT="${NBD_PORT:-10809}"
QEMU_PORT="${QEMU_PORT:-10810}"
DEDICATED_PORTS="${DEDICATED_PORTS:-10900-10999}"
HEALTH_PORT="${HEALTH_PORT:-18080}"
work="$(mktemp -d /tmp/nbdx-demo.XXXXXX)"
images="$work/images"
mkdir -p "$images" "$work/exports"
controller_pid=""

cleanup() {
  set +e
  if [[ -n "$controller_pid" ]] && kill -0 "$controller_pid" 2>/dev/null; then
    kill -TERM "$controller_pid"
    wait "$controller_pid" 2>/dev/null
  fi
  bin/nbd-export-controller stop-servers --state-dir "$work/state" >/dev/null 2>&1
  if [[ "${KEEP:-}" == 1 ]]; then log "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# The full backup, as the platform leaves it: 64 MiB of data in a QCOW2 file.
mkdir -p "$images/vm-1234"
head -c $((64 * 1024 * 1024)) /dev/urandom >"$work/full-disk.bin"
qemu-img convert -q -f raw -O qcow2 "$work/full-disk.bin" "$images/vm-1234/disk0-full.qcow2"

# The example resources, as an operator would write them (several documents in one file).
sed "s#__IMAGES__#$images#g" hack/demo/exports.yaml >"$work/exports/backups.yaml"
log "example NbdExports in $work/exports/backups.yaml:"
sed 's/^/    /' "$work/exports/backups.yaml" >&2

log "starting the controller (plain-host mode, log in $work/controller.log)"
bin/nbd-export-controller run \
  --source "dir:$work/exports" --node-name demo-node \
  --allowed-root "$images" --state-dir "$work/state" --status-dir "$work/status" \
  --listen-address 127.0.0.1 --nbd-port "$NBD_PORT" --qemu-port "$QEMU_PORT" \
  --dedicated-ports "$DEDICATED_PORTS" \
  --health-address 127.0.0.1 --health-port "$HEALTH_PORT" >"$work/controller.log" 2>&1 &
controller_pid=$!

names=(vm-1234-disk0-full vm-1234-disk0-incr scratch-raw)
deadline=$((SECONDS + 120))
for name in "${names[@]}"; do
  until grep -qs "reason: Served" "$work/status/backups_$name.yaml" 2>/dev/null &&
    awk '/type: Ready/{found=1} found && /status:/{print; exit}' "$work/status/backups_$name.yaml" | grep -q "'True'"; do
    if ((SECONDS > deadline)) || ! kill -0 "$controller_pid" 2>/dev/null; then
      log "$name did not become Ready; controller log tail:"
      tail -n 30 "$work/controller.log" >&2
      bin/nbd-export-controller get --status-dir "$work/status" -o wide >&2 || true
      exit 1
    fi
    sleep 0.5
  done
  log "$name is Ready"
done

echo
bin/nbd-export-controller get --status-dir "$work/status" -o wide
echo

uri_of() { awk '/^  uri:/{print $2}' "$work/status/backups_$1.yaml"; }
payload="$work/payload.bin"
head -c $((16 * 1024 * 1024)) /dev/urandom >"$payload"
sum() { sha256sum "$1" | cut -c1-16; }

# The incremental: write 16 MiB at its start, read it back, and check that it landed in
# the QCOW2 (not over its container) and that the rest still reads from the full backup.
incr="$(uri_of vm-1234-disk0-incr)"
log "writing 16 MiB to $incr"
nbdcopy --flush "$payload" "$incr"
nbdcopy "$incr" "$work/incr-via-nbd.bin"
head -c $((16 * 1024 * 1024)) "$work/incr-via-nbd.bin" >"$work/readback.bin"
printf '%-44s %s\n' "sha256 of the data written" "$(sum "$payload")"
printf '%-44s %s\n' "sha256 read back through NBD (incremental)" "$(sum "$work/readback.bin")"
cmp -s "$payload" "$work/readback.bin" || { log "read-back differs"; exit 1; }
full="$(uri_of vm-1234-disk0-full)"
disk_tail="$(tail -c $((48 * 1024 * 1024)) "$work/full-disk.bin" | sha256sum | cut -c1-16)"
nbdcopy "$full" "$work/full-via-nbd.bin"
full_tail="$(tail -c $((48 * 1024 * 1024)) "$work/full-via-nbd.bin" | sha256sum | cut -c1-16)"
incr_tail="$(tail -c $((48 * 1024 * 1024)) "$work/incr-via-nbd.bin" | sha256sum | cut -c1-16)"
printf '%-44s %s\n' "sha256 of the full backup's last 48 MiB" "$disk_tail"
printf '%-44s %s\n' "  read through NBD from the full export" "$full_tail"
printf '%-44s %s\n' "  read through the incremental (backing)" "$incr_tail"
[[ "$disk_tail" == "$full_tail" && "$full_tail" == "$incr_tail" ]] ||
  { log "the incremental does not read through to its backing file"; exit 1; }
# What was written went into the incremental's QCOW2 clusters, not over its container:
# qemu-img, reading the image file itself (shared, beside the live server), sees it.
qemu-img convert -U -f qcow2 -O raw "$images/vm-1234/disk0-incr.qcow2" "$work/incr-disk.bin"
cmp -s <(head -c $((16 * 1024 * 1024)) "$work/incr-disk.bin") "$payload" ||
  { log "the incremental's image does not hold the data written"; exit 1; }
printf '%-44s %s\n' "the data written, read from the image file" "$(head -c $((16 * 1024 * 1024)) "$work/incr-disk.bin" | sha256sum | cut -c1-16)"
qemu-img info -U --output=json "$images/vm-1234/disk0-incr.qcow2" | grep -q '"format": "qcow2"' ||
  { log "the incremental is no longer a QCOW2 image"; exit 1; }

raw="$(uri_of scratch-raw)"
log "writing 16 MiB to $raw"
nbdcopy --flush "$payload" "$raw"
nbdcopy "$raw" "$work/raw-via-nbd.bin"
head -c $((16 * 1024 * 1024)) "$work/raw-via-nbd.bin" >"$work/readback-raw.bin"
printf '%-44s %s\n' "sha256 read back through NBD (raw)" "$(sum "$work/readback-raw.bin")"
cmp -s "$payload" "$work/readback-raw.bin" || { log "raw read-back differs"; exit 1; }
cmp -s "$payload" <(head -c $((16 * 1024 * 1024)) "$images/scratch.raw") || { log "raw file does not hold the data"; exit 1; }

echo
echo "served exports:"
for name in "${names[@]}"; do
  uri="$(uri_of "$name")"
  printf '  %-52s %12s bytes\n' "$uri" "$(nbdinfo --size "$uri")"
done
echo
log "demo finished; stopping the controller and its servers"
