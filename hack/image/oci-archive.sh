# Sourced by hack/image.sh and hack/cluster-node.sh: writes an OCI image archive of one layer,
# with no container engine. Both the controller's image and the node's pause image are made so.
# shellcheck shell=bash

# write_oci_archive ARCHIVE NAME ROOTFS_TAR CONFIG_JSON
#   ARCHIVE      the OCI archive to write (a tar of an OCI image layout)
#   NAME         the image's name, as `ctr images import` names it (io.containerd.image.name)
#   ROOTFS_TAR   the layer: an uncompressed tar of the root file system (left in place)
#   CONFIG_JSON  the image config's "config" object (Entrypoint, Env, …)
# Reproducible: times come from SOURCE_DATE_EPOCH (0 if unset), gzip writes no name or time,
# the JSON has a fixed order and the archive is sorted, owned by root, with fixed mtimes.
write_oci_archive() {
  local archive="$1" name="$2" rootfs="$3" config="$4" layout epoch="${SOURCE_DATE_EPOCH:-0}"
  layout="$(mktemp -d "${archive}.layout.XXXXXX")"
  mkdir -p "$layout/blobs/sha256"
  gzip -n -6 <"$rootfs" >"$layout/layer.tar.gz"
  node - "$layout" "$name" "$rootfs" "$config" "$epoch" <<'NODE' || return 1
const fs = require('node:fs');
const { createHash } = require('node:crypto');
const [layout, name, rootfs, configJson, epoch] = process.argv.slice(2);
const sha256 = (data) => `sha256:${createHash('sha256').update(data).digest('hex')}`;
const blob = (data) => {
  const digest = sha256(data);
  fs.writeFileSync(`${layout}/blobs/sha256/${digest.slice(7)}`, data);
  return { digest, size: data.length };
};
const layer = fs.readFileSync(`${layout}/layer.tar.gz`);
fs.rmSync(`${layout}/layer.tar.gz`);
const created = new Date(Number(epoch) * 1000).toISOString().replace(/\.000Z$/, 'Z');
const config = blob(
  Buffer.from(
    JSON.stringify({
      created,
      architecture: 'amd64',
      os: 'linux',
      config: JSON.parse(configJson),
      rootfs: { type: 'layers', diff_ids: [sha256(fs.readFileSync(rootfs))] },
      history: [{ created, created_by: 'hack/image/oci-archive.sh' }],
    }),
  ),
);
const manifest = blob(
  Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', ...config },
      layers: [{ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', ...blob(layer) }],
    }),
  ),
);
// containerd names an imported image by io.containerd.image.name; podman and skopeo read the
// tag from org.opencontainers.image.ref.name.
const tag = name.slice(name.lastIndexOf(':') + 1);
fs.writeFileSync(
  `${layout}/index.json`,
  JSON.stringify({
    schemaVersion: 2,
    mediaType: 'application/vnd.oci.image.index.v1+json',
    manifests: [
      {
        mediaType: 'application/vnd.oci.image.manifest.v1+json',
        ...manifest,
        annotations: { 'io.containerd.image.name': name, 'org.opencontainers.image.ref.name': tag },
      },
    ],
  }),
);
fs.writeFileSync(`${layout}/oci-layout`, JSON.stringify({ imageLayoutVersion: '1.0.0' }));
console.log(manifest.digest);
NODE
  tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner \
    -C "$layout" -cf "$archive.tmp" oci-layout index.json blobs
  mv "$archive.tmp" "$archive"
  rm -rf "$layout"
}
