"""Token pooling (DINO's protocol): which tokens each pool reads, checked against the model's own tokens."""

from __future__ import annotations

import re

import pytest
import timm
import torch

from fewshot.errors import FewshotError
from fewshot.pooling import check_pool, check_pool_for, embed


@pytest.fixture(scope="module")
def registers() -> torch.nn.Module:
    """A tiny ViT with a class token and 4 register tokens: 5 prefix tokens the patch average must leave out."""
    torch.manual_seed(0)
    kwargs = dict(img_size=28, depth=2, embed_dim=64, num_heads=4, num_classes=0)
    return timm.create_model("vit_small_patch14_reg4_dinov2", **kwargs).eval()


def test_avg_is_the_mean_of_the_patch_tokens_only(registers: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        tokens = registers.forward_features(x)  # (2, 5 + 4, 64)
        assert registers.num_prefix_tokens == 5
        torch.testing.assert_close(embed(registers, x, "avg"), tokens[:, 5:].mean(dim=1))
        torch.testing.assert_close(embed(registers, x, "cls"), tokens[:, 0])
        assert embed(registers, x, "cls+avg").shape == (2, 128)
        assert embed(registers, x, "last2").shape == (2, 128)  # the class token of each of the last 2 blocks


def test_a_cnn_pools_its_feature_map_and_has_no_class_token() -> None:
    cnn = timm.create_model("resnet10t", num_classes=0).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(embed(cnn, x, "avg"), cnn.forward_features(x).mean(dim=(2, 3)))
    with pytest.raises(FewshotError, match="no class token; use --pool avg"):
        check_pool_for(cnn, "cls")
    with pytest.raises(FewshotError, match="needs a ViT with a class token"):
        check_pool_for(cnn, "last2")


def test_pool_names_and_depths_are_checked(registers: torch.nn.Module) -> None:
    with pytest.raises(FewshotError, match="asks for 3 blocks but the model has 2; use last2"):
        check_pool_for(registers, "last3")
    check_pool_for(None, "last3")  # pixels: nothing to check
    for bad in ("max", "last0", "cls+"):
        with pytest.raises(FewshotError, match=re.escape(f"unknown pool '{bad}'")):
            check_pool(bad)
