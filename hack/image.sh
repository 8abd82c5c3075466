#!/usr/bin/env bash
# Builds the controller's container image as an OCI image archive, on a bare Debian machine,
# without a container engine and without pulling anything from a container registry:
#
#   1. the project's build: `npm run build` (dist/), and the production npm dependencies
#      (`npm ci --omit=dev`, from package-lock.json) in a staging directory;
#   2. the root file system, by mmdebstrap from Debian bookworm's packages: the `essential`
#      set (dpkg, bash, coreutils, …) plus nbd-server, qemu-utils (qemu-img),
#      qemu-system-common (qemu-storage-daemon), libnbd-bin (nbdinfo, nbdcopy), iptables
#      (client rules on exports' own ports) and ca-certificates (as Containerfile), without
#      recommends, documentation, manual pages or translations; the staging directory
#      becomes /app (the pinned Node 24 runtime, dist/, bin/, node_modules/, package.json);
#   3. that file system as the one layer of an OCI image (config, manifest, index written
#      here), packed as an OCI archive that `ctr images import`, `podman load` and
#      `skopeo copy oci-archive:…` read.
#
# The result is the image `Containerfile` describes (same packages, same /app, same
# entrypoint, PATH and NODE_ENV), built without a base image.
#
# Reproducible: SOURCE_DATE_EPOCH (if not set already) is the last commit's time; mmdebstrap
# then clamps every mtime to it and leaves out what differs between runs (machine-id, logs,
# caches), the layer is compressed without a name or time, and the JSON is written in a fixed
# order. Two builds from the same commit and the same Debian package versions give the same
# digest. The package
# versions are those the Debian mirror serves that day (point releases and security updates
# change them); /app/debian-packages.txt in the image lists them.
#
#   hack/image.sh            prints the path of the OCI archive, last, on stdout
#
# Environment:
#   IMAGE_NAME       the image's name                 (default: nbd-export-controller:<package.json version>,
#                                                       the name manifests/ uses)
#   IMAGE_DIR        where the archive goes            (default: .cache/image)
#   APT_SOURCES      the Debian sources mmdebstrap uses (default: this machine's debian.sources or
#                                                       sources.list, so the same mirror or proxy)
#
# Needs root (mmdebstrap's root mode), mmdebstrap, and what hack/setup.sh installs.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/image/oci-archive.sh"
cd "$ROOT"

command -v mmdebstrap >/dev/null 2>&1 || die "mmdebstrap is needed (hack/setup.sh installs it)"
[[ $(id -u) -eq 0 ]] || die "building the root file system needs root"

version="$(node -p 'require("./package.json").version')"
IMAGE_NAME="${IMAGE_NAME:-nbd-export-controller:$version}"
IMAGE_DIR="$(realpath -m "${IMAGE_DIR:-$ROOT/.cache/image}")"
if [[ -z ${APT_SOURCES:-} ]]; then
  for candidate in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    [[ -s $candidate ]] && APT_SOURCES="$candidate" && break
  done
fi
[[ -s ${APT_SOURCES:-} ]] || die "no Debian sources to build from: set APT_SOURCES to a sources.list or .sources file"

SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}"
export SOURCE_DATE_EPOCH

packages=(nbd-server qemu-utils qemu-system-common libnbd-bin iptables ca-certificates)
archive="$IMAGE_DIR/nbd-export-controller-$version.oci.tar"
work="$IMAGE_DIR/work"
started=$SECONDS
rm -rf "$work"
mkdir -p "$work/app"

# ---- 1. the project's build
log "building the controller (dist/) and its production dependencies"
npm run --silent build
cp -a package.json package-lock.json bin dist "$work/app/"
mkdir -p "$work/app/.tools"
cp -a "$NODE_DIR" "$work/app/.tools/"
(cd "$work/app" && npm ci --omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error)
rm -f "$work/app/package-lock.json"
# Type declarations and source maps are for editors and debuggers, not for running: about a
# fifth of node_modules (the Kubernetes client's generated typings alone are 30 MB).
find "$work/app/node_modules" -type f \( -name '*.d.ts' -o -name '*.d.mts' -o -name '*.d.cts' -o -name '*.map' \) -delete
# What the servers' launchers need (manifests/daemonset.yaml puts this directory first in PATH).
cp -a hack/image/server-launch "$work/app/server-launch"

# ---- 2. the root file system
log "building the root file system from Debian bookworm with mmdebstrap (${packages[*]})"
# The merged-/usr hook makes the /bin → usr/bin links itself; otherwise apt satisfies bookworm's
# need for merged /usr with the usrmerge package, which brings Perl (about 25 MB).
nice -n 10 mmdebstrap --quiet --mode=root --variant=essential --format=tar \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --include="$(
    IFS=,
    echo "${packages[*]}"
  )" \
  --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --customize-hook='chroot "$1" dpkg-query -W -f "\${Package} \${Version}\n" >"$1/debian-packages.txt"' \
  --customize-hook='mkdir "$1/app"' \
  --customize-hook="sync-in $work/app /app" \
  --customize-hook='mv "$1/debian-packages.txt" "$1/app/debian-packages.txt"' \
  --customize-hook='rm -rf "$1"/var/cache/* "$1"/var/log/* "$1"/usr/share/qemu/*.rom "$1"/usr/share/qemu/*.bin "$1"/usr/share/qemu/*.img "$1"/usr/share/qemu/*.fd' \
  bookworm "$work/rootfs.tar" "$APT_SOURCES"

# ---- 3. the OCI image and its archive
log "writing the OCI image"
# What Containerfile's last stage sets: PATH with /app/bin, NODE_ENV, the entrypoint, labels.
manifest_digest="$(write_oci_archive "$archive" "$IMAGE_NAME" "$work/rootfs.tar" '{
  "Env": ["PATH=/app/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "NODE_ENV=production"],
  "Entrypoint": ["/app/bin/nbd-export-controller", "run", "--source", "kube"],
  "WorkingDir": "/app",
  "Labels": {
    "org.opencontainers.image.title": "nbd-export-controller",
    "org.opencontainers.image.description": "Turns NbdExport resources into NBD exports on storage hosts",
    "org.opencontainers.image.licenses": "Apache-2.0"
  }
}')"
log "image $IMAGE_NAME in $((SECONDS - started))s: $(du -h "$archive" | cut -f1) compressed," \
  "$(du -h "$work/rootfs.tar" | cut -f1) unpacked, $(tar -tf "$work/rootfs.tar" | wc -l) files; manifest $manifest_digest"
rm -rf "$work"
printf '%s\n' "$archive"
