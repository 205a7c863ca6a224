"""The model path alone, no server: our runner (prepare + execute, unpruned) vs the processor + `generate()`.

Same process, same thread count, same images and prompts, the two alternated call by call (median of
`--repeats`), so the ratio holds even on a shared machine. It tells whether a throughput gap between nuwa-serve
and the LitServe peer (`bench/side_by_side.py`) comes from the model path or from the serving around it.

Usage: ``python -m bench.engine_vs_generate --out bench/results/engine_vs_generate.json``
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import time
from typing import Any

import torch
from PIL import Image

from bench.payloads import scene_png
from bench.quiet import start_in_process_benchmark

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from models.budget import PruningConfig
    from models.builtin import BUILTIN_MODEL_DIR
    from models.loading import load_runner
    from models.tasks import TaskRequest

    parser = argparse.ArgumentParser(description="runner.run vs processor + generate(), in one process.")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args, loads = start_in_process_benchmark(parser, argv, repeats=7)
    runner = load_runner(BUILTIN_MODEL_DIR, "cpu")
    processor = AutoProcessor.from_pretrained(BUILTIN_MODEL_DIR)
    processor.tokenizer.padding_side = "left"
    model = LlavaForConditionalGeneration.from_pretrained(BUILTIN_MODEL_DIR, dtype=torch.float32).eval()
    results: dict[str, Any] = {}
    for batch_size in args.batch_sizes:
        scenes = [scene_png(60_000 + batch_size * 100 + i) for i in range(batch_size)]
        images = [Image.open(io.BytesIO(data)).convert("RGB") for data, _, _ in scenes]
        phrases = [phrase for _, phrase, _ in scenes]
        tasks = [
            TaskRequest(
                image=im,
                kind="ground",
                text=p,
                config=PruningConfig(method="none"),
                max_new_tokens=args.max_new_tokens,
            )
            for im, p in zip(images, phrases, strict=True)
        ]

        def ours(tasks: list[TaskRequest] = tasks) -> list[str]:
            out, _ = runner.run(tasks)
            return [r.raw_output for r in out]

        @torch.inference_mode()
        def theirs(images: list[Image.Image] = images, phrases: list[str] = phrases) -> list[str]:
            texts = [
                processor.apply_chat_template(
                    [
                        {
                            "role": "user",
                            "content": [{"type": "image"}, {"type": "text", "text": f"Locate {p}."}],
                        }
                    ],
                    add_generation_prompt=True,
                    tokenize=False,
                )
                for p in phrases
            ]
            inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
            output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            return processor.batch_decode(
                output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=False
            )

        ours()
        theirs()
        key = f"batch {batch_size}"
        loads.before(key)
        times: dict[str, list[float]] = {"runner": [], "generate": []}
        for _ in range(args.repeats):
            for name, call in (("runner", ours), ("generate", theirs)):
                start = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - start) * 1000)
        loads.after(key)
        a, b = ours(), theirs()
        same = sum(
            x.replace("</s>", "").strip() == y.replace("</s>", "").strip() for x, y in zip(a, b, strict=True)
        )
        results[key] = {
            "runner_ms_median": round(statistics.median(times["runner"]), 1),
            "generate_ms_median": round(statistics.median(times["generate"]), 1),
            "runner_over_generate": round(
                statistics.median(times["runner"]) / statistics.median(times["generate"]), 3
            ),
            "same_answers": f"{same} of {batch_size}",
            "times_ms": {k: [round(v, 1) for v in vs] for k, vs in times.items()},
            "load": loads.runs[key],
        }
        logger.info("%s: %s", key, results[key])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "threads": args.threads,
                "max_new_tokens": args.max_new_tokens,
                "results": results,
                "load_average": loads.to_json(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
