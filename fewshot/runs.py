"""The run folder of ``fewshot pretrain``: what is written there and how it is read back.

::

    RUN/config.json                the resolved PretrainConfig, the data size and the derived hyperparameters
    RUN/metrics.jsonl              one JSON object per logging step ("kind": "step") and per epoch ("kind": "epoch")
    RUN/checkpoint.safetensors     everything needed to resume: model (student, teacher, buffers), optimiser
                                   tensors and RNG states as tensors; step, optimiser groups as JSON metadata.
                                   A hard link to the newest of:
    RUN/checkpoint-STEP.safetensors  the last KEEP_CHECKPOINTS checkpoints (STEP zero-padded); resume reads the
                                   newest readable one, so a damaged newest falls back to the one before
    RUN/.lock                      held (flock) by the one process writing the run; holds its pid
    RUN/backbone.safetensors       the exported backbone (DINO: the teacher's), loadable by timm (see save_backbone)
    RUN/best.safetensors           with --monitor: the exported backbone at the best monitored step (step 0 included)
    RUN/tensorboard/               event files, when tensorboard is installed

Files are written to a temporary name, fsynced and moved into place with ``os.replace`` (then the folder is
fsynced: :func:`fewshot.outputs.write_atomically`), so a crash or power loss never leaves a half-written
checkpoint under a final name, and the previous checkpoint is only pruned once the new one is complete. No pickle
anywhere: safetensors and JSON only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fewshot.errors import FewshotError
from fewshot.outputs import check_folder, folder_lock, save_tensors, write_atomically

if TYPE_CHECKING:
    from fewshot.pretrain_config import PretrainConfig

CHECKPOINT_FORMAT = "fewshot-checkpoint/1"
KEEP_CHECKPOINTS = 2  # checkpoint-STEP files kept (PretrainConfig has no field for it)
_STEP_FILE = re.compile(r"checkpoint-(\d+)\.safetensors")


class RunFolder:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.metrics = self.root / "metrics.jsonl"
        self.checkpoint = self.root / "checkpoint.safetensors"
        self.backbone = self.root / "backbone.safetensors"
        self.best = self.root / "best.safetensors"
        self.tensorboard = self.root / "tensorboard"
        self.lockfile = self.root / ".lock"

    def step_checkpoint(self, step: int) -> Path:
        return self.root / f"checkpoint-{step:09d}.safetensors"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """The checkpoint-STEP files as (step, path), newest first."""
        found = [
            (int(m.group(1)), p)
            for p in self.root.glob("checkpoint-*.safetensors")
            if (m := _STEP_FILE.fullmatch(p.name))
        ]
        return sorted(found, reverse=True)

    def has_checkpoint(self) -> bool:
        return self.checkpoint.is_file() or bool(self.checkpoints())

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """One writer per run folder (:func:`fewshot.outputs.folder_lock`); a crashed, even SIGKILLed, run never
        leaves the folder stuck."""
        return folder_lock(self.root, "run folder")

    def create(self) -> None:
        check_folder(self.root)  # a file, under a file, not writable: one line, before any work

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
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=True)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    # safetensors refuses shared or strided storage: give it contiguous copies
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    save_tensors(path, tensors, metadata=metadata, durable=True)


# ---------------------------------------------------------------------------------------------- checkpoint


def save_run_checkpoint(
    run: RunFolder, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Write checkpoint-STEP (``state["step"]``) crash-safely, point checkpoint.safetensors at it, then prune to
    the newest KEEP_CHECKPOINTS. Older checkpoints are only deleted once the new one is complete on disk."""
    step = int(state["step"])
    path = run.step_checkpoint(step)
    save_checkpoint(path, model, optimizer, state)
    write_atomically(run.checkpoint, lambda tmp: _link_or_copy(path, tmp), durable=True)
    found = run.checkpoints()
    # steps after this one belong to a timeline the resume discarded (e.g. after a damaged newest checkpoint)
    keep = {s for s, _ in found if s <= step}
    keep = set(sorted(keep, reverse=True)[:KEEP_CHECKPOINTS])
    for old_step, old in found:
        if old_step not in keep:
            old.unlink(missing_ok=True)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # same bytes, no extra disk
    except OSError:  # file systems without hard links
        shutil.copyfile(source, target)


def load_run_checkpoint(
    run: RunFolder,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor], dict, Path]:
    """The newest readable checkpoint of ``run`` (see :func:`load_checkpoint`) and its path; an unreadable newest
    (e.g. truncated by a full disk) falls back to the one before."""
    candidates = [p for _, p in run.checkpoints()] or [run.checkpoint]  # runs from before checkpoint-STEP files
    errors = []
    for path in candidates:
        try:
            return (*load_checkpoint(path), path)
        except FewshotError as exc:
            errors.append(str(exc))
    raise FewshotError(
        errors[0]
        if len(errors) == 1
        else f"no readable checkpoint in {run.root} ({errors[0]}); delete the checkpoint files to start the run over"
    )


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
    from fewshot.weights import read_weights

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
    crop_pct: float = 1.0,
    interpolation: str = "bicubic",
) -> None:
    """The backbone's state dict with metadata (each value JSON): ``architecture``, ``model_kwargs``, ``mean``,
    ``std``, ``img_size``, ``crop_pct``, ``interpolation`` (+ ``extra``). ``crop_pct`` 1.0 (the default): training
    saw whole (centre-cropped square) images, not a 0.875 crop; a run from ``--init`` keeps the init's.

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
        "crop_pct": json.dumps(crop_pct),
        "interpolation": json.dumps(interpolation),
    }
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    _save_tensors(path, dict(backbone.state_dict()), meta)


def load_run_config(out: Path) -> PretrainConfig:
    """The PretrainConfig a run folder was started with (for ``fewshot pretrain --resume RUN``)."""
    from fewshot.config import from_dict
    from fewshot.pretrain_config import PretrainConfig

    path = RunFolder(Path(out)).config
    if not path.is_file():
        raise FewshotError(f"{out} is not a pretraining run folder (no config.json); pass the --out of a run")
    return from_dict(PretrainConfig, json.loads(path.read_text(encoding="utf-8"))["config"])


def flat_keys(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"a.b": value}`` (tuples as lists, as in config.json)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out
