#!/usr/bin/env bash
# Builds the gateway image offline with buildah (deploy/Containerfile): FROM scratch, the
# `meshup` binary (debug sections stripped), exactly the shared libraries `ldd` lists for
# it and the loader.
#
#   bash deploy/image/build.sh [--binary PATH] [--tag NAME]
#
# --binary: an already built `meshup` (default: `cargo build --release`, then
# $CARGO_TARGET_DIR or target/release/meshup). --tag: default localhost/meshup:<version>.
# Images go to buildah's vfs storage (works without overlay or fuse); prints the tag.
set -euo pipefail
cd "$(dirname "$0")/../.."

binary=
tag=
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=${2:?--binary needs a path}; shift 2 ;;
    --tag) tag=${2:?--tag needs a name}; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
tag=${tag:-localhost/meshup:$version}

if [ -z "$binary" ]; then
  cargo build --release --locked -p meshup-gateway --bin meshup >&2
  binary=${CARGO_TARGET_DIR:-target}/release/meshup
fi
[ -x "$binary" ] || { echo "build.sh: $binary is not an executable" >&2; exit 1; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/rootfs
mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp"
chmod 1777 "$root/tmp"
cp "$binary" "$root/usr/local/bin/meshup"
# The release profile keeps line tables for backtraces on the build machine (~118 MB); the
# image drops the debug sections but keeps the symbols, so a panic's backtrace still names
# the functions (~25 MB).
strip --strip-debug "$root/usr/local/bin/meshup"

# Every library the binary links, and the loader, at the path the binary asks for. Lines
# look like `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or
# `/lib64/ld-linux-x86-64.so.2 (0x…)`; linux-vdso is in the kernel.
libs=$(ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
[ -n "$libs" ] || { echo "build.sh: ldd lists no libraries for $binary (a static build needs none; drop this check)" >&2; exit 1; }
for lib in $libs; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# The names glibc's getpwuid and the logs show; uid 65532 is the image's default user.
printf 'root:x:0:0:root:/:/nonexistent\nmeshup:x:65532:65532:meshup:/:/nonexistent\n' >"$root/etc/passwd"
printf 'root:x:0:\nmeshup:x:65532:\n' >"$root/etc/group"

cp deploy/Containerfile "$stage/Containerfile"
buildah --storage-driver vfs bud --quiet --layers=false \
  --label org.opencontainers.image.title=meshup \
  --label org.opencontainers.image.version="$version" \
  -f "$stage/Containerfile" -t "$tag" "$stage" >/dev/null
echo "$tag"
