#!/usr/bin/env bash
# One-shot GPU check (issue 16): the service on cuda:0 with the built-in model, the 7B-shape speed benchmark, the
# vision + stage-1 memory benchmark and the stock vs fast decode step on the 7B/8B shapes, in about 7-8 minutes on
# one GPU; JSON under bench/results/ and one summary table at the end (bench/gpu_check.py has the details).
#
# The GPU machine has Python 3.12, torch (CUDA), transformers 5.17 and torchvision, and reaches no registry. What
# it lacks travels as wheels in bench/gpu_wheels/ (made by bench/gpu_wheels.sh; git-ignored, so the run tool must
# `carry` it): they go into a venv that sees the system packages (torch stays the system's), or, if no venv can
# be made, into a --target folder put first on PYTHONPATH.
#
# Usage: bench/gpu_check.sh            # on the GPU machine
#        bench/gpu_check.sh --dry-run  # here, on CPU: the same logic with small shapes (numbers mean nothing)
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY=(--dry-run)
    [[ -x .venv/bin/python ]] && PY=.venv/bin/python
    [[ -x /work/main/.venv/bin/python && ! -x .venv/bin/python ]] && PY=/work/main/.venv/bin/python
fi
started=$(date +%s)

needs_wheels() {
    "$1" - <<'PY' 2>/dev/null
import fastapi, uvicorn, pydantic_settings, multipart, prometheus_client, httpx, transformers  # noqa: F401
raise SystemExit(0 if transformers.__version__ == "5.23.0" else 1)
PY
    [[ $? -ne 0 ]]
}

if needs_wheels "$PY"; then
    [[ -d bench/gpu_wheels ]] || { echo "bench/gpu_wheels/ is missing: run bench/gpu_wheels.sh and carry it"; exit 2; }
    VENV=${NUWA_GPU_VENV:-/tmp/nuwa-gpu-venv}
    if "$PY" -m venv --system-site-packages "$VENV" >/dev/null 2>&1 \
        && "$VENV/bin/python" -m pip install -q --no-index --find-links bench/gpu_wheels -r bench/gpu_requirements.txt; then
        PY=$VENV/bin/python
    else
        echo "venv + pip resolution failed; installing the shipped wheels as they are into a --target folder"
        SITE=${NUWA_GPU_SITE:-/tmp/nuwa-gpu-site}
        "$PY" -m pip install -q --no-index --no-deps --target "$SITE" bench/gpu_wheels/*.whl || exit 2
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
    needs_wheels "$PY" && { echo "the wheels did not provide the packages (see above)"; exit 2; }
fi
echo "setup: $(( $(date +%s) - started )) s; python: $("$PY" -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__)')"
timeout "${NUWA_GPU_CHECK_TIMEOUT_S:-540}" "$PY" -m bench.gpu_check "${DRY[@]}"
code=$?
echo "gpu_check.sh: exit $code after $(( $(date +%s) - started )) s"
exit $code
