"""Which device a command runs on (``--device``), and whether training uses bf16 autocast there.

bf16 autocast only on CUDA: CPUs without bf16 units run it 7–100× slower than fp32, so the CPU always trains fp32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fewshot.errors import FewshotError

if TYPE_CHECKING:
    import torch


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; a one-line error otherwise."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FewshotError(f"device '{name}' asked for but CUDA is not available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise FewshotError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None


def training_device(name: str, precision: str) -> tuple[torch.device, bool]:
    """The device of ``pretrain.device`` and whether to use bf16 autocast (``pretrain.precision``: auto = on CUDA)."""
    device = pick_device(name)
    if precision == "bf16" and device.type != "cuda":
        raise FewshotError("bf16 autocast is only used on CUDA (CPUs here run it far slower); use precision fp32")
    return device, device.type == "cuda" and precision != "fp32"
