"""The built-in model: a tiny LLaVA-1.5 (stock transformers classes) trained here on synthetic scenes.

* `tokenizer`: offline byte-level BPE with `<image>` and the 1000 `<loc_k>` location tokens, LLaVA chat template.
* `build`: `build_builtin(out_dir)` makes the model directory (config, random weights, processor).
* `data`: fast training batches drawn straight from `models.scenes` (no per-sample processor calls).

Training lives in `models.train`; the service loads the result like any LLaVA checkpoint.
"""
