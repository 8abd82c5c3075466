#!/usr/bin/env bash
# Throughput of qemu-storage-daemon (and, for comparison, qemu-nbd) over loopback NBD,
# measured with nbdcopy. Prints MiB/s per phase; asserts nothing.
#
#   bench/qemu-storage-daemon-throughput.sh            # 2 GiB, QSD qcow2 + raw, qemu-nbd qcow2
#   SIZE_MIB=1024 bench/qemu-storage-daemon-throughput.sh
#   BENCH_DIR=/var/tmp/b bench/qemu-storage-daemon-throughput.sh   # keep files on that file system
#
# The daemon is configured as QemuStorageDaemon configures it (src/node/qemu-storage-daemon):
# a `file` node with locking on, a qcow2 or raw node on top, an NBD export, writable.
# Servers: `qsd` runs with the GLIBC_TUNABLES the controller gives it (DEFAULT_GLIBC_TUNABLES
# in qemu-storage-daemon.ts), `qsd-glibc` and `qemu-nbd` with glibc's malloc defaults.
# Phases per server and format:
#   write-fresh      nbdcopy --flush from a random source (in page cache) into a new, empty image
#   write-2          the same write again, clusters/blocks now allocated, no read yet
#   read             nbdcopy from the export to null:
#   write-after-read the same write after that first read
#   write-cold-src   a fresh image again, but the source evicted from the page cache first:
#                    shows how much of a "slow first write" is really the source's disk
set -euo pipefail

size_mib="${SIZE_MIB:-2048}"
qsd_tunables='glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=67108864'
dir="${BENCH_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/nbdx-bench-XXXXXX")}"
mkdir -p "$dir"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  [[ -n "${BENCH_DIR:-}" ]] || rm -rf "$dir"
}
trap cleanup EXIT

for tool in qemu-storage-daemon qemu-nbd qemu-img nbdcopy nbdinfo; do
  command -v "$tool" >/dev/null || { echo "missing $tool (Debian: qemu-utils, qemu-system-common, libnbd-bin)" >&2; exit 1; }
done

free_port() { node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'; }
now_ns() { date +%s%N; }
mib_per_s() { awk -v mib="$size_mib" -v ns="$1" 'BEGIN { printf "%6.0f MiB/s (%5.2f s)", mib / (ns / 1e9), ns / 1e9 }'; }
evict() { dd if="$1" iflag=nocache count=0 status=none; }
warm() { cat "$1" >/dev/null; }

source_file="$dir/source.raw"
echo "# $size_mib MiB, files in $dir, $(nproc) CPUs, $(qemu-storage-daemon --version | head -1)"
head -c "$((size_mib * 1024 * 1024))" /dev/urandom >"$source_file"

wait_for_export() {
  local uri="$1"
  for _ in $(seq 1 300); do nbdinfo --size "$uri" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "export $uri did not come up" >&2
  return 1
}

start_server() { # server format image port; sets server_pid
  local server="$1" format="$2" image="$3" port="$4"
  if [[ "$server" == qsd* ]]; then
    local tunables=""
    [[ "$server" == qsd ]] && tunables="$qsd_tunables"
    GLIBC_TUNABLES="$tunables" qemu-storage-daemon \
      --blockdev "driver=file,node-name=f,filename=$image,locking=on" \
      --blockdev "driver=$format,node-name=d,file=f" \
      --nbd-server "addr.type=inet,addr.host=127.0.0.1,addr.port=$port" \
      --export "type=nbd,id=e,node-name=d,name=bench,writable=on" >"$dir/server.log" 2>&1 &
  else
    qemu-nbd --persistent -f "$format" -b 127.0.0.1 -p "$port" -x bench "$image" >"$dir/server.log" 2>&1 &
  fi
  server_pid=$!
  pids+=("$server_pid")
}

stop_server() {
  kill "$server_pid"
  wait "$server_pid" 2>/dev/null || true
}

new_image() { # format path
  rm -f "$2"
  qemu-img create -q -f "$1" "$2" "${size_mib}M"
}

timed() { # label command...
  local label="$1" start end
  shift
  start=$(now_ns)
  "$@"
  end=$(now_ns)
  printf '%-34s %s\n' "$label" "$(mib_per_s $((end - start)))"
}

run_case() { # server format
  local server="$1" format="$2" image="$dir/image.$2" port uri
  port=$(free_port)
  uri="nbd://127.0.0.1:$port/bench"

  new_image "$format" "$image"
  start_server "$server" "$format" "$image" "$port"
  wait_for_export "$uri"
  warm "$source_file"
  timed "$server $format write-fresh" nbdcopy --flush "$source_file" "$uri"
  timed "$server $format write-2" nbdcopy --flush "$source_file" "$uri"
  timed "$server $format read" nbdcopy "$uri" null:
  timed "$server $format write-after-read" nbdcopy --flush "$source_file" "$uri"
  timed "$server $format read-2" nbdcopy "$uri" null:
  stop_server

  new_image "$format" "$image"
  start_server "$server" "$format" "$image" "$port"
  wait_for_export "$uri"
  evict "$source_file"
  timed "$server $format write-cold-src" nbdcopy --flush "$source_file" "$uri"
  stop_server
  rm -f "$image"
}

warm "$source_file"
timed "memory: cat source >/dev/null" warm "$source_file"
evict "$source_file"
timed "disk: cat cold source >/dev/null" warm "$source_file"

run_case qsd qcow2
run_case qsd raw
run_case qsd-glibc qcow2
run_case qemu-nbd qcow2
