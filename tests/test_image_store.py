"""Where training reads the images from (memory, the memory-mapped cache) and the batches of each step: a set over
the memory cap trains from the cache file exactly as from memory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fewshot.image_store import Batches, ImageStore, fit_tensor, open_store
from fewshot.pretrain_config import DataConfig, DinoConfig, PretrainConfig
from fewshot.sources import open_source

CFG = PretrainConfig(
    model="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, epochs=2, batch_size=4, log_every=1, seed=1,
    dino=DinoConfig(local_crops=2, hidden_dim=32, bottleneck_dim=16, out_dim=64),
)  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(10):
        w, h = (50, 30) if i % 3 else (24, 40)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"p{i}.png")
    return root


def test_fit_tensor_keeps_the_aspect_ratio_in_canvases() -> None:
    images = torch.full((2, 3, 20, 40), 9, dtype=torch.uint8)
    pixels, sizes = fit_tensor(images, 16)
    assert pixels.shape == (2, 3, 16, 16) and sizes.tolist() == [[8, 16], [8, 16]]
    assert (pixels[..., :8, :] == 9).all() and not pixels[..., 8:, :].any()


def test_the_store_is_copied_into_memory_under_the_cap_and_memory_mapped_over_it(data: Path) -> None:
    store, cached = open_store(open_source(data), CFG)
    assert store.mapped and store.where.startswith("memory-mapped from")
    assert store.side == 64 and len(store) == 10 and cached.built
    cpu = torch.device("cpu")
    in_ram = store.place(cpu)  # default cap: a quarter of the RAM
    mapped = store.place(cpu, memory_gb=0.0)
    assert in_ram.where.startswith("in memory") and not in_ram.mapped
    assert mapped.mapped and "memory cap" in mapped.where
    assert mapped.pixels is store.pixels and in_ram.pixels.data_ptr() != store.pixels.data_ptr()  # a copy in RAM
    assert torch.equal(in_ram.pixels, mapped.pixels)


def test_batches_read_ahead_from_the_memory_map_are_the_batches_read_directly(data: Path) -> None:
    store, _ = open_store(open_source(data), CFG)
    mapped = store.place(torch.device("cpu"), memory_gb=0.0)
    in_ram = store.place(torch.device("cpu"))
    ahead = Batches(mapped, 4, slice(2, 4), seed=3, per_epoch=2, total=6, device=torch.device("cpu"))
    direct = Batches(in_ram, 4, slice(2, 4), seed=3, per_epoch=2, total=6, device=torch.device("cpu"))
    assert ahead.ahead and not direct.ahead
    for step in range(6):
        (a, sa), (b, sb) = ahead(step), direct(step)
        assert torch.equal(a, b) and torch.equal(sa, sb) and a.shape == (2, 3, 64, 64)
    ahead.close()
    assert sorted(direct.orders[2].tolist()) == list(range(10))  # one permutation of the store per epoch
    assert not torch.equal(direct.orders[2], direct.orders[1])  # a new one each epoch


def test_a_set_over_the_memory_cap_trains_from_the_cache_file_exactly_as_from_memory(data: Path, tmp_path: Path):
    from fewshot.train import pretrain

    images = open_source(data)
    pretrain(images, tmp_path / "ram", CFG, progress=False)
    capped = dataclasses.replace(CFG, data=DataConfig(memory_gb=1e-6))  # 10 images of 64 px: 0.1 MB > 1 kB
    pretrain(images, tmp_path / "mapped", capped, progress=False)
    where = [json.loads((tmp_path / k / "config.json").read_text())["images"]["where"] for k in ("ram", "mapped")]
    assert where[0].startswith("in memory") and where[1].startswith("memory-mapped")
    losses = [[json.loads(ln)["loss"] for ln in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
              for k in ("ram", "mapped")]  # fmt: skip
    assert losses[0] == losses[1]
    a, b = load_file(tmp_path / "ram" / "backbone.safetensors"), load_file(tmp_path / "mapped" / "backbone.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_images_given_in_memory_are_fitted_without_the_cache() -> None:
    pil = [Image.new("RGB", (40, 20), (255, 0, 0)), Image.new("L", (10, 30), 128)]
    store, cached = open_store(pil, CFG)
    assert cached is None and store.file is None and store.sizes.tolist() == [[32, 64], [64, 21]]
    assert store.place(torch.device("cpu"), memory_gb=0.0) is store  # nothing to map: stays in memory
    assert isinstance(store, ImageStore) and store.pixels[0, 0, :32].min() == 255
