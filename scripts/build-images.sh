#!/usr/bin/env bash
# Builds every image in images/ with the tags the chart and the operator use, from one command:
#
#   scripts/build-images.sh            # CPU variants (this machine, CI, laptops)
#   scripts/build-images.sh --gpu      # CUDA variants of the rollout and gateway images
#   scripts/build-images.sh sandbox operator   # only some images
#
# It installs the container engine when it is missing (scripts/install-container-engine.sh) and,
# when the Dockerfiles' base image cannot be pulled (no registry reachable), creates a stand-in
# under the same name: a minimal Debian bookworm root file system from debootstrap with Debian's
# Python 3.11. Rebuilds reuse cached layers (and pip's cache mount), so an unchanged image takes
# seconds.
#
# Package registries: the RUN steps install from the package index this machine is configured
# for. The host's pip configuration, CA bundle and local wheel folders are mounted into the build
# (never copied into an image), so a machine behind a registry mirror builds the same images.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)"
REGISTRY="${FLOWLANE_IMAGE_REGISTRY:-ghcr.io/flowlane}"
BASE_IMAGE="docker.io/library/python:3.11.13-slim-bookworm"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
VARIANT=cpu
IMAGES=()
for arg in "$@"; do
    case "$arg" in
        --gpu) VARIANT=gpu ;;
        --cpu) VARIANT=cpu ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        operator|sandbox|learner|rollout|gateway) IMAGES+=("$arg") ;;
        *) echo "build-images: unknown argument '$arg' (images: operator sandbox learner rollout gateway; flags: --cpu --gpu)" >&2; exit 2 ;;
    esac
done
[ "${#IMAGES[@]}" -gt 0 ] || IMAGES=(operator sandbox learner rollout gateway)

bash scripts/install-container-engine.sh

log() { printf '[build-images %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

ensure_base_image() {
    if podman image exists "$BASE_IMAGE"; then
        return
    fi
    if timeout 60 podman pull --quiet "$BASE_IMAGE" >/dev/null 2>&1; then
        log "pulled $BASE_IMAGE"
        return
    fi
    log "$BASE_IMAGE cannot be pulled: building a stand-in from Debian bookworm (debootstrap)"
    local root
    root="$(mktemp -d /var/tmp/flowlane-base.XXXXXX)"
    trap 'rm -rf "$root"' RETURN
    debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-distutils,ca-certificates \
        bookworm "$root" "$DEBIAN_MIRROR" >/tmp/flowlane-debootstrap.log 2>&1 \
        || { tail -n 20 /tmp/flowlane-debootstrap.log >&2; echo "build-images: debootstrap failed (log: /tmp/flowlane-debootstrap.log)" >&2; exit 1; }
    # The official image's layout: `python` and `python3` on PATH in /usr/local/bin, no apt lists.
    ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python"
    ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python3"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
    tar -C "$root" -c . | podman import \
        --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        --message "flowlane stand-in for python:3.11.13-slim-bookworm (Debian bookworm, python3.11)" \
        - "$BASE_IMAGE" >/dev/null
    log "stand-in base image $BASE_IMAGE created"
}

# Build-time volumes that let RUN steps reach this machine's package index, read-only.
BUILD_VOLUMES=()
add_volume() { [ -e "$1" ] && BUILD_VOLUMES+=(--volume "$1:$1:ro"); return 0; }
for path in /etc/pip.conf /etc/xdg/pip "$HOME/.config/pip" /etc/ssl/certs /usr/share/ca-certificates /opt/wheels /opt/pypi /opt/pypi-more; do
    add_volume "$path"
done
if [ -d "$HOME/.config/pip" ]; then
    BUILD_VOLUMES+=(--volume "$HOME/.config/pip:/root/.config/pip:ro")
fi
# torch's CPU wheels come from download.pytorch.org on an open network; a machine whose own pip
# already finds the CPU build (a mirror or a local wheel folder) uses that instead.
TORCH_INDEX=(--build-arg "TORCH_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu")
if pip download --no-deps --quiet -d "$(mktemp -d)" "torch==2.13.0+cpu" >/dev/null 2>&1; then
    TORCH_INDEX=(--build-arg "TORCH_EXTRA_INDEX_URL=")
fi

build() {
    local name="$1" dockerfile="$2" target="$3" tag="$4"
    local started=$SECONDS
    local args=(build --network host --layers -f "$dockerfile" --build-arg "VERSION=$VERSION" -t "$tag")
    [ -n "$target" ] && args+=(--target "$target")
    log "building $tag"
    podman "${args[@]}" "${BUILD_VOLUMES[@]}" "${TORCH_INDEX[@]}" . >"/tmp/flowlane-build-$name.log" 2>&1 || {
        tail -n 40 "/tmp/flowlane-build-$name.log" >&2
        echo "build-images: $tag failed (full log: /tmp/flowlane-build-$name.log)" >&2
        exit 1
    }
    local size
    size="$(podman image inspect --format '{{.Size}}' "$tag")"
    log "built $tag in $((SECONDS - started)) s, $((size / 1024 / 1024)) MiB"
}

ensure_base_image
# What an earlier build tagged and this one replaced is left untagged; dropping those images
# keeps the disk from filling across rebuilds (the build cache of current images stays).
trap 'podman image prune --force >/dev/null 2>&1 || true' EXIT
suffix=""
[ "$VARIANT" = gpu ] && suffix="-gpu"
for image in "${IMAGES[@]}"; do
    case "$image" in
        operator) build operator images/Dockerfile.operator "" "$REGISTRY/flowlane-operator:$VERSION" ;;
        sandbox) build sandbox images/Dockerfile.sandbox "" "$REGISTRY/flowlane-sandbox:$VERSION" ;;
        learner) build learner images/Dockerfile.learner "$VARIANT" "$REGISTRY/flowlane-learner:$VERSION$suffix" ;;
        rollout) build rollout images/Dockerfile.rollout "rollout-$VARIANT" "$REGISTRY/flowlane-rollout:$VERSION$suffix" ;;
        gateway) build gateway images/Dockerfile.rollout "gateway-$VARIANT" "$REGISTRY/flowlane-gateway:$VERSION$suffix" ;;
    esac
done
