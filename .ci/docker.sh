#!/usr/bin/env bash
# Make sure a Docker daemon answers and the offline base image exists. Idempotent: each step
# runs only when needed, so CI and the test fixture can call it every time.
#
#   .ci/docker.sh            install docker.io, debootstrap and docker-registry (the local
#                            registry the push tests use) if missing, start dockerd, build
#                            qlc-base:bookworm if absent
#   QLC_DOCKER_TIMEOUT=60    seconds to wait for the daemon (default 60)
#   QLC_BASE_IMAGE=TAG       base image tag to make (default qlc-base:bookworm)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
TIMEOUT="${QLC_DOCKER_TIMEOUT:-60}"
BASE_TAG="${QLC_BASE_IMAGE:-qlc-base:bookworm}"
LOG="${QLC_DOCKERD_LOG:-/var/log/qlc-dockerd.log}"

say() { echo "ci/docker: $*"; }
die() { echo "ci/docker: error: $*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@";
    else die "need root for: $* (run as root or install sudo)"; fi
}

install_packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v docker-registry >/dev/null || missing+=(docker-registry)
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

daemon_answers() { docker info >/dev/null 2>&1; }

start_daemon() {
    daemon_answers && { say "daemon already answering"; return 0; }
    say "starting dockerd (log: $LOG)"
    as_root mkdir -p "$(dirname "$LOG")"
    # setsid: the daemon outlives this script and the CI step that called it.
    as_root setsid dockerd >"$LOG" 2>&1 < /dev/null &
    local waited=0
    until daemon_answers; do
        if [ "$waited" -ge "$TIMEOUT" ]; then
            tail -n 20 "$LOG" >&2 || true
            die "dockerd did not answer within ${TIMEOUT}s (see $LOG above)"
        fi
        sleep 1
        waited=$((waited + 1))
    done
    say "daemon answering after ${waited}s"
}

ensure_base_image() {
    if docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
        say "base image $BASE_TAG present"
        return 0
    fi
    as_root "$ROOT/docker/make-base-image.sh" "$BASE_TAG"
}

install_packages
start_daemon
ensure_base_image
