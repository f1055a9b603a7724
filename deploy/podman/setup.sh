#!/usr/bin/env bash
# What the compose cluster test (tests/test_deploy_compose_cluster.py) needs, set up by
# `make test` (its `engine` step) on a Debian machine:
#   1. a container engine that runs: Docker when `docker info` answers; otherwise
#      Debian's podman with runc, configured by deploy/podman/containers.conf
#      (CONTAINERS_CONF, unless set), installed with apt-get when `podman info` fails;
#   2. a base image for the flwr-guard images: nothing to do when an image registry
#      answers; otherwise localhost/debian-python:bookworm, bootstrapped with debootstrap
#      by deploy/podman/base-image.sh when it is not already in the engine's store.
# Each step runs only when needed (the engine keeps the image between runs). It never
# fails `make`: what it cannot do it says, and the cluster test then fails naming it.
# FLWR_GUARD_SKIP_CLUSTER=1 skips everything (the test is then switched off too).
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$HERE/containers.conf}"
PYTHON="${PYTHON:-python3}"

if [ "${FLWR_GUARD_SKIP_CLUSTER:-}" = 1 ]; then
  echo "engine: FLWR_GUARD_SKIP_CLUSTER=1, the compose cluster test is off: nothing to set up"
  exit 0
fi

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
apt_install() {  # apt_install PKG... ; returns non-zero when apt cannot
  command -v apt-get >/dev/null 2>&1 || { echo "engine: no apt-get to install $*"; return 1; }
  echo "engine: installing $* (apt)"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    --no-install-recommends "$@" >/dev/null
}

engine_runs() {
  { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; } ||
  { command -v podman >/dev/null 2>&1 && podman info >/dev/null 2>&1; }
}

if ! engine_runs; then
  # podman and runc; CNI's dnsname plugin (with dnsmasq) resolves the compose services'
  # names; iptables for CNI's bridge; uidmap, slirp4netns and fuse-overlayfs for rootless
  # use; debootstrap for the base image.
  apt_install podman runc golang-github-containernetworking-plugin-dnsname dnsmasq-base iptables \
    uidmap slirp4netns fuse-overlayfs debootstrap ||
    echo "engine: could not install podman; the compose cluster test will fail and say why"
  if ! engine_runs; then
    echo "engine: no container engine runs here (podman info: $(podman info 2>&1 | tail -1));" \
      "the compose cluster test will fail and say why"
    exit 0
  fi
fi

if "$PYTHON" -c "
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen('https://registry-1.docker.io/v2/', timeout=5)
except urllib.error.HTTPError:
    pass
except OSError:
    sys.exit(1)"; then
  echo "engine: an image registry answers: the images build from the Dockerfile's base image"
  exit 0
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  apt_install debootstrap || true
fi
bash "$HERE/base-image.sh" ||
  echo "engine: could not bootstrap the base image; the compose cluster test will fail and say why"
exit 0
