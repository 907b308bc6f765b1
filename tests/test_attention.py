"""Attention maps, DINO masks and Jaccard: what a user reads off the PNGs and the report must be right."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.masked_set import write_masked_set
from fewshot.attention import attention_maps, capture_attention, class_attention, mass_mask, upsample
from fewshot.attention_outputs import run_attention
from fewshot.backbones import load_backbone
from fewshot.config import AttentionConfig, Config
from fewshot.errors import FewshotError
from fewshot.mask_quality import jaccard
from tests.conftest import TINY_VIT

REG_VIT = TINY_VIT + ",reg_tokens=4"  # class token + 4 registers
DINOV2_REG = "vit_small_patch14_reg4_dinov2:img_size=28,depth=2,embed_dim=64,num_heads=4"  # patch 14, 5 prefix


def settings(**attention: Any) -> Config:
    return Config(attention=AttentionConfig(**attention))


@pytest.fixture(scope="module")
def masked_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_masked_set(tmp_path_factory.mktemp("masked"), n=4, size=48, seed=0)


def manual_class_row(model: Any, x: torch.Tensor, block: int) -> torch.Tensor:
    """The class token's softmax attention (B, heads, N) of ``block``, recomputed from its q and k."""
    seen: list[torch.Tensor] = []
    attn = model.blocks[block].attn
    handle = attn.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.inference_mode():
        model.forward_features(x)
        handle.remove()
        b, n, _ = seen[0].shape
        qkv = attn.qkv(seen[0]).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0]  # (B, heads, N)


@pytest.mark.parametrize("spec", [TINY_VIT, REG_VIT, DINOV2_REG])
def test_maps_are_the_class_tokens_attention_to_patches(spec: str) -> None:
    model = load_backbone(spec).model
    n_prefix = model.num_prefix_tokens
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    row, _ = class_attention(model, x, block=-1)
    expected = manual_class_row(model, x, block=len(model.blocks) - 1)
    torch.testing.assert_close(row, expected, atol=1e-5, rtol=1e-4)
    grid = tuple(model.patch_embed.grid_size)
    maps = attention_maps(row[0].numpy(), n_prefix, grid, 0.6)
    assert maps.heads.shape == (model.blocks[-1].attn.num_heads, *grid)
    assert (maps.heads >= 0).all()
    prefix_mass = expected[0, :, :n_prefix].sum(-1).numpy()  # class + register tokens, never on the map
    np.testing.assert_allclose(maps.heads.sum(axis=(1, 2)), 1 - prefix_mass, atol=1e-5)
    np.testing.assert_allclose(maps.prefix_mass, prefix_mass, atol=1e-5)
    np.testing.assert_allclose(maps.heads.reshape(maps.heads.shape[0], -1), expected[0, :, n_prefix:], atol=1e-5)


def test_mask_keeps_the_threshold_mass_and_is_minimal() -> None:
    maps = np.random.default_rng(0).random((50, 5, 7)) ** 3  # (maps, gh, gw)
    for x in (0.1, 0.6, 0.9, 1.0):
        masks = mass_mask(maps, x)
        for m, keep in zip(maps, masks, strict=True):
            kept = m[keep]
            assert kept.sum() >= x * m.sum() - 1e-9
            assert kept.sum() - kept.min() < x * m.sum()  # dropping any kept patch falls short
            assert kept.min() >= m[~keep].max(initial=0)  # the kept patches are the strongest


def test_mask_on_a_hand_made_map() -> None:
    m = np.array([[0.1, 0.5], [0.3, 0.1]])
    assert mass_mask(m, 0.6).tolist() == [[False, True], [True, False]]
    assert mass_mask(m, 0.5).tolist() == [[False, True], [False, False]]  # 0.5 alone reaches 50%


def test_fused_switch_is_restored_also_after_an_exception() -> None:
    model = load_backbone(TINY_VIT).model
    attn = model.blocks[-1].attn
    for before in (True, False):
        attn.fused_attn = before
        with capture_attention(model) as captured:
            assert attn.fused_attn is False
            model.forward_features(torch.randn(1, 3, 32, 32))
        assert attn.fused_attn is before and not attn.attn_drop._forward_hooks and len(captured) == 1
    attn.fused_attn = True

    def boom(*_: object) -> None:
        raise ValueError("after the attention")

    model.norm.register_forward_hook(boom)  # the forward fails once the attention has been captured
    with pytest.raises(ValueError, match="after the attention"):
        class_attention(model, torch.randn(1, 3, 32, 32))
    assert attn.fused_attn is True and not attn.attn_drop._forward_hooks
    assert all(b.attn.fused_attn for b in model.blocks)


def test_jaccard_on_hand_made_masks() -> None:
    a = np.array([[1, 1, 0], [0, 0, 0]], bool)
    b = np.array([[0, 1, 1], [0, 0, 0]], bool)
    assert jaccard(a, b) == pytest.approx(1 / 3)
    assert jaccard(a, a) == 1.0 and jaccard(a, ~a) == 0.0
    assert jaccard(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
    assert upsample(np.array([[1, 2]]), (2, 3)).tolist() == [[1, 1, 1, 2, 2, 2]] * 2


def test_run_attention_writes_grids_sheet_pca_and_maps(masked_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_attention(masked_set / "images", out, settings(save_maps=True), backbone=TINY_VIT, progress=False)
    assert result.images == 4 and result.grid == (4, 4) and result.prefix_tokens == 1
    for png in [*result.grids, *result.contact_sheets, *result.pca]:
        assert Image.open(png).size[0] > 32
    assert (out / "contact_sheet.png").is_file() and (out / "pca" / "pca_sheet.png").is_file()
    from safetensors.numpy import load_file

    maps = load_file(result.maps[0])
    assert maps["heads"].shape == (3, 4, 4) and maps["masks"].shape == (3, 4, 4)
    assert json.loads((out / "attention.json").read_text())["threshold"] == 0.6
    assert json.loads((out / "maps" / "index.json").read_text())["files"]["000.safetensors"] == "000.png"

    bare = run_attention(
        masked_set / "images", tmp_path / "bare", settings(pca=False), backbone=TINY_VIT, progress=False
    )
    assert bare.maps == [] and bare.pca == [] and not (tmp_path / "bare" / "maps").exists()


def test_shapes_follow_image_size_and_patch_size(masked_set: Path, tmp_path: Path) -> None:
    backbone = load_backbone(TINY_VIT)
    pos_before = backbone.model.pos_embed.detach().clone()
    with pytest.raises(FewshotError, match="not a whole number of 8x8 patches; use e.g. --img-size 48x32"):
        run_attention(
            masked_set / "images", tmp_path / "a", settings(img_size="50x36"), backbone=backbone
        )  # never 48x32
    cfg = settings(img_size="48x32", pca=False, save_maps=True)
    result = run_attention(masked_set / "images", tmp_path / "a", cfg, backbone=backbone)
    assert result.input_size == (48, 32) and result.grid == (6, 4)
    from safetensors.numpy import load_file

    assert load_file(result.maps[0])["heads"].shape == (3, 6, 4)
    assert torch.equal(backbone.model.pos_embed, pos_before)  # the caller's model keeps its size
    result = run_attention(
        masked_set / "images", tmp_path / "b", settings(img_size="42"), backbone=DINOV2_REG, progress=False
    )
    assert result.grid == (3, 3) and result.prefix_tokens == 5 and result.heads == 4


def test_jaccard_report_against_masks(masked_set: Path, tmp_path: Path) -> None:
    truth = tmp_path / "full"  # every pixel is foreground, so J = the fraction of patches a mask keeps
    truth.mkdir()
    for name in ("000", "001", "002"):  # 003 has no mask; other extension than the images on purpose
        Image.new("L", (48, 48), 255).save(truth / f"{name}.bmp")
    result = run_attention(
        masked_set / "images", tmp_path / "o", settings(save_maps=True), backbone=TINY_VIT, masks=truth
    )
    jac = result.jaccard
    assert jac is not None and jac["images_with_masks"] == 3 and jac["missing_masks"] == ["003.png"]
    from safetensors.numpy import load_file

    saved = load_file(result.maps[0])
    per = jac["per_image"]["000.png"]
    assert per["mean_map"] == pytest.approx(saved["mean_mask"].mean())
    assert per["heads"] == pytest.approx(saved["masks"].mean(axis=(1, 2)).tolist())
    assert jac["best_head"] == int(np.argmax(jac["mean_per_head"]))
    assert json.loads((tmp_path / "o" / "jaccard.json").read_text())["best_head"] == jac["best_head"]

    masks = masked_set / "masks"
    real = run_attention(masked_set / "images", tmp_path / "r", settings(pca=False), backbone=TINY_VIT, masks=masks)
    assert real.jaccard is not None and real.jaccard["images_with_masks"] == 4
    assert all(0 <= j <= 1 for j in real.jaccard["mean_per_head"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backbone": "pixels"}, "not a ViT"),
        ({"block": 5}, "out of range"),
        ({"threshold": 0.0}, "threshold"),
        ({"backbone": TINY_VIT + ",class_token=False,global_pool='avg'"}, "no class token"),
        ({"masks": "/nonexistent/masks"}, "mask folder"),
        ({"img_size": "big"}, "HxW"),
    ],
)
def test_bad_input_is_one_line(masked_set: Path, tmp_path: Path, kwargs: dict, message: str) -> None:
    kwargs = dict(kwargs)
    backbone, masks = kwargs.pop("backbone", TINY_VIT), kwargs.pop("masks", None)
    with pytest.raises(FewshotError, match=message):
        run_attention(
            masked_set / "images", tmp_path / "x", settings(pca=False, **kwargs), backbone=backbone, masks=masks
        )
