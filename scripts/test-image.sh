#!/usr/bin/env bash
# `make test-image`: build docker/Dockerfile with a real container engine and test the running container.
#
#   bash scripts/test-image.sh          # the CPU flavour (what CI runs)
#   bash scripts/test-image.sh gpu      # the GPU flavour: builds it and runs what needs no GPU (docs/DEPLOY.md)
#
# Steps: a container engine (podman, installed with apt when missing and this user is root), the Debian base
# image (made with debootstrap once, then cached in the engine's store), the image build with only this host's
# needs as build arguments (scripts/image/build.sh), then tests/image against containers on 127.0.0.1.
# Exits 0 with a loud SKIPPED banner when there is no engine and no way to install one, or when the package
# registries cannot be reached at all; any other failure fails the target.
set -euo pipefail
cd "$(dirname "$0")/.."

FLAVOUR="${1:-cpu}"
case "$FLAVOUR" in
    cpu | gpu) ;;
    *)
        echo "usage: $0 [cpu|gpu]" >&2
        exit 2
        ;;
esac
PY="${PY:-.venv/bin/python}"
TAG="${NUWA_TEST_IMAGE_TAG:-localhost/nuwa-serve:$FLAVOUR-test}"

source scripts/image/common.sh
source scripts/image/engine.sh
source scripts/image/base.sh
source scripts/image/build.sh

human_size() {
    awk -v bytes="$1" 'BEGIN { printf "%.2f GB (%d MiB)", bytes / 1e9, bytes / 1048576 }'
}

run() {
    local started report size status=0
    started=$(date +%s)
    ensure_engine
    if ! reachable "$(pip_index_url)/pip/"; then
        skip_loudly "the Python package index $(pip_index_url) cannot be reached: the image cannot be built"
    fi
    ensure_base_image
    build_image "$FLAVOUR" "$TAG"
    size=$($ENGINE image inspect --format '{{.Size}}' "$TAG")
    log "built $TAG in ${BUILD_SECONDS} s (${CACHED_STEPS} steps from the layer cache); image size $(human_size "$size")"

    report=$(mktemp /tmp/nuwa-image-report.XXXXXX.jsonl)
    NUWA_IMAGE_UNDER_TEST="$TAG" NUWA_IMAGE_ENGINE="$ENGINE" NUWA_IMAGE_FLAVOUR="$FLAVOUR" \
        NUWA_IMAGE_REPORT="$report" HF_HUB_OFFLINE=1 \
        timeout 900 "$PY" -m pytest -q -p no:cacheprovider tests/image || status=$?

    log "summary ($FLAVOUR flavour, $($ENGINE --version)):"
    log "  build ${BUILD_SECONDS} s (${CACHED_STEPS} cached steps), image $(human_size "$size")"
    "$PY" - "$report" <<'EOF' >&2
import json, sys
for line in open(sys.argv[1], encoding="utf-8"):
    for key, value in json.loads(line).items():
        print(f"[test-image]   {key}: {value}")
EOF
    rm -f "$report"
    log "total $(($(date +%s) - started)) s"
    return "$status"
}

# run in a subshell with errexit in force (a `(run) || ...` would switch it off inside), so that skip_loudly's
# exit and any failing step end it; its status decides.
set +e
(
    set -e
    run
)
status=$?
set -e
if [ "$status" -eq "$SKIP_CODE" ]; then
    exit 0
fi
exit "$status"
