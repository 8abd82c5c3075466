# Sourced by the server launchers in this directory (bash). Moves the calling process out of
# the pod's cgroup into the node's own cgroup `nbd-export-servers`, so that the NBD server it
# is about to become, and every connection it serves, outlive the pod: the runtime kills what
# is in a container's cgroup when the container ends, nothing else. The next pod adopts the
# servers through their pid files in the state directory (docs/kubernetes.md, "Servers that
# outlive the pod").
#
# NBD_SERVERS_CGROUP_ROOT is the host's cgroup file system mounted into the pod
# (manifests/daemonset.yaml mounts the host's /sys/fs/cgroup at /host/sys/fs/cgroup). Unset,
# nothing moves: the plain-host case, where the controller's own session is enough.
# shellcheck shell=bash

leave_pod_cgroup() {
  local root="${NBD_SERVERS_CGROUP_ROOT:-}" name="${NBD_SERVERS_CGROUP:-nbd-export-servers}" dir parent
  [[ -n $root ]] || return 0
  [[ -d $root ]] || {
    echo "server-launch: NBD_SERVERS_CGROUP_ROOT=$root is not a directory (is the host's /sys/fs/cgroup mounted?)" >&2
    return 1
  }
  if [[ -f $root/cgroup.controllers ]]; then
    # cgroup v2: one tree. A process may only move between cgroups its cgroup namespace can
    # see, and the pod has a namespace of its own: the launcher re-executes itself in the
    # host's (pid 1's; the pod shares the host's PID namespace) before it moves.
    if [[ $(readlink /proc/self/ns/cgroup) != "$(readlink /proc/1/ns/cgroup)" ]]; then
      exec nsenter --cgroup=/proc/1/ns/cgroup -- "$0" "$@"
    fi
    mkdir -p "$root/$name"
    echo $$ >"$root/$name/cgroup.procs"
    return
  fi
  # cgroup v1: one tree per controller (and maybe a named systemd one): move in each.
  for dir in "$root"/*/; do
    dir="${dir%/}"
    [[ -f $dir/cgroup.procs && ! -L $dir ]] || continue
    mkdir -p "$dir/$name"
    # A new cpuset has no CPUs and no memory nodes until given some: its parent's.
    if [[ -f $dir/$name/cpuset.cpus && ! -s $dir/$name/cpuset.cpus ]]; then
      parent="$dir"
      cat "$parent/cpuset.cpus" >"$dir/$name/cpuset.cpus"
      cat "$parent/cpuset.mems" >"$dir/$name/cpuset.mems"
    fi
    echo $$ >"$dir/$name/cgroup.procs"
  done
}
