"""PNG figures for :mod:`fewshot.attention` and :mod:`fewshot.pca_maps`, drawn with PIL (no pyplot state).

- a grid per image: the image the model saw | each head's class-token attention | the mean map | the mean map's
  mask over the image (DINO, Caron et al. 2021, Fig. 1 and 3). Maps keep their patch blocks (nearest
  upsampling) and each is min-max scaled on its own, as DINO's figures are;
- contact sheets: image | mean map | mask for every image, 36 images a page;
- PCA panels (DINOv2, Oquab et al. 2023): image | first component | foreground | PCA RGB | foreground PCA RGB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from fewshot.attention import AttentionMaps
    from fewshot.pca_maps import PCAMaps

TILE = 160  # longest side of a panel in the per-image grids, pixels
THUMB = 128  # longest side of a panel on the contact sheets
LABEL = 16  # height of a panel's caption strip
PER_PAGE, SHEET_COLUMNS, ONE_ROW = 36, 3, 15  # ViT-B's 12 heads + 3 panels still fit one row


@dataclass
class Cell:
    """One image on the contact sheet."""

    name: str
    image: Image.Image  # thumbnail of the image the model saw
    mean: np.ndarray  # (gh, gw) mean attention map
    mask: np.ndarray  # (gh, gw) bool mask of the mean map
    caption: str


def _font() -> Any:
    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


def _fit(size: tuple[int, int], side: int) -> tuple[int, int]:
    """(w, h) scaled so the longer side is ``side``."""
    w, h = size
    s = side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def thumbnail(img: Image.Image, side: int = THUMB) -> Image.Image:
    return img.resize(_fit(img.size, side), Image.Resampling.BILINEAR)


def colorize(m: np.ndarray, size: tuple[int, int], cmap: str = "inferno") -> Image.Image:
    """(gh, gw) map -> RGB image of ``size`` (w, h): min-max scaled, colour-mapped, patch blocks kept."""
    from matplotlib import colormaps

    lo, hi = float(m.min()), float(m.max())
    scaled = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m, dtype=np.float64)
    rgb = (colormaps[cmap](scaled)[..., :3] * 255).astype(np.uint8)  # (gh, gw, 3)
    return Image.fromarray(rgb).resize(size, Image.Resampling.NEAREST)


def overlay(img: Image.Image, mask: np.ndarray, color: tuple[int, int, int] = (255, 40, 40)) -> Image.Image:
    """The image darkened outside the (gh, gw) mask, with the mask's outline drawn."""
    up = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(img.size, Image.Resampling.NEAREST)) > 0
    px = np.asarray(img.convert("RGB"), dtype=np.float32)
    px = np.where(up[..., None], px, px * 0.3)  # (h, w, 3)
    inner = up.copy()  # 4-neighbour erosion: the outline is the mask minus its interior
    inner[1:] &= up[:-1]
    inner[:-1] &= up[1:]
    inner[:, 1:] &= up[:, :-1]
    inner[:, :-1] &= up[:, 1:]
    px[up & ~inner] = color
    return Image.fromarray(px.astype(np.uint8))


def panels(tiles: list[tuple[str, Image.Image]], columns: int, title: str = "") -> Image.Image:
    """Lay out captioned, equally sized tiles in rows of ``columns``, with an optional title strip."""
    w, h = tiles[0][1].size
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    top = LABEL if title else 0
    sheet = Image.new("RGB", (cols * (w + 4) + 4, top + rows * (h + LABEL + 4) + 4), (255, 255, 255))
    draw, font = ImageDraw.Draw(sheet), _font()
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0), font=font)
    for i, (caption, tile) in enumerate(tiles):
        x, y = 4 + (i % cols) * (w + 4), top + 4 + (i // cols) * (h + LABEL + 4)
        draw.text((x, y), _clip(caption, w, font), fill=(0, 0, 0), font=font)
        sheet.paste(tile.resize((w, h)), (x, y + LABEL))
    return sheet


def _clip(text: str, width: int, font: Any) -> str:
    while len(text) > 1 and font.getlength(text) > width:
        text = "…" + text[2:] if text[0] == "…" else "…" + text[1:]
    return text


def attention_grid(img: Image.Image, maps: AttentionMaps, tile: int = TILE) -> Image.Image:
    """image | head 0..h-1 | mean | mask overlay, for one :class:`fewshot.attention.AttentionMaps`."""
    size = _fit(img.size, tile)
    shown = img.resize(size, Image.Resampling.BILINEAR)
    tiles = [("image", shown)]
    tiles += [(f"head {i}", colorize(m, size)) for i, m in enumerate(maps.heads)]
    tiles += [("mean", colorize(maps.mean, size)), ("mask (mean)", overlay(shown, maps.mean_mask))]
    return panels(tiles, len(tiles) if len(tiles) <= ONE_ROW else -(-len(tiles) // 2))


def save_contact_sheets(cells: list[Cell], path: Path) -> list[Path]:
    """image | mean map | mask per image, ``PER_PAGE`` images a page: path, path_2, ..."""
    written = []
    for page, start in enumerate(range(0, len(cells), PER_PAGE), start=1):
        tiles = []
        for c in cells[start : start + PER_PAGE]:
            size = _fit(c.image.size, THUMB)
            shown = c.image.resize(size)
            tiles += [(c.caption, shown), ("mean", colorize(c.mean, size)), ("mask", overlay(shown, c.mask))]
        target = path if page == 1 else path.with_name(f"{path.stem}_{page}{path.suffix}")
        panels(tiles, 3 * SHEET_COLUMNS).save(target)
        written.append(target)
    return written


def save_pca(result: PCAMaps, images: list[Image.Image], stems: list[str], folder: Path) -> list[str]:
    """Per-image PCA panels ``folder/<stem>.png`` and ``folder/pca_sheet.png`` (pages); returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    limit = float(np.abs(result.first).max()) or 1.0  # one symmetric scale for the first component, all images
    sheet: list[tuple[str, Image.Image]] = []
    for i, (img, stem) in enumerate(zip(images, stems, strict=True)):
        size = _fit(img.size, THUMB)
        shown = img.resize(size)
        first = np.clip(result.first[i] / (2 * limit) + 0.5, 0, 1)  # (gh, gw): 0.5 is the threshold
        rgb = _rgb(result.rgb[i], size)
        rgb_fg = _rgb(result.rgb_foreground[i], size)
        tiles = [
            ("image", shown),
            ("PC1", _colorize_fixed(first, size)),
            ("foreground", overlay(shown, result.foreground[i])),
            ("PCA 1-3", rgb),
            ("PCA 1-3 (fg)", rgb_fg),
        ]
        panels(tiles, len(tiles)).save(folder / f"{stem}.png")
        written.append(str(folder / f"{stem}.png"))
        sheet += [(stem, shown), ("PCA 1-3", rgb), ("PCA 1-3 (fg)", rgb_fg)]
    for page, start in enumerate(range(0, len(sheet), 3 * PER_PAGE), start=1):
        target = folder / ("pca_sheet.png" if page == 1 else f"pca_sheet_{page}.png")
        panels(sheet[start : start + 3 * PER_PAGE], 3 * SHEET_COLUMNS).save(target)
        written.append(str(target))
    return written


def _rgb(rgb: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """(gh, gw, 3) in [0, 1] -> RGB image of ``size``, patch blocks kept."""
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).resize(size, Image.Resampling.NEAREST)


def _colorize_fixed(values: np.ndarray, size: tuple[int, int], cmap: str = "coolwarm") -> Image.Image:
    """(gh, gw) values already in [0, 1] -> colour-mapped image (no per-map rescaling)."""
    from matplotlib import colormaps

    rgb = (colormaps[cmap](values)[..., :3] * 255).astype(np.uint8)
    return Image.fromarray(rgb).resize(size, Image.Resampling.NEAREST)
