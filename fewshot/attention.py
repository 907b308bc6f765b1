"""Emerging properties of ViTs: class-token attention maps, DINO's attention masks and their Jaccard to masks.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers" (DINO): the attention of the
class token to every patch, per head, at the last block (or ``block``), upsampled to the image by the patch size.
A head's mask keeps the smallest set of patches holding ``threshold`` (DINO: 60%) of its attention mass, as in
DINO's ``visualize_attention.py``; we add the union of the heads' masks and the mask of the mean map. The mass is
normalised over the patches only: prefix tokens (the class token and any register tokens) are excluded.

timm computes attention fused (``F.scaled_dot_product_attention``), which never materialises the softmax. For
the block we read we switch its ``Attention.fused_attn`` off and hook ``attn_drop``, whose input is the softmaxed
attention (B, heads, N, N) on the unfused path (timm 1.0 ``Attention``, ``AttentionRope``, Eva, BEiT); the switch
and the hook are restored afterwards, also on error. ``timm.layers.set_fused_attn`` would not help: it is read
only when a module is built.

Images are resized whole (no crop) to the model's input size, or to ``img_size``, rounded to whole patches;
another size is set with timm's ``set_input_size`` on a copy of the model (position embeddings interpolated).
Jaccard (IoU) is computed at that input resolution: ground-truth masks are resized with nearest neighbours.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fewshot.errors import FewshotError


@dataclass
class AttentionMaps:
    """One image's class-token attention at one block, on the patch grid (gh, gw)."""

    heads: np.ndarray  # (h, gh, gw) attention of the class token to each patch, per head
    prefix_mass: np.ndarray  # (h,) attention the class token puts on prefix tokens (class + registers)
    mean: np.ndarray  # (gh, gw) mean over heads
    masks: np.ndarray  # (h, gh, gw) bool: the smallest patch set holding `threshold` of each head's mass
    mean_mask: np.ndarray  # (gh, gw) bool: the same for the mean map
    union_mask: np.ndarray  # (gh, gw) bool: union of the heads' masks


# ---------------------------------------------------------------------------------------------- capturing


def attention_block(model: Any, block: int | None = None) -> tuple[Any, int]:
    """The attention module of ``block`` (None: the last; negative counts from the end) and its index."""
    import torch

    blocks = getattr(model, "blocks", None)
    if model is None or blocks is None or len(blocks) == 0:
        name = type(model).__name__ if model is not None else "pixels"
        raise FewshotError(f"backbone '{name}' is not a ViT; attention maps need one, e.g. --backbone runs/dino")
    depth = len(blocks)
    index = depth - 1 if block is None else block
    if not -depth <= index < depth:
        raise FewshotError(f"block {block} is out of range: the model has {depth} blocks (0..{depth - 1}, -1 = last)")
    index %= depth
    attn = getattr(blocks[index], "attn", None)
    if not hasattr(attn, "fused_attn") or not isinstance(getattr(attn, "attn_drop", None), torch.nn.Module):
        raise FewshotError(
            f"block {index} of {type(model).__name__} has no timm attention with attn_drop; "
            "attention maps support timm ViTs (vit_*, deit*, eva*, beit*)"
        )
    return attn, index


@contextmanager
def capture_attention(model: Any, block: int | None = None) -> Iterator[list[Any]]:
    """Within the context each forward appends the class token's attention row (B, heads, N) of ``block``."""
    attn, _ = attention_block(model, block)
    captured: list[Any] = []

    def hook(module: Any, inputs: tuple[Any, ...], output: Any) -> None:
        captured.append(inputs[0][:, :, 0, :].detach().float().cpu())  # (B, heads, N): softmax row of token 0

    previous = attn.fused_attn
    handle = attn.attn_drop.register_forward_hook(hook)
    attn.fused_attn = False  # the unfused path materialises the softmax and passes it through attn_drop
    try:
        yield captured
    finally:
        attn.fused_attn = previous
        handle.remove()


def class_attention(model: Any, x: Any, block: int | None = None) -> tuple[Any, Any]:
    """(B, 3, H, W) -> class-token attention to every token (B, heads, N) and the output tokens (B, N, D)."""
    import torch

    if getattr(model, "cls_token", None) is None:
        raise FewshotError(f"{type(model).__name__} has no class token; attention maps read the class token's row")
    with capture_attention(model, block) as captured, torch.inference_mode():
        tokens = model.forward_features(x)  # (B, N, D)
    if len(captured) != 1:
        raise FewshotError(f"could not read the attention of {type(model).__name__} (hook fired {len(captured)}x)")
    return captured[0], tokens


def attention_maps(row: np.ndarray, n_prefix: int, grid: tuple[int, int], threshold: float) -> AttentionMaps:
    """Class-token attention row (h, N) of one image -> per-head patch maps and DINO masks."""
    h = row.shape[0]
    if row.shape[1] != n_prefix + grid[0] * grid[1]:
        raise FewshotError(f"attention has {row.shape[1]} tokens, expected {n_prefix} prefix + {grid} patches")
    heads = row[:, n_prefix:].reshape(h, *grid).astype(np.float32)  # (h, gh, gw), prefix tokens dropped
    mean = heads.mean(axis=0)  # (gh, gw)
    masks = mass_mask(heads, threshold)  # (h, gh, gw)
    union = np.any(masks, axis=0)  # (gh, gw)
    prefix_mass = row[:, :n_prefix].sum(axis=1).astype(np.float32)  # (h,)
    return AttentionMaps(heads, prefix_mass, mean, masks, mass_mask(mean, threshold), np.asarray(union))


def mass_mask(maps: np.ndarray, threshold: float) -> np.ndarray:
    """(..., gh, gw) non-negative maps -> bool masks: the fewest patches holding ``threshold`` of each map's mass.

    Patches are sorted by attention, descending; a patch is kept while the mass before it is under ``threshold``
    (DINO keeps the same set, phrased on the ascending cumulative sum).
    """
    shape = maps.shape
    flat = maps.reshape(*shape[:-2], -1).astype(np.float64)  # (..., P)
    order = np.argsort(-flat, axis=-1, kind="stable")
    ranked = np.take_along_axis(flat, order, axis=-1)
    total = np.maximum(ranked.sum(axis=-1, keepdims=True), np.finfo(np.float64).tiny)
    before = (np.cumsum(ranked, axis=-1) - ranked) / total  # normalised mass strictly above each patch
    keep = np.zeros(flat.shape, dtype=bool)
    np.put_along_axis(keep, order, before < threshold, axis=-1)
    return keep.reshape(shape)


def upsample(maps: np.ndarray, patch: tuple[int, int]) -> np.ndarray:
    """(..., gh, gw) -> (..., gh*ph, gw*pw): each patch's value repeated over its pixels."""
    return np.repeat(np.repeat(maps, patch[0], axis=-2), patch[1], axis=-1)


# ---------------------------------------------------------------------------------------------- inputs


def input_size(model: Any, img_size: int | str | tuple[int, int] | None) -> tuple[int, int]:
    """(H, W) the model runs at: ``img_size`` (int, 'S' or 'HxW') or the model's own, rounded to whole patches."""
    ph, pw = (int(p) for p in model.patch_embed.patch_size)
    if img_size is None:
        h, w = (int(s) for s in model.patch_embed.img_size)
    elif isinstance(img_size, int):
        h = w = img_size
    elif isinstance(img_size, str):
        found = re.fullmatch(r"\s*(\d+)\s*(?:[xX,]\s*(\d+))?\s*", img_size)
        if not found:
            raise FewshotError(f"image size '{img_size}' is not SIZE or HxW, e.g. 224 or 224x320")
        h, w = int(found[1]), int(found[2] or found[1])
    else:
        h, w = (int(s) for s in img_size)
    if h < ph or w < pw:
        raise FewshotError(f"image size {h}x{w} is smaller than one {ph}x{pw} patch; pass a larger --img-size")
    return h // ph * ph, w // pw * pw


def sized_model(model: Any, size: tuple[int, int]) -> Any:
    """``model`` if it runs at ``size`` as it is, else a copy resized with timm's ``set_input_size``."""
    if getattr(model, "dynamic_img_size", False) or tuple(model.patch_embed.img_size) == size:
        return model
    if not hasattr(model, "set_input_size"):
        raise FewshotError(f"{type(model).__name__} cannot change its input size; drop --img-size")
    resized = copy.deepcopy(model)  # the caller's model keeps its size and position embeddings
    resized.set_input_size(img_size=size)
    return resized


def slug(name: str, taken: set[str]) -> str:
    """A file-name-safe, unique stem for an image record name ('a/b.jpg' -> 'a__b')."""
    base = re.sub(r"[^\w.\-]+", "_", str(Path(name).with_suffix("")).replace("/", "__").replace("\\", "__"))
    out, i = base or "image", 1
    while out in taken:
        out, i = f"{base}_{i}", i + 1
    taken.add(out)
    return out


# ---------------------------------------------------------------------------------------------- entry point


def run_attention(
    images: str | Path,
    backbone: Any,
    out: str | Path,
    block: int | None = None,
    threshold: float = 0.6,
    save_maps: bool = False,
    masks: str | Path | None = None,
    pca: bool = True,
    progress: bool = True,
    img_size: int | str | tuple[int, int] | None = None,
    device: str = "auto",
    batch_size: int = 16,
    cfg: Any = None,
) -> dict[str, Any]:
    """Python twin of ``fewshot attention``: maps, masks, grids, contact sheet, PCA maps and Jaccard under ``out``.

    ``images`` is any data source (see :func:`fewshot.sources.open_source`); ``backbone`` a spec string or a
    :class:`fewshot.backbones.Backbone`; ``masks`` a folder of ground-truth masks named like the images (adds
    Jaccard figures, also written to ``jaccard.json``); ``cfg`` (a resolved config) is saved as ``config.json``.
    Returns the summary written to ``attention.json``.
    """
    import torch
    from PIL import Image

    from fewshot import attention_plots as plots
    from fewshot.backbones import load_backbone
    from fewshot.features import pick_device
    from fewshot.images import UnreadableImage
    from fewshot.mask_quality import jaccard_report, mask_index
    from fewshot.progress import bar as progress_bar
    from fewshot.sources import open_source

    if not 0.0 < threshold <= 1.0:
        raise FewshotError(f"threshold {threshold} is not a fraction of the attention mass; use 0 < x <= 1, e.g. 0.6")
    source = open_source(images)
    bb = load_backbone(backbone) if isinstance(backbone, str) else backbone
    _, block_index = attention_block(bb.model, block)
    size = input_size(bb.model, img_size)
    dev = pick_device(device)
    model = sized_model(bb.model, size).to(dev)
    ph, pw = (int(p) for p in model.patch_embed.patch_size)
    patch = (ph, pw)
    grid = (size[0] // patch[0], size[1] // patch[1])
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))
    desc = json.loads(bb.transform_desc)
    mean, std = (torch.tensor(desc[k], dtype=torch.float32).view(3, 1, 1) for k in ("mean", "std"))
    resample = getattr(Image.Resampling, str(desc.get("interpolation", "bicubic")).upper(), Image.Resampling.BICUBIC)
    index = mask_index(Path(masks)) if masks is not None else None

    out = Path(out)
    for sub in ("grids", *(("maps",) if save_maps else ()), *(("pca",) if pca else ())):
        (out / sub).mkdir(parents=True, exist_ok=True)
    skipped, taken = list(source.skipped), set[str]()
    rows: list[dict[str, Any]] = []
    cells: list[plots.Cell] = []
    patch_features: list[np.ndarray] = []
    pending: list[tuple[str, Any]] = []  # (record name, display image) of the batch being filled

    def flush() -> None:
        x = torch.stack([_to_tensor(img, mean, std) for _, img in pending]).to(dev)  # (B, 3, H, W)
        attn, tokens = class_attention(model, x, block_index)  # (B, heads, N), (B, N, D)
        if pca:
            patch_features.append(tokens[:, n_prefix:].float().cpu().numpy().reshape(len(pending), *grid, -1))
        for (name, img), row in zip(pending, attn.numpy(), strict=True):
            rows.append(_one_image(name, img, attention_maps(row, n_prefix, grid, threshold), out, taken, cells))
        pending.clear()

    bar = progress_bar(total=len(source), desc="attention", unit="img", disable=not progress, leave=False)
    for i, rec in enumerate(source.records):
        try:
            pending.append((rec.name, source.load(i).resize((size[1], size[0]), resample)))
        except UnreadableImage as exc:
            skipped.append({"path": rec.name, "reason": str(exc)})
        if len(pending) >= batch_size or (i == len(source) - 1 and pending):
            flush()
        bar.update(1)
    bar.close()
    if not rows:
        raise FewshotError(f"no readable images in '{images}' ({len(skipped)} skipped); point at your images")

    meta = {
        "backbone": bb.spec,
        "architecture": bb.architecture,
        "weights_sha256": bb.weights_sha256,
        "block": block_index,
        "depth": len(model.blocks),
        "heads": int(rows[0]["maps"].heads.shape[0]),
        "prefix_tokens": n_prefix,
        "patch_size": list(patch),
        "input_size": list(size),
        "grid": list(grid),
        "threshold": threshold,
    }
    jac = jaccard_report(rows, index, size, patch, out) if index is not None else None
    for cell, row in zip(cells, rows, strict=True):
        if jac is not None and row["name"] in jac["per_image"]:
            cell.caption += f"  J={jac['per_image'][row['name']]['mean_map']:.2f}"
    sheets = plots.save_contact_sheets(cells, out / "contact_sheet.png")
    pca_files: list[str] = []
    if pca:
        from fewshot.pca_maps import pca_feature_maps

        result = pca_feature_maps(np.concatenate(patch_features))  # (N, gh, gw, D) patches of every image
        pca_files = plots.save_pca(result, [c.image for c in cells], [r["slug"] for r in rows], out / "pca")
        meta["pca_explained_variance"] = result.explained_variance_ratio
    if save_maps:
        _save_maps(rows, meta, out / "maps")
    summary: dict[str, Any] = {
        **meta,
        "images": len(rows),
        "out": str(out),
        "grids": [str(out / "grids" / f"{r['slug']}.png") for r in rows],
        "contact_sheets": [str(p) for p in sheets],
        "pca": pca_files,
        "maps": [str(out / "maps" / f"{r['slug']}.safetensors") for r in rows] if save_maps else [],
        "prefix_mass": float(np.mean([r["maps"].prefix_mass.mean() for r in rows])),
        "skipped": skipped,
    }
    if jac is not None:
        summary["jaccard"] = {**jac, "report": str(out / "jaccard.json")}
    write_json(out / "attention.json", summary)
    if cfg is not None:
        from fewshot.config import save_config

        save_config(cfg, out / "config.json", data=str(images), attention={k: summary[k] for k in meta})
    return summary


def _to_tensor(img: Any, mean: Any, std: Any) -> Any:
    import torch

    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W) in [0, 1]
    return (x - mean) / std


def _one_image(
    name: str, img: Any, maps: AttentionMaps, out: Path, taken: set[str], cells: list[Any]
) -> dict[str, Any]:
    """Write the image's grid PNG; keep a thumbnail cell for the contact sheet."""
    from fewshot import attention_plots as plots

    stem = slug(name, taken)
    plots.attention_grid(img, maps).save(out / "grids" / f"{stem}.png")
    cells.append(plots.Cell(name, plots.thumbnail(img), maps.mean, maps.mean_mask, name))
    return {"name": name, "slug": stem, "maps": maps}


def _save_maps(rows: list[dict[str, Any]], meta: dict[str, Any], folder: Path) -> None:
    """Raw patch-grid maps per image as safetensors (+ index.json): heads, mean, masks, prefix mass."""
    from safetensors.numpy import save_file

    strings = {k: json.dumps(v) for k, v in meta.items()}
    for row in rows:
        m: AttentionMaps = row["maps"]
        tensors = {
            "heads": m.heads,  # (h, gh, gw) float32
            "mean": m.mean,  # (gh, gw)
            "prefix_mass": m.prefix_mass,  # (h,)
            "masks": m.masks.astype(np.uint8),  # (h, gh, gw)
            "mean_mask": m.mean_mask.astype(np.uint8),
            "union_mask": m.union_mask.astype(np.uint8),
        }
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        save_file(tensors, str(folder / f"{row['slug']}.safetensors"), metadata={**strings, "name": row["name"]})
    index = {"files": {f"{r['slug']}.safetensors": r["name"] for r in rows}, **meta}
    index["tensors"] = "heads (h,gh,gw) float32, mean (gh,gw), prefix_mass (h,), masks/mean_mask/union_mask uint8"
    write_json(folder / "index.json", index)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
