"""The images behind pretraining and how each step gets its batch.

An :class:`ImageStore` holds every readable image once, whole, as a canvas (:mod:`fewshot.decoding`):
``pixels`` ``(N, 3, S, S)`` uint8 with each image at the top-left and ``sizes`` ``(N, 2)`` its height and width.
A data source with a fingerprint (a folder, CSV, Hugging Face set) goes through the on-disk cache
(:mod:`fewshot.image_cache`) and is memory-mapped; images given in memory (a tensor, PIL images) are fitted in
memory. Then :meth:`ImageStore.place` picks where the training reads them from:

- a CUDA device: the whole store copied onto the GPU when it takes under a quarter of its memory, else kept on the
  host and each batch gathered into pinned memory one step ahead, in a background thread, and copied without
  blocking the step;
- the CPU: copied into this process's memory when it fits under ``pretrain.data.memory_gb`` (by default 1 GiB, at
  most a quarter of the RAM shared among the processes of the node), else read from the memory map, each batch
  gathered one step ahead so that pages coming from disk do not stall the step. Steps read from the map as fast
  as from a copy (benchmarks/data_scale.py), and a copy of a large set only delays the first step, hence the
  small default.

:class:`Batches` draws the data order (one permutation per epoch, a function of seed and epoch:
DistributedSampler's scheme) and hands each step this process's rows of the global batch.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from fewshot import distributed
from fewshot.errors import FewshotError
from fewshot.sources import ImageSet

if TYPE_CHECKING:
    from fewshot.image_cache import Cached
    from fewshot.pretrain_config import PretrainConfig
    from fewshot.sources import Decodable, Images


@dataclass
class ImageStore:
    """Every readable image: ``pixels`` ``(N, 3, S, S)`` uint8 canvases, ``sizes`` ``(N, 2)`` int64 (h, w)."""

    pixels: Tensor
    sizes: Tensor
    skipped: list[dict[str, str]] = field(default_factory=list)
    file: Path | None = None  # the cache entry it is mapped from
    where: str = "in memory"  # what place() chose, for the run's config.json and summary

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def side(self) -> int:
        return int(self.pixels.shape[-1])

    @property
    def mapped(self) -> bool:
        """Read from the memory-mapped file (not copied into RAM or onto a GPU)."""
        return self.file is not None and self.where.startswith("memory-mapped")

    def gather(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """The canvases and sizes of the images ``ids``: ``(b, 3, S, S)`` uint8 and ``(b, 2)``."""
        return self.pixels[ids.to(self.pixels.device)], self.sizes[ids.to(self.sizes.device)]

    def place(self, device: torch.device, memory_gb: float | None = None) -> ImageStore:
        """Where training reads the images from (see the module docstring); returns the placed store."""
        nbytes = self.pixels.numel()
        if device.type == "cuda":
            if nbytes < 0.25 * torch.cuda.get_device_properties(device).total_memory:
                pixels, sizes = _copy(self.pixels, device), self.sizes.to(device)
                return replace(self, pixels=pixels, sizes=sizes, where=f"on {device}")
            return replace(self, where="memory-mapped, pinned batches" if self.file else "in memory, pinned batches")
        if self.file is None:
            return self
        cap = _memory_cap(memory_gb)
        if nbytes <= cap:
            return replace(self, pixels=_copy(self.pixels, device), where="in memory (copied from the cache)")
        return replace(self, where=f"memory-mapped ({nbytes / 2**30:.2f} GiB > {cap / 2**30:.2f} GiB memory cap)")


DEFAULT_MEMORY_GB = 1.0  # what a process copies into RAM by default (a second or two to read)


def _memory_cap(memory_gb: float | None) -> float:
    """Bytes of images one process may copy into RAM: ``memory_gb`` GiB, else 1 GiB, at most a quarter of the RAM
    divided among the node's processes (more would only duplicate what the page cache holds once)."""
    if memory_gb is not None:
        return memory_gb * 2**30
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0.0
    return min(DEFAULT_MEMORY_GB * 2**30, 0.25 * ram / distributed.local_world())


def _copy(pixels: Tensor, device: torch.device, chunk: int = 1024) -> Tensor:
    """``pixels`` copied to ``device`` in chunks (a memory-mapped source is read once, sequentially)."""
    out = torch.empty(pixels.shape, dtype=pixels.dtype, device=device)
    for start in range(0, pixels.shape[0], chunk):
        out[start : start + chunk].copy_(pixels[start : start + chunk])
    return out


# ---------------------------------------------------------------------------------------------- opening


def open_store(
    images: Images, cfg: PretrainConfig, ranks: distributed.Dist | None = None, progress: bool = False
) -> tuple[ImageStore, Cached | None]:
    """The images of a run at ``cfg.store_size`` (default twice ``cfg.img_size``), through the on-disk cache when
    ``images`` has a fingerprint; returns the store and the cache entry (None for images given in memory)."""
    side = store_side(cfg)
    if isinstance(images, ImageSet) and images.fingerprint:  # files: through the on-disk cache
        from fewshot.decoding import default_workers
        from fewshot.image_cache import cache_folder, open_cache

        data = cfg.data
        workers = data.workers or default_workers(distributed.local_world())
        cached = open_cache(images, side, data.draft, workers, cache_folder(data.cache_dir), ranks, progress)
        where = f"memory-mapped from {cached.path}"
        return ImageStore(cached.pixels, cached.sizes, cached.skipped, cached.path, where), cached
    if torch.is_tensor(images):
        return ImageStore(*fit_tensor(images, side)), None
    return _decode_in_memory(images, side), None


def store_side(cfg: PretrainConfig) -> int:
    """The stored resolution: the longer side of every image (``pretrain.store_size``, default 2 × img_size)."""
    if not cfg.store_size and cfg.img_size is None:
        raise ValueError("store_side needs img_size: resolve the config first (fewshot.inits.resolve_pretrain)")
    side = cfg.store_size or 2 * (cfg.img_size or 0)
    if side < 1:
        raise FewshotError(f"pretrain.store_size must be a positive number of pixels, got {side}")
    return int(side)


def fit_tensor(images: Tensor, side: int) -> tuple[Tensor, Tensor]:
    """``(N, 3, H, W)`` uint8 images resized (bicubic, antialiased) to a longer side of ``side``, in canvases."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise FewshotError(f"image tensors must be (N, 3, H, W) uint8, got {tuple(images.shape)} {images.dtype}")
    n, _, h, w = images.shape
    scale = side / max(h, w)
    nh, nw = max(1, min(side, round(h * scale))), max(1, min(side, round(w * scale)))
    x = images
    if (nh, nw) != (h, w):
        x = torch.nn.functional.interpolate(images.float(), (nh, nw), mode="bicubic", antialias=True)
        x = x.round().clamp(0, 255).to(torch.uint8)
    out = torch.zeros(n, 3, side, side, dtype=torch.uint8)
    out[..., :nh, :nw] = x
    return out, torch.tensor([[nh, nw]], dtype=torch.long).expand(n, 2).contiguous()


def _decode_in_memory(images: Decodable, side: int) -> ImageStore:
    """A sequence of PIL images or of objects with ``load()``, decoded in this process."""
    from fewshot.decoding import canvas, fit, load, record_name
    from fewshot.images import UnreadableImage

    n = len(images)
    pixels = np.zeros((n, 3, side, side), dtype=np.uint8)
    sizes: list[tuple[int, int]] = []
    skipped: list[dict[str, str]] = []
    for i in range(n):
        try:
            fitted = fit(load(images, i).convert("RGB"), side)  # (h, w, 3)
        except (UnreadableImage, OSError) as exc:
            skipped.append({"path": record_name(images, i), "reason": str(exc)})
            continue
        canvas(fitted, side, pixels[len(sizes)])
        sizes.append((fitted.shape[0], fitted.shape[1]))
    if not sizes:
        raise FewshotError(f"none of the {n} images could be read; check the data source")
    return ImageStore(torch.from_numpy(pixels[: len(sizes)]), torch.tensor(sizes, dtype=torch.long), skipped)


# ---------------------------------------------------------------------------------------------- batches


class Batches:
    """``batches(step)``: this process's rows ``rows`` of the global batch of ``batch`` images of ``step`` (of
    ``total``), as
    ``(b, 3, S, S)`` uint8 canvases and ``(b, 2)`` sizes on ``device``.

    The order is one permutation of the store per epoch (``per_epoch`` steps), a function of ``seed`` and the
    epoch, so a resumed run sees the same batches. Stores read from the host by a GPU, or memory-mapped, are
    gathered one step ahead in a background thread (on CUDA into two pinned buffers, reused once the copy out of
    them has finished)."""

    def __init__(
        self, store: ImageStore, batch: int, rows: slice, seed: int, per_epoch: int, total: int, device: torch.device
    ) -> None:
        self.store, self.batch, self.rows, self.seed, self.per_epoch = store, batch, rows, seed, per_epoch
        self.total, self.device = total, device
        self.cuda = device.type == "cuda" and store.pixels.device.type == "cpu"
        self.ahead = self.cuda or store.mapped
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="fewshot-batches") if self.ahead else None
        self.pending: dict[int, Future[tuple[Tensor, Tensor, int]]] = {}
        self.orders: dict[int, Tensor] = {}
        self.pinned: list[Tensor] = []
        self.copied: list[Any] = [None, None]  # a CUDA event per pinned buffer: its copy to the GPU is done

    def ids(self, step: int) -> Tensor:
        """Positions in the store of this process's images of ``step``."""
        epoch, i = divmod(step, self.per_epoch)
        if epoch not in self.orders:
            order = torch.Generator().manual_seed(self.seed * 100_003 + epoch)  # a function of the epoch: resumable
            self.orders = {e: o for e, o in self.orders.items() if e >= epoch - 1}
            self.orders[epoch] = torch.randperm(len(self.store), generator=order)
        return self.orders[epoch][i * self.batch : (i + 1) * self.batch][self.rows]  # (b,)

    def __call__(self, step: int) -> tuple[Tensor, Tensor]:
        if not self.ahead:
            pixels, sizes = self.store.gather(self.ids(step))
            return pixels.to(self.device, non_blocking=True), sizes.to(self.device)
        job = self.pending.pop(step, None)
        pixels, sizes, slot = job.result() if job is not None else self._gather(self.ids(step), step % 2)
        if self.pool is not None and step + 1 < self.total:
            self.pending = {step + 1: self.pool.submit(self._gather, self.ids(step + 1), (step + 1) % 2)}
        if not self.cuda:
            return pixels, sizes
        out = pixels.to(self.device, non_blocking=True)  # (b, 3, S, S) from pinned memory: does not block
        self.copied[slot] = torch.cuda.Event()
        self.copied[slot].record()
        return out, sizes.to(self.device, non_blocking=True)

    def _gather(self, ids: Tensor, slot: int) -> tuple[Tensor, Tensor, int]:
        if not self.cuda:
            pixels, sizes = self.store.gather(ids)
            return pixels, sizes, slot
        if not self.pinned:
            shape = (len(ids), *self.store.pixels.shape[1:])
            self.pinned = [torch.empty(shape, dtype=torch.uint8).pin_memory() for _ in range(2)]
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()  # the copy out of this buffer (two steps ago) has finished
        torch.index_select(self.store.pixels, 0, ids, out=self.pinned[slot])
        return self.pinned[slot], self.store.sizes[ids].pin_memory(), slot

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
