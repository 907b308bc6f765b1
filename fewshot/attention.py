"""Emerging properties of ViTs: class-token attention maps, DINO's attention masks and their Jaccard to masks.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers" (DINO): the attention of the
class token to every patch, per head, at the last block (or ``block``), upsampled to the image by the patch size.
A head's mask keeps the smallest set of patches holding ``threshold`` (DINO: 60%) of its attention mass, as in
DINO's ``visualize_attention.py``; we add the union of the heads' masks and the mask of the mean map. The mass is
normalised over the patches only: prefix tokens (the class token and any register tokens) are excluded.

timm computes attention fused (``F.scaled_dot_product_attention``), which never materialises the softmax. For
the block we read we switch its ``Attention.fused_attn`` off and hook ``attn_drop``, whose input is the softmaxed
attention (B, heads, N, N) on the unfused path (timm 1.0 ``Attention``, ``AttentionRope``, Eva, BEiT); the switch
and the hook are restored afterwards, also on error. ``timm.layers.set_fused_attn`` would not help: it is read
only when a module is built.

Images are resized whole (no crop) to the model's input size, or to ``img_size`` (whole patches);
another size is set with timm's ``set_input_size`` on a copy of the model (position embeddings interpolated).
Jaccard (IoU) is computed at that input resolution: ground-truth masks are resized with nearest neighbours.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fewshot.errors import FewshotError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from fewshot.backbones import Backbone
    from fewshot.sources import ImageSet

# a timm ViT: its blocks, patch_embed and attention modules are read by name (timm's vocabulary), which nn.Module's
# type (attributes typed Tensor | Module) cannot express
TimmViT = Any


@dataclass
class AttentionMaps:
    """One image's class-token attention at one block, on the patch grid (gh, gw)."""

    heads: np.ndarray  # (h, gh, gw) attention of the class token to each patch, per head
    prefix_mass: np.ndarray  # (h,) attention the class token puts on prefix tokens (class + registers)
    mean: np.ndarray  # (gh, gw) mean over heads
    masks: np.ndarray  # (h, gh, gw) bool: the smallest patch set holding `threshold` of each head's mass
    mean_mask: np.ndarray  # (gh, gw) bool: the same for the mean map
    union_mask: np.ndarray  # (gh, gw) bool: union of the heads' masks


# ---------------------------------------------------------------------------------------------- capturing


def attention_block(model: TimmViT, block: int | None = None) -> tuple[TimmViT, int]:
    """The attention module of ``block`` (None: the last; negative counts from the end) and its index."""
    import torch

    blocks = getattr(model, "blocks", None)
    if model is None or blocks is None or len(blocks) == 0:
        name = type(model).__name__ if model is not None else "pixels"
        raise FewshotError(f"backbone '{name}' is not a ViT; attention maps need one, e.g. --backbone runs/dino")
    depth = len(blocks)
    index = depth - 1 if block is None else block
    if not -depth <= index < depth:
        raise FewshotError(f"block {block} is out of range: the model has {depth} blocks (0..{depth - 1}, -1 = last)")
    index %= depth
    attn = getattr(blocks[index], "attn", None)
    if not hasattr(attn, "fused_attn") or not isinstance(getattr(attn, "attn_drop", None), torch.nn.Module):
        raise FewshotError(
            f"block {index} of {type(model).__name__} has no timm attention with attn_drop; "
            "attention maps support timm ViTs (vit_*, deit*, eva*, beit*)"
        )
    return attn, index


@contextmanager
def capture_attention(model: TimmViT, block: int | None = None) -> Iterator[list[torch.Tensor]]:
    """Within the context each forward appends the class token's attention row (B, heads, N) of ``block``."""
    attn, _ = attention_block(model, block)
    captured: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        captured.append(inputs[0][:, :, 0, :].detach().float().cpu())  # (B, heads, N): softmax row of token 0

    previous = attn.fused_attn
    handle = attn.attn_drop.register_forward_hook(hook)
    attn.fused_attn = False  # the unfused path materialises the softmax and passes it through attn_drop
    try:
        yield captured
    finally:
        attn.fused_attn = previous
        handle.remove()


def class_attention(model: TimmViT, x: torch.Tensor, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) -> class-token attention to every token (B, heads, N) and the output tokens (B, N, D)."""
    import torch

    if getattr(model, "cls_token", None) is None:
        raise FewshotError(f"{type(model).__name__} has no class token; attention maps read the class token's row")
    with capture_attention(model, block) as captured, torch.inference_mode():
        tokens = model.forward_features(x)  # (B, N, D)
    if len(captured) != 1:
        raise FewshotError(f"could not read the attention of {type(model).__name__} (hook fired {len(captured)}x)")
    return captured[0], tokens


def attention_maps(row: np.ndarray, n_prefix: int, grid: tuple[int, int], threshold: float) -> AttentionMaps:
    """Class-token attention row (h, N) of one image -> per-head patch maps and DINO masks."""
    h = row.shape[0]
    if row.shape[1] != n_prefix + grid[0] * grid[1]:
        raise FewshotError(f"attention has {row.shape[1]} tokens, expected {n_prefix} prefix + {grid} patches")
    heads = row[:, n_prefix:].reshape(h, *grid).astype(np.float32)  # (h, gh, gw), prefix tokens dropped
    mean = heads.mean(axis=0)  # (gh, gw)
    masks = mass_mask(heads, threshold)  # (h, gh, gw)
    union = np.any(masks, axis=0)  # (gh, gw)
    prefix_mass = row[:, :n_prefix].sum(axis=1).astype(np.float32)  # (h,)
    return AttentionMaps(heads, prefix_mass, mean, masks, mass_mask(mean, threshold), np.asarray(union))


def mass_mask(maps: np.ndarray, threshold: float) -> np.ndarray:
    """(..., gh, gw) non-negative maps -> bool masks: the fewest patches holding ``threshold`` of each map's mass.

    Patches are sorted by attention, descending; a patch is kept while the mass before it is under ``threshold``
    (DINO keeps the same set, phrased on the ascending cumulative sum).
    """
    shape = maps.shape
    flat = maps.reshape(*shape[:-2], -1).astype(np.float64)  # (..., P)
    order = np.argsort(-flat, axis=-1, kind="stable")
    ranked = np.take_along_axis(flat, order, axis=-1)
    total = np.maximum(ranked.sum(axis=-1, keepdims=True), np.finfo(np.float64).tiny)
    before = (np.cumsum(ranked, axis=-1) - ranked) / total  # normalised mass strictly above each patch
    keep = np.zeros(flat.shape, dtype=bool)
    np.put_along_axis(keep, order, before < threshold, axis=-1)
    return keep.reshape(shape)


def upsample(maps: np.ndarray, patch: tuple[int, int]) -> np.ndarray:
    """(..., gh, gw) -> (..., gh*ph, gw*pw): each patch's value repeated over its pixels."""
    return np.repeat(np.repeat(maps, patch[0], axis=-2), patch[1], axis=-1)


# ---------------------------------------------------------------------------------------------- inputs


def input_size(model: TimmViT, img_size: int | str | tuple[int, int] | None) -> tuple[int, int]:
    """(H, W) the model runs at: ``img_size`` (int, 'S' or 'HxW', whole patches) or the model's own."""
    ph, pw = (int(p) for p in model.patch_embed.patch_size)
    if img_size is None:
        h, w = (int(s) for s in model.patch_embed.img_size)
    elif isinstance(img_size, int):
        h = w = img_size
    elif isinstance(img_size, str):
        found = re.fullmatch(r"\s*(\d+)\s*(?:[xX,]\s*(\d+))?\s*", img_size)
        if not found:
            raise FewshotError(f"image size '{img_size}' is not SIZE or HxW, e.g. 224 or 224x320")
        h, w = int(found[1]), int(found[2] or found[1])
    else:
        h, w = (int(s) for s in img_size)
    if h < ph or w < pw:
        raise FewshotError(f"image size {h}x{w} is smaller than one {ph}x{pw} patch; pass a larger --img-size")
    if h % ph or w % pw:
        fit = f"{max(1, round(h / ph)) * ph}x{max(1, round(w / pw)) * pw}"
        raise FewshotError(f"image size {h}x{w} is not a whole number of {ph}x{pw} patches; use e.g. --img-size {fit}")
    return h, w


def sized_model(model: TimmViT, size: tuple[int, int]) -> TimmViT:
    """``model`` if it runs at ``size`` as it is, else a copy resized with timm's ``set_input_size``."""
    if getattr(model, "dynamic_img_size", False) or tuple(model.patch_embed.img_size) == size:
        return model
    if not hasattr(model, "set_input_size"):
        raise FewshotError(f"{type(model).__name__} cannot change its input size; drop --img-size")
    resized = copy.deepcopy(model)  # the caller's model keeps its size and position embeddings
    resized.set_input_size(img_size=size)
    return resized


# ---------------------------------------------------------------------------------------------- running


@dataclass
class ImageAttention:
    """One image's result: its name, the image as the model saw it, its maps and (for PCA) its patch tokens."""

    name: str
    image: Image.Image | None  # resized to the input size (None once written out)
    maps: AttentionMaps
    patch_tokens: np.ndarray  # (gh, gw, D)


@dataclass
class AttentionRunner:
    """A backbone prepared to read one block's class-token attention at one input size."""

    model: TimmViT  # resized to ``size`` when needed, on its device
    block: int
    size: tuple[int, int]  # (H, W), whole patches
    patch: tuple[int, int]
    grid: tuple[int, int]
    n_prefix: int
    mean: torch.Tensor  # (3, 1, 1) normalisation of the backbone's eval transform
    std: torch.Tensor  # (3, 1, 1)
    resample: Image.Resampling  # PIL resampling filter of that transform

    @classmethod
    def prepare(
        cls, backbone: Backbone, block: int | None, img_size: int | str | None, device: torch.device
    ) -> AttentionRunner:
        """Check the backbone can give attention maps (one line otherwise) and size it for ``img_size``."""
        import torch
        from PIL import Image

        _, index = attention_block(backbone.model, block)
        size = input_size(backbone.model, img_size)
        model = sized_model(backbone.model, size).to(device)
        patch = (int(model.patch_embed.patch_size[0]), int(model.patch_embed.patch_size[1]))
        desc = json.loads(backbone.transform_desc)
        mean, std = (torch.tensor(desc[k], dtype=torch.float32).view(3, 1, 1) for k in ("mean", "std"))
        interpolation = str(desc.get("interpolation", "bicubic")).upper()
        resample = getattr(Image.Resampling, interpolation, Image.Resampling.BICUBIC)
        grid = (size[0] // patch[0], size[1] // patch[1])
        return cls(model, index, size, patch, grid, int(getattr(model, "num_prefix_tokens", 1)), mean, std, resample)

    def run(
        self, source: ImageSet, threshold: float, batch_size: int, skipped: list[dict[str, str]], progress: bool = True
    ) -> Iterator[ImageAttention]:
        """Each readable image of ``source``'s maps, in order, ``batch_size`` images per forward pass; unreadable
        images are appended to ``skipped``."""
        from fewshot.images import UnreadableImage
        from fewshot.progress import bar as progress_bar

        pending: list[tuple[str, Image.Image]] = []  # (record name, image at the input size)
        with progress_bar(total=len(source), desc="attention", unit="img", disable=not progress, leave=False) as bar:
            for i, rec in enumerate(source.records):
                try:
                    pending.append((rec.name, source.load(i).resize((self.size[1], self.size[0]), self.resample)))
                except UnreadableImage as exc:
                    skipped.append({"path": rec.name, "reason": str(exc)})
                if len(pending) >= batch_size or (i == len(source) - 1 and pending):
                    yield from self._batch(pending, threshold)
                    pending = []
                bar.update(1)

    def _batch(self, pending: list[tuple[str, Image.Image]], threshold: float) -> Iterator[ImageAttention]:
        import torch

        device = next(self.model.parameters()).device
        x = torch.stack([self._tensor(img) for _, img in pending]).to(device)  # (B, 3, H, W)
        attn, tokens = class_attention(self.model, x, self.block)  # (B, heads, N), (B, N, D)
        patches = tokens[:, self.n_prefix :].float().cpu().numpy().reshape(len(pending), *self.grid, -1)
        for (name, img), row, own in zip(pending, attn.numpy(), patches, strict=True):
            yield ImageAttention(name, img, attention_maps(row, self.n_prefix, self.grid, threshold), own)

    def _tensor(self, img: Image.Image) -> torch.Tensor:
        import torch

        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W) in [0, 1]
        return (x - self.mean) / self.std
