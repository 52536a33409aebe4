#!/usr/bin/env bash
# The per-cluster etcd roles (deploy/README.md, "etcd"): each cluster's gateways log in as
# meshup-<cluster>, which may read the whole prefix and write only under its own cluster's
# keys. Idempotent: existing roles and users are kept (their grants are re-applied), and a
# password file that exists is used, not replaced.
#
#   bash deploy/kubernetes/etcd/roles.sh [--prefix /meshup] [--passwords DIR] [--enable-auth] CLUSTER...
#
# etcdctl reads the endpoints and client certificate from its environment
# (ETCDCTL_ENDPOINTS, ETCDCTL_CACERT, ETCDCTL_CERT, ETCDCTL_KEY; ETCDCTL_USER=root:... once
# authentication is on). Each user's password is DIR/meshup-<cluster> (made when missing);
# give it to that cluster's gateways as the `password` key of the meshup-etcd-client Secret.
# --enable-auth also creates the root user (password DIR/root) and turns authentication on.
set -euo pipefail

prefix=/meshup
passwords=.
enable_auth=false
clusters=()
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=${2:?--prefix needs a value}; shift 2 ;;
    --passwords) passwords=${2:?--passwords needs a directory}; shift 2 ;;
    --enable-auth) enable_auth=true; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "roles.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) clusters+=("$1"); shift ;;
  esac
done
if [ ${#clusters[@]} -eq 0 ]; then
  echo "roles.sh: name at least one cluster (see --help)" >&2
  exit 2
fi
prefix=${prefix%/}
mkdir -p "$passwords"

password_of() { # NAME: the password in DIR/NAME, made when missing
  local file="$passwords/$1"
  if [ ! -s "$file" ]; then
    (umask 077 && od -An -tx1 -N24 /dev/urandom | tr -d ' \n' >"$file")
  fi
  cat "$file"
}

ensure_user() { # NAME ROLE
  if ! etcdctl user get "$1" >/dev/null 2>&1; then
    etcdctl user add "$1" --new-user-password="$(password_of "$1")" >/dev/null
  fi
  etcdctl user grant-role "$1" "$2" >/dev/null
}

for cluster in "${clusters[@]}"; do
  case "$cluster" in
    *[!a-z0-9-]*|-*|*-) echo "roles.sh: $cluster is not a cluster name (a DNS label)" >&2; exit 2 ;;
  esac
  role=meshup-$cluster
  etcdctl role get "$role" >/dev/null 2>&1 || etcdctl role add "$role" >/dev/null
  etcdctl role grant-permission "$role" read --prefix=true "$prefix/" >/dev/null
  for part in clusters vips vip-claims; do
    etcdctl role grant-permission "$role" write --prefix=true "$prefix/v1/$part/$cluster/" >/dev/null
  done
  ensure_user "$role" "$role"
  echo "roles.sh: $role may write $prefix/v1/{clusters,vips,vip-claims}/$cluster/ (password in $passwords/$role)"
done

if $enable_auth; then
  etcdctl role get root >/dev/null 2>&1 || etcdctl role add root >/dev/null
  ensure_user root root
  etcdctl auth enable >/dev/null
  echo "roles.sh: authentication enabled (root's password in $passwords/root)"
fi
