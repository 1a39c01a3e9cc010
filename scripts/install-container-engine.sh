#!/usr/bin/env bash
# Installs and configures the container engine that builds and runs flowlane's images on one
# machine: Debian's podman with the runc runtime (crun refuses hybrid cgroup layouts, which VMs
# such as this project's CI machines have), plus debootstrap for the stand-in base image.
# Idempotent: a second run only checks. Needs root (apt-get) unless podman is already there.
set -euo pipefail

if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
    if [ "$(id -u)" != 0 ]; then
        echo "install-container-engine: podman, runc and debootstrap are missing; run this as root" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends podman runc debootstrap uidmap slirp4netns \
        fuse-overlayfs netavark aardvark-dns iptables >/dev/null
fi

# runc, and no default ulimits: podman's defaults raise RLIMIT_NPROC/NOFILE, which an unprivileged
# VM sandbox refuses ("setrlimit: operation not permitted"). A file of our own wins over the
# distribution's defaults without editing them.
conf_dir=/etc/containers/containers.conf.d
conf="$conf_dir/50-flowlane.conf"
if [ "$(id -u)" = 0 ] && [ ! -f "$conf" ]; then
    mkdir -p "$conf_dir"
    cat >"$conf" <<'EOF'
# Written by flowlane's scripts/install-container-engine.sh.
[containers]
default_ulimits = []

[engine]
runtime = "runc"
EOF
fi

podman_version="$(podman --version)"
echo "container engine: ${podman_version}, runtime $(podman info --format '{{.Host.OCIRuntime.Name}}')"
