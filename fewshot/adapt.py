"""Guarded adaptation: continue self-supervised training from good weights without destroying them.

A fresh projection head (DINO) or decoder (MAE) on top of a pretrained backbone sends large, uninformed gradients
into the backbone before it has learnt anything, and a from-scratch learning rate then moves the features far
from where they started: the k-NN accuracy that users of continued DINOv2 training report falling from 80% to 10%
(facebookresearch/dinov2#204). The guard does what fine-tuning practice does for the same problem:

1. **Head warm-up** (linear probing, then fine-tuning: Kumar et al. 2022, "Fine-Tuning can Distort Pretrained
   Features and Underperform Out-of-Distribution"): for ``head_warmup_steps`` the method's backbone modules
   (:meth:`fewshot.methods.base.Method.backbone_modules`) are frozen -- no gradients, eval mode (BatchNorm keeps the
   init's statistics), not touched by the optimiser or an EMA -- and only the new head trains.
2. **A lower, layer-wise decayed backbone learning rate** (BEiT, Bao et al. 2022; MAE fine-tuning, He et al. 2022):
   a backbone parameter trains at ``lr × backbone_lr_scale × layer_decay^(L - layer)`` (the scale is 1 unless set),
   where ``layer`` is timm's own grouping of the model (``group_matcher``: embeddings 0, block i is i + 1, the final
   norm L), so block i of a depth-D ViT gets ``layer_decay^(D - i)``; after the warm-up the backbone's rate ramps up
   linearly from 0 over ``backbone_warmup_steps``.
3. Method-specific settings stay in the method (DINO's teacher momentum starts higher with ``--init``:
   :func:`fewshot.methods.dino.resolve`).

The training loop applies this through :class:`Guard` for every method alike; without ``--init`` the defaults
make it a no-op (no warm-up, every scale 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from fewshot.methods.base import Method
    from fewshot.pretrain_config import AdaptConfig

_MATCH_PREV_GROUP = (99999,)  # timm's group_matcher ordinal for "same group as the previous one"
ADAPT_WARMUP_FRACTION = 0.1  # head warm-up with --init: this share of the run
ADAPT_LAYER_DECAY = 0.75  # MAE's ViT-L / BEiT-L fine-tuning value; 0.65 for their ViT-B


@dataclass(frozen=True)
class GuardPlan:
    """The resolved guard of one run (recorded in config.json under ``resolved``)."""

    head_warmup_steps: int
    backbone_lr_scale: float
    layer_decay: float
    backbone_warmup_steps: int


def resolve(cfg: AdaptConfig, adapting: bool, total_steps: int, lr_warmup_steps: int) -> GuardPlan:
    """Explicit ``pretrain.adapt`` values, else: with ``--init`` (``adapting``) a head warm-up of 10% of the run
    (at least one step), layer decay 0.75 and a backbone lr ramp as long as the lr warm-up; without, nothing (no
    warm-up, no decay, no ramp). ``backbone_lr_scale`` is 1 unless set, either way."""
    warmup = cfg.head_warmup_steps
    if warmup is None:
        warmup = max(1, round(ADAPT_WARMUP_FRACTION * total_steps)) if adapting else 0
    scale = cfg.backbone_lr_scale
    decay = cfg.layer_decay
    if decay is None:
        decay = ADAPT_LAYER_DECAY if adapting else 1.0
    ramp = cfg.backbone_warmup_steps
    if ramp is None:
        ramp = lr_warmup_steps if adapting else 0
    return GuardPlan(min(int(warmup), total_steps), float(scale), float(decay), int(ramp))


def layer_ids(module: nn.Module) -> tuple[dict[str, int], int]:
    """Each parameter's layer in ``module`` by timm's ``group_matcher`` (fine grouping), and the number of layers;
    a model without one is a single layer. timm files a ViT's final norm with its last block ("match the previous
    group"); here it is a layer of its own above it, as BEiT's and MAE's layer ids have it (embeddings 0, block i
    is i + 1, the rest D + 1)."""
    names = [name for name, _ in module.named_parameters()]
    matcher = getattr(module, "group_matcher", None)
    if matcher is None:
        return dict.fromkeys(names, 0), 1
    from timm.models import group_parameters

    spec = matcher(coarse=False)
    if isinstance(spec, dict):  # {"stem": regex, "blocks": [(regex, ordinal or None), ...]}
        top = (_MATCH_PREV_GROUP[0] - 1,)  # after every block, not merged into the last
        spec = {k: [(r, top if o == _MATCH_PREV_GROUP else o) for r, o in v] if isinstance(v, list) else v
                for k, v in spec.items()}  # fmt: skip
    ids = group_parameters(module, spec, reverse=True)  # {name: layer}
    n = max(ids.values(), default=0) + 1
    return {name: ids.get(name, n - 1) for name in names}, n  # unmatched: the top


def lr_scales(method: Method, plan: GuardPlan) -> dict[str, float]:
    """``backbone_lr_scale × layer_decay^(last layer - layer)`` for every parameter of the method's backbone
    modules, by its name in the method (what :meth:`~fewshot.methods.base.Method.param_groups` takes). Empty when
    the backbone trains like the rest (scale 1, no decay, no ramp): the groups, and so the checkpoints, of a run
    from scratch stay as they were."""
    if plan.backbone_lr_scale == 1 and plan.layer_decay == 1 and plan.backbone_warmup_steps == 0:
        return {}
    scales: dict[str, float] = {}
    for prefix, module in method.backbone_modules().items():
        ids, n = layer_ids(module)
        for name, layer in ids.items():
            scales[f"{prefix}.{name}"] = plan.backbone_lr_scale * plan.layer_decay ** (n - 1 - layer)
    return scales


class Guard:
    """Applies a :class:`GuardPlan` to a method step by step: freezes its backbone modules during the head
    warm-up, unfreezes them after, and gives each optimiser group its lr factor."""

    def __init__(self, method: Method, plan: GuardPlan) -> None:
        self.method, self.plan = method, plan
        self.modules = list(method.backbone_modules().values())
        # a parameter that never trains (MAE's fixed position embeddings, a teacher) stays frozen after the warm-up
        self.trainable = {id(p): p.requires_grad for m in self.modules for p in m.parameters()}
        self.frozen: bool | None = None

    def apply(self, step: int) -> bool:
        """Put the backbone modules in the state of ``step``; True when that changed it (the loop then rebuilds
        what depends on which parameters train, e.g. its DistributedDataParallel wrapper)."""
        frozen = step < self.plan.head_warmup_steps
        if frozen == self.frozen:
            return False
        for module in self.modules:
            for p in module.parameters():
                p.requires_grad_(self.trainable[id(p)] and not frozen)
            module.train(self.method.training and not frozen)
        changed, self.frozen = self.frozen is not None, frozen
        return changed

    def lr_factor(self, group: dict[str, Any], step: int) -> float:
        """What the scheduled lr of ``step`` is multiplied by in ``group``: its lr_scale, and for the backbone the
        linear ramp after the head warm-up."""
        scale = float(group.get("lr_scale", 1.0))
        if not group.get("backbone"):
            return scale
        since = step - self.plan.head_warmup_steps
        if since < 0:
            return 0.0
        ramp = self.plan.backbone_warmup_steps
        return scale * (1.0 if ramp <= 0 else min(1.0, (since + 1) / ramp))

    def advice(self) -> str:
        """The settings that hold the backbone back, with their values (for the start-point warning)."""
        p = self.plan
        parts = [
            f"lower adapt.backbone_lr_scale (now {p.backbone_lr_scale:g}) or adapt.layer_decay (now {p.layer_decay:g})",
            f"lengthen adapt.head_warmup_steps (now {p.head_warmup_steps})",
        ]
        extra = self.method.guard_advice()
        return ", ".join(parts + ([extra] if extra else []))


def describe(plan: GuardPlan) -> str:
    """One line for the progress output ('' when the guard does nothing)."""
    if plan.head_warmup_steps == 0 and plan.backbone_lr_scale == 1 and plan.layer_decay == 1:
        return ""
    return (
        f"guarded adaptation: head warm-up {plan.head_warmup_steps} steps with the backbone frozen, then backbone lr "
        f"× {plan.backbone_lr_scale:g} with layer decay {plan.layer_decay:g} (ramp {plan.backbone_warmup_steps} steps)"
    )
