#!/usr/bin/env bash
# The image tier: builds the gateway image (deploy/image/build.sh) and runs
# `meshup demo --check` from it as its non-root user: the image's container is mounted with
# buildah and the binary run in a chroot of it (`podman run` cannot run containers on
# machines without a full cgroup set-up; the chroot still proves the image holds every file
# the binary needs). Prints the image size.
#
#   bash deploy/image/check.sh [--binary PATH]   # PATH: skip the release build
#
# Needs root (buildah mount, chroot) and `bash .ci/setup deploy`.
set -euo pipefail
cd "$(dirname "$0")/../.."

tag=$(bash deploy/image/build.sh "$@")
echo "image: $tag"
container=$(buildah --storage-driver vfs from --quiet "$tag")
cleanup() {
  buildah --storage-driver vfs umount "$container" >/dev/null 2>&1 || true
  buildah --storage-driver vfs rm "$container" >/dev/null 2>&1 || true
}
trap cleanup EXIT
rootfs=$(buildah --storage-driver vfs mount "$container")

echo "image files:"
(cd "$rootfs" && find . -type f | sort | sed 's/^\./  /')
echo "== meshup demo --check in the image, as uid 65532"
chroot --userspec=65532:65532 "$rootfs" /usr/local/bin/meshup demo --check
size=$(buildah --storage-driver vfs images --format '{{.Size}}' "$tag")
echo "image size: $size"
