"""The image-embedding cache: a hit skips the vision tower and gives bit-identical results, for every method.

Real tiny LLaVA and Qwen2.5-VL models; the cache is keyed by the caller's image key and the request's
similarity layers; in-batch duplicates share one vision run; the LRU holds at most its byte bound.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.budget import PruningConfig
from models.embedding_cache import EmbeddingCache, encoded_nbytes
from models.llava import LlavaAdapter
from models.methods import method_names
from models.qwen2_5_vl import Qwen2_5_VLAdapter
from tests.models.tiny import tiny_llava, tiny_qwen

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def adapter(request):
    if request.param == "llava":
        return LlavaAdapter(*tiny_llava(seed=1))
    return Qwen2_5_VLAdapter(*tiny_qwen(seed=1))


def _image(seed: int, size: tuple[int, int] = (112, 84)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


class _CountingVision:
    """Counts how many images the adapter's vision tower encodes (wraps `encode_images`)."""

    def __init__(self, adapter) -> None:
        self.images = 0
        self._original = adapter.encode_images

        def counted(batch, configs):
            self.images += len(configs)
            return self._original(batch, configs)

        adapter.encode_images = counted
        self._adapter = adapter

    def restore(self) -> None:
        self._adapter.encode_images = self._original


def _generate(adapter, images, prompts, configs, keys, cache):
    batch = adapter.prepare(images, prompts)
    batch.image_keys = keys
    return adapter.generate(batch, configs, max_new_tokens=4, embedding_cache=cache)


@pytest.mark.parametrize("method", method_names())
def test_a_hit_skips_the_vision_tower_and_is_bit_identical(adapter, method: str) -> None:
    cache = EmbeddingCache(64 * 1024 * 1024)
    config = PruningConfig(method=method, budget=0.5)
    image, prompt = _image(3), "Locate the red square in the image please"
    counter = _CountingVision(adapter)
    try:
        miss = _generate(adapter, [image], [prompt], [config], ["img-3"], cache)
        hit = _generate(adapter, [image], [prompt], [config], ["img-3"], cache)
    finally:
        counter.restore()
    assert (miss.cache_status, hit.cache_status) == (["miss"], ["hit"])
    assert counter.images == 1  # the second request never reached the vision tower
    assert hit.sequences == miss.sequences
    assert hit.reports == miss.reports  # same kept cells, per-layer counts and FLOPs, exactly
    assert "vision" in hit.timings and hit.timings["vision"] < miss.timings["vision"]


def _one_batch_and_alone(adapter, image: Image.Image, prompts: list[str], configs: list[PruningConfig]):
    """The requests in one batch with one image key (no cache), then each alone; and the images encoded."""
    counter = _CountingVision(adapter)
    try:
        shared = _generate(
            adapter, [image] * len(prompts), prompts, configs, ["same"] * len(prompts), cache=None
        )
        alone = [
            _generate(adapter, [image], [prompt], [config], [None], cache=None)
            for prompt, config in zip(prompts, configs, strict=True)
        ]
    finally:
        counter.restore()
    return shared, alone, counter.images


def test_the_same_image_in_one_batch_is_encoded_once(adapter) -> None:
    configs = [PruningConfig(budget=0.5), PruningConfig(method="fastv", budget=0.5), PruningConfig()]
    prompts = ["What color is the circle?", "Locate the red square", "How many triangles?"]
    shared, alone, images = _one_batch_and_alone(adapter, _image(5), prompts, configs)
    assert shared.cache_status == ["miss", "hit", "hit"]
    assert images == 1 + 3
    for b, single in enumerate(alone):
        assert shared.reports[b].kept == single.reports[0].kept
        assert shared.reports[b].per_layer == single.reports[0].per_layer


def test_different_similarity_layers_are_different_entries(adapter) -> None:
    cache = EmbeddingCache(64 * 1024 * 1024)
    image = _image(7)
    first = PruningConfig(budget=0.5)
    other = PruningConfig(budget=0.5, similarity_layers=(0.0, 0.5))
    _generate(adapter, [image], ["What color?"], [first], ["img-7"], cache)
    second = _generate(adapter, [image], ["What color?"], [other], ["img-7"], cache)
    assert second.cache_status == ["miss"]
    assert cache.stats().entries == 2


def test_the_lru_stays_within_its_bytes_and_evicts_the_oldest(adapter) -> None:
    probe = EmbeddingCache(1 << 30)
    _generate(adapter, [_image(10)], ["What color?"], [PruningConfig()], ["a"], probe)
    entry = probe.stats().bytes
    cache = EmbeddingCache(2 * entry + entry // 2)  # room for two entries
    for key in ("a", "b", "c"):
        _generate(adapter, [_image(ord(key))], ["What color?"], [PruningConfig()], [key], cache)
    stats = cache.stats()
    assert (stats.entries, stats.evictions, stats.misses) == (2, 1, 3)
    assert stats.bytes <= stats.capacity_bytes
    again = _generate(adapter, [_image(ord("a"))], ["What color?"], [PruningConfig()], ["a"], cache)
    assert again.cache_status == ["miss"]  # "a" was the least recently used
    assert cache.stats().hits == 0


def test_an_entry_larger_than_the_cache_is_not_stored(adapter) -> None:
    cache = EmbeddingCache(16)
    output = _generate(adapter, [_image(11)], ["What color?"], [PruningConfig()], ["big"], cache)
    assert output.cache_status == ["miss"]
    assert cache.stats().entries == 0 and cache.stats().bytes == 0


def test_encoded_nbytes_counts_every_tensor() -> None:
    from models.engine import EncodedImage

    encoded = EncodedImage(
        features=torch.zeros(4, 8),
        salience=torch.zeros(4),
        similarity=torch.zeros(4, 2, dtype=torch.float16),
        key_norm=None,
        grid=(2, 2),
    )
    assert encoded_nbytes(encoded) == 4 * 8 * 4 + 4 * 4 + 4 * 2 * 2


def test_an_image_is_encoded_once_whichever_of_its_requests_needs_the_similarity(adapter) -> None:
    """A request that reads no similarity shares the encoding of one that does, whatever their order."""
    configs = [PruningConfig(method="fastv", budget=0.5), PruningConfig(method="nuwa", budget=0.5)]
    prompts = ["Locate the red square", "What color is the circle?"]
    shared, alone, images = _one_batch_and_alone(adapter, _image(9), prompts, configs)
    assert shared.cache_status == ["hit", "miss"]
    assert images == 1 + 2
    for b, single in enumerate(alone):
        assert shared.sequences[b] == single.sequences[0]
        assert shared.reports[b].kept == single.reports[0].kept


def test_an_entry_with_the_similarity_serves_a_later_request_that_aggregates(adapter) -> None:
    """Unpruned first, then a Nüwa budget on the same image: Qwen's tower always records the similarity, so its
    entry serves the second request (bit-identical to running the tower); LLaVA's skipped the layers only the
    similarity needs, so its entry cannot, and the tower runs again."""
    from models.methods import get_method

    cache = EmbeddingCache(64 * 1024 * 1024)
    image, prompt = _image(21), "Locate the red square in the image please"
    unpruned, aggregating = PruningConfig(method="none"), PruningConfig(method="nuwa", budget=0.5)
    assert not get_method("none").needs_similarity(unpruned)
    assert get_method("nuwa").needs_similarity(aggregating)
    _generate(adapter, [image], [prompt], [unpruned], ["img-21"], cache)
    counter = _CountingVision(adapter)
    try:
        second = _generate(adapter, [image], [prompt], [aggregating], ["img-21"], cache)
    finally:
        counter.restore()
    reference = _generate(adapter, [image], [prompt], [aggregating], [None], cache=None)
    assert second.sequences == reference.sequences and second.reports == reference.reports
    if isinstance(adapter, Qwen2_5_VLAdapter):
        assert (second.cache_status, counter.images) == (["hit"], 0)
    else:
        assert (second.cache_status, counter.images) == (["miss"], 1)
    assert cache.stats().entries == (1 if isinstance(adapter, Qwen2_5_VLAdapter) else 2)
