"""Scene items written as a `models.eval --data` JSON Lines file (PNG images next to it), for the eval tests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from models.builtin import scenes


def write_scene_jsonl(
    directory: Path, grounding: Sequence[scenes.GroundingItem], vqa: Sequence[scenes.VQAItem]
) -> tuple[Path, list[dict]]:
    """`directory/items.jsonl` with one line per item (images `g<i>.png`, `v<i>.png`); returns it and its lines."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, item in enumerate(grounding):
        scenes.render(item.scene).save(directory / f"g{i}.png")
        lines.append({"type": "ground", "image": f"g{i}.png", "phrase": item.phrase, "box": list(item.box)})
    for i, item in enumerate(vqa):
        scenes.render(item.scene).save(directory / f"v{i}.png")
        lines.append({"type": "vqa", "image": f"v{i}.png", "question": item.question, "answer": item.answer})
    path = directory / "items.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    return path, lines
