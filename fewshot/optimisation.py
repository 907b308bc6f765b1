"""The optimiser of pretraining and one step of it, shared by the training loop (:mod:`fewshot.train`) and the
``--minutes`` probe that times that step (:mod:`fewshot.budget`).

AdamW (Loshchilov & Hutter 2019) over the method's parameter groups, with DINO's per-parameter gradient clipping
(Caron et al. 2021, ``clip_gradients`` in the reference code): each parameter's gradient scaled to an L2 norm of at
most ``clip_grad``. Learning rate and weight decay are set by the loop before every step from its schedules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fewshot.methods.base import Method
    from fewshot.pretrain_config import PretrainConfig


def build_optimizer(
    method: Method, cfg: PretrainConfig, lr_scales: dict[str, float] | None = None
) -> torch.optim.Optimizer:
    """AdamW over ``method.param_groups(lr_scales)`` with ``cfg.optim.betas`` (lr 0: the loop sets it each step)."""
    groups = [g for g in method.param_groups(lr_scales) if g["params"]]
    betas = tuple(cfg.optim.betas or ())  # resolved: two values (config_rules)
    # the fused kernel is ~10× faster than foreach on CPU (and than the for-loop default, ~100×)
    try:
        return torch.optim.AdamW(groups, lr=0.0, betas=(betas[0], betas[1]), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=0.0, betas=(betas[0], betas[1]), foreach=True)


def clip_per_parameter(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """DINO's clip_gradients: scale each parameter's gradient to L2 norm ≤ ``max_norm``, without a host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))  # (P,)
    scales = (max_norm / (norms + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(grads, list(scales.unbind()))


def optimise(
    model: torch.nn.Module,
    method: Method,
    opt: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    batch: dict[str, torch.Tensor],
    step: int,
    clip_grad: float,
    autocast: bool,
) -> dict[str, torch.Tensor]:
    """One optimiser step on an augmented batch (``model`` is ``method`` or its DDP wrapper); the method's logs."""
    device_type = params[0].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        out = model(batch, step)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    if clip_grad > 0:
        clip_per_parameter(params, clip_grad)
    method.before_optimizer_step(step)
    opt.step()
    method.after_step(step)
    return out
