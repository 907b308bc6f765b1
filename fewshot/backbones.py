"""Building backbones: a spec (:mod:`fewshot.specs`) becomes a ready feature extractor, built only through
``timm.create_model`` (:func:`create_model`), with its eval transform and the sha256 of its weights.

- ``pixels`` -- no model: the image resized and flattened;
- a timm name -- random init, seeded;
- a weights file (:mod:`fewshot.weights`: safetensors, or ``.pth`` read with ``weights_only=True``; common layouts
  unwrapped), with the architecture from our metadata or ``:arch=NAME``; a partial load that leaves much of the
  model random is refused unless ``:strict=false``;
- a run folder (its ``backbone.safetensors``; an unfinished run is used with a warning naming its step);
  ``RUN:init`` the weights the run started from (``--init``, checked against the sha256 it recorded);
- ``hf-hub:owner/name`` -- timm's hub loader (needs the network once).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewshot.errors import FewshotError
from fewshot.specs import parse_spec
from fewshot.weights import file_sha256, load_state, read_weights, state_sha256

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- building


@dataclass
class Backbone:
    """A ready-to-run feature extractor: the timm model (None for pixels) and its eval transform."""

    spec: str
    model: Any  # torch.nn.Module | None
    transform: Callable[[Any], Any]  # PIL RGB image -> (3, H, W) float tensor
    transform_desc: str
    weights_sha256: str
    architecture: str
    model_kwargs: dict[str, Any]
    load_report: str = ""  # missing / unexpected keys when weights were loaded
    pool: str | None = None  # the spec's own pooling, overriding the command's
    note: str = ""  # a warning that travels with the features (e.g. an unfinished run)


def load_backbone(spec: str) -> Backbone:
    """Build the backbone a spec names, on the CPU, in eval mode."""
    parsed = parse_spec(spec)
    if parsed.kind == "pixels":
        return _pixels(spec, parsed.size)  # pixels have no tokens to pool
    if parsed.kind == "init":
        assert parsed.path is not None
        return _run_init(parsed.path, spec, parsed.pool)
    import timm
    import torch

    data_cfg: dict[str, Any] | None = None
    report = note = ""
    if parsed.kind == "timm":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(parsed.seed)  # the random-init baseline is reproducible
            model, _ = create_model(parsed.name, parsed.kwargs)
        sha = "random-init:" + state_sha256(model)
        data_cfg = {"crop_pct": 1.0}  # no pretrained eval protocol to follow: keep the whole image
    elif parsed.kind == "hub":
        from huggingface_hub.errors import EntryNotFoundError  # a plain Exception, unlike the hub's HTTP errors

        try:
            model = timm.create_model(parsed.name, pretrained=True, num_classes=0, **parsed.kwargs)
        except (OSError, ValueError, RuntimeError, EntryNotFoundError) as exc:  # network, unknown repo or file, auth
            raise FewshotError(f"cannot load '{parsed.name}' from the Hugging Face hub ({exc})") from None
        sha = "hub:" + state_sha256(model)
    else:
        assert parsed.path is not None
        state, meta = read_weights(parsed.path)
        arch = parsed.name or meta.get("architecture", "")
        if not arch:
            raise FewshotError(
                f"'{parsed.path}' does not say which architecture it holds; add :arch=<timm name>, "
                f"e.g. {parsed.path}:arch=vit_small_patch16_224"
            )
        kwargs = {**json.loads(meta.get("model_kwargs", "{}")), **parsed.kwargs}
        model, _ = create_model(arch, kwargs)
        report = load_state(model, state, str(parsed.path), strict=parsed.strict)
        if report:
            log.warning("%s: %s", parsed.path, report)
        parsed = dataclasses.replace(parsed, name=arch, kwargs=kwargs)
        sha = file_sha256(parsed.path)  # type: ignore[arg-type]  # set for weights and runs
        data_cfg = {k: json.loads(meta[k]) for k in ("mean", "std", "crop_pct", "interpolation") if k in meta}
        note = _unfinished(parsed.path, meta)  # type: ignore[arg-type]
    model.eval()
    transform, desc = _timm_transform(model, data_cfg)
    return Backbone(spec, model, transform, desc, sha, parsed.name, dict(parsed.kwargs), report, parsed.pool, note)


def recorded_init(folder: Path) -> dict[str, Any] | None:
    """The init a run folder recorded in its config.json (``spec``, ``sha256``, ...), or None."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("init")
    except (OSError, ValueError):
        return None


def _run_init(folder: Path, spec: str, pool: str | None) -> Backbone:
    """The backbone ``RUN:init`` names: the weights ``RUN`` started from, refused if they changed since."""
    init = recorded_init(folder)
    if not init:
        raise FewshotError(f"backbone '{spec}': run folder {folder} did not start from --init weights")
    bb = load_backbone(init["spec"])
    if bb.weights_sha256 != init["sha256"]:
        raise FewshotError(
            f"backbone '{spec}': the weights {init['spec']} changed since the run started from them (sha256 "
            f"{bb.weights_sha256[:16]}…, recorded {init['sha256'][:16]}…); pass the original weights' spec"
        )
    return dataclasses.replace(bb, spec=spec, pool=pool or bb.pool)


def _unfinished(path: Path, meta: dict[str, str]) -> str:
    """A warning (also logged) when ``path`` was exported by a pretraining run that stopped before its last step."""
    try:
        step, total = int(json.loads(meta["step"])), int(json.loads(meta["total_steps"]))
    except (KeyError, ValueError, TypeError):
        return ""  # not written by fewshot pretrain, or by an older version
    if step >= total:
        return ""
    note = (
        f"{path} is from an unfinished run: step {step:,} of {total:,}; re-run the same `fewshot pretrain` "
        "command to finish it"
    )
    log.warning(note)
    return note


def create_model(
    arch: str, kwargs: dict[str, Any], hint: str = "check the spec's options", optional: tuple[str, ...] = ()
) -> tuple[Any, dict[str, Any]]:
    """The one door to ``timm.create_model`` for a randomly initialised model: ``arch`` with ``num_classes=0`` and
    ``kwargs``. Keys of ``optional`` that the architecture does not take (timm raises TypeError) are dropped, in
    order, and the build tried again (e.g. ``dynamic_img_size``, then ``img_size`` for a CNN). Returns the model and
    the keyword arguments it was built with; any other failure is one :class:`FewshotError` line ending in ``hint``."""
    import timm

    args = dict(kwargs)
    while True:
        try:
            return timm.create_model(arch, pretrained=False, num_classes=0, **args), args
        except TypeError as exc:
            drop = next((k for k in optional if k in args), None)
            if drop is None:
                raise FewshotError(f"timm cannot build '{arch}' with {kwargs} ({exc}); {hint}") from None
            del args[drop]
        except (ValueError, RuntimeError, AssertionError) as exc:
            raise FewshotError(f"timm cannot build '{arch}' with {kwargs} ({exc}); {hint}") from None


def _timm_transform(model: Any, overrides: dict[str, Any] | None) -> tuple[Callable[[Any], Any], str]:
    """timm's eval transform for the model; the input size follows the model's actual patch-embed size."""
    import timm.data

    cfg = dict(timm.data.resolve_model_data_config(model))
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:  # resolve_model_data_config reports the pretrained size, not an img_size override
        cfg["input_size"] = (3, int(img_size[0]), int(img_size[1]))
    cfg.update(overrides or {})
    for key in ("mean", "std"):
        cfg[key] = tuple(float(v) for v in cfg[key])
    keep = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    cfg = {k: cfg[k] for k in keep if k in cfg}
    transform = timm.data.create_transform(**cfg, is_training=False)
    return transform, json.dumps(cfg, sort_keys=True)


def _pixels(spec: str, size: int) -> Backbone:
    import torch
    from torchvision.transforms import v2

    transform = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize((size, size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    desc = json.dumps({"input_size": [3, size, size], "interpolation": "bilinear", "scale": "0..1"}, sort_keys=True)
    return Backbone(spec, None, transform, desc, "none", "pixels", {"size": size})
