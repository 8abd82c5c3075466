#!/usr/bin/env bash
# A real Kubernetes control plane on loopback for the end-to-end tests: etcd and kube-apiserver,
# plus kubectl, and with --with-node a real node (kube-controller-manager, kube-scheduler, and a
# kubelet on containerd and runc: hack/cluster-node.sh), all built from source as Go modules by
# hack/controlplane/ and cached under .tools/controlplane/<stamp>/bin/.
#
#   hack/cluster.sh build [--with-node]
#                                build the binaries unless the pinned versions are already built
#                                (--with-node: the node's too); prints their directory
#   hack/cluster.sh up [--with-node]
#                                build if needed, start etcd and kube-apiserver in the background,
#                                wait for /readyz, write an admin kubeconfig; prints its path.
#                                --with-node: also the node node-1, with the controller's image
#                                (IMAGE_ARCHIVE, or hack/image.sh builds it) in its containerd.
#                                Does nothing if this CLUSTER_DIR's cluster is already up.
#   hack/cluster.sh down         stop what `up` started (by pid file), remove the state; keeps logs/
#   hack/cluster.sh status       exit 0 and say so if the control plane is up, else exit 1
#   hack/cluster.sh kubeconfig   print the path of the running control plane's admin kubeconfig
#   hack/cluster.sh kubectl      no arguments: print the path of our kubectl (building it if needed)
#   hack/cluster.sh kubectl ARGS...
#                                run our kubectl with ARGS against this control plane (it always
#                                uses the admin kubeconfig here, never the caller's KUBECONFIG)
#   hack/cluster.sh env          print shell exports: KUBECONFIG, and PATH with our kubectl first
#                                (use as: eval "$(hack/cluster.sh env)")
#
# Environment:
#   CLUSTER_DIR     state: etcd data, pki, kubeconfig, pid files, logs   (default: .cache/cluster)
#   ETCD_PORT       etcd client port                                      (default: 23790)
#   ETCD_PEER_PORT  etcd peer port                                        (default: 23800)
#   APISERVER_PORT  kube-apiserver secure port                            (default: 26443)
#   READY_TIMEOUT   seconds `up` waits for readiness                       (default: 120)
#   IMAGE_ARCHIVE   --with-node: the image archive to import  (default: what hack/image.sh builds)
#   NODE_IP, KUBELET_PORT, KUBELET_HEALTHZ_PORT, CONTROLLER_MANAGER_PORT, SCHEDULER_PORT
#                   --with-node: see hack/cluster-node.sh
#
# Access: the admin kubeconfig authenticates with a static bearer token (user "admin" in
# system:masters) and trusts the cluster's own CA ($CLUSTER_DIR/pki/ca.crt). Without a node no
# controllers run:
# namespaces get no "default" ServiceAccount and no token Secrets are made; get a ServiceAccount
# token from the TokenRequest API instead (`kubectl create token NAME`), which the apiserver
# serves by itself. Pods are stored but never scheduled or run; a Pod that names no
# ServiceAccount is refused until its namespace has one called "default" (create it).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

CONTROLPLANE_SRC="$ROOT/hack/controlplane"
CLUSTER_DIR="$(realpath -m "${CLUSTER_DIR:-$ROOT/.cache/cluster}")"
ETCD_PORT="${ETCD_PORT:-23790}"
ETCD_PEER_PORT="${ETCD_PEER_PORT:-23800}"
APISERVER_PORT="${APISERVER_PORT:-26443}"
READY_TIMEOUT="${READY_TIMEOUT:-120}"
SERVICE_CIDR="10.0.0.0/24"
SERVICE_IP="10.0.0.1" # the first address of SERVICE_CIDR: the "kubernetes" Service
SA_ISSUER="https://kubernetes.default.svc.cluster.local"

PKI_DIR="$CLUSTER_DIR/pki"
LOG_DIR="$CLUSTER_DIR/logs"
KUBECONFIG_FILE="$CLUSTER_DIR/kubeconfig"
SERVER_URL="https://127.0.0.1:$APISERVER_PORT"
source "$ROOT/hack/image/oci-archive.sh"
source "$ROOT/hack/cluster-node.sh"

# ---------------------------------------------------------------------------------------------
# build

# The Go module versions pinned in hack/controlplane/*/go.mod.
module_version() { awk -v m="$2" '$1 == m && $2 ~ /^v/ { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' "$1"; }
KUBE_VERSION="$(module_version "$CONTROLPLANE_SRC/kube/go.mod" k8s.io/kubernetes)"
ETCD_VERSION="$(module_version "$CONTROLPLANE_SRC/etcd/go.mod" go.etcd.io/etcd/server/v3)"
[[ -n $KUBE_VERSION && -n $ETCD_VERSION ]] || die "cannot read the pinned versions from $CONTROLPLANE_SRC/*/go.mod"

# What the binaries are built from; a change to any of it means another stamp, so another build.
BUILD_FLAGS=(-trimpath -p 2)
kube_ldflags() {
  local v="$KUBE_VERSION" major minor pkg flags="-s -w"
  major="${v#v}" && major="${major%%.*}"
  minor="${v#v*.}" && minor="${minor%%.*}"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  printf '%s' "$flags"
}
ETCD_LDFLAGS="-s -w"

build_stamp() {
  local hash
  hash="$(
    cd "$CONTROLPLANE_SRC"
    {
      find . -type f \( -name go.mod -o -name go.sum -o -name '*.go' \) | LC_ALL=C sort | xargs sha256sum
      printf '%s\n' "${BUILD_FLAGS[*]}" "$(kube_ldflags)" "$ETCD_LDFLAGS"
    } | sha256sum | cut -c1-12
  )"
  printf 'kube-%s_etcd-%s_%s' "$KUBE_VERSION" "$ETCD_VERSION" "$hash"
}
BIN_DIR="$TOOLS_DIR/controlplane/$(build_stamp)/bin"
KUBECTL="$BIN_DIR/kubectl"
BINARIES=(etcd kube-apiserver kubectl)
# What a node adds (`--with-node`), built only when asked for: the plain control plane is what
# every other end-to-end test needs, and these add minutes to a cold build.
NODE_BINARIES=(kube-controller-manager kube-scheduler kubelet pause)

binaries_present() {
  local b
  for b in "$@"; do [[ -x $BIN_DIR/$b ]] || return 1; done
}

# build [--with-node]
cmd_build() {
  local with_node="${1:-}"
  if ! binaries_present "${BINARIES[@]}" || { [[ $with_node == --with-node ]] && ! binaries_present "${NODE_BINARIES[@]}"; }; then
    command -v go >/dev/null 2>&1 || die "Go is needed to build the control plane (hack/controlplane/)"
    mkdir -p "$TOOLS_DIR/controlplane"
    # One build at a time: a second caller waits for the lock, then finds the binaries there.
    build_binaries 9>"$TOOLS_DIR/controlplane/.lock"
    [[ $with_node == --with-node ]] && build_node_binaries 9>"$TOOLS_DIR/controlplane/.lock"
  fi
  printf '%s\n' "$BIN_DIR"
}

build_binaries() {
  flock 9
  binaries_present "${BINARIES[@]}" && return
  local stage="${BIN_DIR%/bin}.partial" started=$SECONDS
  rm -rf "$stage"
  mkdir -p "$stage/bin"
  log "building kube-apiserver and kubectl $KUBE_VERSION, etcd $ETCD_VERSION (a cold build takes a while)"
  export CGO_ENABLED=0 GOWORK=off GOFLAGS="-mod=readonly -buildvcs=false"
  (cd "$CONTROLPLANE_SRC/etcd" && go build "${BUILD_FLAGS[@]}" -ldflags="$ETCD_LDFLAGS" -o "$stage/bin/etcd" .) ||
    die "building etcd failed"
  (cd "$CONTROLPLANE_SRC/kube" && go build "${BUILD_FLAGS[@]}" -ldflags="$(kube_ldflags)" -o "$stage/bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl) ||
    die "building kube-apiserver and kubectl failed"
  "$stage/bin/kubectl" version --client >/dev/null || die "the built kubectl does not run"
  # Node binaries built earlier for the same stamp stay.
  if [[ -d $BIN_DIR ]]; then
    local b
    for b in "${NODE_BINARIES[@]}"; do [[ -x $BIN_DIR/$b ]] && mv "$BIN_DIR/$b" "$stage/bin/"; done
  fi
  rm -rf "${BIN_DIR%/bin}"
  mv "$stage" "${BIN_DIR%/bin}"
  log "built in $((SECONDS - started))s: $BIN_DIR"
}

# The node's binaries go into the same stamped directory, each moved in only when built whole.
build_node_binaries() {
  flock 9
  binaries_present "${NODE_BINARIES[@]}" && return
  local stage="${BIN_DIR%/bin}.node-partial" started=$SECONDS b
  rm -rf "$stage"
  mkdir -p "$stage"
  log "building kube-controller-manager, kube-scheduler and kubelet $KUBE_VERSION and the pause program"
  export CGO_ENABLED=0 GOWORK=off GOFLAGS="-mod=readonly -buildvcs=false"
  (cd "$CONTROLPLANE_SRC/kube" && go build "${BUILD_FLAGS[@]}" -ldflags="$(kube_ldflags)" -o "$stage/" \
    k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet) ||
    die "building kube-controller-manager, kube-scheduler and kubelet failed"
  (cd "$CONTROLPLANE_SRC/pause" && go build "${BUILD_FLAGS[@]}" -ldflags="$ETCD_LDFLAGS" -o "$stage/pause" .) ||
    die "building pause failed"
  "$stage/kubelet" --version >/dev/null || die "the built kubelet does not run"
  for b in "${NODE_BINARIES[@]}"; do mv "$stage/$b" "$BIN_DIR/$b"; done
  rm -rf "$stage"
  log "built the node's binaries in $((SECONDS - started))s: $BIN_DIR"
}

# ---------------------------------------------------------------------------------------------
# processes

pid_file() { printf '%s/%s.pid' "$CLUSTER_DIR" "$1"; }

# The pid of a component started by `up`, if that process still runs our binary.
running_pid() {
  local file pid exe
  file="$(pid_file "$1")"
  [[ -s $file ]] || return 1
  pid="$(<"$file")"
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
  [[ ${exe% (deleted)} == */"$1" ]] || return 1
  printf '%s' "$pid"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Starts a binary in its own session, detached from this shell; the process writes its own pid.
# The binary is ours ($BIN_DIR/NAME) unless PROGRAM names another (containerd is Debian's).
start() {
  local name="$1"
  shift
  local pidf program="${PROGRAM:-$BIN_DIR/$name}"
  pidf="$(pid_file "$name")"
  rm -f "$pidf"
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidf" "$program" "$@" \
    >"$LOG_DIR/$name.log" 2>&1 </dev/null &
  local i
  for ((i = 0; i < 50; i++)); do
    [[ -s $pidf ]] && return
    sleep 0.1
  done
  die "$name did not start"
}

stop() {
  local name="$1" pid i
  pid="$(running_pid "$name")" || {
    rm -f "$(pid_file "$name")"
    return 0
  }
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name (pid $pid) ignored SIGTERM for 10s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.2
  fi
  rm -f "$(pid_file "$name")"
  log "stopped $name (pid $pid)"
}

etcd_healthy() { curl -fsS --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" 2>/dev/null | grep -q '"health":"true"'; }

apiserver_ready() {
  [[ -s $PKI_DIR/ca.crt && -s $PKI_DIR/admin.token ]] || return 1
  curl -fsS --max-time 3 --cacert "$PKI_DIR/ca.crt" -H "Authorization: Bearer $(<"$PKI_DIR/admin.token")" \
    "$SERVER_URL/readyz" 2>/dev/null | grep -qx ok
}

is_up() { running_pid etcd >/dev/null && running_pid kube-apiserver >/dev/null && apiserver_ready; }

show_log_tail() {
  local name
  for name in "$@"; do
    [[ -f $LOG_DIR/$name.log ]] || continue
    printf '\n----- last 40 lines of %s -----\n' "$LOG_DIR/$name.log" >&2
    tail -n 40 "$LOG_DIR/$name.log" >&2
  done
}

# ---------------------------------------------------------------------------------------------
# certificates, keys, kubeconfig

make_pki() {
  mkdir -p "$PKI_DIR"
  (
    cd "$PKI_DIR"
    umask 077
    # The CA that signs the serving certificate, and the serving certificate itself.
    openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
    openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=nbd-export-controller-test-ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -out ca.crt 2>/dev/null
    openssl ecparam -name prime256v1 -genkey -noout -out apiserver.key 2>/dev/null
    openssl req -new -key apiserver.key -subj "/CN=kube-apiserver" -out apiserver.csr 2>/dev/null
    cat >apiserver.ext <<EOF
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,IP:$SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 3650 \
      -extfile apiserver.ext -out apiserver.crt 2>/dev/null
    # The key pair that signs and verifies ServiceAccount tokens (TokenRequest API).
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    # The admin's static bearer token: token,user,uid,"groups".
    openssl rand -hex 32 >admin.token
    printf '%s,admin,admin,"system:masters"\n' "$(<admin.token)" >tokens.csv
    # The node's kubelet: a node identity, so the Node authorizer limits it to its own pods.
    openssl rand -hex 32 >kubelet.token
    printf '%s,system:node:%s,%s,"system:nodes"\n' "$(<kubelet.token)" "$NODE_NAME" "$NODE_NAME" >>tokens.csv
  ) || die "generating certificates and keys in $PKI_DIR failed"
}

# write_kubeconfig [FILE TOKEN_FILE USER]: the admin's by default
write_kubeconfig() {
  local file="${1:-$KUBECONFIG_FILE}" token_file="${2:-$PKI_DIR/admin.token}" user="${3:-admin}"
  local tmp="$file.tmp"
  (
    umask 077
    cat >"$tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: $SERVER_URL
    certificate-authority-data: $(base64 -w0 <"$PKI_DIR/ca.crt")
users:
- name: $user
  user:
    token: $(<"$token_file")
contexts:
- name: local
  context:
    cluster: local
    user: $user
    namespace: default
current-context: local
EOF
  )
  mv "$tmp" "$file"
}

# ---------------------------------------------------------------------------------------------
# subcommands

# up [--with-node]
cmd_up() {
  local with_node=""
  case "${1:-}" in
    --with-node) with_node=1 ;;
    "") ;;
    *) usage ;;
  esac
  if is_up && { [[ -z $with_node ]] || node_is_up; }; then
    log "control plane${with_node:+ and node} already up: $SERVER_URL"
    printf '%s\n' "$KUBECONFIG_FILE"
    return
  fi
  # Whatever is left of an earlier run (a process that died, a stale pid file) goes first.
  if compgen -G "$CLUSTER_DIR/*.pid" >/dev/null; then
    log "the control plane of $CLUSTER_DIR is not healthy: stopping what is left, starting anew"
  fi
  cmd_down
  cmd_build ${with_node:+--with-node} >/dev/null
  [[ -z $with_node ]] || node_check_host
  local port
  for port in "$ETCD_PORT" "$ETCD_PEER_PORT" "$APISERVER_PORT"; do
    port_in_use "$port" && die "port $port on 127.0.0.1 is in use (another control plane? set ETCD_PORT, ETCD_PEER_PORT, APISERVER_PORT)"
  done

  local started=$SECONDS
  mkdir -p "$CLUSTER_DIR" "$LOG_DIR"
  make_pki

  start etcd \
    --name=controlplane \
    --data-dir="$CLUSTER_DIR/etcd" \
    --listen-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="controlplane=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync \
    --log-level=warn
  local deadline=$((SECONDS + READY_TIMEOUT))
  until etcd_healthy; do
    if ! running_pid etcd >/dev/null || ((SECONDS >= deadline)); then
      show_log_tail etcd
      stop etcd
      die "etcd did not become healthy (log: $LOG_DIR/etcd.log)"
    fi
    sleep 0.2
  done

  start kube-apiserver \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --secure-port="$APISERVER_PORT" \
    --cert-dir="$PKI_DIR" \
    --tls-cert-file="$PKI_DIR/apiserver.crt" \
    --tls-private-key-file="$PKI_DIR/apiserver.key" \
    --token-auth-file="$PKI_DIR/tokens.csv" \
    --authorization-mode=Node,RBAC \
    --service-account-issuer="$SA_ISSUER" \
    --service-account-key-file="$PKI_DIR/sa.pub" \
    --service-account-signing-key-file="$PKI_DIR/sa.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --endpoint-reconciler-type=none \
    --allow-privileged=true \
    --kubelet-preferred-address-types=InternalIP \
    --profiling=false
  until apiserver_ready; do
    if ! running_pid kube-apiserver >/dev/null || ((SECONDS >= deadline)); then
      show_log_tail kube-apiserver etcd
      stop kube-apiserver
      stop etcd
      die "kube-apiserver did not become ready within ${READY_TIMEOUT}s (logs: $LOG_DIR)"
    fi
    sleep 0.25
  done
  write_kubeconfig
  log "control plane up in $((SECONDS - started))s: $SERVER_URL (etcd 127.0.0.1:$ETCD_PORT, state $CLUSTER_DIR)"
  if [[ -n $with_node ]]; then
    # A subshell, so that a failure inside (die, or errexit) ends only it and what it started is
    # stopped here; started in the background and waited for, because errexit does not apply
    # inside a subshell that is the left side of `||`.
    local node_started
    (node_up) &
    node_started=$!
    wait "$node_started" || {
      node_down
      stop kube-apiserver
      stop etcd
      die "the node did not start (logs: $LOG_DIR)"
    }
  fi
  printf '%s\n' "$KUBECONFIG_FILE"
}

cmd_down() {
  node_down
  stop kube-apiserver
  stop etcd
  # Everything but the logs, which stay for a look after a failed run (`up` starts them anew).
  if [[ -d $CLUSTER_DIR ]]; then
    rm -rf "$CLUSTER_DIR/etcd" "$PKI_DIR" "$KUBECONFIG_FILE" "$KUBECONFIG_FILE.tmp"
    rm -f "$CLUSTER_DIR"/*.pid
  fi
}

cmd_status() {
  if is_up; then
    printf 'up: %s (kubeconfig %s)\n' "$SERVER_URL" "$KUBECONFIG_FILE"
  else
    printf 'down\n'
    return 1
  fi
}

cmd_kubeconfig() {
  [[ -s $KUBECONFIG_FILE ]] && running_pid kube-apiserver >/dev/null ||
    die "no control plane runs for $CLUSTER_DIR: run hack/cluster.sh up"
  printf '%s\n' "$KUBECONFIG_FILE"
}

cmd_kubectl() {
  cmd_build >/dev/null
  if (($# == 0)); then
    printf '%s\n' "$KUBECTL"
    return
  fi
  [[ -s $KUBECONFIG_FILE ]] || die "no control plane runs for $CLUSTER_DIR: run hack/cluster.sh up"
  KUBECONFIG="$KUBECONFIG_FILE" exec "$KUBECTL" "$@"
}

cmd_env() {
  cmd_build >/dev/null
  printf 'export KUBECONFIG=%q\n' "$KUBECONFIG_FILE"
  printf 'export PATH=%q:"$PATH"\n' "$BIN_DIR"
}

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
  exit 2
}

case "${1:-}" in
  build) shift && cmd_build "$@" ;;
  up) shift && cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  kubeconfig) cmd_kubeconfig ;;
  kubectl) shift && cmd_kubectl "$@" ;;
  env) cmd_env ;;
  -h | --help | help) usage ;;
  *) usage ;;
esac
