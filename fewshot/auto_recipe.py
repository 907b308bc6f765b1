"""``fewshot pretrain --recipe auto``: a pretraining recipe chosen from the device and the data.

The default when neither ``--recipe`` nor ``--model`` (nor ``--init``) is given. :func:`choose` is a pure function
of a :class:`DeviceInfo` and a :class:`DataInfo` (so the same machine and data always give the same recipe); its
rules are the findings of the CPU sweep in ``benchmarks/mae_cpu_sweep.md`` (MAE, He et al. 2022, learns several
times more per CPU-minute than DINO, Caron et al. 2021, on a few thousand small images). The choice is a layer at
the recipe's place in the precedence (defaults < recipe < ``--set`` < flags), so explicit flags still win; it is
printed in one line and saved in the run's ``config.json`` under ``auto_recipe``.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fewshot.errors import FewshotError

if TYPE_CHECKING:
    from fewshot.sources import ImageSet

AUTO = "auto"
SAMPLE = 100  # images whose size is read (evenly spaced through the data): the typical size is their median
CPU_MINUTES = 20.0  # the budget the CPU recipe was chosen for, used when no --steps/--epochs/--minutes is given


@dataclass(frozen=True)
class DeviceInfo:
    """What the choice needs to know about the device."""

    kind: str  # "cpu" | "cuda"
    name: str = ""  # e.g. the GPU's name (recorded, not used by the rules)


@dataclass(frozen=True)
class DataInfo:
    """What the choice needs to know about the data."""

    n_images: int
    typical_side: int  # median shorter side of the sampled images, in pixels
    sampled: int = 0  # images whose size was read


@dataclass(frozen=True)
class Choice:
    """The chosen ``[pretrain]`` values (a recipe section) and why, in one line."""

    pretrain: dict[str, Any]
    reason: str
    device: DeviceInfo
    data: DataInfo
    length_default: dict[str, Any] = field(default_factory=dict)  # minutes, when no run length was given

    def line(self) -> str:
        """``recipe auto: WHAT, LENGTH (WHY)``: what ``fewshot pretrain`` prints."""
        p = self.pretrain
        blocks = f" cut to {p['depth']} blocks" if p.get("depth") else ""
        patch = f" / patch {p['patch_size']}" if p.get("patch_size") else ""
        what = f"{p['method']}, {p['model']}{blocks} at {p['img_size']} px{patch}, batch {p['batch_size']}"
        length = f", {self.length_default['minutes']:g} minutes" if self.length_default else ""
        return f"recipe auto: {what}{length} ({self.reason})"

    def base(self) -> Any:
        """The default config with this choice in the recipe's place (``--set`` and flags go on top)."""
        from fewshot.config import Config, apply

        return apply(Config(), {"pretrain": {**self.pretrain, **self.length_default}}, source="recipe auto")

    def record(self) -> dict[str, Any]:
        """What ``config.json`` keeps under ``auto_recipe``."""
        return {
            "device": asdict(self.device),
            "data": asdict(self.data),
            "pretrain": self.pretrain,
            "length_default": self.length_default,
            "reason": self.reason,
        }


def given_keys(flags: dict[str, Any], sets: Iterable[str]) -> set[str]:
    """The dotted config keys the user set: flags that are not None and ``--set KEY=VALUE`` keys."""
    return {k for k, v in flags.items() if v is not None} | {s.partition("=")[0].strip() for s in sets}


def wanted(recipe: Path | str | None, given: set[str]) -> bool:
    """``--recipe auto``, or no recipe and neither a model nor starting weights (``given``: :func:`given_keys`)."""
    if recipe is not None:
        return str(recipe) == AUTO
    return not given & {"pretrain.model", "pretrain.init"}


def for_run(images: ImageSet, out: Path, device: str, given: set[str], method: str) -> Choice:
    """The choice for ``fewshot pretrain``: the one saved in ``out`` when re-running into a run folder (it resumes
    with the same recipe), else :func:`choose` for this device and data. ``method`` counts only when the user set it;
    with a run length given (``--steps``, ``--epochs``, ``--minutes``) no default budget is added."""
    saved = saved_choice(out)
    if saved is not None:
        return Choice(
            saved["pretrain"], saved["reason"] + f"; as saved in {out}", DeviceInfo(**saved["device"]),
            DataInfo(**saved["data"]), saved.get("length_default") or {},
        )  # fmt: skip
    lengths = {"pretrain.steps", "pretrain.epochs", "pretrain.minutes"}
    chosen_method = method if "pretrain.method" in given else None
    return choose(describe_device(device), describe_data(images), chosen_method, length_given=bool(given & lengths))


def describe_device(device: str) -> DeviceInfo:
    """The device ``--device`` resolves to (``auto``: CUDA when available)."""
    from fewshot.devices import pick_device

    picked = pick_device(device)
    if picked.type == "cuda":
        import torch

        return DeviceInfo("cuda", torch.cuda.get_device_name(picked))
    return DeviceInfo(picked.type)


def describe_data(images: ImageSet, sample: int = SAMPLE) -> DataInfo:
    """Size of ``images`` (a :class:`fewshot.sources.ImageSet`) and the median shorter side of up to ``sample``
    images spread evenly through it (file headers only where the images are files)."""
    from PIL import Image

    n = len(images)
    if n == 0:
        raise FewshotError("no readable images to pretrain on; check the DATA folder")
    k = min(sample, n)
    picks = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})
    sides = []
    for i in picks:
        record = images.records[i] if hasattr(images, "records") else None
        try:
            if record is not None and record.file is not None:
                with Image.open(record.file) as img:  # the header: no decoding
                    sides.append(min(img.size))
            else:
                sides.append(min(images.load(i).size))
        except (OSError, ValueError):
            continue  # unreadable: pretraining skips and reports it
    if not sides:
        raise FewshotError("none of the sampled images could be read; check the DATA folder")
    return DataInfo(n, int(statistics.median(sides)), len(sides))


def choose(device: DeviceInfo, data: DataInfo, method: str | None = None, length_given: bool = False) -> Choice:
    """The recipe for this device and data (``method``: the user's ``--method``, which the choice keeps)."""
    values, reason = (_gpu if device.kind == "cuda" else _cpu)(data, method)
    default = {} if length_given or device.kind == "cuda" else {"minutes": CPU_MINUTES}
    return Choice(values, reason, device, data, default)


# MAE on a CPU (benchmarks/mae_cpu_sweep.md): ViT-tiny (192-d) cut to 4 blocks, 2-block 128-d decoder, 75% masking,
# batch 64, 10× MAE's learning rate (short runs), MAE's AdamW otherwise; warm-up by the project's rule.
CPU_MAE: dict[str, Any] = {
    "method": "mae",
    "model": "vit_tiny_patch16_224",
    "depth": 4,
    "batch_size": 64,
    "log_every": 50,
    "optim": {"lr": 1.5e-3, "min_lr": 0.0, "weight_decay": 0.05, "weight_decay_end": 0.05, "betas": (0.9, 0.95),
              "clip_grad": 0.0},
    "mae": {"mask_ratio": 0.75, "decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4, "norm_pix_loss": True},
}  # fmt: skip
# DINO on a CPU when the user asks for it: recipes/dino-cpu-tiny.toml's values
CPU_DINO: dict[str, Any] = {
    "method": "dino",
    "model": "vit_tiny_patch16_224",
    "depth": 4,
    "batch_size": 64,
    "log_every": 50,
    "optim": {"lr": 2e-3, "min_lr": 1e-5, "weight_decay": 0.04, "weight_decay_end": 0.4, "betas": (0.9, 0.999),
              "clip_grad": 3.0},
    "dino": {"hidden_dim": 512, "bottleneck_dim": 128, "local_crops": 4, "drop_path_rate": 0.0},
}  # fmt: skip
# On a GPU (not swept here): recipes/dino-vits-small-gpu.toml, DINO ViT-S/16 at 112 px, for either method's family
GPU_DINO: dict[str, Any] = {
    "method": "dino",
    "model": "vit_small_patch16_224",
    "img_size": 112,
    "patch_size": 16,
    "epochs": 200,
    "batch_size": 128,
    "log_every": 50,
    "optim": {"lr": 5e-4, "min_lr": 1e-6, "weight_decay": 0.04, "weight_decay_end": 0.4, "betas": (0.9, 0.999),
              "clip_grad": 3.0},
    "dino": {"local_crops": 6, "local_crop_size": 48, "drop_path_rate": 0.1},
}  # fmt: skip
GPU_MAE: dict[str, Any] = {
    "method": "mae",
    "model": "vit_small_patch16_224",
    "img_size": 112,
    "patch_size": 16,
    "epochs": 400,
    "batch_size": 256,
    "log_every": 50,
    "optim": {"lr": 1.5e-4, "min_lr": 0.0, "warmup_epochs": 20, "weight_decay": 0.05, "weight_decay_end": 0.05,
              "betas": (0.9, 0.95), "clip_grad": 0.0},
    "mae": {"mask_ratio": 0.75, "decoder_dim": 256, "decoder_depth": 4, "decoder_heads": 8},
}  # fmt: skip
CHECKPOINT_STEPS = 300  # about this many steps between checkpoints on small data (an epoch can be a few steps)


def cpu_geometry(side: int) -> tuple[int, int]:
    """(img_size, patch_size) for images whose shorter side is typically ``side`` pixels (the sweep,
    benchmarks/mae_cpu_sweep.md: photos at 32 px / patch 8 tie 32 / 4 and 64 / 8 at a fraction of their CPU time;
    28-px digits in 4-px patches, 49 tokens, reach 57.2% at 10 shots against 52.2% in 7-px patches, 16 tokens)."""
    if side <= 16:
        return 16, 4  # 16 tokens: tiny scans are upsampled (the demo's digits, 8 px)
    if side < 32:
        return side // 4 * 4, 4
    return 32, 8


def _batch(n_images: int, batch: int) -> int:
    """``batch``, halved until an epoch has at least 4 steps (tiny data sets)."""
    while batch > 1 and n_images // batch < 4:
        batch //= 2
    return batch


def _cpu(data: DataInfo, method: str | None) -> tuple[dict[str, Any], str]:
    img, patch = cpu_geometry(data.typical_side)
    values = dict(CPU_DINO if method == "dino" else CPU_MAE)
    values |= {"img_size": img, "patch_size": patch, "batch_size": _batch(data.n_images, values["batch_size"])}
    per_epoch = max(data.n_images // values["batch_size"], 1)
    values["checkpoint_every"] = max(1, -(-CHECKPOINT_STEPS // per_epoch))
    tokens = (img // patch) ** 2
    if method == "dino":
        values["dino"] = {**values["dino"], "local_crop_size": img // 2}
        why = "DINO as asked (MAE learns more per CPU-minute)"
    else:
        values["mae"] = {**values["mae"], "reconstruct_every": 10 * values["checkpoint_every"]}
        why = "MAE learns several times more per CPU-minute than DINO"
    return values, (
        f"CPU: {why}; {data.n_images} images of typically {data.typical_side} px → {img} px in {tokens} patches"
    )


def _gpu(data: DataInfo, method: str | None) -> tuple[dict[str, Any], str]:
    values = dict(GPU_MAE if method == "mae" else GPU_DINO)
    values["batch_size"] = _batch(data.n_images, values["batch_size"])
    name = "MAE as asked" if method == "mae" else "DINO, whose frozen features beat MAE's given GPU time"
    return values, f"GPU: {name}, the small-GPU ViT-S/16 recipe at 112 px (not swept here); {data.n_images} images"


def saved_choice(run: Path) -> dict[str, Any] | None:
    """The ``auto_recipe`` record of an existing run folder (a re-run resumes with the same choice), or None."""
    try:
        saved = json.loads((Path(run) / "config.json").read_text(encoding="utf-8")).get("auto_recipe")
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None
