"""Peak memory and time of the vision tower + Nüwa stage 1 at real vision dimensions, from 0.5 to 12.8 MP.

Two parts:

* ``tower`` (default): in-process, one fresh child process per (model, megapixels, mode) so every peak is its
  own. Mode ``tower`` runs the bare vision tower (no probe, no hook): the tower's own activations. Mode
  ``stage1`` runs the adapter's `encode_images` (salience probe + similarity) and stage 1 (Nüwa at 25%: region
  selection + aggregation): what serving does before the LLM. "Stage-1 extra" = peak(stage1) - peak(tower).
  Peaks: on CPU the torch allocator's live bytes (every allocation recorded by the torch profiler, so the
  number is exact and does not depend on what malloc returns to the OS) and the process RSS high-water mark
  (VmHWM, reset just before the run); on CUDA `torch.cuda.max_memory_allocated`.
* ``service``: a directory laid out like a real Qwen2.5-VL-7B-Instruct checkpoint (`preprocessor_config.json`
  naming `Qwen2VLImageProcessor`, max_pixels 12845056; REAL vision dims; 2 vision blocks; a 2-layer LLM of width
  256 with the real 152064-token vocabulary; random weights) served with NUWA_MODEL through the real
  `python -m service`; `/ground` at budget 0.25 at growing image sizes; the worker's VmHWM after each request.

Model shapes (random weights; nothing is downloaded):

* ``qwen2_5_vl_7b_vision``: Qwen2.5-VL-7B's vision tower: hidden 1280, 16 heads, MLP 3420, patch 14, spatial
  merge 2, temporal patch 2, window 112 px; depth `--qwen-depth` (default 2 on CPU). Full-attention blocks: the
  published 7/15/23/31 at depth 32, else the last block only (the salience block either way). Images are
  smart-resized by the stock `Qwen2VLImageProcessor` logic within min_pixels 3136 / max_pixels 12845056.
* ``llava_1_5_clip``: LLaVA-1.5's CLIP ViT-L/14-336 (24 layers, hidden 1024, 16 heads, MLP 4096); every image
  becomes 336 x 336 = 576 patches, so its cost does not depend on the megapixels.
* both with a 2-layer LLM of width 256 that these runs never execute (stage 1 ends before the LLM).

Before/after: run the same script with the code of another tree on the path, e.g. the commit before this change::

    git archive 28b6ac6 | tar -x -C /tmp/nuwa-before
    PYTHONPATH=/tmp/nuwa-before python /path/to/bench/vision_memory.py --label before \\
        --out bench/results/vision_memory_before.json
    python -m bench.vision_memory --label after --out bench/results/vision_memory_after.json
    python -m bench.vision_memory --report bench/results/vision_memory_before.json \\
        bench/results/vision_memory_after.json --plot docs/bench_vision_memory.png

The script only uses what both trees have (`prepare`, `encode_images`, `stage1`, `bench.shapes`,
`tests.support.launcher`).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("bench.vision_memory")

MEGAPIXELS = (0.5, 2.0, 4.0, 12.8)
MODELS = ("qwen2_5_vl_7b_vision", "llava_1_5_clip")
MODES = ("tower", "stage1")
QWEN_MAX_PIXELS = 12845056  # Qwen2.5-VL's default max_pixels (preprocessor_config.json of the 7B checkpoint)
QWEN_MIN_PIXELS = 3136
QWEN_PUBLISHED_FULL_ATTENTION = (7, 15, 23, 31)
TEXT_WIDTH = 256
SERVICE_MEGAPIXELS = (0.26, 1.0, 2.4, 4.2)
PROMPT = "Locate the red circle."


# ---------------------------------------------------------------------------------------------------- images
def image_size_for(megapixels: float, aspect: float = 4 / 3) -> tuple[int, int]:
    """(w, h) of an image of about `megapixels` MP and the given aspect ratio."""
    height = math.sqrt(megapixels * 1e6 / aspect)
    return round(height * aspect), round(height)


def scene(size: tuple[int, int], seed: int = 0) -> Any:
    """A smooth synthetic photo-like image (gradient + shapes): compresses well, so a 12.8 MP JPEG stays small."""
    from PIL import Image, ImageDraw

    width, height = size
    base = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(base)
    rng = random.Random(seed)
    for _ in range(12):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(max(2, min(width, height) // 20), max(3, min(width, height) // 6))
        colour = tuple(rng.randrange(256) for _ in range(3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    draw.ellipse(
        (width // 3, height // 3, width // 3 + width // 10, height // 3 + width // 10), fill=(220, 30, 30)
    )
    return base


# ---------------------------------------------------------------------------------------------------- models
def qwen_full_attention(depth: int) -> list[int]:
    if depth == 32:
        return list(QWEN_PUBLISHED_FULL_ATTENTION)
    return [depth - 1]


SMOKE_QWEN_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_heads": 2}


def qwen_config(depth: int, vocab_size: int, special_ids: dict[str, int], smoke: bool = False) -> Any:
    """Qwen2.5-VL config: the 7B's REAL vision dims at `depth` blocks, a 2-layer LLM of width 256.

    `smoke` shrinks the vision widths (the code path only, for dry runs on a CPU; its numbers mean nothing).
    """
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": 2 * TEXT_WIDTH,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": [8, 12, 12],
            },
            "eos_token_id": special_ids["<|im_end|>"],
            "bos_token_id": None,
            "pad_token_id": special_ids["<|endoftext|>"],
        },
        vision_config={
            "depth": depth,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": TEXT_WIDTH,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": qwen_full_attention(depth),
            **(SMOKE_QWEN_VISION if smoke else {}),
        },
        image_token_id=special_ids["<|image_pad|>"],
        video_token_id=special_ids["<|video_pad|>"],
        vision_start_token_id=special_ids["<|vision_start|>"],
        vision_end_token_id=special_ids["<|vision_end|>"],
    )


def build_qwen(device: Any, dtype: Any, depth: int, smoke: bool = False) -> Any:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from bench.shapes import QWEN_SPECIALS, _qwen_tokenizer
    from models.qwen2_5_vl import Qwen2_5_VLAdapter, Qwen2_5_VLImageOnlyProcessor

    tokenizer = _qwen_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIALS}
    config = qwen_config(depth, len(tokenizer), ids, smoke)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype).eval()
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=QWEN_MIN_PIXELS,
        max_pixels=QWEN_MAX_PIXELS,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    processor = Qwen2_5_VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return Qwen2_5_VLAdapter(model, processor)


def build_llava(device: Any, dtype: Any, smoke: bool = False) -> Any:
    """LLaVA-1.5's CLIP ViT-L/14-336 (`bench.shapes`) in front of a 2-layer LLM of width 256 that is never run."""
    from bench.shapes import build_llava_1_5_7b
    from models.llava import LlavaAdapter

    stub = {
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 2 * TEXT_WIDTH,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    }
    return LlavaAdapter(*build_llava_1_5_7b(device, dtype, smoke, llm=stub))


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def reset_rss_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: `5` into /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class AllocatorPeak:
    """Peak live bytes allocated by torch inside the block: the profiler's memory events on CPU, the caching
    allocator's statistics on CUDA. Measured from zero at entry (only this block's allocations count)."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.peak_bytes = 0
        self._profile: Any = None

    def __enter__(self) -> AllocatorPeak:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profile.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._profile.__exit__(*exc)
        events = [e for e in self._profile.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = peak = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            live += event.nbytes()
            peak = max(peak, live)
        self.peak_bytes = peak


def build(model_name: str, device_name: str, qwen_depth: int, smoke: bool) -> Any:
    import torch

    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if model_name.startswith("qwen"):
        return build_qwen(device, dtype, qwen_depth, smoke)
    return build_llava(device, dtype, smoke)


def measure(adapter: Any, model_name: str, megapixels: float, mode: str) -> dict:
    """Peak memory and time of one run of `mode` on one image of about `megapixels` MP."""
    import torch

    from models.budget import PruningConfig

    device = adapter.device
    dtype = next(adapter.model.parameters()).dtype
    size = image_size_for(megapixels)
    batch = adapter.prepare([scene(size)], [PROMPT])
    config = PruningConfig(method="nuwa", budget=0.25)
    if adapter.family == "qwen2_5_vl":
        _, grid_h, grid_w = (int(v) for v in batch.inputs["image_grid_thw"][0].tolist())
        patches, model_input = grid_h * grid_w, (grid_w * 14, grid_h * 14)
    else:
        patches = int(adapter.grid[0] * adapter.grid[1])
        model_input = (adapter.input_side, adapter.input_side)
    kept = None

    def run() -> None:
        nonlocal kept
        with torch.inference_mode():
            if mode == "tower":
                if adapter.family == "qwen2_5_vl":
                    visual = adapter.model.model.visual
                    visual(
                        batch.inputs["pixel_values"].to(visual.dtype), grid_thw=batch.inputs["image_grid_thw"]
                    )
                else:
                    adapter.model.model.vision_tower(batch.inputs["pixel_values"].to(dtype))
            else:
                encoded = adapter.encode_images(batch, [config])
                kept = int(adapter.stage1(encoded[0], config).features.shape[0])
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # One run, timed, inside the peak measurement (on CPU the profiler's per-op overhead is small next to these
    # ops), with the RSS high-water mark reset just before.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rss_base = _status_kib("VmRSS")
    rss_reset = reset_rss_peak()
    with AllocatorPeak(device) as peak:
        start, cpu_start = time.perf_counter(), time.process_time()
        run()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    rss_peak = _status_kib("VmHWM")
    return {
        "model": model_name,
        "megapixels": megapixels,
        "image_size": list(size),
        "model_input_size": list(model_input),
        "megapixels_in": model_input[0] * model_input[1] / 1e6,
        "patches": patches,
        "tokens": patches // (4 if adapter.family == "qwen2_5_vl" else 1),
        "stage1_tokens": kept if mode == "stage1" else None,
        "mode": mode,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "alloc_peak_mib": peak.peak_bytes / 2**20,
        "rss_base_mib": rss_base / 1024,
        "rss_peak_mib": rss_peak / 1024 if rss_reset else None,
        "rss_extra_mib": (rss_peak - rss_base) / 1024 if rss_reset else None,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "qwen_vision_blocks": len(adapter.model.model.visual.blocks)
        if adapter.family == "qwen2_5_vl"
        else None,
    }


def measure_one(
    model_name: str, megapixels: float, mode: str, device_name: str, qwen_depth: int, smoke=False
):
    """One measurement in this (fresh) process; returns the row."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    return measure(build(model_name, device_name, qwen_depth, smoke), model_name, megapixels, mode)


def _log_row(row: dict) -> None:
    logger.info(
        "%s %.1f MP %s: %.1f s (CPU %.1f s), alloc peak %.0f MiB, RSS +%s MiB",
        row["model"],
        row["megapixels"],
        row["mode"],
        row["seconds"],
        row["cpu_seconds"],
        row["alloc_peak_mib"],
        f"{row['rss_extra_mib']:.0f}" if row["rss_extra_mib"] is not None else "?",
    )


def _sizes(args: argparse.Namespace, model_name: str) -> list[float]:
    if model_name == "llava_1_5_clip" and not args.llava_every_size:
        return args.megapixels[:1]  # LLaVA's cost does not depend on the image size: measure it once
    return list(args.megapixels)


def run_tower(args: argparse.Namespace) -> dict:
    """Every (model, megapixels, mode): in its own child process (default: clean RSS and allocator state), or
    all in this process (`--in-process`: one model build per model, a warm-up run first; what the GPU check
    uses, where the allocator peak is reset per run anyway)."""
    rows = []
    started = time.perf_counter()
    for model_name in args.models:
        if args.in_process:
            import torch

            torch.set_num_threads(args.threads)
            adapter = build(model_name, args.device, args.qwen_depth, args.smoke)
            measure(adapter, model_name, min(args.megapixels), "stage1")  # warm-up (kernels, allocator)
            for megapixels in _sizes(args, model_name):
                for mode in MODES:
                    rows.append(measure(adapter, model_name, megapixels, mode))
                    _log_row(rows[-1])
            del adapter
            continue
        for megapixels in _sizes(args, model_name):
            for mode in MODES:
                spec = json.dumps([model_name, megapixels, mode, args.device, args.qwen_depth, args.smoke])
                child = subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), "--child", spec],
                    env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)},
                    capture_output=True,
                    text=True,
                    timeout=args.child_timeout_s,
                )
                if child.returncode != 0:
                    raise RuntimeError(f"{spec} failed:\n{child.stderr[-4000:]}")
                rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
                _log_row(rows[-1])
    return {"part": "tower", "rows": rows, "wall_s": time.perf_counter() - started, "smoke": args.smoke}


# ---------------------------------------------------------------------------------------------------- service
PREPROCESSOR_CONFIG = {  # as shipped with Qwen2.5-VL-7B-Instruct
    "min_pixels": QWEN_MIN_PIXELS,
    "max_pixels": QWEN_MAX_PIXELS,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}


def write_qwen_checkpoint(directory: Path, depth: int = 2) -> Path:
    """A directory laid out like Qwen2.5-VL-7B-Instruct (real vision dims, `depth` blocks, random weights)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from bench.shapes import QWEN_SPECIALS, _qwen_tokenizer

    if (directory / "config.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _qwen_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIALS}
    config = qwen_config(depth, 152064, ids)  # the real vocabulary size
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    return directory


def _worker_hwm_mib(pid: int) -> float | None:
    match = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def _reset_worker_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_service(args: argparse.Namespace) -> dict:
    """Serve the Qwen-7B-like directory and measure the worker's peak RSS per /ground request."""
    import io

    import httpx

    from tests.support import launcher

    model_dir = write_qwen_checkpoint(Path(args.checkpoint_dir))
    settings = {
        "log_level": "WARNING",
        "request_timeout_s": str(args.request_timeout_s),
        "max_image_pixels": str(args.max_image_pixels),
        "max_body_bytes": str(64 * 1024 * 1024),
        "max_queue_visual_tokens": str(1 << 20),
        "worker_start_timeout_s": "900",
        "device": args.device,
    }
    log_dir = Path(tempfile.mkdtemp(prefix="nuwa-vision-memory-"))
    service = launcher.start_service(model_dir, log_dir / "service.log", settings)
    rows = []
    try:
        service.wait_ready(timeout_s=900)
        pid = service.worker_pid()
        idle = _worker_hwm_mib(pid)
        with httpx.Client(base_url=service.base_url, timeout=args.request_timeout_s + 60) as client:
            for megapixels in args.service_megapixels:
                size = image_size_for(megapixels)
                buffer = io.BytesIO()
                scene(size).save(buffer, format="JPEG", quality=90)
                reset = _reset_worker_peak(pid)
                start = time.perf_counter()
                response = client.post(
                    "/ground",
                    files={"image": ("image.jpg", buffer.getvalue(), "image/jpeg")},
                    data={"phrase": "the red circle", "budget": "0.25"},
                )
                seconds = time.perf_counter() - start
                body = response.json()
                row = {
                    "megapixels": megapixels,
                    "image_size": list(size),
                    "status": response.status_code,
                    "seconds": seconds,
                    "worker_peak_rss_mib": _worker_hwm_mib(pid),
                    "peak_reset": reset,
                    "model_input_size": body.get("model_input_size"),
                    "visual_tokens": body.get("visual_tokens"),
                    "error": body.get("error"),
                }
                rows.append(row)
                logger.info(
                    "service %.2f MP: %s in %.1f s, worker peak RSS %.0f MiB",
                    megapixels,
                    response.status_code,
                    seconds,
                    row["worker_peak_rss_mib"] or -1,
                )
    finally:
        code = service.stop()
    return {
        "part": "service",
        "checkpoint": {"vision": "REAL 7B dims, 2 blocks (block 1 full attention)", "llm": "2 layers x 256"},
        "settings": settings,
        "worker_idle_rss_mib": idle,
        "exit_code": code,
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------------- report
def summarise(rows: list[dict]) -> list[dict]:
    """Per (model, megapixels): tower activations, stage-1 extra and its ratio to the tower's activations."""
    out = []
    keys = sorted({(r["model"], r["megapixels"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for model_name, megapixels in keys:
        pair = {r["mode"]: r for r in rows if r["model"] == model_name and r["megapixels"] == megapixels}
        if set(pair) != set(MODES):
            continue
        tower, stage1 = pair["tower"], pair["stage1"]
        extra = stage1["alloc_peak_mib"] - tower["alloc_peak_mib"]
        out.append(
            {
                "model": model_name,
                "megapixels": megapixels,
                "model_input_size": tower["model_input_size"],
                "patches": tower["patches"],
                "tower_mib": tower["alloc_peak_mib"],
                "stage1_peak_mib": stage1["alloc_peak_mib"],
                "stage1_extra_mib": extra,
                "ratio": extra / tower["alloc_peak_mib"] if tower["alloc_peak_mib"] > 0 else float("nan"),
                "tower_s": tower["seconds"],
                "stage1_s": stage1["seconds"],
                "tower_cpu_s": tower.get("cpu_seconds"),
                "stage1_cpu_s": stage1.get("cpu_seconds"),
                "rss_tower_mib": tower["rss_extra_mib"],
                "rss_stage1_mib": stage1["rss_extra_mib"],
            }
        )
    return out


def _fmt(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def markdown(documents: list[dict]) -> str:
    """Tables: tower part (before/after side by side when both are given) and service part."""
    lines = []
    towers = [d for d in documents if d.get("part") == "tower"]
    if towers:
        lines.append(
            "| code | model | MP asked | model input | patches | tower activations MiB | vision + stage 1 peak MiB "
            "| stage-1 extra MiB | extra / tower | tower CPU s | vision + stage 1 CPU s | tower wall s "
            "| vision + stage 1 wall s | RSS tower +MiB | RSS stage 1 +MiB |"
        )
        lines.append("|" + " --- |" * 15)
        for document in towers:
            for row in summarise(document["rows"]):
                lines.append(
                    f"| {document.get('label', '')} | {row['model']} | {row['megapixels']:g} "
                    f"| {row['model_input_size'][0]}x{row['model_input_size'][1]} | {row['patches']:,} "
                    f"| {_fmt(row['tower_mib'])} | {_fmt(row['stage1_peak_mib'])} | {_fmt(row['stage1_extra_mib'])} "
                    f"| {row['ratio']:.2f}x | {_fmt(row['tower_cpu_s'], 1)} | {_fmt(row['stage1_cpu_s'], 1)} "
                    f"| {row['tower_s']:.1f} | {row['stage1_s']:.1f} "
                    f"| {_fmt(row['rss_tower_mib'])} | {_fmt(row['rss_stage1_mib'])} |"
                )
    for document in (d for d in documents if d.get("part") == "service"):
        lines.append("")
        lines.append(
            f"Service ({document.get('label', '')}): worker idle RSS {_fmt(document['worker_idle_rss_mib'])} MiB, "
            f"exit code {document['exit_code']}."
        )
        lines.append("")
        lines.append(
            "| code | MP asked | model input | visual tokens (orig / stage 1 / stage 2) | status | s | worker peak RSS MiB |"
        )
        lines.append("|" + " --- |" * 7)
        for row in document["rows"]:
            tokens = row.get("visual_tokens") or {}
            size = row.get("model_input_size")
            size_text = f"{size[0]}x{size[1]}" if size else "–"
            token_text = " / ".join(str(tokens.get(key, "–")) for key in ("original", "stage1", "stage2"))
            lines.append(
                f"| {document.get('label', '')} | {row['megapixels']:g} | {size_text} | {token_text} "
                f"| {row['status']} | {row['seconds']:.1f} | {_fmt(row['worker_peak_rss_mib'])} |"
            )
    return "\n".join(lines)


def plot(documents: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for document in (d for d in documents if d.get("part") == "tower"):
        summary = [r for r in summarise(document["rows"]) if r["model"].startswith("qwen")]
        if not summary:
            continue
        mp = [r["megapixels"] for r in summary]
        label = document.get("label", "")
        axes[0].plot(
            mp, [r["stage1_extra_mib"] / 1024 for r in summary], marker="o", label=f"stage-1 extra ({label})"
        )
        axes[0].plot(
            mp,
            [r["tower_mib"] / 1024 for r in summary],
            marker="s",
            linestyle="--",
            label=f"tower activations ({label})",
        )
    axes[0].set_xlabel("megapixels asked")
    axes[0].set_ylabel("GiB (torch allocator peak)")
    axes[0].set_title("Qwen2.5-VL-7B vision dims: vision + stage 1")
    axes[0].legend(fontsize=8)
    for document in (d for d in documents if d.get("part") == "service"):
        rows = [r for r in document["rows"] if r["status"] == 200]
        axes[1].plot(
            [r["megapixels"] for r in rows],
            [(r["worker_peak_rss_mib"] or 0) / 1024 for r in rows],
            marker="o",
            label=document.get("label", ""),
        )
    axes[1].axhline(2.5, color="grey", linestyle=":", label="target at 4.2 MP")
    axes[1].set_xlabel("megapixels of the request")
    axes[1].set_ylabel("worker peak RSS, GiB")
    axes[1].set_title("Served /ground, budget 0.25 (2 vision blocks)")
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("tower", "service"), default="tower")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--megapixels", nargs="+", type=float, default=list(MEGAPIXELS))
    parser.add_argument("--service-megapixels", nargs="+", type=float, default=list(SERVICE_MEGAPIXELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--qwen-depth", type=int, default=2, help="vision blocks (32 = the real tower)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--llava-every-size", action="store_true", help="measure LLaVA at every size too")
    parser.add_argument("--child-timeout-s", type=float, default=3600)
    parser.add_argument("--in-process", action="store_true", help="no child processes (GPU runs)")
    parser.add_argument("--smoke", action="store_true", help="shrunken vision widths (dry runs only)")
    parser.add_argument(
        "--checkpoint-dir", default=str(Path(tempfile.gettempdir()) / "nuwa-qwen2.5-vl-7b-2blocks")
    )
    parser.add_argument("--request-timeout-s", type=float, default=60.0)
    parser.add_argument("--max-image-pixels", type=int, default=40_000_000)
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--report", nargs="+", type=Path, help="result JSONs to print as tables")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_one(*json.loads(args.child))))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.report:
        documents = [json.loads(path.read_text()) for path in args.report]
        print(markdown(documents))
        if args.plot:
            plot(documents, args.plot)
        return
    document = run_tower(args) if args.part == "tower" else run_service(args)
    document.update(
        {
            "label": args.label,
            "code": os.environ.get("PYTHONPATH", "") or str(Path(__file__).resolve().parents[1]),
            "machine": {"processor": platform.processor() or platform.machine(), "threads": args.threads},
            "device": args.device,
            "command": " ".join(sys.argv),
        }
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(document, indent=1))
    print(markdown([document]))


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a file (the "before" tree on PYTHONPATH): make `bench` importable
        sys.path.insert(
            0, os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or str(Path(__file__).parents[1])
        )
    main()
