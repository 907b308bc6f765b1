"""The run folder of ``fewshot pretrain``: what is written there and how it is read back.

::

    RUN/config.json                the resolved PretrainConfig, the data size and the derived hyperparameters
    RUN/metrics.jsonl              one JSON object per logging step ("kind": "step") and per epoch ("kind": "epoch")
    RUN/checkpoint.safetensors     everything needed to resume: model (student, teacher, buffers), optimiser
                                   tensors and RNG states as tensors; step, optimiser groups as JSON metadata
    RUN/backbone.safetensors       the exported backbone (DINO: the teacher's), loadable by timm (see save_backbone)
    RUN/tensorboard/               event files, when tensorboard is installed

Files are written to a temporary name and moved into place with ``os.replace``, so a crash never leaves a
half-written checkpoint. No pickle anywhere: safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from fewshot.errors import FewshotError

CHECKPOINT_FORMAT = "fewshot-checkpoint/1"


class RunFolder:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.metrics = self.root / "metrics.jsonl"
        self.checkpoint = self.root / "checkpoint.safetensors"
        self.backbone = self.root / "backbone.safetensors"
        self.tensorboard = self.root / "tensorboard"

    def create(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise FewshotError(f"--out {self.root} is a file; pass a folder for the run")
        self.root.mkdir(parents=True, exist_ok=True)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop lines logged after ``step`` (they are recomputed when a run resumes from that step)."""
        if not self.metrics.is_file():
            return
        lines = self.metrics.read_text(encoding="utf-8").splitlines()
        keep = [ln for ln in lines if ln.strip() and _step_of(ln) <= step]
        _atomic_write_text(self.metrics, "".join(ln + "\n" for ln in keep))

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        return [json.loads(ln) for ln in self.metrics.read_text(encoding="utf-8").splitlines() if ln.strip()]


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # unreadable line: drop it


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    # safetensors refuses shared or strided storage: give it contiguous copies
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- checkpoint


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Model and optimiser tensors plus RNG states in one safetensors file; ``state`` (JSON-able) as metadata."""
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, param_state in opt["state"].items():
        for key, value in param_state.items():
            tensors[f"optim/{idx}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    meta = {"format": CHECKPOINT_FORMAT, "state": json.dumps(state), "optim_groups": json.dumps(opt["param_groups"])}
    _save_tensors(path, tensors, meta)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor], dict]:
    """Read a checkpoint: (model state dict, optimiser state dict, RNG states, JSON state)."""
    from fewshot.backbones import read_weights

    try:
        tensors, meta = read_weights(path)
    except FewshotError as exc:
        raise FewshotError(f"checkpoint {path} is unreadable ({exc}); delete it to start the run over") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise FewshotError(f"{path} is not a fewshot pretraining checkpoint; choose another --out")
    model = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, idx, key = k.split("/", 2)
            opt_state.setdefault(int(idx), {})[key] = v
    optim = {"state": opt_state, "param_groups": json.loads(meta["optim_groups"])}
    rng = {k[len("rng/") :]: v for k, v in tensors.items() if k.startswith("rng/")}
    return model, optim, rng, json.loads(meta["state"])


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda/")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# ---------------------------------------------------------------------------------------------- backbone


def save_backbone(
    path: Path,
    backbone: nn.Module,
    architecture: str,
    model_kwargs: dict[str, Any],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    img_size: int,
    extra: dict[str, Any] | None = None,
) -> None:
    """The backbone's state dict with metadata (each value JSON): ``architecture``, ``model_kwargs``, ``mean``,
    ``std``, ``img_size``, ``crop_pct``, ``interpolation`` (+ ``extra``).

    Loads with plain timm: ``timm.create_model(architecture, pretrained=True, num_classes=0,
    pretrained_cfg_overlay=dict(file=path), **model_kwargs)``, or with ``fewshot`` as a backbone spec.
    """
    meta = {
        "format": "fewshot-backbone/1",
        "architecture": architecture,  # a plain string, as timm names are
        "model_kwargs": json.dumps(model_kwargs),
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
        "img_size": json.dumps(img_size),
        "crop_pct": json.dumps(1.0),  # training saw whole (centre-cropped square) images, not a 0.875 crop
        "interpolation": json.dumps("bicubic"),
    }
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    _save_tensors(path, dict(backbone.state_dict()), meta)
