"""``fewshot select``: which images to label first, as files a person can act on.

Frozen features of the images (cached, as every command), a selection strategy from :mod:`fewshot.selection`, and
three outputs in ``--out``: ``selection.csv`` (path, rank, cluster, score; paths relative to the images), contact
sheets of the chosen images in rank order (people label from pictures), and optionally the chosen files copied or
linked into ``images/`` under ``RANK_name`` for a labelling tool. ``--exclude`` names images that are labelled
already (a folder, or a CSV with a ``path`` column such as an earlier ``selection.csv``): they are matched by path
or by file content, never chosen again, and count as covering their neighbourhood, so the next batch goes elsewhere.
"""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fewshot.config import Config, save_config
from fewshot.errors import FewshotError

if TYPE_CHECKING:
    from fewshot.sources import ImageSet

SHEET = "contact_sheet.png"
PER_PAGE, COLUMNS, THUMB = 100, 10, 96
LINK_MODES = ("none", "copy", "link")


@dataclass(frozen=True)
class Selection:
    """What :func:`select_images` returns."""

    rows: list[dict[str, Any]]  # the chosen images in order: {path, rank, cluster, score}
    strategy: str
    excluded: int  # images already labelled (--exclude), never chosen
    candidates: int  # images it chose from
    details: dict[str, Any]  # the strategy's own figures (clusters, radius, ...)
    csv: Path  # selection.csv
    sheets: list[Path]  # contact sheets, 100 images a page
    skipped: list[dict[str, str]]  # unreadable files


def select_images(
    images: str | Path,
    out: str | Path,
    cfg: Config | None = None,
    *,
    exclude: str | Path | None = None,
    files: str = "none",
    progress: bool = True,
) -> Selection:
    """Choose ``cfg.select.budget`` images of ``images`` to label with ``cfg.select.strategy``; labels are never read.

    Parameters
    ----------
    images : the unlabeled pool, any data source :func:`fewshot.sources.open_source` accepts.
    out : a folder for ``selection.csv`` and the contact sheet; checked before any work, held by one command at a
        time.
    cfg : ``cfg.select`` (strategy, budget, seed, classes) and ``cfg.extract`` (backbone); defaults when None.
    exclude : already labelled images (a folder, or a CSV such as an earlier ``selection.csv``): never chosen.
    files : ``none``, ``copy`` or ``link`` (symbolic links): put the chosen images in ``out/images``.
    progress : show progress bars.

    Returns
    -------
    Selection : the chosen rows (path, rank, cluster, score) and the files written.
    """
    from fewshot.outputs import check_folder, folder_lock

    out = check_folder(out)  # before minutes of extraction
    with folder_lock(out):
        return _select_images(images, out, cfg or Config(), exclude, files, progress)


def _select_images(
    images: str | Path, out: Path, cfg: Config, exclude: str | Path | None, files: str, progress: bool
) -> Selection:
    from fewshot.features import extract_features
    from fewshot.outputs import write_csv
    from fewshot.selection import select
    from fewshot.sources import open_source

    scfg = cfg.select  # its values were checked when it was built (fewshot.config.SelectConfig)
    if scfg.budget is None:
        raise FewshotError("--budget must be a positive number of images; e.g. --budget 50")
    if files not in LINK_MODES:
        raise FewshotError(f"unknown file mode '{files}'; use one of {', '.join(LINK_MODES)}")
    source = open_source(images)
    labelled = _excluded(source, exclude) if exclude is not None else set()
    feats = extract_features(images, cfg.extract, progress=progress)
    mask = np.array([p in labelled for p in feats.paths], dtype=bool)
    picked = select(feats.features, scfg.budget, scfg.strategy, seed=scfg.seed, exclude=mask, cfg=scfg)
    rows = [
        {
            "path": feats.paths[i],
            "rank": rank,
            "cluster": int(c) if c >= 0 else "",
            "score": "" if np.isnan(s) else float(s),
        }
        for rank, (i, c, s) in enumerate(zip(picked.indices, picked.clusters, picked.scores, strict=True), start=1)
    ]
    scored = ({**r, "score": f"{r['score']:.6g}" if r["score"] != "" else ""} for r in rows)
    write_csv(out / "selection.csv", ["path", "rank", "cluster", "score"], scored)
    by_name = {rec.name: i for i, rec in enumerate(source.records)}
    chosen = [by_name[r["path"]] for r in rows]
    sheets = _contact_sheets(source, chosen, rows, out / SHEET)
    if files != "none":
        _place(source, chosen, out / "images", files)
    save_config(cfg, out / "config.json", command="select", images=str(images), exclude=str(exclude or ""))
    return Selection(rows, scfg.strategy, int(mask.sum()), int((~mask).sum()), picked.details,
                     out / "selection.csv", sheets, feats.skipped)  # fmt: skip


def _excluded(source: ImageSet, exclude: str | Path) -> set[str]:
    """Names of ``source``'s records that ``exclude`` lists (by path) or holds (by file content)."""
    from fewshot.leakage import content_hashes
    from fewshot.sources import open_source

    exclude = Path(exclude)
    if not exclude.exists():
        raise FewshotError(f"--exclude '{exclude}' does not exist; pass a folder of labelled images or a CSV")
    names = {rec.name for rec in source.records}
    listed: set[str] = set()
    if exclude.is_file() and exclude.suffix.lower() == ".csv":
        try:
            with exclude.open(newline="", encoding="utf-8-sig") as fh:
                listed = {(row.get("path") or "").strip() for row in csv.DictReader(fh)} & names
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise FewshotError(f"cannot read --exclude CSV '{exclude}' ({exc}); save it as UTF-8 CSV") from None
    try:
        others = open_source(exclude)
    except FewshotError:
        others = None  # a CSV of paths relative to the images, not to itself: matched by path above
    if others is not None:
        theirs = {h for h in content_hashes(others) if h}
        listed |= {rec.name for rec, h in zip(source.records, content_hashes(source), strict=True) if h in theirs}
    return listed


def _contact_sheets(source: ImageSet, chosen: list[int], rows: list[dict], path: Path) -> list[Path]:
    """Thumbnails of the chosen images in rank order, captioned '#rank name', ``PER_PAGE`` a page."""
    from PIL import Image

    from fewshot.attention_plots import panels, thumbnail
    from fewshot.images import UnreadableImage

    tiles = []
    for i, row in zip(chosen, rows, strict=True):
        try:
            img = source.load(i)
        except UnreadableImage:
            img = Image.new("RGB", (THUMB, THUMB), (200, 200, 200))
        canvas = Image.new("RGB", (THUMB, THUMB), (255, 255, 255))
        small = thumbnail(img, THUMB)
        canvas.paste(small, ((THUMB - small.width) // 2, (THUMB - small.height) // 2))
        tiles.append((f"#{row['rank']} {Path(row['path']).name}", canvas))
    written = []
    for page, start in enumerate(range(0, len(tiles), PER_PAGE), start=1):
        target = path if page == 1 else path.with_name(f"{path.stem}_{page}{path.suffix}")
        panels(tiles[start : start + PER_PAGE], COLUMNS).save(target)
        written.append(target)
    return written


def _place(source: ImageSet, chosen: list[int], folder: Path, mode: str) -> None:
    """Copy or link the chosen files into ``folder`` as ``RANK_name`` (rows without a file are saved as PNG)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("[0-9][0-9][0-9][0-9]_*"):  # an earlier selection's files: this one replaces them
        old.unlink()
    for rank, i in enumerate(chosen, start=1):
        rec = source.records[i]
        name = f"{rank:04d}_{Path(rec.name).name}"
        target = folder / (name if rec.file is not None else f"{Path(name).stem}.png")
        if rec.file is None:
            source.load(i).save(target)
        elif mode == "link":
            os.symlink(Path(rec.file).resolve(), target)
        else:
            shutil.copy2(rec.file, target)
