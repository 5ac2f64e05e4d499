#!/usr/bin/env bash
# Makes the image the Dockerfile starts from, debian:bookworm, without Docker Hub: debootstrap
# (minbase) from a Debian mirror into a temporary directory, imported into the local Docker daemon.
# `docker build` then finds debian:bookworm locally and pulls nothing.
#   scripts/debian-base-image.sh [MIRROR]     (default http://deb.debian.org/debian; as root)
# The image's apt sources are bookworm, bookworm-updates and bookworm-security on that mirror (the
# security suite at MIRROR-security, as deb.debian.org lays it out), as in Docker Hub's image.
set -euo pipefail
mirror=${1:-http://deb.debian.org/debian}
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase bookworm "$rootfs" "$mirror"
cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $mirror-security bookworm-security main
EOF
# Downloaded packages and package lists: every Dockerfile stage runs apt-get update first.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import --change 'CMD ["bash"]' - debian:bookworm
