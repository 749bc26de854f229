#!/usr/bin/env bash
# Build a local Debian bookworm base image offline (no registry needed) and import it.
#
#   docker/make-base-image.sh [TAG] [CACHE_DIR]
#
# TAG defaults to qlc-base:bookworm. The root file system is made with debootstrap from
# Debian's apt mirror and kept in CACHE_DIR (default /var/cache/qlc/bookworm-rootfs) so a
# second import needs no network. The image stands in for the pinned CUDA base in tests and
# air-gapped builds: `qlc build SPEC --base-image qlc-base:bookworm`.
set -euo pipefail

TAG="${1:-qlc-base:bookworm}"
CACHE_DIR="${2:-/var/cache/qlc/bookworm-rootfs}"
MIRROR="${QLC_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PACKAGES="python3,python3-pip,python3-venv,python-is-python3,ca-certificates"

die() { echo "make-base-image: $*" >&2; exit 1; }

command -v docker >/dev/null || die "docker CLI not found: run .ci/docker.sh (installs docker.io)"
command -v debootstrap >/dev/null || die "debootstrap not found: apt-get install -y debootstrap"
[ "$(id -u)" = 0 ] || die "debootstrap needs root: run as root (or with sudo)"

if [ ! -f "$CACHE_DIR/.qlc-complete" ]; then
    echo "make-base-image: debootstrap bookworm into $CACHE_DIR (about a minute)"
    rm -rf "$CACHE_DIR"
    mkdir -p "$(dirname "$CACHE_DIR")"
    tmp="$CACHE_DIR.tmp.$$"
    rm -rf "$tmp"
    debootstrap --variant=minbase --include="$PACKAGES" bookworm "$tmp" "$MIRROR" \
        || { rm -rf "$tmp"; die "debootstrap failed (is $MIRROR reachable?)"; }
    # Keep the image small: apt lists and caches are not needed at run time.
    rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*
    touch "$tmp/.qlc-complete"
    mv "$tmp" "$CACHE_DIR"
fi

# Trust what the host trusts: behind a TLS-inspecting proxy, pip inside the build needs the
# host's CA bundle (QLC_HOST_CA_BUNDLE= to keep Debian's own bundle).
HOST_CA="${QLC_HOST_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}"
if [ -n "$HOST_CA" ] && [ -f "$HOST_CA" ]; then
    cp "$HOST_CA" "$CACHE_DIR/etc/ssl/certs/ca-certificates.crt"
fi

echo "make-base-image: importing $CACHE_DIR as $TAG"
# pip may install into the system Python of this throwaway image (PEP 668 marker ignored).
tar -C "$CACHE_DIR" --exclude=./.qlc-complete -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' \
    --change 'ENV PIP_DISABLE_PIP_VERSION_CHECK=1' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'LABEL org.opencontainers.image.title=qlc-base' \
    --change 'LABEL org.opencontainers.image.description="Debian bookworm minbase with python3, made offline by docker/make-base-image.sh"' \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null
echo "make-base-image: $TAG ready ($(docker image inspect --format '{{.Id}}' "$TAG"))"
