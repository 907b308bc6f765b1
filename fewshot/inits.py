"""The weights a pretraining run starts from (``fewshot pretrain --init SPEC``), and finding them again.

Continuing self-supervised training on one's own domain from public weights is domain-adaptive pretraining
(Gururangan et al. 2020, "Don't Stop Pretraining"; for vision, Reed et al. 2022, "Self-Supervised Pretraining
Improves Self-Supervised Pretraining"). ``SPEC`` is any backbone spec, resolved by the one resolver
:func:`fewshot.backbones.load_backbone`: ``hf-hub:owner/name`` (also ``timm/name.tag``), a run folder, a weights
file (``:arch=`` when it does not say). From it the run takes, unless set: the architecture and its timm
keyword arguments, the image, patch size and depth, and the normalisation and eval transform (mean, std,
crop_pct, interpolation), so that the run is evaluated exactly as its init is.

The run folder records the init (``config.json`` → ``init``: the spec with file paths made absolute, and the
weights' sha256), and the exported backbone repeats it in its metadata. ``RUN:init`` is then a backbone spec for
those weights (checked against the recorded sha256), and :func:`init_references` pairs each run with its init so
that ``evaluate`` reports the paired difference run − init (:mod:`fewshot.comparisons`, kind ``init``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from fewshot.errors import FewshotError
from fewshot.pretrain_config import IMAGENET_MEAN, IMAGENET_STD, PretrainConfig, resolve_optim, scratch_architecture

# the eval transform of a run without an init: training saw whole (centre-cropped square) images
SCRATCH_EVAL = {"crop_pct": 1.0, "interpolation": "bicubic"}


@dataclass
class InitWeights:
    """A resolved ``--init``: what the run rebuilds and loads, and what it records."""

    spec: str  # as given, with a file or folder path made absolute
    sha256: str  # the weights' hash as load_backbone reports it (a file's sha256, or "hub:" + the tensors' hash)
    architecture: str  # timm architecture
    model_kwargs: dict[str, Any]  # timm kwargs that rebuild it (img_size, patch_size and depth excluded)
    img_size: int
    patch_size: int | None  # None: not a ViT
    depth: int | None
    data: dict[str, Any]  # mean, std, crop_pct, interpolation of the init's eval transform
    state: dict[str, Any]  # its state dict (tensors)
    report: str  # missing / unexpected keys when the spec was loaded

    def record(self) -> dict[str, Any]:
        """What config.json keeps of the init (everything but the tensors)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("state", "report")}


def resolve_init(spec: str) -> InitWeights:
    """Load ``spec`` with :func:`fewshot.backbones.load_backbone` and read off what a run needs from it."""
    from fewshot.backbones import load_backbone
    from fewshot.specs import absolute_spec, parse_spec

    parsed = parse_spec(spec)
    if parsed.kind in ("pixels", "timm"):
        raise FewshotError(
            f"--init {spec} names {'raw pixels' if parsed.kind == 'pixels' else 'a randomly initialised timm model'}, "
            "not weights; pass pretrained weights (e.g. hf-hub:timm/vit_small_patch16_224.dino or "
            "timm/vit_small_patch16_224.dino, a run folder, a weights file), or drop --init and set --model"
        )
    bb = load_backbone(spec)
    model = bb.model
    arch = str(getattr(model, "pretrained_cfg", {}).get("architecture") or bb.architecture)
    kwargs = dict(bb.model_kwargs)
    if bb.architecture.startswith("hf-hub:"):  # the hub's config.json may hold model_args timm built it with
        from timm.models import load_model_config_from_hf

        kwargs = {**(load_model_config_from_hf(bb.architecture[len("hf-hub:") :])[2] or {}), **kwargs}
    desc = json.loads(bb.transform_desc)
    patch = getattr(model, "patch_embed", None)
    blocks = getattr(model, "blocks", None)
    img_size = int(patch.img_size[0]) if patch is not None else int(desc["input_size"][-1])
    data = {"mean": tuple(desc["mean"]), "std": tuple(desc["std"])}
    data.update({k: desc[k] for k in ("crop_pct", "interpolation") if k in desc})
    return InitWeights(
        spec=absolute_spec(spec),
        sha256=bb.weights_sha256,
        architecture=arch,
        model_kwargs={k: v for k, v in kwargs.items() if k not in ("img_size", "patch_size", "depth")},
        img_size=img_size,
        patch_size=int(patch.patch_size[0]) if patch is not None else None,
        depth=len(blocks) if patch is not None and blocks is not None else None,  # a ViT's blocks
        data=data,
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        report=bb.load_report,
    )


def resolve_pretrain(cfg: PretrainConfig) -> tuple[PretrainConfig, InitWeights | None]:
    """Every value the run needs that the config left to be derived from the method or the init: the method's
    optimiser (:func:`fewshot.pretrain_config.resolve_optim`), and the architecture, sizes and normalisation (the
    init's, else :func:`fewshot.pretrain_config.scratch_architecture` and ImageNet's mean and std)."""
    cfg = dataclasses.replace(cfg, optim=resolve_optim(cfg.method, cfg.optim))
    init = resolve_init(cfg.init) if cfg.init else None
    if init is None:
        model, img_size = scratch_architecture(cfg)
        return dataclasses.replace(
            cfg, model=model, img_size=img_size, mean=cfg.mean or IMAGENET_MEAN, std=cfg.std or IMAGENET_STD
        ), None
    cfg = dataclasses.replace(
        cfg,
        init=init.spec,
        model=cfg.model or init.architecture,
        img_size=cfg.img_size or init.img_size,
        patch_size=cfg.patch_size or init.patch_size,
        depth=cfg.depth or init.depth,
        mean=cfg.mean or tuple(init.data["mean"]),
        std=cfg.std or tuple(init.data["std"]),
    )
    return cfg, init


def eval_transform(data: dict[str, Any] | None) -> dict[str, Any]:
    """crop_pct and interpolation of the run's exported backbone: its init's (``InitWeights.data``, so that run and
    init are evaluated alike), else whole images, bicubic."""
    return {k: (data or {}).get(k, v) for k, v in SCRATCH_EVAL.items()}


# ---------------------------------------------------------------------------------------------- RUN:init


def started_from(spec: str) -> str | None:
    """The sha256 of the weights that the run or backbone file ``spec`` started from (its metadata), or None."""
    from fewshot.specs import parse_spec

    try:
        parsed = parse_spec(spec)
    except FewshotError:
        return None
    if parsed.kind not in ("run", "weights") or parsed.path is None or parsed.path.suffix != ".safetensors":
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(parsed.path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError):
        return None
    return json.loads(meta["init_sha256"]) if "init_sha256" in meta else None


def init_references(feats: dict[str, Any]) -> dict[str, str]:
    """``{run: init}`` for every evaluated run that started from weights also evaluated here (``-b RUN -b RUN:init``,
    or the init's own spec), matched by the init's recorded sha256; :mod:`fewshot.comparisons` pairs them by seed."""
    sha = {name: pair[0].meta.get("weights_sha256") for name, pair in feats.items()}
    found = {}
    for run in feats:
        init_sha = started_from(run)
        init = next((b for b in feats if b != run and init_sha and sha[b] == init_sha), None)
        if init is not None:
            found[run] = init
    return found
