"""Frozen features: stream images through a backbone, pool its tokens, cache the result as safetensors.

How the tokens become one vector per image (``cls``, ``avg``, ``cls+avg``, ``lastN``) is :mod:`fewshot.pooling`.

The file format is part of the contract: tensors ``features`` (N x D float32) and ``labels`` (N int64, -1 when
unlabelled); string metadata ``classes``, ``paths``, ``skipped`` (JSON lists), ``backbone``, ``weights_sha256``,
``pool``, ``transform``. The same backbone + data + transform + pool is served from the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fewshot.config import Config, ExtractConfig, save_config
from fewshot.errors import FewshotError
from fewshot.pooling import check_pool, check_pool_for, embed

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from fewshot.backbones import Backbone
    from fewshot.distributed import Dist
    from fewshot.sources import ImageSet

CACHE_VERSION = "2"  # 2: the data fingerprint covers class names and skipped files


@dataclass
class Features:
    """What ``fewshot extract`` writes: one row per readable image."""

    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64, -1 when unlabeled
    classes: list[str]  # label i is classes[i]
    paths: list[str]  # relative to the data source
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path": ..., "reason": ...}
    meta: dict[str, str] = field(default_factory=dict)  # backbone, weights_sha256, pool, transform, ...


# ---------------------------------------------------------------------------------------------- public API


def extract(
    data: str | Path,
    out: str | Path | None = None,
    cfg: Config | None = None,
    *,
    backbone: str | None = None,
    pool: str | None = None,
    progress: bool = True,
) -> Features:
    """Python twin of ``fewshot extract``: frozen features of every readable image in ``data``.

    Parameters
    ----------
    data : any data source :func:`fewshot.sources.open_source` accepts (labels are kept when it has them).
    out : a ``.safetensors`` file to write (with the resolved config beside it); None: only return them.
    cfg : ``cfg.extract`` says how (backbone, pool, batch size, device, cache); defaults when None.
    backbone, pool : override ``cfg.extract.backbone`` / ``cfg.extract.pool``.
    progress : show a progress bar.

    Returns
    -------
    Features : (N, D) features, labels, classes, paths, the skipped files and the backbone's metadata; computed
    once per backbone + data + transform + pool, then read from the cache.
    """
    from fewshot import distributed
    from fewshot.outputs import check_file

    cfg = cfg or Config()
    ecfg = cfg.extract
    if backbone is not None:
        ecfg = replace(ecfg, backbone=backbone)
    if pool is not None:
        ecfg = replace(ecfg, pool=pool)
    if out is not None:
        out = check_file(out, suffix=".safetensors")  # before minutes of extraction
    feats = extract_features(data, ecfg, progress=progress)
    if out is not None and distributed.is_main():
        save_features(feats, out)
        save_config(replace(cfg, extract=ecfg), out.with_suffix(".config.json"), data=str(data))
    return feats


def extract_features(
    data: str | Path, cfg: ExtractConfig, progress: bool = True, backbone: Backbone | None = None
) -> Features:
    """Features of every readable image in ``data`` with ``cfg.backbone`` (or the already loaded ``backbone``
    that spec names); cached unless ``cfg.cache`` is off."""
    from fewshot import distributed
    from fewshot.backbones import load_backbone
    from fewshot.devices import pick_device
    from fewshot.sources import open_source

    ranks = distributed.setup(pick_device(cfg.device))  # under torchrun the images are shared out among ranks
    backbone = backbone or load_backbone(cfg.backbone)
    cfg = replace(cfg, pool=backbone.pool or cfg.pool)  # a spec's own :pool= wins over --pool
    check_pool(cfg.pool)
    check_pool_for(backbone.model, cfg.pool)
    images = open_source(data)
    key = _cache_key(images.fingerprint, backbone, cfg.pool)
    cached = cache_dir() / f"{key}.safetensors"
    feats = None
    if cfg.cache and cached.is_file():
        try:
            feats = load_features(cached)
        except FewshotError:
            cached.unlink(missing_ok=True)  # a damaged cache entry is recomputed, never trusted
    if feats is None:
        feats = _compute(images, backbone, cfg, progress and ranks.main, ranks)
        feats.meta.update(
            architecture=backbone.architecture,
            model_kwargs=json.dumps(backbone.model_kwargs, sort_keys=True),
            weights_sha256=backbone.weights_sha256,
            pool=cfg.pool,
            transform=backbone.transform_desc,
        )
        if cfg.cache and ranks.main:
            save_features(feats, cached)
    # how the backbone and data were named this time: they do not define the features, so they are not in the key
    feats.meta.update(backbone=cfg.backbone, data=str(data))
    if backbone.note:
        feats.meta["backbone_note"] = backbone.note
    return feats


# ---------------------------------------------------------------------------------------------- computing


def _compute(images: ImageSet, backbone: Backbone, cfg: ExtractConfig, progress: bool, ranks: Dist) -> Features:
    import torch
    from torch.utils.data import DataLoader

    from fewshot.devices import pick_device
    from fewshot.progress import bar as progress_bar

    device = ranks.device(pick_device(cfg.device))
    model = backbone.model.to(device) if backbone.model is not None else None
    share = range(ranks.rank, len(images), ranks.world)  # this rank's images (all of them in one process)
    loader: DataLoader[Any] = DataLoader(
        _Decoded(images, backbone.transform, share),  # type: ignore[arg-type]  # a map-style dataset by protocol
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    out: np.ndarray | None = None  # (N, D), allocated once the first batch tells D: memory stays flat
    kept: list[int] = []
    skipped: list[dict[str, str]] = []
    bar = progress_bar(total=len(share), desc=f"extract {cfg.backbone}", unit="img", disable=not progress, leave=False)
    with torch.inference_mode():
        for x, index, bad in loader:
            skipped += bad
            if x is not None:
                x = x.to(device, non_blocking=True)  # (B, 3, H, W)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    z = embed(model, x, cfg.pool) if model is not None else x.flatten(1)  # (B, D)
                if out is None:
                    out = np.empty((len(share), z.shape[1]), dtype=np.float32)
                out[len(kept) : len(kept) + len(index)] = z.float().cpu().numpy()
                kept += index
            bar.update(len(index) + len(bad))
    bar.close()
    if ranks.world > 1:
        out, kept, skipped = _gather(out, kept, skipped, len(images), device)
    skipped = list(images.skipped) + skipped
    if out is None:
        reasons = "; ".join(sorted({s["reason"] for s in skipped}))[:200]
        raise FewshotError(f"no readable images in '{images.source}' (all {len(skipped)} skipped: {reasons})")
    labels = np.array([images.records[i].label for i in kept], dtype=np.int64)
    paths = [images.records[i].name for i in kept]
    return Features(out[: len(kept)], labels, list(images.classes), paths, skipped)


def _gather(
    out: np.ndarray | None, kept: list[int], skipped: list[dict[str, str]], n: int, device: torch.device
) -> tuple[np.ndarray | None, list[int], list[dict[str, str]]]:
    """Every rank's features, in the images' order, on every rank (torchrun)."""
    import torch

    from fewshot import distributed

    on = device if device.type == "cuda" else torch.device("cpu")  # NCCL gathers GPU tensors, gloo CPU ones
    dim = int(distributed.max_(torch.tensor(0 if out is None else out.shape[1], device=on)))
    mine = torch.from_numpy(out[: len(kept)]) if out is not None else torch.zeros(0, dim)  # (n_rank, D)
    values, index = distributed.gather_rows(mine.to(on), torch.tensor(kept, dtype=torch.long, device=on), n)
    skipped = sorted(distributed.gather_objects(skipped), key=lambda s: s["path"])
    return (values.cpu().numpy() if len(index) else None), index.tolist(), skipped


class _Decoded:
    """Map-style dataset over the images ``ids``: decoded, transformed image or the reason it could not be read."""

    def __init__(self, images: ImageSet, transform: Callable[[Image.Image], torch.Tensor], ids: range) -> None:
        self.images, self.transform, self.ids = images, transform, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, j: int) -> tuple[torch.Tensor | None, int, str]:
        from fewshot.images import UnreadableImage

        i = self.ids[j]
        try:
            return self.transform(self.images.load(i)), i, ""
        except UnreadableImage as exc:
            return None, i, f"{self.images.records[i].name}\0{exc}"


def _collate(
    items: list[tuple[torch.Tensor | None, int, str]],
) -> tuple[torch.Tensor | None, list[int], list[dict[str, str]]]:
    import torch

    good = [(x, i) for x, i, _ in items if x is not None]
    bad = [dict(zip(("path", "reason"), why.split("\0", 1), strict=True)) for x, _, why in items if x is None]
    x = torch.stack([g[0] for g in good]) if good else None
    return x, [g[1] for g in good], bad


# ---------------------------------------------------------------------------------------------- files & cache


def save_features(feats: Features, path: Path) -> None:
    """Write ``feats`` as safetensors (atomically: a reader never sees half a file)."""
    from fewshot.outputs import save_tensors

    meta = {
        **feats.meta,
        "classes": json.dumps(feats.classes),
        "paths": json.dumps(feats.paths),
        "skipped": json.dumps(feats.skipped),
    }
    tensors: dict[str, np.ndarray] = {
        "features": np.ascontiguousarray(feats.features, np.float32),
        "labels": feats.labels.astype(np.int64),
    }
    save_tensors(path, tensors, metadata=meta)


def load_features(path: str | Path) -> Features:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            features, labels = f.get_tensor("features"), f.get_tensor("labels")
        classes, paths, skipped = (json.loads(meta.pop(k, "[]")) for k in ("classes", "paths", "skipped"))
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise FewshotError(f"'{path}' is not a fewshot features file ({exc}); re-run fewshot extract") from None
    return Features(features, labels, classes, paths, skipped, meta)


def cache_dir() -> Path:
    root = os.environ.get("FEWSHOT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fewshot"
    )
    return Path(root) / "features"


def _cache_key(data_fingerprint: str, backbone: Backbone, pool: str) -> str:
    ident = [CACHE_VERSION, data_fingerprint, backbone.weights_sha256, backbone.architecture]
    ident += [json.dumps(backbone.model_kwargs, sort_keys=True), backbone.transform_desc, pool]
    return hashlib.sha256("\0".join(ident).encode()).hexdigest()[:32]
