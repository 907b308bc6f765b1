"""AdamW over the method's groups, DINO's per-parameter gradient clipping, and one step with the method's hooks."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from fewshot.optimisation import build_optimizer, clip_per_parameter, optimise


def test_clipping_matches_dino_clip_gradients() -> None:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(2))]
    grads = [torch.randn(5, 3) * 10, torch.randn(4) * 0.01, torch.zeros(2)]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    clip_per_parameter(params, 3.0)
    for p, g in zip(params, grads, strict=True):  # DINO's utils.clip_gradients, parameter by parameter
        coef = 3.0 / (g.norm(2) + 1e-6)
        torch.testing.assert_close(p.grad, g * coef if coef < 1 else g)
    assert params[0].grad.norm() <= 3.0 + 1e-5 and torch.equal(params[2].grad, torch.zeros(2))


class _Toy(nn.Module):
    """A method in miniature: one linear layer, param_groups as Method's, hooks that record their calls."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)
        self.calls: list[str] = []

    def param_groups(self, lr_scales: dict[str, float] | None = None) -> list[dict[str, Any]]:
        return [{"params": [self.layer.weight], "apply_wd": True}, {"params": [self.layer.bias], "apply_wd": False}]

    def forward(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        return {"loss": ((self.layer(batch["x"]) - batch["y"]) ** 2).mean()}

    def before_optimizer_step(self, step: int) -> None:
        self.calls.append(f"before {step}")

    def after_step(self, step: int) -> None:
        self.calls.append(f"after {step}")


def test_one_step_descends_and_calls_the_hooks_in_order() -> None:
    torch.manual_seed(0)
    toy = _Toy()
    opt = build_optimizer(toy, SimpleNamespace(optim=SimpleNamespace(betas=(0.9, 0.95))))
    assert [g["apply_wd"] for g in opt.param_groups] == [True, False] and opt.defaults["betas"] == (0.9, 0.95)
    for group in opt.param_groups:
        group["lr"], group["weight_decay"] = 0.05, 0.0
    batch = {"x": torch.randn(16, 3), "y": torch.randn(16, 1)}
    params = [p for g in opt.param_groups for p in g["params"]]
    first = optimise(toy, toy, opt, params, batch, 0, clip_grad=0.0, autocast=False)["loss"].item()
    optimise(toy, toy, opt, params, batch, 1, clip_grad=0.0, autocast=False)
    assert toy(batch, 2)["loss"].item() < first
    assert toy.calls == ["before 0", "after 0", "before 1", "after 1"]
