"""The contract between a self-supervised method (DINO today, MAE later) and the training loop in
:mod:`fewshot.train`. The loop never branches on the method's name: everything method-specific goes through
the hooks below.

A step of the loop, for a method ``m``::

    (the guard of fewshot.adapt freezes m.backbone_modules() for the head warm-up steps)
    batch = m.augment(canvases_uint8, generator, rows, global_batch, sizes)  # (b, 3, S, S), (b, 2) -> inputs
    logs = m(batch, step)                              # {"loss": scalar with grad, other scalars detached}
    logs["loss"].backward()
    clip each parameter's gradient (optim.clip_grad), then m.before_optimizer_step(step)
    optimizer.step()                                   # lr × the group's lr_scale, weight decay from the schedules
    m.after_step(step)                                 # e.g. the EMA teacher update
    at each epoch end: m.diagnose(epoch-averaged logs) -> warnings; m.on_epoch_end(epoch, run_dir, store, final)

Everything a resume needs lives in ``m.state_dict()`` (teacher and buffers included).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from fewshot.image_store import ImageStore
    from fewshot.inits import InitWeights
    from fewshot.pretrain_config import PretrainConfig


@dataclass(frozen=True)
class RunPlan:
    """What the method needs to know about the run to resolve its schedules and small-data defaults."""

    n_images: int
    batch_size: int
    steps_per_epoch: int
    total_steps: int


class Method(nn.Module):
    """Base class of pretraining methods; subclasses implement ``build``, ``augment``, ``forward``."""

    #: timm architecture and keyword arguments of the exported backbone (written into backbone.safetensors)
    architecture: str = ""
    model_kwargs: dict[str, Any]
    #: the token pooling that reads this method's frozen features best (the k-NN monitor's default)
    feature_pool: str = "cls"
    #: missing / unexpected keys of the --init weights ('' when none or no init)
    init_report: str = ""

    @classmethod
    def build(cls, cfg: PretrainConfig, plan: RunPlan, init: InitWeights | None = None) -> Method:
        """Construct the method from a resolved :class:`fewshot.pretrain_config.PretrainConfig`, the run plan and
        the ``--init`` weights (a :class:`fewshot.inits.InitWeights`, or None: random initialisation)."""
        raise NotImplementedError

    def backbone_modules(self) -> dict[str, nn.Module]:
        """The modules that start from ``--init``, keyed by their parameter-name prefix (e.g. ``"encoder"``): the
        guard (:mod:`fewshot.adapt`) freezes them during the head warm-up and trains their parameters at the
        backbone's learning-rate scale with layer-wise decay. An EMA teacher's copy belongs here too (frozen alike)."""
        raise NotImplementedError

    def guard_advice(self) -> str:
        """Method settings that keep an init from being destroyed, named for the start-point warning ('' if none)."""
        return ""

    def augment(
        self, images: Tensor, generator: torch.Generator, rows: slice = slice(None), batch: int | None = None,
        sizes: Tensor | None = None,
    ) -> dict[str, Tensor]:  # fmt: skip
        """Turn a ``(b, 3, S, S)`` uint8 batch of canvases into the method's inputs (views, masks, ...). Each image
        lies at the top-left of its canvas, ``sizes (b, 2)`` its height and width (None: the whole canvas); crops
        are taken inside it, relative to its own area.

        Under torchrun ``images`` are the rows ``rows`` of a global batch of ``batch`` images: draw the random
        numbers for all ``batch`` images and keep these rows, so that every process gets its own augmentations
        and the run does not depend on the number of processes.
        """
        raise NotImplementedError

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """Return ``{"loss": ..., <name>: scalar tensor, ...}``; logs other than the loss are detached."""
        raise NotImplementedError

    def param_groups(self, lr_scales: dict[str, float] | None = None) -> list[dict[str, Any]]:
        """Trainable parameters in groups. A group with ``"apply_wd": False`` never gets weight decay; the loop
        multiplies the scheduled lr by its ``"lr_scale"`` (``lr_scales`` by parameter name, 1 for the rest);
        ``"backbone"`` marks the groups of parameters named in ``lr_scales``."""
        lr_scales = lr_scales or {}
        groups: dict[tuple[bool, float | None], dict[str, Any]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            # DINO's get_params_groups: biases and 1-D parameters (norms) are not regularised
            wd = not (name.endswith(".bias") or p.ndim <= 1)
            scale = lr_scales.get(name)
            lr_scale = 1.0 if scale is None else scale
            new = {"params": [], "apply_wd": wd, "lr_scale": lr_scale, "backbone": scale is not None}
            groups.setdefault((wd, scale), new)["params"].append(p)
        return list(groups.values())

    def before_optimizer_step(self, step: int) -> None:
        """Hook after gradient clipping, before ``optimizer.step()`` (e.g. freeze a layer by dropping its grads)."""

    def after_step(self, step: int) -> None:
        """Hook after ``optimizer.step()`` (e.g. the momentum teacher's EMA update)."""

    def on_epoch_end(self, epoch: int, run_dir: Path, images: ImageStore, final: bool) -> None:
        """Hook after each epoch (0-based ``epoch``; ``final`` on the last) with the run folder and every decoded
        image (a :class:`fewshot.image_store.ImageStore`), e.g. to write reconstructions or attention maps."""

    def compile_blocks(self) -> None:
        """``pretrain.compile``: compile, in place, the transformer blocks of every timm model inside the method
        (the bulk of the FLOPs). Not the whole step: schedules feed Python floats that would force recompiles."""
        for module in self.modules():
            blocks = getattr(module, "blocks", None)
            if hasattr(module, "forward_features") and isinstance(blocks, nn.Module):
                blocks.compile()

    def export_backbone(self) -> nn.Module:
        """The backbone to save as ``backbone.safetensors`` (a timm model built with ``num_classes=0``)."""
        raise NotImplementedError

    def schedules(self, step: int) -> dict[str, float]:
        """Method-specific scheduled values at ``step`` to log (e.g. teacher momentum, temperature)."""
        return {}

    def diagnose(self, logs: dict[str, float]) -> list[str]:
        """Warnings (one line each, with advice) from epoch-averaged logs, e.g. signs of collapse."""
        return []

    def resolved(self) -> dict[str, Any]:
        """Values derived from the data size / run length, recorded in config.json under ``resolved``."""
        return {}


def create_vit(
    cfg: PretrainConfig, drop_path_rate: float = 0.0, init: InitWeights | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The timm backbone of ``cfg`` (a resolved PretrainConfig) and the kwargs that rebuild it (for the export
    metadata); with ``init`` (:class:`fewshot.inits.InitWeights`) also the init's own timm kwargs.

    Built with ``num_classes=0`` and, where the architecture supports it, ``dynamic_img_size=True`` so that the
    same weights take global and local crops of different sizes (position embeddings are interpolated).
    Architectures without an ``img_size`` (CNNs) take any size anyway.
    """
    import timm

    from fewshot.backbones import create_model
    from fewshot.errors import FewshotError

    arch, img_size, _, _ = cfg.resolved_input()
    kwargs: dict[str, Any] = dict(init.model_kwargs) if init is not None else {}
    kwargs["img_size"] = img_size
    if cfg.patch_size is not None:
        kwargs["patch_size"] = cfg.patch_size
    if cfg.depth is not None:
        kwargs["depth"] = cfg.depth
    if not timm.is_model(arch):
        raise FewshotError(f"'{arch}' is not a timm architecture; pass e.g. --model vit_small_patch16_224")
    # dynamic_img_size: the same weights take global and local crops; a CNN takes neither it nor an img_size
    model, used = create_model(arch, {**kwargs, "dynamic_img_size": True, "drop_path_rate": drop_path_rate},
                               hint="check --img-size etc.", optional=("dynamic_img_size", "img_size"))  # fmt: skip
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None and img_size % int(patch[0]):
        raise FewshotError(
            f"--img-size {img_size} is not a multiple of {arch}'s patch size {int(patch[0])}; "
            f"use e.g. --img-size {max(1, round(img_size / int(patch[0]))) * int(patch[0])} or set --patch-size"
        )
    return model, {k: v for k, v in used.items() if k not in ("dynamic_img_size", "drop_path_rate")}


def prepare(cfg: PretrainConfig, init: InitWeights | None) -> tuple[PretrainConfig, InitWeights | None]:
    """``(cfg, init)`` ready to build from: as given when ``init`` is, else ``cfg`` resolved here (method optimiser,
    architecture and normalisation; its ``--init`` loaded), as :func:`fewshot.train.pretrain` does."""
    if init is not None:
        return cfg, init
    from fewshot.inits import resolve_pretrain

    return resolve_pretrain(cfg)


def load_init(model: nn.Module, init: InitWeights) -> str:
    """Load the ``--init`` weights (:class:`fewshot.inits.InitWeights`) into ``model``; the missing/unexpected-key
    report of reading them and of this load, '' when both were clean."""
    from fewshot.weights import load_state

    report = load_state(model, init.state, init.spec)
    return "; ".join(r for r in (init.report, report) if r)


def patch_size_of(model: nn.Module, default: int = 8) -> int:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    return int(patch[0]) if patch is not None else default
