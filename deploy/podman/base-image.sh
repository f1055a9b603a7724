#!/usr/bin/env bash
# The local base image of the flwr-guard images, for a machine that reaches Debian's
# mirror but no image registry: a Debian bookworm root file system with python3.11,
# python3-venv and python-is-python3, bootstrapped with debootstrap and imported into
# the container engine's store as TAG (default localhost/debian-python:bookworm).
#
#   deploy/podman/base-image.sh [TAG]       (as root: debootstrap needs it)
#
# Idempotent and cached: does nothing when TAG is already in the engine's store (the
# engine keeps it between runs). The docker/Dockerfile builds FROM it with
#   --build-arg PYTHON_IMAGE=localhost/debian-python:bookworm
# and the compose cluster test uses it when no registry answers.
# Engine: docker when `docker info` answers, else podman with deploy/podman/containers.conf
# (CONTAINERS_CONF, unless set). Mirror: DEBIAN_MIRROR, else the host's apt mirror, else
# http://deb.debian.org/debian. Documentation and locales are left out (as in Debian's
# slim images).
set -euo pipefail
TAG="${1:-localhost/debian-python:bookworm}"
HERE="$(cd "$(dirname "$0")" && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$HERE/containers.conf}"

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then ENGINE=docker
elif command -v podman >/dev/null 2>&1; then ENGINE=podman
else echo "base-image: no container engine (docker or podman)" >&2; exit 1; fi

if "$ENGINE" image inspect "$TAG" >/dev/null 2>&1; then
  echo "base-image: $TAG is in $ENGINE's store"
  exit 0
fi
command -v debootstrap >/dev/null 2>&1 || { echo "base-image: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "base-image: debootstrap needs root" >&2; exit 1; }

MIRROR="${DEBIAN_MIRROR:-}"
if [ -z "$MIRROR" ]; then  # the host's mirror (deb822 sources, then sources.list)
  MIRROR="$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1 || true)"
  [ -n "$MIRROR" ] || MIRROR="$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -1 || true)"
  [ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
fi

ROOTFS="$(mktemp -d /var/tmp/flwr-guard-rootfs.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT
START=$(date +%s)
echo "base-image: debootstrap bookworm from $MIRROR into $ROOTFS"
debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
  bookworm "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || { tail -20 "$ROOTFS.log" >&2; rm -f "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"
# What a slim image leaves out: documentation (copyright files kept), manuals, locales,
# apt's caches and lists (`apt-get update` fetches them again), logs.
find "$ROOTFS/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
find "$ROOTFS/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/usr/share/locale/* \
  "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
  "$ROOTFS"/var/log/*.log "$ROOTFS"/var/log/apt/* "$ROOTFS"/var/cache/debconf/*-old
tar --numeric-owner -C "$ROOTFS" -c . | "$ENGINE" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$TAG" >/dev/null
echo "base-image: $TAG imported into $ENGINE's store in $(( $(date +%s) - START )) s" \
  "($("$ENGINE" image inspect "$TAG" --format '{{.Size}}') bytes)"
