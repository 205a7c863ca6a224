"""The plainest alternative a user would write: LitServe dynamic batching + transformers `generate()`.

This is the PEER of the side-by-side benchmark (`bench/side_by_side.py`), not part of nuwa-serve. It runs in the
benchmark's own virtual environment (litserve is never a project dependency):

    python3 -m venv .bench-venv
    .bench-venv/bin/pip install torch==2.13.0          # first: the CPU wheel, before anything pulls another
    .bench-venv/bin/pip install litserve transformers==5.23.0 pillow numpy
    .bench-venv/bin/python -m bench.peer_litserve --model models/builtin/nuwa-tiny-llava --port 8100

What it does is what the library documentation shows, nothing tuned: `LitAPI.decode_request` opens the uploaded
image with PIL, `predict` runs the checkpoint's own processor (chat template, resize, normalise) on the batch and
`model.generate()` greedy with the same `max_new_tokens` and the same grounding prompt our runner uses for
/ground on this checkpoint (``Locate {phrase}.`` inside the processor's chat template). LitServe gathers a batch
until `max_batch_size` requests or `batch_timeout` seconds. The endpoint is POST /ground (multipart `image` +
`phrase`, other fields ignored), so the same load generator drives both servers. It binds 127.0.0.1 only.

No project module is imported: this file must stand for code written without nuwa-serve. (No `from __future__
import annotations`: LitServe reads `decode_request`'s annotation at run time to pick the request type.)
"""

import argparse
import io
import os

import litserve as ls
import torch
from fastapi import Request
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

GROUNDING_PROMPT = "Locate {phrase}."


class GroundingAPI(ls.LitAPI):
    """Image + phrase -> the model's raw answer (its location tokens), batched by LitServe."""

    def __init__(self, model_dir: str, max_new_tokens: int, threads: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.model_dir = model_dir
        self.max_new_tokens = max_new_tokens
        self.threads = threads

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.threads)
        self.processor = AutoProcessor.from_pretrained(self.model_dir)
        self.processor.tokenizer.padding_side = "left"  # batched generation needs left padding
        self.model = LlavaForConditionalGeneration.from_pretrained(self.model_dir, dtype=torch.float32)
        self.model.eval()

    def decode_request(self, request: Request) -> tuple[Image.Image, str]:
        # LitServe reads the annotation: `Request` = the parsed multipart form arrives here.
        upload = request["image"]  # type: ignore[index]
        image = Image.open(io.BytesIO(upload.file.read())).convert("RGB")
        return image, str(request["phrase"])  # type: ignore[index]

    def batch(self, inputs: list[tuple[Image.Image, str]]) -> list[tuple[Image.Image, str]]:
        return inputs

    @torch.inference_mode()
    def predict(self, batch: list[tuple[Image.Image, str]]) -> list[str]:
        images = [image for image, _ in batch]
        texts = [
            self.processor.apply_chat_template(
                [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image"},
                            {"type": "text", "text": GROUNDING_PROMPT.format(phrase=phrase)},
                        ],
                    }
                ],
                add_generation_prompt=True,
                tokenize=False,
            )
            for _, phrase in batch
        ]
        inputs = self.processor(images=images, text=texts, padding=True, return_tensors="pt")
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=False)

    def unbatch(self, output: list[str]) -> list[str]:
        return list(output)

    def encode_response(self, output: str) -> dict:  # the annotation is LitServe's response type
        return {"raw_output": output, "batch_size": None}


def main() -> None:
    parser = argparse.ArgumentParser(description="LitServe + transformers generate() peer (loopback only).")
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads in the inference worker"
    )
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    api = GroundingAPI(
        args.model,
        args.max_new_tokens,
        args.threads,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        api_path="/ground",
    )
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=120)
    server.run(
        host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning"
    )


if __name__ == "__main__":
    main()
