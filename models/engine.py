"""The engine core, the model-agnostic half: stage 1 per image, the sequence rebuilt with original positions, the
LLM run under the stage-2 controller, and greedy generation (`models/decoding.py`) with per-sample reports
(`models/reports.py`).

A family adapter (`models/llava.py`, `models/qwen2_5_vl.py`) supplies four things: how to turn images + prompts
into the stock processor's tensors, how to run the vision tower while recording salience / similarity, how to
project kept features into the LLM space, and the UNPRUNED position ids. What each pruning method keeps is the
method's own business (`models/methods/`). Everything else is shared here, because the mechanics are the same for
every family and method: drop `<image>` placeholders for pruned tokens, pass the kept features through
transformers' `mm_encoder_outputs` argument, and pass the kept tokens' original position ids explicitly.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from models.attention import enable_probes
from models.boxes import Frame
from models.budget import Family, PruningConfig, TokenPlan, plan_tokens
from models.clocks import Clock, StageClock
from models.decoding import FinishReason, greedy_decode, pad_token_id
from models.embedding_cache import EmbeddingCache
from models.fast_decode import LlamaDecodeStep
from models.geometry import Geometry
from models.last_position import LastPositionRows
from models.methods import Stage1Selection, get_method, keep_every_token
from models.reports import visual_token_reports
from models.stage2 import DropPlan, LayerDropController
from models.tasks import VisualTokenReport


@dataclass
class EncodedImage:
    """What the vision side produced for one image, before any pruning.

    Attributes:
        features: `(N, D)` tokens in raster order of `grid`, in the space where aggregation happens (LLaVA: the
            selected CLIP layer, before the projector; Qwen2.5-VL: merged tokens, already in the LLM space).
        salience: `(N,)` float32 attention-based salience (Nüwa's m).
        similarity: `(N, Ds)` features for the semantic similarity A (mean of middle encoder layers); None when
            no method of the batch reads it (`PruningMethod.needs_similarity`) and the adapter skipped it.
        key_norm: `(N,)` mean key L2 norm in the salience layer (paper options), or None.
        grid: (rows, cols) of the token grid.
        distinct: `(N,)` `pruning.distinctness` of the tokens, when the adapter fixes which columns it reads
            (Qwen3-VL: the main features, not the DeepStack levels stacked after them); None = of `features`.
    """

    features: torch.Tensor
    salience: torch.Tensor
    similarity: torch.Tensor | None
    key_norm: torch.Tensor | None
    grid: tuple[int, int]
    distinct: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])


@dataclass
class PreparedBatch:
    """The stock processor's output for a batch plus where each original image sits in its model input.

    Attributes:
        inputs: processor tensors (input_ids, attention_mask, pixel_values, ...), left padded, on the device.
        frames: per sample, the `Frame` between the original image and the image its vision encoder saw.
        image_keys: per sample, a key naming the image's content for the embedding cache (None: never cached);
            samples with the same key share one vision-encoder run inside the batch too.
    """

    inputs: dict[str, Any]
    frames: list[Frame]
    image_keys: list[str | None] | None = None

    @property
    def batch_size(self) -> int:
        return int(self.inputs["input_ids"].shape[0])

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """(w, h) of each original image."""
        return [frame.original_size for frame in self.frames]

    @property
    def model_input_sizes(self) -> list[tuple[int, int]]:
        """(w, h) of the image each sample's vision encoder saw."""
        return [frame.input_size for frame in self.frames]

    def to(self, device: torch.device) -> PreparedBatch:
        """The same batch with its tensors on `device` (asynchronous from pinned memory).

        `prepare` leaves tensors on the CPU on purpose: it runs on the worker's preparation thread, and a copy to
        a CUDA device there would queue behind the running batch's kernels and stall the pipeline.
        """
        if all(not isinstance(v, torch.Tensor) or v.device == device for v in self.inputs.values()):
            return self
        inputs = {
            key: value.to(device, non_blocking=value.is_pinned())
            if isinstance(value, torch.Tensor)
            else value
            for key, value in self.inputs.items()
        }
        return PreparedBatch(inputs=inputs, frames=self.frames, image_keys=self.image_keys)


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
    configs: list[PruningConfig]  # the pruning config of each sample
    cache_status: list[CacheStatus] = field(default_factory=list)  # per sample, from the vision step


CacheStatus = Literal["hit", "miss"]
"""Per sample: "hit" = the vision tower did not run for it (cached, or shared with an identical image in the
batch), "miss" = it ran."""


@dataclass
class EngineOutput:
    """Result of `VisionLanguageAdapter.forward` / `.generate`."""

    reports: list[VisualTokenReport]
    logits: torch.Tensor | None = None  # (B, L_last, V) in the last layer's layout (forward only)
    sequences: list[list[int]] = field(default_factory=list)  # generated ids per sample (generate only)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: vision, prune, prefill, decode
    prompt_tokens: list[int] = field(default_factory=list)  # unpruned prompt length per sample
    cache_status: list[CacheStatus] = field(default_factory=list)  # per sample
    finish_reasons: list[FinishReason] = field(default_factory=list)  # per sample (generate only)


class VisionLanguageAdapter(ABC):
    """Applies per-request `PruningConfig`s to one transformers VLM instance (no source edits, no global patches)."""

    family: Family = "generic"
    fallback_template: str = "{prompt}"
    """The family's one-image chat format, for a checkpoint that ships no chat template (`format_prompt`)."""

    def __init__(self, model: torch.nn.Module, processor: Any, fast_paths: bool = True) -> None:
        self.model = model
        self.processor = processor
        self.fast_paths = fast_paths
        """Use the serving-path equivalences (each tested bit-exact against the stock code: the family's own
        preprocessing and vision shortcuts, and `fast_decode_step`); False runs the stock code everywhere, as an
        escape hatch should a transformers version change what they mirror (`NUWA_FAST_PATHS`)."""
        enable_probes(model)
        self.controller = LayerDropController(self.decoder_layers)
        self.fast_decode_step: LlamaDecodeStep | None = (
            LlamaDecodeStep.for_model(model) if fast_paths else None
        )
        """Cached decode steps without the model stack (`models.fast_decode`); None = the stock forward."""
        self.last_rows: LastPositionRows | None = (
            LastPositionRows.for_layer(self.decoder_layers[-1]) if self.fast_decode_step is not None else None
        )
        """The prefill's last layer runs o_proj and the MLP where logits are read only (`models.last_position`);
        None = the whole layer runs (another family, fast paths off, or no row count passed the probe)."""

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def format_prompt(self, prompt: str) -> str:
        """The chat-formatted text for one user prompt with one image: the checkpoint's own chat template when
        it has one (processor or tokenizer), else the family's `fallback_template`."""
        template = getattr(self.processor, "chat_template", None) or getattr(
            self.tokenizer, "chat_template", None
        )
        if template:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.fallback_template.format(prompt=prompt)

    # ---- family hooks ----------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def decoder_layers(self) -> torch.nn.ModuleList: ...

    @property
    @abstractmethod
    def image_token_id(self) -> int: ...

    @abstractmethod
    def prepare(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        original_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> PreparedBatch:
        """Images + user prompts -> processor tensors (chat template applied, left padding).

        `original_sizes` are the sizes the frames refer to when `images` were already reduced by a decoder to
        the geometry's `decode_size` (boxes then still map to the pixels of the image the client sent).
        """

    @abstractmethod
    def encode_images(self, batch: PreparedBatch, configs: Sequence[PruningConfig]) -> list[EncodedImage]:
        """Run the vision tower once for the batch, recording salience and similarity per image."""

    @abstractmethod
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Map `EncodedImage.features` rows into the LLM embedding space."""

    @abstractmethod
    def unpruned_positions(self, batch: PreparedBatch) -> torch.Tensor:
        """Position ids of the UNPRUNED padded sequence: (B, L) or (3, B, L) for M-RoPE."""

    @property
    @abstractmethod
    def geometry(self) -> Geometry:
        """How this model frames an image and how many visual tokens it becomes, from the size alone."""

    def llm_position_kwargs(self) -> dict[str, Any]:
        """Extra forward kwargs for the LLM call (none by default)."""
        return {}

    def image_encoder_outputs(self, features: tuple[torch.Tensor, ...]) -> BaseModelOutputWithPooling:
        """`mm_encoder_outputs["image"]` of the LLM call: the kept, projected features, one tensor per sample.

        A family whose model reads more than `pooler_output` from it (Qwen3-VL: `deepstack_features`) says so here.
        """
        return BaseModelOutputWithPooling(pooler_output=features)

    # ---- shared properties -----------------------------------------------------------------------------------
    def estimate_visual_tokens(self, image_size: tuple[int, int]) -> int:
        """Unpruned visual tokens for an original image of (w, h), without decoding any pixels."""
        return self.geometry.visual_tokens(image_size)

    def frame_for(self, image_size: tuple[int, int]) -> Frame:
        """Where an original image of (w, h) will sit in the model input, from its size alone."""
        return self.geometry.frame(image_size)

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
        keep_all = plan.stage1_tokens >= encoded.num_tokens and (
            config.budget is None or not config.aggregation
        )
        selection: Stage1Selection = (
            keep_every_token(encoded) if keep_all else get_method(config.method).select(encoded, config, plan)
        )
        return Stage1Sample(
            plan=plan,
            grid=encoded.grid,
            features=self.project(selection.features),
            source_index=selection.source_index,
            compressed_positions=selection.compressed_positions,
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
        pad_id = pad_token_id(self.processor)
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
                scoring = get_method(config.method).stage2_scoring(config)
                drop_plans.append(DropPlan(plan.stage2_layer, plan.stage2_tokens, scoring))
        return LLMInputs(
            input_ids=new_ids,
            attention_mask=new_mask,
            position_ids=new_pos,
            visual=new_visual,
            features=tuple(sample.features for sample in samples),
            samples=samples,
            text_tokens=text_tokens,
            drop_plans=drop_plans,
            configs=list(configs),
        )

    # ---- vision, once per distinct image ---------------------------------------------------------------------
    def vision_subset(self, batch: PreparedBatch, indices: Sequence[int]) -> PreparedBatch:
        """The vision inputs of some samples only (to encode what the cache lacks).

        This default selects rows of every tensor whose first axis is the batch (LLaVA's `pixel_values`);
        families that pack images along one axis (Qwen's patches) override it.
        """
        index = torch.tensor(list(indices), device=self.device)
        size = batch.batch_size
        inputs = {
            key: value.index_select(0, index.to(value.device))
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size
            else value
            for key, value in batch.inputs.items()
        }
        return PreparedBatch(inputs=inputs, frames=[batch.frames[i] for i in indices])

    def encode(
        self, batch: PreparedBatch, configs: Sequence[PruningConfig], cache: EmbeddingCache | None = None
    ) -> tuple[list[EncodedImage], list[CacheStatus]]:
        """The vision side of every sample, running the tower only for images neither cached nor seen earlier
        in this batch (the key is the image's content and the request's similarity layers, None for a request
        whose method reads no similarity: its entry may lack it)."""
        size = batch.batch_size
        image_keys = batch.image_keys or [None] * size
        candidates = [
            None if image_key is None else embedding_keys(image_key, config)
            for image_key, config in zip(image_keys, configs, strict=True)
        ]
        encoded: list[EncodedImage | None] = [None] * size
        status: list[CacheStatus] = ["miss"] * size
        first_of: dict[Any, int] = {}
        source = list(range(size))  # the sample whose encoding each sample uses
        to_encode: list[int] = []
        # Samples that need the similarity claim their image first, so one of the same image that needs none
        # shares their encoding (an entry with the similarity serves both; one without serves only the latter).
        order = sorted(range(size), key=lambda b: candidates[b] is not None and len(candidates[b]) > 1)
        for b in order:
            options = candidates[b]
            if options is None:
                to_encode.append(b)
            elif (shared := next((first_of[k] for k in options if k in first_of), None)) is not None:
                status[b], source[b] = "hit", shared
            elif cache is not None and (cached := cache.get_any(options)) is not None:
                encoded[b], status[b] = cached, "hit"
                first_of[options[0]] = b
            else:
                first_of[options[0]] = b
                to_encode.append(b)
        if to_encode:
            to_encode.sort()
            sub_batch = batch if len(to_encode) == size else self.vision_subset(batch, to_encode)
            fresh = self.encode_images(sub_batch, [configs[b] for b in to_encode])
            for b, value in zip(to_encode, fresh, strict=True):
                encoded[b] = value
                if image_keys[b] is not None and cache is not None:
                    cache.put(storage_key(image_keys[b], configs[b], value), value)
        for b in range(size):
            if encoded[b] is None:
                encoded[b] = encoded[source[b]]
        return [value for value in encoded if value is not None], status

    # ---- running ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prune(
        self,
        batch: PreparedBatch,
        configs: Sequence[PruningConfig],
        clock: Clock | None = None,
        cache: EmbeddingCache | None = None,
    ) -> LLMInputs:
        """Vision tower (cache-aware) + stage 1 for every sample; returns the rebuilt LLM inputs."""
        if len(configs) != batch.batch_size:
            raise ValueError(f"{len(configs)} configs for a batch of {batch.batch_size}")
        clock = clock or StageClock(self.device)
        batch = batch.to(self.device)
        start = clock.now()
        encoded, status = self.encode(batch, configs, cache)
        start = clock.add("vision", start)
        samples = [self.stage1(enc, config) for enc, config in zip(encoded, configs, strict=True)]
        llm_inputs = self.build_llm_inputs(batch, samples, configs)
        llm_inputs.cache_status = status
        clock.add("prune", start)
        return llm_inputs

    def run_llm(
        self,
        llm: LLMInputs,
        trailing: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        logits_to_keep: int = 0,
    ) -> Any:
        """One prefill of the stage-1 sequence (plus `trailing` tokens) with the stage-2 controller armed.

        The caller ends the run with `self.controller.finish()` (or `end_prefill()` before cached decoding).
        """
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
        rows = self.last_rows if logits_to_keep == 1 else None  # only the last position's logits are read
        with rows.only_last(input_ids.shape[0]) if rows is not None else contextlib.nullcontext():
            return self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                mm_encoder_outputs={"image": self.image_encoder_outputs(llm.features)},
                past_key_values=cache,
                use_cache=cache is not None,
                logits_to_keep=logits_to_keep,
                **self.llm_position_kwargs(),
            )

    def reports(self, llm: LLMInputs) -> list[VisualTokenReport]:
        """What the prefill that just ran kept, per sample (call before the controller's run ends)."""
        return visual_token_reports(self.controller, llm, llm.configs, self.text_config)

    @torch.inference_mode()
    def forward(
        self, batch: PreparedBatch, configs: Sequence[PruningConfig], trailing: torch.Tensor | None = None
    ) -> EngineOutput:
        """One full (uncached) forward; logits come back in the last layer's layout."""
        clock = StageClock(self.device)
        llm = self.prune(batch, configs, clock)
        start = clock.now()
        try:
            outputs = self.run_llm(llm, trailing=trailing)
            reports = self.reports(llm)
        finally:
            self.controller.finish()
        clock.add("prefill", start)
        return EngineOutput(
            reports=reports, logits=outputs.logits, timings=clock.timings, cache_status=llm.cache_status
        )

    @torch.inference_mode()
    def generate(
        self,
        batch: PreparedBatch,
        configs: Sequence[PruningConfig],
        max_new_tokens: int | Sequence[int] = 32,
        use_cache: bool = True,
        clock: Clock | None = None,
        stop_at_eos: bool = True,
        embedding_cache: EmbeddingCache | None = None,
        cancelled: Callable[[], Collection[int]] | None = None,
        on_step: Callable[[Sequence[Sequence[int]]], None] | None = None,
    ) -> EngineOutput:
        """Greedy decoding with per-request pruning; identical tokens with and without the KV cache.

        Args:
            batch: The prepared batch.
            configs: One pruning config per sample.
            max_new_tokens: Generation cap, for all samples or per sample.
            use_cache: Decode with a KV cache (False re-runs the pruned prefill each step; same tokens).
            clock: Stage clock (default: a `StageClock` on this device).
            stop_at_eos: False decodes exactly max(max_new_tokens) tokens per sample (speed benchmarks).
            embedding_cache: Vision outputs of images seen before (see `encode`).
            cancelled: Samples to stop decoding (see `models.decoding.greedy_decode`).
            on_step: Called with every sample's tokens so far after each step (streaming).
        """
        clock = clock or StageClock(self.device)
        llm = self.prune(batch, configs, clock, cache=embedding_cache)
        batch_size = batch.batch_size
        limits = [max_new_tokens] * batch_size if isinstance(max_new_tokens, int) else list(max_new_tokens)
        sequences, reports, reasons = greedy_decode(
            self,
            llm,
            limits,
            clock,
            use_cache=use_cache,
            stop_at_eos=stop_at_eos,
            cancelled=cancelled,
            on_step=on_step,
        )
        prompt_tokens = [int(m.sum()) for m in batch.inputs["attention_mask"]]
        return EngineOutput(
            reports=reports,
            sequences=sequences,
            timings=dict(clock.timings),
            prompt_tokens=prompt_tokens,
            cache_status=llm.cache_status,
            finish_reasons=reasons,
        )


def storage_key(image_key: Any, config: PruningConfig, encoded: EncodedImage) -> tuple[Any, Any]:
    """The key an encoding is stored under: with its similarity layers whenever it carries the similarity.

    Why not always `embedding_keys(...)[0]`: a request that reads no similarity would store under
    `(image, None)`, which a later request that aggregates never looks up, although the entry may well carry the
    similarity (Qwen's towers always record it; LLaVA's does when the batch needed it) and would serve it: a user
    who grounds a phrase unpruned and then asks for a Nüwa budget on the same image would run the tower twice.
    An entry under `(image, layers)` serves both kinds (`embedding_keys`).
    """
    if encoded.similarity is not None:
        return (image_key, config.similarity_layers)
    return (image_key, None)


def embedding_keys(image_key: Any, config: PruningConfig) -> tuple[tuple[Any, Any], ...]:
    """The embedding-cache keys whose entry serves `config` for this image, the one it is stored under first.

    A method that reads the similarity needs an entry computed with ITS similarity layers. One that reads none
    stores under `(image, None)` (the entry may lack the similarity: LLaVA then skips the layers only the
    similarity needs), and can also use an entry made for a request with the default-or-own layers.
    """
    if get_method(config.method).needs_similarity(config):
        return ((image_key, config.similarity_layers),)
    return ((image_key, None), (image_key, config.similarity_layers))


__all__ = [
    "EncodedImage",
    "EngineOutput",
    "LLMInputs",
    "PreparedBatch",
    "Stage1Sample",
    "VisionLanguageAdapter",
    "embedding_keys",
    "storage_key",
]
