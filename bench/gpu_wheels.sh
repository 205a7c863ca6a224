#!/usr/bin/env bash
# Download, on a machine WITH a package registry, the wheels bench/gpu_check.sh installs on the GPU machine,
# which reaches no registry: bench/gpu_requirements.txt and its dependencies, for CPython 3.12 manylinux x86_64,
# into bench/gpu_wheels/ (git-ignored; it travels with the run tool's `carry`).
#
# Packages the GPU machine already has because torch 2.11, torchvision and transformers 5.17 need them are left
# out to keep the carry small (the working tree + carry must stay under 64 MiB): see ASSUMED_PRESENT.
# `--check` then proves, offline, that the folder plus those packages resolves the requirements.
#
# Usage: bench/gpu_wheels.sh [--check]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[[ -x $PY ]] || PY=/work/main/.venv/bin/python
OUT=bench/gpu_wheels
SIDE=${TMPDIR:-/tmp}/nuwa-gpu-wheels-assumed
REQ=bench/gpu_requirements.txt
ASSUMED_PRESENT=(numpy tokenizers safetensors regex pyyaml pillow)
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64)

normalise() { echo "$1" | tr 'A-Z_.' 'a-z--'; }

if [[ "${1:-}" != "--check" ]]; then
    rm -rf "$OUT" "$SIDE"
    mkdir -p "$OUT" "$SIDE"
    "$PY" -m pip download -q "${TARGET[@]}" -d "$OUT" -r "$REQ"
    for wheel in "$OUT"/*.whl; do
        name=$(normalise "$(basename "$wheel" | cut -d- -f1)")
        for assumed in "${ASSUMED_PRESENT[@]}"; do
            if [[ $name == "$(normalise "$assumed")" ]]; then mv "$wheel" "$SIDE/"; fi
        done
    done
fi
echo "bench/gpu_wheels: $(ls "$OUT"/*.whl | wc -l) wheels, $(du -sh "$OUT" | cut -f1)"
ls "$OUT" | sed 's/^/  /'
# Offline resolution into an empty target: the shipped wheels + the assumed-present ones must satisfy $REQ.
"$PY" -m pip install -q --dry-run --ignore-installed --no-index "${TARGET[@]}" --target "${TMPDIR:-/tmp}/nuwa-gpu-dry" \
    --find-links "$OUT" --find-links "$SIDE" -r "$REQ"
echo "offline resolution OK (assumed present on the GPU machine: ${ASSUMED_PRESENT[*]})"
