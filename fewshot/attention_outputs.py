"""What ``fewshot attention`` writes: per-image grids, contact sheets, PCA feature maps, raw maps and Jaccard.

The maps themselves come from :mod:`fewshot.attention` (DINO's class-token attention and masks, Caron et al.
2021); this module only reads the images through it and writes the results::

    OUT/grids/<image>.png          image | each head | mean | mask overlay
    OUT/contact_sheet.png          image | mean | mask for every image (36 a page: contact_sheet_2.png, ...)
    OUT/pca/                       PCA feature maps (DINOv2), unless --no-pca
    OUT/maps/<image>.safetensors   the raw patch-grid maps and masks (--save-maps), with maps/index.json
    OUT/jaccard.json               with --masks: every head's mask against the ground truth
    OUT/attention.json             the summary (:class:`AttentionResult`); OUT/config.json the resolved config
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fewshot.attention import AttentionRunner, ImageAttention
from fewshot.errors import FewshotError
from fewshot.outputs import save_tensors, write_text

if TYPE_CHECKING:
    from fewshot.backbones import Backbone
    from fewshot.config import Config


@dataclass(frozen=True)
class AttentionResult:
    """The summary of an attention run (also ``OUT/attention.json``)."""

    out: Path
    backbone: str
    architecture: str
    weights_sha256: str
    block: int  # 0-based index of the block read
    depth: int
    heads: int
    prefix_tokens: int  # class token + registers
    patch_size: tuple[int, int]
    input_size: tuple[int, int]  # (H, W) the model ran at
    grid: tuple[int, int]  # (gh, gw) patches
    threshold: float  # share of each map's attention mass a mask keeps
    images: int
    grids: list[Path]
    contact_sheets: list[Path]
    pca: list[Path]  # empty without PCA
    maps: list[Path]  # empty without --save-maps
    prefix_mass: float  # mean attention the class token puts on prefix tokens
    skipped: list[dict[str, str]] = field(default_factory=list)
    pca_explained_variance: list[float] = field(default_factory=list)
    jaccard: dict[str, Any] | None = None  # with masks: see fewshot.mask_quality.jaccard_report

    def to_json(self) -> dict[str, Any]:
        """The result as JSON values (paths as strings, pairs as lists)."""
        out: dict[str, Any] = {}
        for key, value in dataclasses.asdict(self).items():
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, list):
                value = [str(v) if isinstance(v, Path) else v for v in value]
            out[key] = value
        return out


def run_attention(
    images: str | Path,
    out: str | Path,
    cfg: Config | None = None,
    *,
    backbone: str | Backbone | None = None,
    masks: str | Path | None = None,
    progress: bool = True,
) -> AttentionResult:
    """Python twin of ``fewshot attention``: attention maps, masks, grids, contact sheets, PCA maps and Jaccard.

    Parameters
    ----------
    images : any data source :func:`fewshot.sources.open_source` accepts.
    out : the output folder (created; checked before any image is read, and locked while written).
    cfg : the resolved config: ``cfg.attention`` (block, threshold, img_size, save_maps, pca) and ``cfg.extract``
        (backbone, device, batch_size). Defaults when None.
    backbone : a spec string or a loaded :class:`fewshot.backbones.Backbone`; default ``cfg.extract.backbone``.
    masks : a folder of ground-truth masks named like the images: adds Jaccard figures (``jaccard.json``).

    Returns
    -------
    AttentionResult, also written as ``OUT/attention.json``.
    """
    from fewshot.backbones import load_backbone
    from fewshot.config import Config, save_config
    from fewshot.devices import pick_device
    from fewshot.mask_quality import jaccard_report, mask_index
    from fewshot.outputs import check_folder, folder_lock
    from fewshot.sources import open_source

    cfg = cfg or Config()
    acfg, ecfg = cfg.attention, cfg.extract
    out = check_folder(out)  # before any image is read
    with folder_lock(out):
        source = open_source(images)
        bb = load_backbone(backbone or ecfg.backbone) if backbone is None or isinstance(backbone, str) else backbone
        runner = AttentionRunner.prepare(bb, acfg.block, acfg.img_size, pick_device(ecfg.device))
        index = mask_index(Path(masks)) if masks is not None else None
        writer = _Writer(out, save_maps=acfg.save_maps, pca=acfg.pca)
        skipped = list(source.skipped)
        for item in runner.run(source, acfg.threshold, ecfg.batch_size, skipped, progress):
            writer.add(item)
        if not writer.items:
            raise FewshotError(f"no readable images in '{images}' ({len(skipped)} skipped); point at your images")
        jaccard = None
        if index is not None:
            jaccard = jaccard_report([(i.name, i.maps) for i in writer.items], index, runner.size, runner.patch)
            write_text(out / "jaccard.json", json.dumps(jaccard, indent=2) + "\n")
            jaccard = {**jaccard, "report": str(out / "jaccard.json")}
        result = writer.finish(bb, runner, acfg.threshold, skipped, jaccard)
        write_text(out / "attention.json", json.dumps(result.to_json(), indent=2) + "\n")
        save_config(cfg, out / "config.json", data=str(images))
        return result


class _Writer:
    """Writes each image's grid as it comes, keeps what the sheets, PCA and maps need, writes those at the end."""

    def __init__(self, out: Path, save_maps: bool, pca: bool) -> None:
        self.out, self.save_maps, self.pca = out, save_maps, pca
        self.items: list[ImageAttention] = []  # images are dropped once their grid is written (thumbnails kept)
        self.cells: list[Any] = []
        self.stems: list[str] = []  # unique file stems, one per image
        self.taken: set[str] = set()
        self.patch_tokens: list[np.ndarray] = []  # (gh, gw, D) per image, for the PCA over all images
        for sub in ("grids", *(("maps",) if save_maps else ()), *(("pca",) if pca else ())):
            (out / sub).mkdir(parents=True, exist_ok=True)

    def add(self, item: ImageAttention) -> None:
        from fewshot import attention_plots as plots

        stem = _slug(item.name, self.taken)
        assert item.image is not None  # dropped below, once drawn
        plots.attention_grid(item.image, item.maps).save(self.out / "grids" / f"{stem}.png")
        self.cells.append(plots.Cell(item.name, plots.thumbnail(item.image), item.maps.mean, item.maps.mean_mask,
                                     item.name))  # fmt: skip
        self.stems.append(stem)
        if self.pca:
            self.patch_tokens.append(item.patch_tokens)
        self.items.append(dataclasses.replace(item, image=None, patch_tokens=np.empty(0)))

    def finish(
        self, bb: Backbone, runner: AttentionRunner, threshold: float, skipped: list[dict[str, str]],
        jaccard: dict[str, Any] | None,
    ) -> AttentionResult:  # fmt: skip
        from fewshot import attention_plots as plots

        if jaccard is not None:
            for cell in self.cells:
                if cell.name in jaccard["per_image"]:
                    cell.caption += f"  J={jaccard['per_image'][cell.name]['mean_map']:.2f}"
        sheets = plots.save_contact_sheets(self.cells, self.out / "contact_sheet.png")
        pca_files: list[Path] = []
        explained: list[float] = []
        if self.pca:
            from fewshot.pca_maps import pca_feature_maps

            maps = pca_feature_maps(np.stack(self.patch_tokens))  # (N, gh, gw, D): one PCA over every image
            pca_files = [Path(p) for p in plots.save_pca(maps, [c.image for c in self.cells], self.stems,
                                                         self.out / "pca")]  # fmt: skip
            explained = maps.explained_variance_ratio
        result = AttentionResult(
            out=self.out, backbone=bb.spec, architecture=bb.architecture, weights_sha256=bb.weights_sha256,
            block=runner.block, depth=len(runner.model.blocks), heads=int(self.items[0].maps.heads.shape[0]),
            prefix_tokens=runner.n_prefix, patch_size=runner.patch, input_size=runner.size, grid=runner.grid,
            threshold=threshold, images=len(self.items), grids=[self.out / "grids" / f"{s}.png" for s in self.stems],
            contact_sheets=sheets, pca=pca_files,
            maps=[self.out / "maps" / f"{s}.safetensors" for s in self.stems] if self.save_maps else [],
            prefix_mass=float(np.mean([i.maps.prefix_mass.mean() for i in self.items])), skipped=skipped,
            pca_explained_variance=explained, jaccard=jaccard,
        )  # fmt: skip
        if self.save_maps:
            self._save_maps(result)
        return result

    def _save_maps(self, result: AttentionResult) -> None:
        """Raw patch-grid maps per image as safetensors (+ index.json): heads, mean, masks, prefix mass."""
        keys = ("backbone", "architecture", "weights_sha256", "block", "depth", "heads", "prefix_tokens",
                "patch_size", "input_size", "grid", "threshold")  # fmt: skip
        meta = {k: v for k, v in result.to_json().items() if k in keys}
        strings = {k: json.dumps(v) for k, v in meta.items()}
        for item, path in zip(self.items, result.maps, strict=True):
            m = item.maps
            tensors = {
                "heads": m.heads,  # (h, gh, gw) float32
                "mean": m.mean,  # (gh, gw)
                "prefix_mass": m.prefix_mass,  # (h,)
                "masks": m.masks.astype(np.uint8),  # (h, gh, gw)
                "mean_mask": m.mean_mask.astype(np.uint8),
                "union_mask": m.union_mask.astype(np.uint8),
            }
            tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
            save_tensors(path, tensors, metadata={**strings, "name": item.name})
        index = {"files": {p.name: i.name for i, p in zip(self.items, result.maps, strict=True)}, **meta}
        index["tensors"] = "heads (h,gh,gw) float32, mean (gh,gw), prefix_mass (h,), masks/mean_mask/union_mask uint8"
        write_text(self.out / "maps" / "index.json", json.dumps(index, indent=2) + "\n")


def _slug(name: str, taken: set[str]) -> str:
    """A file-name-safe, unique stem for an image record name ('a/b.jpg' -> 'a__b')."""
    base = re.sub(r"[^\w.\-]+", "_", str(Path(name).with_suffix("")).replace("/", "__").replace("\\", "__"))
    out, i = base or "image", 1
    while out in taken:
        out, i = f"{base}_{i}", i + 1
    taken.add(out)
    return out
