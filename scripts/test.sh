#!/usr/bin/env bash
# `make test`: the whole suite, as two pytest sessions, with the images built beside the first.
#
#   1. scripts/build-images.sh starts in the background (a cold build takes 15-18 min on two
#      cores, most of it pip unpacking wheels into image layers; a warm one about a minute) while
#      every test that does not need the one-machine cluster runs.
#   2. Then the `cluster` tests run in a session of their own. Their pods take up to ~17 GiB of a
#      24 GiB machine; the first session's vLLM engine (~3 GiB) is gone by then, since it ends
#      with that session. Their `built_images` fixture re-checks the images, in seconds when the
#      build above succeeded, and shows the build's own error when it did not.
#
# Both sessions always run; the exit status is non-zero if either failed. Extra arguments go to
# both pytest sessions. The pytest script, not `python -m pytest`: the latter puts the repository
# root on sys.path, where the operator/ folder would shadow the standard library's operator module.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=(.venv/bin/pytest -q -p no:cacheprovider --durations=25)
mkdir -p build
images_log=build/build-images.log
started=$SECONDS
bash scripts/build-images.sh >"$images_log" 2>&1 &
builder=$!
# A test run that is stopped (Ctrl-C, CI's time limit) stops the build too.
trap 'kill "$builder" 2>/dev/null' EXIT

failed=()
session() {  # pytest's 5 is "no tests collected": arguments that select no test of one session
    local name=$1 code=0
    shift
    "${PYTEST[@]}" "$@" || code=$?
    if ((code != 0 && code != 5)); then failed+=("$name"); fi
}
session "tests" -m "not cluster" "$@"
if wait "$builder"; then
    echo "scripts/test.sh: images built; the build and the first session took $((SECONDS - started)) s together (log: $images_log)"
else
    echo "scripts/test.sh: building the images failed (log: $images_log):" >&2
    tail -n 20 "$images_log" >&2
fi
session "cluster tests" -m cluster "$@"
if ((${#failed[@]})); then
    echo "scripts/test.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
