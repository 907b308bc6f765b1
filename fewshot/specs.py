"""Backbone specs: the one string that names any feature extractor, parsed (:func:`parse_spec`) before anything is
built (:mod:`fewshot.backbones`).

Grammar: ``SPEC[:key=value,key=value...]``. The suffix passes keyword arguments to ``timm.create_model``
(``img_size``, ``patch_size``, ``depth``, ...) except five of ours: ``arch`` (the timm architecture of a
foreign weights file), ``seed`` (random init), ``size`` (pixels), ``pool`` (this backbone's token pooling,
overriding ``--pool``: e.g. ``runs/mae:pool=avg`` beside ``runs/dino`` in one evaluation) and ``strict``
(``strict=false`` accepts weights that leave more than :data:`fewshot.weights.MAX_MISSING_SHARE` of the model random).

- ``pixels`` / ``pixels:SIZE`` -- the image resized to SIZE x SIZE (default 32), flattened: the raw baseline;
- a timm name, e.g. ``vit_tiny_patch16_224:img_size=32,patch_size=8`` -- random init (seeded): a baseline;
- ``weights.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` -- local weights;
- a run folder written by ``fewshot pretrain`` (it holds ``backbone.safetensors``); ``RUN:init`` the weights that
  run started from;
- ``hf-hub:owner/name`` (or ``timm/name.tag``) -- pretrained weights through timm's hub loader.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewshot.errors import FewshotError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@dataclass(frozen=True)
class BackboneSpec:
    kind: str  # pixels | timm | weights | run | hub | init
    name: str  # timm architecture (or hf-hub:...); "pixels" for the baseline
    path: Path | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # for timm.create_model
    seed: int = 0
    size: int = 32
    pool: str | None = None  # overrides the command's --pool for this backbone
    strict: bool = True  # refuse weights that leave much of the model random


def parse_spec(spec: str) -> BackboneSpec:
    """Parse a backbone spec string (see the module docstring); raise one line on nonsense."""
    spec = spec.strip()
    if not spec:
        raise FewshotError("empty backbone spec; pass e.g. pixels, vit_small_patch16_224 or a run folder")
    base, options = _split_options(spec)
    _check_unparsed_options(spec, base)
    pool = options.pop("pool", None)
    strict = options.pop("strict", True)
    if not isinstance(strict, bool):
        raise FewshotError(f"backbone '{spec}': strict takes True or False, e.g. {base}:strict=False")
    parsed = _parse(spec, base, options)
    return dataclasses.replace(parsed, pool=None if pool is None else str(pool), strict=strict)


def absolute_spec(spec: str) -> str:
    """``spec`` with a relative weights file or run folder made absolute (options kept): what a saved artifact
    records, so that it names the same backbone from any working directory."""
    spec = spec.strip()
    kind = parse_spec(spec).kind
    if kind not in ("weights", "run", "init"):
        return spec
    base = spec_base(spec)
    path = base[: -len(":init")] if kind == "init" else base  # RUN:init names the run folder
    return str(Path(path).expanduser().resolve()) + spec[len(path) :]


def spec_base(spec: str) -> str:
    """The spec without its ``:key=value`` options: a timm name, a hub name or a path."""
    return _split_options(spec.strip())[0]


def _check_unparsed_options(spec: str, base: str) -> None:
    """'pixels:abc' or 'vit_x:img_size' (no '='): an option suffix that is not key=value, named as such."""
    head, sep, tail = base.rpartition(":")
    if not sep or not head or head == "hf-hub" or Path(base).exists() or tail == "init":
        return
    if head == "pixels":
        raise FewshotError(f"backbone '{spec}': pixels takes only a size in pixels, e.g. pixels:32")
    import timm

    if timm.is_model(head) or Path(head).expanduser().exists() or head.startswith("hf-hub:"):
        raise FewshotError(
            f"backbone '{spec}': options after ':' must be key=value pairs, e.g. {head}:img_size=64,pool=avg"
        )


def _parse(spec: str, base: str, options: dict[str, Any]) -> BackboneSpec:
    seed = int(options.pop("seed", 0))
    if base == "pixels":
        size = int(options.pop("size", options.pop("_positional", 32)))
        if options or size < 1:
            raise FewshotError(f"backbone '{spec}': pixels takes only a size, e.g. pixels:32")
        return BackboneSpec("pixels", "pixels", size=size)
    if "_positional" in options:
        raise FewshotError(f"backbone '{spec}': write options as key=value, e.g. {base}:img_size=64")
    arch = options.pop("arch", None)
    if base.endswith(":init") and Path(base[: -len(":init")]).expanduser().is_dir():
        if options or arch:
            raise FewshotError(f"backbone '{spec}': RUN:init takes no options but :pool=, e.g. runs/adapted:init")
        return BackboneSpec("init", "", Path(base[: -len(":init")]).expanduser(), options, seed)
    if base.startswith("hf-hub:") or base.startswith("timm/"):
        return BackboneSpec("hub", base if base.startswith("hf-hub:") else f"hf-hub:{base}", None, options, seed)
    path = Path(base).expanduser()
    if path.is_dir():
        weights = path / "backbone.safetensors"
        if not weights.is_file():
            raise FewshotError(
                f"backbone folder '{base}' has no backbone.safetensors; pass a finished `fewshot pretrain` run folder"
            )
        return BackboneSpec("run", arch or "", weights, options, seed)
    if path.suffix.lower() in WEIGHT_SUFFIXES or path.exists():
        if not path.is_file():
            raise FewshotError(f"weights file '{base}' does not exist; check the path")
        return BackboneSpec("weights", arch or "", path, options, seed)
    import timm

    if not timm.is_model(base):
        close = timm.list_models(f"*{base.split('_')[0]}*")[:5] if base else []
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise FewshotError(
            f"backbone '{base}' is not a file, a run folder or a timm model{hint}; see `timm.list_models()`"
        )
    return BackboneSpec("timm", base, None, options, seed)


def _split_options(spec: str) -> tuple[str, dict[str, Any]]:
    """'vit_x:img_size=32,depth=2' -> ('vit_x', {'img_size': 32, 'depth': 2}); 'pixels:64' -> positional.
    Several groups are one: 'vit_x:img_size=32:pool=avg' == 'vit_x:img_size=32,pool=avg'."""
    head = spec
    options: dict[str, Any] = {}
    while True:
        base, sep, tail = head.rpartition(":")
        if not sep or not base or Path(head).exists() or base == "hf-hub":
            return head, options
        if re.fullmatch(r"\d+", tail) and not options:
            options = {"_positional": int(tail)}
        elif re.fullmatch(r"\w+=[^,=]+(,\w+=[^,=]+)*", tail):
            pairs = (pair.split("=", 1) for pair in tail.split(","))
            options = {**{key: _literal(value) for key, value in pairs}, **options}  # the later group wins
        else:
            return head, options
        head = base


def _literal(value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
