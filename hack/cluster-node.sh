# Sourced by hack/cluster.sh: the node of `hack/cluster.sh up --with-node`. Beside etcd and
# kube-apiserver it runs kube-controller-manager, kube-scheduler, and one node, `node-1`: a
# kubelet on Debian's containerd and runc, on loopback (the node address $NODE_IP is on lo), with the
# controller's image (hack/image.sh) and a pause image built here already in containerd, so
# nothing is pulled. The node's address ($NODE_IP) is on lo. docs/control-plane.md, "The node", tells what each piece is for.
#
# Everything the node writes is under $CLUSTER_DIR/node (containerd's root and state, the
# kubelet's root directory, the CNI configuration), except what a node has to put on its host:
# kubelet's cgroups (kubepods), the node's address and the "kubernetes" Service's on lo with one
# iptables rule (below), and what pods write to their hostPath volumes. `down` removes all of
# it but the hostPath contents.
# shellcheck shell=bash

NODE_NAME="${NODE_NAME:-node-1}"
# The node's address. The kubelet refuses a loopback address (127.0.0.0/8) as a node IP, so the
# node gets one of its own on lo (from TEST-NET-2, which no real network uses): traffic to it
# never leaves the machine. Pods on the host network get it as status.hostIP.
NODE_IP="${NODE_IP:-198.51.100.10}"
NODE_STATE="$CLUSTER_DIR/node"
CONTAINERD_SOCKET="$NODE_STATE/containerd/containerd.sock"
KUBELET_PORT="${KUBELET_PORT:-10250}"
KUBELET_HEALTHZ_PORT="${KUBELET_HEALTHZ_PORT:-10248}"
CONTROLLER_MANAGER_PORT="${CONTROLLER_MANAGER_PORT:-10257}"
SCHEDULER_PORT="${SCHEDULER_PORT:-10259}"
PAUSE_IMAGE="localhost/pause:node"
# The cgroup the DaemonSet's servers move to (hack/image/server-launch/): `down` stops what is
# left in it, so no NBD server of a test outlives the cluster.
SERVERS_CGROUP="nbd-export-servers"
# The comment that marks our iptables rule, so `down` deletes that rule and no other.
IPTABLES_MARK="nbd-export-controller test node: kubernetes Service"

ctr_node() { ctr --address "$CONTAINERD_SOCKET" --namespace k8s.io "$@"; }

node_is_up() {
  running_pid containerd >/dev/null && running_pid kubelet >/dev/null &&
    running_pid kube-controller-manager >/dev/null && running_pid kube-scheduler >/dev/null &&
    [[ $("$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" get node "$NODE_NAME" \
      -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}

node_check_host() {
  local program
  for program in containerd runc ctr iptables /usr/lib/cni/bridge /usr/lib/cni/host-local /usr/lib/cni/loopback; do
    command -v "$program" >/dev/null 2>&1 || die "$program is needed for the node (hack/setup.sh installs it)"
  done
  [[ $(id -u) -eq 0 ]] || die "the node (containerd, kubelet) runs as root"
  local port
  for port in "$KUBELET_PORT" "$KUBELET_HEALTHZ_PORT" "$CONTROLLER_MANAGER_PORT" "$SCHEDULER_PORT"; do
    port_in_use "$port" && die "port $port on 127.0.0.1 is in use (another node? set KUBELET_PORT, KUBELET_HEALTHZ_PORT, CONTROLLER_MANAGER_PORT, SCHEDULER_PORT)"
  done
  return 0
}

# The pause image: the pause program (hack/controlplane/pause) alone in a layer.
node_pause_archive() {
  local dir="$NODE_STATE/pause"
  mkdir -p "$dir/rootfs"
  cp "$BIN_DIR/pause" "$dir/rootfs/pause"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$dir/rootfs" -cf "$dir/rootfs.tar" pause
  write_oci_archive "$dir/pause.oci.tar" "$PAUSE_IMAGE" "$dir/rootfs.tar" '{"Entrypoint": ["/pause"]}' >/dev/null
  printf '%s' "$dir/pause.oci.tar"
}

node_write_config() {
  mkdir -p "$NODE_STATE/containerd" "$NODE_STATE/cni/net.d" "$NODE_STATE/kubelet"
  # containerd 1.6's CRI: runc with cgroupfs (kubelet's driver here: no systemd), overlayfs,
  # the local pause image, and a CNI configuration of our own. Pods here use the host's
  # network; the CNI configuration is there because a node without one is never Ready.
  cat >"$NODE_STATE/containerd/config.toml" <<EOF
version = 2
root = "$NODE_STATE/containerd/root"
state = "$NODE_STATE/containerd/state"
[grpc]
  address = "$CONTAINERD_SOCKET"
[ttrpc]
  address = "$CONTAINERD_SOCKET.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # The kubelet asks for oom_score_adj down to -998 for sandboxes and critical pods; lowering it
  # needs CAP_SYS_RESOURCE, which a sandboxed machine may withhold even from root (runc then
  # fails with "can't get final child's PID from pipe"). Keep it no lower than containerd's.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$NODE_STATE/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE_STATE/cni/net.d"
EOF
  cat >"$NODE_STATE/cni/net.d/10-node.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "node",
  "plugins": [
    {
      "type": "bridge", "bridge": "nbdxnode0", "isGateway": true, "ipMasq": false,
      "ipam": { "type": "host-local", "ranges": [[{ "subnet": "10.244.0.0/24" }]], "dataDir": "$NODE_STATE/cni/ipam" }
    },
    { "type": "loopback" }
  ]
}
EOF
  write_kubeconfig "$NODE_STATE/kubelet/kubeconfig" "$PKI_DIR/kubelet.token" "system:node:$NODE_NAME"
  # The kubelet serves its API (logs, exec) on loopback only, to anyone: the API server calls it
  # without a client certificate. Image garbage collection is off: the images were imported,
  # and nothing could pull them back. No swap check, cgroup v1 allowed (this may be a VM that has
  # only v1).
  cat >"$NODE_STATE/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
authentication:
  anonymous: { enabled: true }
  webhook: { enabled: false }
authorization:
  mode: AlwaysAllow
containerRuntimeEndpoint: unix://$CONTAINERD_SOCKET
cgroupDriver: cgroupfs
failSwapOn: false
failCgroupV1: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: { memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%" }
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
serializeImagePulls: false
nodeStatusUpdateFrequency: 4s
syncFrequency: 10s
fileCheckFrequency: 10s
podLogsDir: $NODE_STATE/pod-logs
EOF
}

# Pods with hostNetwork get KUBERNETES_SERVICE_HOST/PORT, the "kubernetes" Service's address
# ($SERVICE_IP:443), for the in-cluster config. No kube-proxy runs here, so the node makes that
# address lead to the API server itself: the address on lo, and one rule that redirects its
# port 443 to the API server's port on loopback (the serving certificate names $SERVICE_IP).
node_service_route() {
  lo_has "$NODE_IP" || ip addr add "$NODE_IP/32" dev lo
  lo_has "$SERVICE_IP" || ip addr add "$SERVICE_IP/32" dev lo
  iptables -t nat -C OUTPUT -d "$SERVICE_IP/32" -p tcp --dport 443 -m comment --comment "$IPTABLES_MARK" \
    -j REDIRECT --to-ports "$APISERVER_PORT" 2>/dev/null ||
    iptables -t nat -A OUTPUT -d "$SERVICE_IP/32" -p tcp --dport 443 -m comment --comment "$IPTABLES_MARK" \
      -j REDIRECT --to-ports "$APISERVER_PORT"
}

# Whether lo has ADDRESS/32. (Not `ip | grep -q`: with pipefail, grep leaving early can fail it.)
lo_has() { [[ $(ip -o addr show dev lo 2>/dev/null) == *" $1/32 "* ]]; }

node_remove_service_route() {
  local rule
  while rule="$(iptables -t nat -S OUTPUT 2>/dev/null | grep -F -- "--comment \"$IPTABLES_MARK\"" | head -n1)" && [[ -n $rule ]]; do
    eval "iptables -t nat ${rule/-A /-D }" || break
  done
  local address
  for address in "$SERVICE_IP" "$NODE_IP"; do
    if lo_has "$address"; then ip addr del "$address/32" dev lo || true; fi
  done
}

wait_for() { # DESCRIPTION LOGS CHECK... : polls CHECK until it succeeds or READY_TIMEOUT passes
  local what="$1" logs="$2" deadline=$((SECONDS + READY_TIMEOUT))
  shift 2
  until "$@"; do
    if ((SECONDS >= deadline)); then
      # shellcheck disable=SC2086 # a list of names
      show_log_tail $logs
      die "$what within ${READY_TIMEOUT}s (logs: $LOG_DIR)"
    fi
    sleep 0.5
  done
}

containerd_ready() { ctr --address "$CONTAINERD_SOCKET" version >/dev/null 2>&1; }
node_ready() {
  [[ $("$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" get node "$NODE_NAME" \
    -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}
default_service_account() { "$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" -n default get serviceaccount default >/dev/null 2>&1; }

node_up() {
  local started=$SECONDS image_archive="${IMAGE_ARCHIVE:-}" image_name
  node_check_host
  if [[ -z $image_archive ]]; then
    log "building the controller's image (hack/image.sh; set IMAGE_ARCHIVE to use one built already)"
    image_archive="$("$ROOT/hack/image.sh" | tail -n1)"
  fi
  [[ -s $image_archive ]] || die "no image archive at $image_archive"
  node_write_config

  PROGRAM="$(command -v containerd)" start containerd --config "$NODE_STATE/containerd/config.toml"
  wait_for "containerd did not answer" containerd containerd_ready
  ctr_node images import "$(node_pause_archive)" >/dev/null || die "importing the pause image failed"
  image_name="$(tar -xOf "$image_archive" index.json | node -p 'JSON.parse(require("fs").readFileSync(0)).manifests[0].annotations["io.containerd.image.name"]')"
  ctr_node images import "$image_archive" >/dev/null || die "importing $image_archive failed"
  # The CRI looks an image up by its normalized reference: a short name such as
  # nbd-export-controller:0.1.0 (manifests/) is looked up in the reference grammar's default
  # domain and "library/" path. Tag it so, so pods that name it short find it (nothing is pulled:
  # imagePullPolicy IfNotPresent finds it present).
  if [[ $image_name != */* || ${image_name%%/*} != *[.:]* && ${image_name%%/*} != localhost ]]; then
    local normalized="$image_name"
    [[ $normalized == */* ]] || normalized="library/$normalized"
    ctr_node images tag --force "$image_name" "docker.io/$normalized" >/dev/null
  fi
  log "containerd holds $image_name and $PAUSE_IMAGE"

  node_service_route
  node_share_mounts
  node_save_sysctls
  local kubeconfig_args=(--kubeconfig="$KUBECONFIG_FILE")
  start kube-controller-manager "${kubeconfig_args[@]}" \
    --bind-address=127.0.0.1 --secure-port="$CONTROLLER_MANAGER_PORT" \
    --leader-elect=false \
    --root-ca-file="$PKI_DIR/ca.crt" \
    --service-account-private-key-file="$PKI_DIR/sa.key" \
    --use-service-account-credentials=false
  start kube-scheduler "${kubeconfig_args[@]}" \
    --bind-address=127.0.0.1 --secure-port="$SCHEDULER_PORT" --leader-elect=false
  start kubelet \
    --config="$NODE_STATE/kubelet/config.yaml" \
    --kubeconfig="$NODE_STATE/kubelet/kubeconfig" \
    --root-dir="$NODE_STATE/kubelet/root" \
    --cert-dir="$NODE_STATE/kubelet/pki" \
    --hostname-override="$NODE_NAME" \
    --node-ip="$NODE_IP"
  wait_for "node $NODE_NAME did not become Ready" "kubelet containerd kube-controller-manager" node_ready
  # Pods that name no ServiceAccount need the namespace's "default" one, which the controller
  # manager creates.
  wait_for "the default ServiceAccount did not appear" kube-controller-manager default_service_account
  log "node $NODE_NAME up in $((SECONDS - started))s (address $NODE_IP on lo, containerd $NODE_STATE/containerd, kubelet $NODE_IP:$KUBELET_PORT)"
}

# Stops the node's pods' containers, the kubelet, containerd and the controllers; then removes
# what the node left on the host: mounts under $NODE_STATE, the servers the DaemonSet left in
# their cgroup, kubelet's cgroups, the service route. Safe to run when nothing runs; does
# nothing for a control plane that never had a node (its `down` must not touch another's).
node_down() {
  [[ -d $NODE_STATE ]] || return 0
  stop kubelet
  stop kube-scheduler
  stop kube-controller-manager
  if running_pid containerd >/dev/null; then
    local task
    for task in $(ctr_node tasks list -q 2>/dev/null); do ctr_node tasks kill --signal SIGKILL "$task" >/dev/null 2>&1 || true; done
    local i
    for ((i = 0; i < 50; i++)); do
      [[ -z $(ctr_node tasks list -q 2>/dev/null | while read -r t; do ctr_node tasks ps "$t" 2>/dev/null | tail -n +2; done) ]] && break
      sleep 0.2
    done
  fi
  stop containerd
  # containerd's shims outlive it; each ends when its container's task is gone.
  pkill_shims
  node_stop_servers
  node_restore_sysctls
  node_restore_mounts
  # Pod volumes (tmpfs for tokens), container root file systems and sandboxes' /dev/shm are
  # mounted under $NODE_STATE: unmount, deepest first, before anything there is removed.
  local mount link
  while read -r mount; do
    umount -l "$mount" 2>/dev/null || true
  done < <(awk -v root="$NODE_STATE/" 'index($5, root) == 1 { print $5 }' /proc/self/mountinfo | sort -r)
  # The kubelet links each container's log into /var/log/containers (a fixed path).
  for link in /var/log/containers/*.log; do
    if [[ -L $link && $(readlink "$link") == "$NODE_STATE/"* ]]; then rm -f "$link"; fi
  done
  rm -rf --one-file-system "$NODE_STATE"
  # containerd puts its shims' sockets under /run/containerd whatever its state directory:
  # remove what is left there empty (a containerd of the host's own keeps its entries).
  [[ -d /run/containerd ]] && find /run/containerd -depth -type d -empty -delete 2>/dev/null
  node_remove_cgroups kubepods
  node_remove_service_route
}

# The DaemonSet mounts /dev and /var/lib/nbd-exports with HostToContainer propagation, which
# the runtime refuses unless the host's mount is shared (or a slave). A systemd host shares
# every mount; a machine without systemd (a VM's own init, a container) may have them private.
# Then the node makes / shared, recursively, as a kubelet host has it, and `down` puts it back.
node_share_mounts() {
  [[ $(findmnt -no PROPAGATION /) == private ]] || return 0
  mount --make-rshared /
  touch "$NODE_STATE/mounts-were-private"
}
node_restore_mounts() {
  [[ -f $NODE_STATE/mounts-were-private ]] || return 0
  mount --make-rprivate /
}

# The kubelet sets these kernel settings at start (it cannot be told not to); `down` puts back
# the values the host had.
KUBELET_SYSCTLS=(vm/overcommit_memory kernel/panic kernel/panic_on_oops)
node_save_sysctls() {
  local key
  for key in "${KUBELET_SYSCTLS[@]}"; do
    printf '%s %s\n' "$key" "$(<"/proc/sys/$key")"
  done >"$NODE_STATE/sysctls.saved"
}
node_restore_sysctls() {
  local key value
  [[ -f $NODE_STATE/sysctls.saved ]] || return 0
  while read -r key value; do
    echo "$value" >"/proc/sys/$key" || true
  done <"$NODE_STATE/sysctls.saved"
}

# containerd-shim-runc-v2 processes whose containerd is ours (their -address names our socket).
pkill_shims() {
  local pid cmdline
  for pid in $(pgrep -x containerd-shim-runc-v2 2>/dev/null || true); do
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
    [[ $cmdline == *"-address $CONTAINERD_SOCKET "* ]] && kill -TERM "$pid" 2>/dev/null || true
  done
}

# The NBD servers the DaemonSet's pods started outlive the pods, by design (they are in the
# node's $SERVERS_CGROUP cgroup); the test node is gone now, so they go too.
node_stop_servers() {
  local procs pid any=0
  for procs in /sys/fs/cgroup/$SERVERS_CGROUP/cgroup.procs /sys/fs/cgroup/*/$SERVERS_CGROUP/cgroup.procs; do
    [[ -f $procs ]] || continue
    while read -r pid; do
      kill -TERM "$pid" 2>/dev/null && any=1
    done <"$procs"
  done
  ((any)) && sleep 1
  for procs in /sys/fs/cgroup/$SERVERS_CGROUP/cgroup.procs /sys/fs/cgroup/*/$SERVERS_CGROUP/cgroup.procs; do
    [[ -f $procs ]] || continue
    while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done <"$procs"
  done
  node_remove_cgroups "$SERVERS_CGROUP"
}

# Removes a cgroup and every cgroup below it, in every hierarchy, once they are empty.
node_remove_cgroups() {
  local name="$1" dir
  for dir in /sys/fs/cgroup/"$name" /sys/fs/cgroup/*/"$name"; do
    [[ -d $dir ]] || continue
    find "$dir" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}
