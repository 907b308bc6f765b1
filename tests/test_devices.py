"""--device: auto picks CUDA only when present; a missing or unknown device is one line; bf16 only on CUDA."""

from __future__ import annotations

import pytest
import torch

from fewshot.devices import pick_device, training_device
from fewshot.errors import FewshotError


def test_auto_is_the_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert training_device("auto", "auto") == (torch.device("cpu"), False)  # fp32 on a CPU, never autocast


def test_a_missing_or_unknown_device_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FewshotError, match="CUDA is not available here; use --device cpu"):
        pick_device("cuda:1")
    with pytest.raises(FewshotError, match="unknown device 'gpu0'; use auto, cpu, cuda or cuda:N"):
        pick_device("gpu0")


def test_bf16_is_refused_on_a_cpu() -> None:
    with pytest.raises(FewshotError, match="bf16 autocast is only used on CUDA"):
        training_device("cpu", "bf16")
