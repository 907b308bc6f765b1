"""MAE: per-sample masking, the encoder on visible patches only, patchify, the masked normalised-pixel loss,
overfitting a tiny batch, the timm-loadable export, the recipes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fewshot.errors import FewshotError
from fewshot.methods import get_method
from fewshot.methods.base import RunPlan
from fewshot.methods.mae import MAE, masked_mse, patchify, pixel_targets, random_masking, sincos_2d, unpatchify
from fewshot.pretrain_config import MaeConfig, PretrainConfig, resolve_optim
from fewshot.runs import save_backbone

TINY: dict[str, Any] = dict(model="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, batch_size=4)
SMALL_DECODER = MaeConfig(decoder_dim=32, decoder_depth=1, decoder_heads=4)
RECIPES = Path(__file__).parents[1] / "recipes"


def _mae(**mae: Any) -> MAE:
    cfg = PretrainConfig(method="mae", **TINY, mae=MaeConfig(**{**vars(SMALL_DECODER), **mae}))
    torch.manual_seed(0)
    method = get_method("mae").build(cfg, RunPlan(n_images=8, batch_size=4, steps_per_epoch=2, total_steps=8))
    assert isinstance(method, MAE)
    return method


def _smooth_images(n: int, side: int = 40, seed: int = 0) -> torch.Tensor:
    """Images with structure a model can learn (upsampled low-resolution noise), uint8 (n, 3, side, side)."""
    low = torch.rand(n, 3, 5, 5, generator=torch.Generator().manual_seed(seed))
    x = torch.nn.functional.interpolate(low, (side, side), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8)


def test_masking_keeps_exactly_len_keep_per_sample_with_independent_seeded_masks() -> None:
    b, n, ratio = 6, 49, 0.75
    keep = int(n * (1 - ratio))  # 12
    ids_keep, ids_restore, mask = random_masking(b, n, ratio, torch.Generator().manual_seed(0))
    assert ids_keep.shape == (b, keep) and ids_restore.shape == (b, n)
    assert torch.all(mask.sum(1) == n - keep)  # the same count for every image
    assert torch.all(mask.gather(1, ids_keep) == 0)  # kept = visible
    assert all(len(set(row.tolist())) == keep for row in ids_keep)
    assert len({tuple(row.tolist()) for row in mask}) == b  # every image gets its own mask
    again = random_masking(b, n, ratio, torch.Generator().manual_seed(0))[2]
    other = random_masking(b, n, ratio, torch.Generator().manual_seed(1))[2]
    assert torch.equal(mask, again) and not torch.equal(mask, other)
    method = _mae()
    batch = method.augment(_smooth_images(4), torch.Generator().manual_seed(3))
    assert batch["images"].shape == (4, 3, 32, 32) and torch.all(batch["mask"].sum(1) == 16 - 4)


def test_encoder_receives_only_the_class_token_and_the_visible_patches() -> None:
    method = _mae()
    batch = method.augment(_smooth_images(4), torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []
    hook = method.encoder.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    latent = method.encode(batch["images"], batch["ids_keep"])
    hook.remove()
    assert seen[0].shape == (4, 1 + 4, 192) and latent.shape == (4, 1 + 4, 192)
    # hiding the masked patches' pixels changes nothing: the encoder never looks at them
    hidden = unpatchify(batch["mask"][..., None].expand(-1, -1, 8 * 8 * 3), 8, (4, 4))  # (B, 3, 32, 32)
    scrambled = torch.where(hidden > 0, torch.randn_like(batch["images"]) * 5, batch["images"])
    torch.testing.assert_close(method.encode(scrambled, batch["ids_keep"]), latent)
    changed = scrambled.clone()
    changed[hidden == 0] += 1.0  # the visible patches do matter
    assert not torch.allclose(method.encode(changed, batch["ids_keep"]), latent)


def test_patchify_layout_and_round_trip() -> None:
    images = torch.randn(2, 3, 16, 24)
    patches = patchify(images, 8)
    assert patches.shape == (2, 2 * 3, 8 * 8 * 3)
    # patch 1 is row 0, column 1; its pixels are stored (row, column, channel)
    torch.testing.assert_close(patches[:, 1], images[:, :, 0:8, 8:16].permute(0, 2, 3, 1).reshape(2, -1))
    torch.testing.assert_close(unpatchify(patches, 8, (2, 3)), images)


def test_patchify_sincos_and_norm_pix_match_lightly() -> None:
    from lightly.models import utils

    images = torch.randn(2, 3, 24, 24)
    torch.testing.assert_close(patchify(images, 8), utils.patchify(images, 8))
    torch.testing.assert_close(pixel_targets(images, 8, True), utils.normalize_mean_var(patchify(images, 8)))
    lightly_table = torch.from_numpy(utils.get_2d_sincos_pos_embed(32, 5, cls_token=True)).float()
    torch.testing.assert_close(sincos_2d(32, (5, 5), prefix=1), lightly_table)


def test_loss_counts_only_masked_patches() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 16, 12, generator=g)
    pred = torch.randn(3, 16, 12, generator=g, requires_grad=True)
    _, _, mask = random_masking(3, 16, 0.75, g)
    loss = masked_mse(pred, target, mask)
    other = torch.where(mask[..., None] > 0, pred, torch.randn(3, 16, 12, generator=g) * 10)  # new visible preds
    torch.testing.assert_close(masked_mse(other, target, mask), loss)
    expected = ((pred - target) ** 2).mean(-1)[mask > 0].mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert pred.grad is not None
    assert torch.all(pred.grad[mask == 0] == 0) and torch.any(pred.grad[mask > 0] != 0)


def test_norm_pix_targets_have_zero_mean_and_unit_variance_per_patch() -> None:
    images = torch.rand(2, 3, 16, 16) * 4 + 3
    target = pixel_targets(images, 8, norm_pix=True)  # (2, 4, 192)
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.var(-1), torch.ones(2, 4), atol=1e-4, rtol=0)
    torch.testing.assert_close(pixel_targets(images, 8, norm_pix=False), patchify(images, 8))


def test_loss_falls_when_overfitting_a_tiny_batch() -> None:
    method = _mae()
    batch = method.augment(_smooth_images(4), torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(method.param_groups(), lr=2e-3, betas=(0.9, 0.95))
    losses = []
    for step in range(80):  # ≈ 1 s; MAE sits near the patch-mean baseline for ~30 steps before it memorises
        out = method(batch, step)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0]
    assert losses[-1] < 0.6 * out["baseline_loss"].item()  # well below predicting each patch's mean colour


def test_fixed_sincos_position_embeddings_and_weight_decay_groups() -> None:
    method = _mae()
    pos = method.encoder.pos_embed
    assert pos is not None and not pos.requires_grad
    torch.testing.assert_close(pos[0], sincos_2d(192, (4, 4), prefix=1))
    torch.testing.assert_close(method.decoder.pos_embed[0], sincos_2d(32, (4, 4), prefix=1))
    decay, no_decay = method.param_groups()
    grouped = {id(p) for g in (decay, no_decay) for p in g["params"]}
    assert id(pos) not in grouped
    assert any(p is method.decoder.mask_token for p in decay["params"])  # MAE's code decays tokens too
    assert all(p.ndim > 1 for p in decay["params"])
    learned = _mae(fixed_pos_embed=False).encoder.pos_embed
    assert learned is not None and learned.requires_grad


def test_exported_backbone_is_the_trained_encoder_and_loads_into_timm(tmp_path: Path) -> None:
    method = _mae()
    batch = method.augment(_smooth_images(4), torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(method.param_groups(), lr=1e-3)
    before = {k: v.clone() for k, v in method.encoder.state_dict().items()}
    method(batch, 0)["loss"].backward()
    opt.step()
    path = tmp_path / "backbone.safetensors"
    save_backbone(path, method.export_backbone(), method.architecture, method.model_kwargs, (0.5,) * 3, (0.2,) * 3, 32)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    model = timm.create_model(
        meta["architecture"], pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=0,
        **json.loads(meta["model_kwargs"]),
    )  # fmt: skip
    state = load_file(str(path))
    assert set(state) == set(model.state_dict()) and not any(k.startswith("decoder") for k in state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not torch.equal(state["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])  # trained
    assert torch.equal(state["pos_embed"], before["pos_embed"])  # fixed
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 192)


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(FewshotError, match="mask_ratio"):
        _mae(mask_ratio=1.0)
    with pytest.raises(FewshotError, match="keeps no patch"):
        _mae(mask_ratio=0.97)
    with pytest.raises(FewshotError, match="decoder_heads"):
        _mae(decoder_dim=36, decoder_heads=8)
    cfg = PretrainConfig(method="mae", model="eva02_tiny_patch14_224", img_size=28, depth=1, mae=SMALL_DECODER)
    with pytest.raises(FewshotError, match="plain timm ViT"):  # a ViT with rotary embeddings, not timm's ViT class
        MAE.build(cfg, RunPlan(8, 4, 2, 8))


def test_diagnose_warns_when_reconstructions_are_no_better_than_patch_means() -> None:
    method = _mae()  # 8 steps in all
    assert method.diagnose({"step": 8, "loss": 0.45, "baseline_loss": 0.99}) == []
    assert method.diagnose({"step": 1, "loss": 0.99, "baseline_loss": 0.99}) == []  # too early
    assert "mean colour" in method.diagnose({"step": 8, "loss": 0.98, "baseline_loss": 0.99})[0]


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("mae-*.toml")), ids=str)
def test_recipes_set_only_known_pretrain_keys(recipe: Path) -> None:
    from fewshot.config import apply, load_recipe

    table = load_recipe(recipe)
    assert set(table) == {"pretrain"}
    cfg = apply(PretrainConfig(), table["pretrain"], source=f"recipe {recipe.name}")
    assert cfg.method == "mae" and (cfg.img_size or 224) % (cfg.patch_size or 16) == 0  # None: from --init
    optim = resolve_optim(cfg.method, cfg.optim)  # what the loop trains with
    assert optim.betas == (0.9, 0.95) and optim.weight_decay == optim.weight_decay_end == 0.05
    assert optim.clip_grad == 0 and cfg.mae.mask_ratio == 0.75 and cfg.mae.norm_pix_loss


def test_vitb16_recipe_is_the_papers() -> None:
    from fewshot.config import apply, load_recipe

    table = load_recipe(RECIPES / "mae-vitb16-gpu.toml")["pretrain"]
    cfg = apply(PretrainConfig(), table, source="recipe")
    assert (cfg.model, cfg.img_size, cfg.epochs) == ("vit_base_patch16_224", 224, 800)
    assert (cfg.mae.decoder_dim, cfg.mae.decoder_depth, cfg.mae.decoder_heads) == (512, 8, 16)
    assert cfg.optim.lr == 1.5e-4 and cfg.optim.warmup_epochs == 40 and cfg.mae.crop_scale == (0.2, 1.0)
