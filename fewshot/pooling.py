"""Token pooling: a timm model's tokens -> one feature vector per image.

Pooling follows DINO's evaluation protocol (Caron et al. 2021): ``cls`` is the final class token, ``avg`` the
mean of the patch tokens (prefix tokens excluded), ``cls+avg`` their concatenation, and ``lastN`` the class
tokens of the last N blocks, each layer-normed, concatenated (DINO used N=4 for ViT-S linear probes). A CNN's
feature map has no class token: only ``avg`` (its spatial mean).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fewshot.config_rules import POOL_PATTERN
from fewshot.errors import FewshotError

if TYPE_CHECKING:
    import torch

TimmModel = Any  # a timm model: forward_features, num_prefix_tokens, blocks... are read by name (timm's vocabulary)


def check_pool(pool: str) -> None:
    """A pool name from a backbone spec's ``:pool=`` (the config's own is checked when it is built)."""
    if POOL_PATTERN.fullmatch(pool) is None:
        raise FewshotError(f"unknown pool '{pool}'; use cls, avg, cls+avg or lastN with N ≥ 1 (e.g. last4)")


def check_pool_for(model: TimmModel | None, pool: str) -> None:
    """Refuse (one line, before any image is read) a pooling the model cannot give; ``model`` None is pixels."""
    if model is None:
        return
    has_cls = getattr(model, "cls_token", None) is not None
    if pool.startswith("last"):
        depth = len(getattr(model, "blocks", [])) if hasattr(model, "forward_intermediates") else 0
        if depth == 0 or not has_cls:
            raise FewshotError(f"pool {pool} needs a ViT with a class token and blocks; use --pool avg")
        if int(pool[4:]) > depth:
            raise FewshotError(f"pool {pool} asks for {pool[4:]} blocks but the model has {depth}; use last{depth}")
    elif pool != "avg" and not has_cls:
        raise FewshotError(f"this backbone has no class token; use --pool avg instead of {pool}")


def embed(model: TimmModel, x: torch.Tensor, pool: str) -> torch.Tensor:
    """Pool a timm model's tokens into one vector per image: (B, 3, H, W) -> (B, D)."""
    import torch

    check_pool_for(model, pool)
    if pool.startswith("last"):
        n = int(pool[4:])
        outs = model.forward_intermediates(x, indices=n, return_prefix_tokens=True, norm=True, intermediates_only=True)
        return torch.cat([prefix[:, 0] for _, prefix in outs], dim=1)  # (B, n * D)
    tokens = model.forward_features(x)
    if tokens.ndim == 4:  # a CNN: (B, C, h, w) has no class token (check_pool_for allowed only avg)
        return tokens.mean(dim=(2, 3))  # (B, C)
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))
    cls = tokens[:, 0]  # (B, D)
    avg = tokens[:, n_prefix:].mean(dim=1)  # (B, D), prefix (class/register) tokens excluded
    return {"cls": cls, "avg": avg, "cls+avg": torch.cat([cls, avg], dim=1)}[pool]
