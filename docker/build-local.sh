#!/usr/bin/env bash
# Build docker/Dockerfile.cpu with podman on a Debian machine that has no Docker daemon and no image
# registry, only PyPI and Debian's apt mirror (the development machine). Run as root from anywhere:
#   docker/build-local.sh
#   podman --runtime runc --cgroup-manager=cgroupfs run -d --name kvc-cpu --shm-size 1g \
#     -p 127.0.0.1:18080:8000 localhost/vllm-kvcompress:cpu      # ready in about 1.5 min
# Overrides: IMAGE (vllm-kvcompress:cpu), WHEELS (/opt/wheels: a dir holding the CPU torch wheel,
# as PyTorch's own index is unreachable), CA (/etc/ssl/certs/ca-certificates.crt), BASE_DIR.
set -euo pipefail

IMAGE=${IMAGE:-localhost/vllm-kvcompress:cpu}
BASE=localhost/debian:bookworm-slim
BASE_DIR=${BASE_DIR:-/var/tmp/debian-bookworm}
WHEELS=${WHEELS:-/opt/wheels}
CA=${CA:-/etc/ssl/certs/ca-certificates.crt}
# runc, not crun; cgroupfs, as there is no systemd to manage cgroups in this container-in-a-VM.
PODMAN=(podman --runtime runc --cgroup-manager=cgroupfs)
cd "$(dirname "$0")/.."

if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y podman runc debootstrap
fi

# podman's default ulimits cannot be set here (it fails creating any container): use none.
conf=/etc/containers/containers.conf
if ! grep -qs '^default_ulimits *= *\[\]' "$conf"; then
    grep -qs '^\[containers\]' "$conf" || printf '[containers]\n' >> "$conf"
    sed -i 's/^\[containers\]$/[containers]\ndefault_ulimits = []/' "$conf"
fi

# No registry to pull python:3.11-slim from: make a Debian bookworm base from the apt mirror.
if ! "${PODMAN[@]}" image exists "$BASE"; then
    if [ ! -x "$BASE_DIR/bin/sh" ]; then
        mirror=$(grep -rhoE 'https?://[^ ]*/debian/?$' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | head -1)
        debootstrap --variant=minbase bookworm "$BASE_DIR" "${mirror:-http://deb.debian.org/debian}"
    fi
    tar -C "$BASE_DIR" -c . | "${PODMAN[@]}" import - "$BASE"
fi

# Host network, so apt and pip reach what the host reaches; the host's CA bundle (the network
# intercepts TLS) and the torch wheel dir are bind-mounted into the RUN steps only, not the image.
start=$(date +%s)
"${PODMAN[@]}" build --network host -f docker/Dockerfile.cpu -t "$IMAGE" \
    --build-arg BASE="$BASE" \
    -v "$WHEELS:/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels --build-arg PIP_EXTRA_INDEX_URL= \
    -v "$CA:/run/build-ca.crt:ro" --build-arg PIP_CERT=/run/build-ca.crt \
    .
echo "built $IMAGE in $(( $(date +%s) - start )) s"
"${PODMAN[@]}" images "$IMAGE"
