"""The model-agnostic half of the engine: stage 1 per image, sequence rebuild with original positions, the LLM run
with the stage-2 controller, a greedy decode loop with or without KV cache, and per-sample reports.

A family adapter (`models/llava.py`, `models/qwen2_5_vl.py`) supplies four things: how to turn images + prompts
into the stock processor's tensors, how to run the vision tower while recording salience / similarity, how to
project kept features into the LLM space, and the UNPRUNED position ids. Everything else is shared here, because
the method is the same for every family: drop `<image>` placeholders for pruned tokens, pass the kept features
through transformers' `mm_encoder_outputs` argument, and pass the kept tokens' original position ids explicitly.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from models import pruning
from models.attention import enable_probes
from models.budget import Family, PruningConfig, TokenPlan, plan_tokens, pooling_grid
from models.stage2 import DropPlan, LayerDropController
from models.tasks import VisualTokenReport

logger = logging.getLogger(__name__)


@dataclass
class EncodedImage:
    """What the vision side produced for one image, before any pruning.

    Attributes:
        features: `(N, D)` tokens in raster order of `grid`, in the space where aggregation happens (LLaVA: the
            selected CLIP layer, before the projector; Qwen2.5-VL: merged tokens, already in the LLM space).
        salience: `(N,)` float32 attention-based salience (Nüwa's m).
        similarity: `(N, Ds)` features for the semantic similarity A (mean of middle encoder layers).
        key_norm: `(N,)` mean key L2 norm in the salience layer (paper options), or None.
        grid: (rows, cols) of the token grid.
    """

    features: torch.Tensor
    salience: torch.Tensor
    similarity: torch.Tensor
    key_norm: torch.Tensor | None
    grid: tuple[int, int]

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])


@dataclass
class PreparedBatch:
    """The stock processor's output for a batch plus what is needed to map boxes back.

    Attributes:
        inputs: processor tensors (input_ids, attention_mask, pixel_values, ...), left padded, on the device.
        image_sizes: (w, h) of each original image.
        model_input_sizes: (w, h) of the image each sample's vision encoder saw.
        frames: per sample (offset_x, offset_y, extent_x, extent_y): original pixel = norm * extent - offset.
    """

    inputs: dict[str, Any]
    image_sizes: list[tuple[int, int]]
    model_input_sizes: list[tuple[int, int]]
    frames: list[tuple[float, float, float, float]]

    @property
    def batch_size(self) -> int:
        return int(self.inputs["input_ids"].shape[0])


@dataclass
class Stage1Sample:
    """One sample after stage 1: what the LLM receives instead of the N visual tokens."""

    plan: TokenPlan
    grid: tuple[int, int]
    features: torch.Tensor  # (K1, D_llm)
    source_index: torch.Tensor  # (K1,) grid index each kept token stands for (its position source)
    compressed_positions: bool  # VisionZip: positions renumbered densely instead of kept


@dataclass
class LLMInputs:
    """The rebuilt (stage-1) sequence for the LLM, left padded."""

    input_ids: torch.Tensor  # (B, L1)
    attention_mask: torch.Tensor  # (B, L1) long
    position_ids: torch.Tensor  # (B, L1) or (3, B, L1)
    visual: torch.Tensor  # (B, L1) bool
    features: tuple[torch.Tensor, ...]  # per sample (K1_b, D_llm)
    samples: list[Stage1Sample]
    text_tokens: list[int]  # non-visual prompt tokens per sample
    drop_plans: list[DropPlan]


@dataclass
class EngineOutput:
    """Result of `VisionLanguageAdapter.forward` / `.generate`."""

    reports: list[VisualTokenReport]
    logits: torch.Tensor | None = None  # (B, L_last, V) in the last layer's layout (forward only)
    sequences: list[list[int]] = field(default_factory=list)  # generated ids per sample (generate only)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: vision, prune, prefill, decode
    prompt_tokens: list[int] = field(default_factory=list)  # unpruned prompt length per sample


def prefill_flops(sequence_lengths: Sequence[int], hidden: int, intermediate: int) -> float:
    """Theoretical prefill FLOPs: sum over layers of 8*S*H^2 + 4*S^2*H + 4*S*H*I (the Nüwa paper's count)."""
    return float(
        sum(8 * s * hidden**2 + 4 * s * s * hidden + 4 * s * hidden * intermediate for s in sequence_lengths)
    )


class _Clock:
    """Wall-clock stage timer that waits for the GPU, so CUDA timings mean what they say."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self.timings: dict[str, float] = {}

    def now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, stage: str, since: float) -> float:
        current = self.now()
        self.timings[stage] = self.timings.get(stage, 0.0) + current - since
        return current


class VisionLanguageAdapter(ABC):
    """Applies per-request `PruningConfig`s to one transformers VLM instance (no source edits, no global patches)."""

    family: Family = "generic"

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        self.model = model
        self.processor = processor
        enable_probes(model)
        self.controller = LayerDropController(self.decoder_layers)

    # ---- family hooks ----------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def decoder_layers(self) -> torch.nn.ModuleList: ...

    @property
    @abstractmethod
    def image_token_id(self) -> int: ...

    @abstractmethod
    def prepare(self, images: Sequence[Any], prompts: Sequence[str]) -> PreparedBatch:
        """Images + user prompts -> processor tensors (chat template applied, left padding)."""

    @abstractmethod
    def encode_images(self, batch: PreparedBatch, configs: Sequence[PruningConfig]) -> list[EncodedImage]:
        """Run the vision tower once for the batch, recording salience and similarity per image."""

    @abstractmethod
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Map `EncodedImage.features` rows into the LLM embedding space."""

    @abstractmethod
    def unpruned_positions(self, batch: PreparedBatch) -> torch.Tensor:
        """Position ids of the UNPRUNED padded sequence: (B, L) or (3, B, L) for M-RoPE."""

    @abstractmethod
    def estimate_visual_tokens(self, image_size: tuple[int, int]) -> int:
        """Unpruned visual tokens for an original image of (w, h), without decoding any pixels."""

    @abstractmethod
    def model_input_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(w, h) of the image the vision encoder sees for an original image of (w, h)."""

    @abstractmethod
    def frame_for(self, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
        """(offset_x, offset_y, extent_x, extent_y): original pixel = norm * extent - offset."""

    def llm_position_kwargs(self) -> dict[str, Any]:
        """Extra forward kwargs for the LLM call (none by default)."""
        return {}

    # ---- shared properties -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def text_config(self) -> Any:
        return self.model.config.text_config

    @property
    def num_llm_layers(self) -> int:
        return len(self.decoder_layers)

    # ---- stage 1 ---------------------------------------------------------------------------------------------
    def stage1(self, encoded: EncodedImage, config: PruningConfig) -> Stage1Sample:
        """Choose (and for Nüwa, aggregate) the visual tokens the LLM will receive for one image."""
        plan = plan_tokens(config, encoded.num_tokens, self.num_llm_layers, encoded.grid, self.family)
        n, k1, grid = encoded.num_tokens, plan.stage1_tokens, encoded.grid
        features = encoded.features
        compressed = False
        keep_all = k1 >= n and (config.budget is None or not config.aggregation)
        if config.method in ("none", "fastv", "nuwa_stage2") or keep_all:
            index = torch.arange(n, device=features.device)
            kept = features
        elif config.method == "random":
            index = pruning.select_random(n, k1, config.seed).to(features.device)
            kept = features[index]
        elif config.method == "pooling":
            kept, index = pruning.pool_grid(features, grid, pooling_grid(config, grid))
            index = index.to(features.device)
        elif config.method == "visionzip":
            kept, index = pruning.visionzip_merge(
                features, encoded.similarity, encoded.salience, k1, config.visionzip_contextual_fraction
            )
            index = index.to(features.device)
            compressed = True
        else:  # nuwa, nuwa_stage1
            salience = encoded.salience
            if config.salience_key_norm and encoded.key_norm is not None:
                salience = salience * encoded.key_norm
            index = pruning.select_stage1(salience, grid, k1, plan.top_n, config.region_size).to(
                features.device
            )
            if config.aggregation:
                kept = pruning.aggregate(
                    features,
                    encoded.similarity,
                    salience,
                    index,
                    grid,
                    pruning.proximity_radius(grid, config.proximity_fraction),
                    pillar_quantile=config.pillar_quantile,
                    convex_rows=config.convex_rows,
                    pillar_scores=encoded.key_norm if config.pillar_by_key_norm else None,
                )
            else:
                kept = features[index]
        return Stage1Sample(
            plan=plan,
            grid=grid,
            features=self.project(kept),
            source_index=index,
            compressed_positions=compressed,
        )

    def build_llm_inputs(
        self, batch: PreparedBatch, samples: list[Stage1Sample], configs: Sequence[PruningConfig]
    ) -> LLMInputs:
        """Rebuild each sample's sequence: text kept, `<image>` placeholders only for kept tokens, original positions."""
        input_ids = batch.inputs["input_ids"]
        attention_mask = batch.inputs["attention_mask"].bool()
        positions = self.unpruned_positions(batch)
        mrope = positions.dim() == 3
        rows_ids, rows_pos, rows_visual, text_tokens = [], [], [], []
        for b, sample in enumerate(samples):
            valid_rows = torch.nonzero(attention_mask[b]).flatten()
            ids = input_ids[b, valid_rows]
            pos = positions[:, b, valid_rows] if mrope else positions[b, valid_rows]
            image_rows = torch.nonzero(ids == self.image_token_id).flatten()
            if image_rows.numel() != sample.plan.num_tokens:
                raise ValueError(
                    f"sample {b}: {image_rows.numel()} image placeholders but {sample.plan.num_tokens} visual tokens"
                )
            first, last = int(image_rows[0]), int(image_rows[-1])
            kept_rows = image_rows[sample.source_index.to(image_rows.device)]
            before, after = torch.arange(0, first), torch.arange(last + 1, ids.numel())
            new_rows = torch.cat([before.to(ids.device), kept_rows, after.to(ids.device)])
            new_ids = ids[new_rows]
            if sample.compressed_positions:
                start = pos[..., first] if not mrope else pos[0, first]
                dense = torch.arange(new_rows.numel(), device=ids.device) - first + start
                dense[:first] = pos[0, :first] if mrope else pos[:first]
                new_pos = dense.expand(3, -1) if mrope else dense
            else:
                new_pos = pos[..., new_rows]
            visual = torch.zeros(new_rows.numel(), dtype=torch.bool, device=ids.device)
            visual[first : first + kept_rows.numel()] = True
            rows_ids.append(new_ids)
            rows_pos.append(new_pos)
            rows_visual.append(visual)
            text_tokens.append(int(ids.numel() - image_rows.numel()))
        length = max(row.numel() for row in rows_ids)
        batch_size = len(samples)
        device = input_ids.device
        pad_id = _pad_token_id(self.processor)
        new_ids = torch.full((batch_size, length), pad_id, dtype=input_ids.dtype, device=device)
        new_mask = torch.zeros(batch_size, length, dtype=torch.long, device=device)
        new_visual = torch.zeros(batch_size, length, dtype=torch.bool, device=device)
        shape = (3, batch_size, length) if mrope else (batch_size, length)
        new_pos = torch.ones(shape, dtype=positions.dtype, device=device)
        for b in range(batch_size):
            width = rows_ids[b].numel()
            new_ids[b, length - width :] = rows_ids[b]
            new_mask[b, length - width :] = 1
            new_visual[b, length - width :] = rows_visual[b]
            new_pos[..., b, length - width :] = rows_pos[b]
        drop_plans = []
        for sample, config in zip(samples, configs, strict=True):
            plan = sample.plan
            if plan.stage2_layer is None or plan.stage2_tokens >= plan.stage1_tokens:
                drop_plans.append(DropPlan())
            else:
                drop_plans.append(DropPlan(plan.stage2_layer, plan.stage2_tokens, _scoring(config)))
        return LLMInputs(
            input_ids=new_ids,
            attention_mask=new_mask,
            position_ids=new_pos,
            visual=new_visual,
            features=tuple(sample.features for sample in samples),
            samples=samples,
            text_tokens=text_tokens,
            drop_plans=drop_plans,
        )

    # ---- running ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prune(
        self, batch: PreparedBatch, configs: Sequence[PruningConfig], clock: _Clock | None = None
    ) -> LLMInputs:
        """Vision tower + stage 1 for every sample; returns the rebuilt LLM inputs."""
        if len(configs) != batch.batch_size:
            raise ValueError(f"{len(configs)} configs for a batch of {batch.batch_size}")
        clock = clock or _Clock(self.device)
        start = clock.now()
        encoded = self.encode_images(batch, configs)
        start = clock.add("vision", start)
        samples = [self.stage1(enc, config) for enc, config in zip(encoded, configs, strict=True)]
        llm_inputs = self.build_llm_inputs(batch, samples, configs)
        clock.add("prune", start)
        return llm_inputs

    def _decode_step(self, llm: LLMInputs, generated: torch.Tensor, cache: DynamicCache) -> Any:
        """One cached decoding step: feed the newest token of `generated` after the prompt and the tokens before it.

        Its position continues from the prompt's last ORIGINAL position id (not the pruned length), so decoding
        sees the same positions as the unpruned model would.
        """
        mask = torch.cat([llm.attention_mask, torch.ones_like(generated)], dim=1)
        position = llm.position_ids[..., -1:] + generated.shape[1]
        return self.model(
            input_ids=generated[:, -1:],
            attention_mask=mask,
            position_ids=position,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )

    def _llm_call(
        self,
        llm: LLMInputs,
        trailing: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        logits_to_keep: int = 0,
    ) -> Any:
        input_ids, attention_mask, position_ids = llm.input_ids, llm.attention_mask, llm.position_ids
        visual = llm.visual
        num_trailing = 0
        if trailing is not None and trailing.shape[1] > 0:
            num_trailing = trailing.shape[1]
            input_ids = torch.cat([input_ids, trailing.to(input_ids.device)], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(trailing)], dim=1)
            extra = position_ids[..., -1:] + torch.arange(1, num_trailing + 1, device=position_ids.device)
            position_ids = torch.cat([position_ids, extra], dim=-1)
            visual = torch.cat([visual, torch.zeros_like(trailing, dtype=torch.bool)], dim=1)
        self.controller.begin(llm.drop_plans, visual, attention_mask.bool(), trailing=num_trailing)
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=llm.features)},
            past_key_values=cache,
            use_cache=cache is not None,
            logits_to_keep=logits_to_keep,
            **self.llm_position_kwargs(),
        )

    @torch.inference_mode()
    def forward(
        self, batch: PreparedBatch, configs: Sequence[PruningConfig], trailing: torch.Tensor | None = None
    ) -> EngineOutput:
        """One full (uncached) forward; logits come back in the last layer's layout."""
        clock = _Clock(self.device)
        llm = self.prune(batch, configs, clock)
        start = clock.now()
        try:
            outputs = self._llm_call(llm, trailing=trailing)
            reports = self._reports(llm, configs)
        finally:
            self.controller.finish()
        clock.add("prefill", start)
        return EngineOutput(reports=reports, logits=outputs.logits, timings=clock.timings)

    @torch.inference_mode()
    def generate(
        self,
        batch: PreparedBatch,
        configs: Sequence[PruningConfig],
        max_new_tokens: int | Sequence[int] = 32,
        use_cache: bool = True,
    ) -> EngineOutput:
        """Greedy decoding with per-request pruning; identical tokens with and without the KV cache."""
        clock = _Clock(self.device)
        llm = self.prune(batch, configs, clock)
        batch_size = batch.batch_size
        limits = [max_new_tokens] * batch_size if isinstance(max_new_tokens, int) else list(max_new_tokens)
        eos_ids = _eos_token_ids(self.model, self.processor)
        generated = torch.zeros(batch_size, 0, dtype=torch.long, device=llm.input_ids.device)
        finished = torch.zeros(batch_size, dtype=torch.bool, device=generated.device)
        sequences: list[list[int]] = [[] for _ in range(batch_size)]
        reports: list[VisualTokenReport] = []
        cache = DynamicCache(config=self.model.config.text_config) if use_cache else None
        start = clock.now()
        try:
            for step in range(max(limits)):
                if cache is None or step == 0:
                    outputs = self._llm_call(llm, trailing=generated, cache=cache, logits_to_keep=1)
                    if step == 0:
                        reports = self._reports(llm, configs)
                        start = clock.add("prefill", start)
                        if cache is not None:
                            self.controller.end_prefill()
                    if cache is None:
                        self.controller.finish()
                else:
                    outputs = self._decode_step(llm, generated, cache)
                next_tokens = outputs.logits[:, -1].argmax(dim=-1)
                generated = torch.cat([generated, next_tokens[:, None]], dim=1)
                for b in range(batch_size):
                    if finished[b]:
                        continue
                    token = int(next_tokens[b])
                    sequences[b].append(token)
                    if token in eos_ids or len(sequences[b]) >= limits[b]:
                        finished[b] = True
                if bool(finished.all()):
                    break
        finally:
            self.controller.finish()
        if len(generated[0]) > 1:
            clock.add("decode", start)
        prompt_tokens = [int(m.sum()) for m in batch.inputs["attention_mask"]]
        return EngineOutput(
            reports=reports, sequences=sequences, timings=clock.timings, prompt_tokens=prompt_tokens
        )

    # ---- reporting -------------------------------------------------------------------------------------------
    def _reports(self, llm: LLMInputs, configs: Sequence[PruningConfig]) -> list[VisualTokenReport]:
        counts = self.controller.visual_counts  # per layer, per sample
        kept_rows = self.controller.kept_visual()  # per sample, rows of the stage-1 sequence
        hidden = int(self.text_config.hidden_size)
        intermediate = int(self.text_config.intermediate_size)
        reports = []
        for b, (sample, config) in enumerate(zip(llm.samples, configs, strict=True)):
            per_layer = tuple(int(layer_counts[b]) for layer_counts in counts)
            cols = sample.grid[1]
            visual_rows = torch.nonzero(llm.visual[b]).flatten().cpu()
            order = {int(row): i for i, row in enumerate(visual_rows)}
            source = sample.source_index.cpu()
            final = [int(source[order[int(row)]]) for row in kept_rows[b]]
            text = llm.text_tokens[b]
            reports.append(
                VisualTokenReport(
                    method=config.method,
                    budget=config.budget,
                    original=sample.plan.num_tokens,
                    stage1=sample.plan.stage1_tokens,
                    stage2=per_layer[-1],
                    per_layer=per_layer,
                    average=sum(per_layer) / len(per_layer),
                    grid=sample.grid,
                    kept=tuple(divmod(index, cols) for index in sorted(final)),
                    kept_stage1=tuple(divmod(int(index), cols) for index in sorted(source.tolist())),
                    flops_prefill=prefill_flops([text + c for c in per_layer], hidden, intermediate),
                    flops_prefill_unpruned=prefill_flops(
                        [text + sample.plan.num_tokens] * len(per_layer), hidden, intermediate
                    ),
                )
            )
        return reports


def _scoring(config: PruningConfig) -> str:
    return "last_token_mean" if config.method == "fastv" else config.stage2_scoring


def _pad_token_id(processor: Any) -> int:
    tokenizer = getattr(processor, "tokenizer", processor)
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)


def _eos_token_ids(model: torch.nn.Module, processor: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config.text_config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(e) for e in eos)
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


__all__ = [
    "EncodedImage",
    "EngineOutput",
    "LLMInputs",
    "PreparedBatch",
    "Stage1Sample",
    "VisionLanguageAdapter",
    "prefill_flops",
]
