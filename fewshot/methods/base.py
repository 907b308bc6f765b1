"""The contract between a self-supervised method (DINO today, MAE later) and the training loop in
:mod:`fewshot.train`. The loop never branches on the method's name: everything method-specific goes through
the hooks below.

A step of the loop, for a method ``m``::

    batch = m.augment(canvases_uint8, generator, rows, global_batch, sizes)  # (b, 3, S, S), (b, 2) -> inputs
    logs = m(batch, step)                              # {"loss": scalar with grad, other scalars detached}
    logs["loss"].backward()
    clip each parameter's gradient (optim.clip_grad), then m.before_optimizer_step(step)
    optimizer.step()                                   # lr / weight decay of each group set from the schedules
    m.after_step(step)                                 # e.g. the EMA teacher update
    at each epoch end: m.diagnose(epoch-averaged logs) -> warnings; m.on_epoch_end(epoch, run_dir, store, final)

Everything a resume needs lives in ``m.state_dict()`` (teacher and buffers included).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


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

    @classmethod
    def build(cls, cfg: Any, plan: RunPlan) -> Method:
        """Construct the method from a :class:`fewshot.pretrain_config.PretrainConfig` and the run plan."""
        raise NotImplementedError

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

    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters in groups; a group with ``"apply_wd": False`` never gets weight decay."""
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            # DINO's get_params_groups: biases and 1-D parameters (norms) are not regularised
            (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
        return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False}]

    def before_optimizer_step(self, step: int) -> None:
        """Hook after gradient clipping, before ``optimizer.step()`` (e.g. freeze a layer by dropping its grads)."""

    def after_step(self, step: int) -> None:
        """Hook after ``optimizer.step()`` (e.g. the momentum teacher's EMA update)."""

    def on_epoch_end(self, epoch: int, run_dir: Path, images: Any, final: bool) -> None:
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


def create_vit(cfg: Any, drop_path_rate: float = 0.0) -> tuple[nn.Module, dict[str, Any]]:
    """The timm backbone of ``cfg`` (a PretrainConfig) and the kwargs that rebuild it (for the export metadata).

    Built with ``num_classes=0`` and, where the architecture supports it, ``dynamic_img_size=True`` so that the
    same weights take global and local crops of different sizes (position embeddings are interpolated).
    """
    import timm

    from fewshot.errors import FewshotError

    kwargs: dict[str, Any] = {"img_size": cfg.img_size}
    if cfg.patch_size is not None:
        kwargs["patch_size"] = cfg.patch_size
    if cfg.depth is not None:
        kwargs["depth"] = cfg.depth
    if not timm.is_model(cfg.model):
        raise FewshotError(f"'{cfg.model}' is not a timm architecture; pass e.g. --model vit_small_patch16_224")
    extra: dict[str, Any] = {"num_classes": 0, "drop_path_rate": drop_path_rate}
    try:
        try:
            model = timm.create_model(cfg.model, pretrained=False, dynamic_img_size=True, **extra, **kwargs)
        except TypeError:  # architectures without dynamic_img_size (e.g. CNNs) take any size anyway
            model = timm.create_model(cfg.model, pretrained=False, **extra, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
        raise FewshotError(f"timm cannot build '{cfg.model}' with {kwargs} ({exc}); check --img-size etc.") from None
    return model, kwargs


def load_init(model: nn.Module, init: str) -> str:
    """Load starting weights (a weights file or a ``fewshot pretrain`` run folder) into ``model``; report line."""
    from pathlib import Path

    from fewshot.backbones import load_state, read_weights
    from fewshot.errors import FewshotError

    path = Path(init).expanduser()
    if path.is_dir():
        path = path / "backbone.safetensors"
    if not path.is_file():
        raise FewshotError(f"--init '{init}' is not a weights file or a run folder with backbone.safetensors")
    state, _ = read_weights(path)
    return load_state(model, state, str(path))


def patch_size_of(model: nn.Module, default: int = 8) -> int:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    return int(patch[0]) if patch is not None else default
