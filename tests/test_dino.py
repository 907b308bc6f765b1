"""DINO: loss parity with lightly, the EMA teacher, the frozen last layer, the head, the small-data rule."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from lightly.loss import DINOLoss as LightlyDINOLoss

from fewshot.methods import get_method
from fewshot.methods.base import RunPlan
from fewshot.methods.dino import DINO, DINOHead, DINOLoss, resolve
from fewshot.pretrain_config import DinoConfig, PretrainConfig
from fewshot.schedules import linear_warmup

TINY: dict[str, Any] = dict(model="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, batch_size=4)
SMALL_HEAD = DinoConfig(local_crops=2, hidden_dim=32, bottleneck_dim=16, out_dim=64)


@pytest.mark.parametrize(
    "views,batch,dim,teacher_temp,student_temp",
    [(2, 4, 16, 0.04, 0.1), (4, 3, 64, 0.07, 0.1), (10, 2, 128, 0.04, 0.2), (2, 8, 32, 0.1, 0.05)],
)
def test_loss_and_centre_match_lightly(views: int, batch: int, dim: int, teacher_temp: float, student_temp: float):
    g = torch.Generator().manual_seed(views * 100 + dim)
    ours = DINOLoss(dim, student_temp=student_temp, center_momentum=0.9)
    theirs = LightlyDINOLoss(dim, teacher_temp=teacher_temp, warmup_teacher_temp=teacher_temp,
                             student_temp=student_temp, center_momentum=0.9)  # fmt: skip
    for _ in range(3):  # consecutive calls: the centre moves between them
        teacher = torch.randn(2, batch, dim, generator=g) * 3
        student = torch.randn(views, batch, dim, generator=g) * 3
        loss, _ = ours(student, teacher, teacher_temp)
        expected = theirs(list(teacher), list(student), teacher_temp=teacher_temp)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.center, theirs.center.view(1, dim), rtol=1e-5, atol=1e-7)


def test_teacher_temperature_warmup_matches_lightly_per_epoch() -> None:
    # one step per epoch: our per-step schedule is lightly's (and DINO's) per-epoch linear warm-up
    dim, epochs, warm = 32, 12, 5
    temps = linear_warmup(0.04, 0.07, epochs, warm)
    ours = DINOLoss(dim)
    theirs = LightlyDINOLoss(dim, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=warm)
    g = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        teacher, student = torch.randn(2, 3, dim, generator=g), torch.randn(4, 3, dim, generator=g)
        loss, _ = ours(student, teacher, float(temps[epoch]))
        torch.testing.assert_close(loss, theirs(list(teacher), list(student), epoch=epoch), rtol=1e-5, atol=1e-6)


def test_loss_gradient_reaches_only_the_student() -> None:
    teacher = torch.randn(2, 3, 16, requires_grad=True)
    student = torch.randn(5, 3, 16, requires_grad=True)
    loss, _ = DINOLoss(16)(student, teacher, 0.04)
    loss.backward()
    assert teacher.grad is None and student.grad is not None


def test_head_is_weight_normalised_with_a_fixed_gain() -> None:
    head = DINOHead(24, 100, hidden_dim=32, bottleneck_dim=8, norm_last_layer=True)
    out = head(torch.randn(5, 24))
    assert out.shape == (5, 100)
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.all(gain == 1)
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(100), atol=1e-5)  # unit prototypes
    assert out.abs().max() <= 1 + 1e-5  # cosine similarities
    free = DINOHead(24, 100, hidden_dim=32, bottleneck_dim=8, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad


def _dino(freeze: int = 2, total: int = 6) -> DINO:
    cfg = PretrainConfig(**TINY, dino=DinoConfig(**{**vars(SMALL_HEAD), "freeze_last_layer_steps": freeze}))
    torch.manual_seed(0)
    method = get_method("dino").build(cfg, RunPlan(n_images=8, batch_size=4, steps_per_epoch=2, total_steps=total))
    assert isinstance(method, DINO)
    return method


def _step(method: DINO, opt: torch.optim.Optimizer, step: int) -> None:
    images = torch.randint(0, 256, (4, 3, 37, 37), generator=torch.Generator().manual_seed(step), dtype=torch.uint8)
    batch = method.augment(images, torch.Generator().manual_seed(step))
    out = method(batch, step)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    method.before_optimizer_step(step)
    opt.step()
    method.after_step(step)


def test_teacher_has_no_gradients_and_follows_the_ema_formula() -> None:
    method = _dino(freeze=0)
    opt = torch.optim.AdamW(method.param_groups(), lr=1e-3)
    assert all(not p.requires_grad for p in method.teacher.parameters())
    assert all(p.requires_grad for n, p in method.student.named_parameters() if "original0" not in n)
    for step in range(3):
        before = [p.detach().clone() for p in method.teacher.parameters()]
        _step(method, opt, step)
        m = float(method.momentum[step])
        assert all(p.grad is None for p in method.teacher.parameters())
        for t_old, t_new, s in zip(before, method.teacher.parameters(), method.student.parameters(), strict=True):
            torch.testing.assert_close(t_new, m * t_old + (1 - m) * s, rtol=1e-6, atol=1e-7)
    moved = any(
        not torch.equal(t, s) for t, s in zip(method.teacher.parameters(), method.student.parameters(), strict=True)
    )
    assert moved  # the teacher lags behind the student


def test_last_layer_is_frozen_for_the_first_epoch() -> None:
    method = _dino(freeze=2)  # two steps per epoch: frozen in epoch 1
    opt = torch.optim.AdamW(method.param_groups(), lr=1e-2)
    params = dict(method.student.head.named_parameters())
    last, first_mlp = params["last_layer.parametrizations.weight.original1"], params["mlp.0.weight"]
    start_last, start_mlp = last.detach().clone(), first_mlp.detach().clone()
    for step in range(2):
        _step(method, opt, step)
    assert torch.equal(last, start_last)  # untouched in epoch 1, not even by weight decay
    assert not torch.equal(first_mlp, start_mlp)  # while the rest trains
    _step(method, opt, 2)
    assert not torch.equal(last, start_last)


def test_param_groups_spare_biases_and_norms_from_weight_decay() -> None:
    method = _dino()
    decay, no_decay = method.param_groups()
    assert decay["apply_wd"] and not no_decay["apply_wd"]
    names = {id(p): n for n, p in method.named_parameters()}
    assert all(p.ndim > 1 for p in decay["params"])
    assert any(names[id(p)].endswith("norm1.weight") for p in no_decay["params"])
    assert not any(names[id(p)].startswith("teacher") for g in (decay, no_decay) for p in g["params"])


def test_forward_logs_collapse_diagnostics() -> None:
    method = _dino()
    images = torch.randint(0, 256, (4, 3, 37, 37), dtype=torch.uint8)
    out = method(method.augment(images, torch.Generator().manual_seed(0)), 0)
    assert out["loss"].requires_grad and out["loss"].ndim == 0
    assert 0 <= float(out["teacher_entropy"]) <= math.log(64) + 1e-4
    assert float(out["teacher_entropy_max"]) == pytest.approx(math.log(64))
    assert float(out["feature_std"]) > 0


def test_diagnose_warns_on_uniform_and_one_hot_collapse() -> None:
    method = _dino()
    ln_k = math.log(64)
    healthy = {"step": 6, "teacher_entropy": 0.5, "teacher_entropy_max": ln_k, "teacher_batch_entropy": 3.0,
               "feature_std": 0.6}  # fmt: skip
    assert method.diagnose(healthy) == []
    assert "uniform" in method.diagnose({**healthy, "teacher_entropy": 0.99 * ln_k})[0]
    assert "one prototype" in method.diagnose({**healthy, "teacher_batch_entropy": 0.1})[0]
    assert "collapsed" in method.diagnose({**healthy, "feature_std": 0.01})[0]
    assert method.diagnose({**healthy, "step": 0, "feature_std": 0.01}) == []  # too early to judge


def test_small_data_rule_scales_with_dataset_and_run() -> None:
    small = resolve(DinoConfig(), RunPlan(n_images=3000, batch_size=64, steps_per_epoch=46, total_steps=4600))
    assert small["out_dim"] == 1024 and small["teacher_temp"] == 0.04
    assert resolve(DinoConfig(), RunPlan(50_000, 64, 781, 78_100))["out_dim"] == 8192
    assert 0.99 < small["momentum_teacher"] < 0.996
    assert small["freeze_last_layer_steps"] == 46  # one epoch
    imagenet = resolve(DinoConfig(), RunPlan(1_281_167, 1024, 1251, 125_100))
    assert imagenet["out_dim"] == 65536 and imagenet["teacher_temp"] == 0.07
    assert imagenet["momentum_teacher"] == 0.996 and imagenet["warmup_teacher_temp_steps"] == 30 * 1251
    short = resolve(DinoConfig(), RunPlan(3000, 64, 46, 200))
    assert short["momentum_teacher"] == 0.99 and short["freeze_last_layer_steps"] == 20  # capped at 10% of the run
    fixed = resolve(DinoConfig(out_dim=512, momentum_teacher=0.9), RunPlan(3000, 64, 46, 200))
    assert fixed["out_dim"] == 512 and fixed["momentum_teacher"] == 0.9  # explicit values win


def test_unknown_method_is_a_one_line_error() -> None:
    from fewshot.errors import FewshotError

    with pytest.raises(FewshotError, match="dino"):
        get_method("simclr")
