"""Data sources: one function, :func:`open_source`, turns any of them into labelled or unlabelled records.

Accepted spellings (an explicit prefix overrides detection):

- ``folder:DIR`` or a folder with images at its top level: every image under it, recursively, unlabelled;
- ``imagefolder:DIR`` or a folder of ``class_name/`` subfolders: the subfolder is the label;
- ``csv:FILE`` or ``FILE.csv``: a manifest with a ``path`` column (relative to the CSV) and an optional ``label``;
- Hugging Face ``datasets``: a ``save_to_disk`` directory, an ``imagefolder`` directory with ``metadata.csv`` /
  ``metadata.jsonl``, or ``hf:owner/name`` (downloaded by ``datasets``, for users who are online). Append
  ``:SPLIT`` to pick a split (default ``train``).

Files that are not images are skipped, counted and listed; images that fail to decode are skipped when they are
read (see :mod:`fewshot.images`). Hidden files and folders (``.name``) are ignored and counted as skips too.

One module for every spelling, past the project's 300 lines, because they share the records, the skip lists and
the fingerprint that keys the feature and image caches; a split would have to pass all three back and forth.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from PIL import Image

from fewshot.errors import FewshotError
from fewshot.images import UnreadableImage, is_image_name, load_rgb

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

UNLABELED = -1
log = logging.getLogger(__name__)
_PREFIXES = ("folder", "imagefolder", "csv", "hf", "hf-disk")


class Loadable(Protocol):
    """Anything with ``load() -> PIL.Image`` (e.g. a :class:`Record` bound to its source)."""

    def load(self) -> Image.Image: ...


class ImageSource(Protocol):
    """An image set read by index: :class:`ImageSet`, or a view of one (e.g. its labelled records)."""

    def __len__(self) -> int: ...

    def load(self, i: int) -> Image.Image: ...


# What pretraining decodes: a data source's records or view of them, PIL images, or objects that load one.
Decodable: TypeAlias = "ImageSource | Sequence[Image.Image] | Sequence[Loadable]"
Images: TypeAlias = "Decodable | torch.Tensor"  # ... or pixels decoded already: (N, 3, H, W) uint8


@dataclass(frozen=True)
class Record:
    """One image: ``name`` is what users see (path relative to the source, or ``split[i]``)."""

    name: str
    label: int = UNLABELED
    file: Path | None = None  # on disk, or None for a row of a Hugging Face dataset
    row: int | None = None


@dataclass
class ImageSet:
    """The records of a data source, its class names and what was skipped while listing it."""

    source: str
    records: list[Record]
    classes: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)
    fingerprint: str = ""  # changes when files, sizes, mtimes or labels change: the feature cache key
    _hf: Any = None  # a datasets.Dataset whose image column is not decoded, for ``row`` records
    _hf_image: str = ""

    @property
    def labeled(self) -> bool:
        return bool(self.classes)

    def __len__(self) -> int:
        return len(self.records)

    def load(self, i: int, draft: int | None = None) -> Image.Image:
        """Decode record ``i`` as RGB (``draft``: see :func:`fewshot.images.load_rgb`); raises
        :class:`UnreadableImage` with a reason."""
        return self.load_record(self.records[i], draft)

    def load_record(self, rec: Record, draft: int | None = None) -> Image.Image:
        """Decode ``rec`` (one of this set's records; a worker process may hold the set without its record list)."""
        if rec.file is not None:
            return load_rgb(rec.file, draft)
        item = self._hf[rec.row][self._hf_image]
        if isinstance(item, Image.Image):
            return load_rgb(_png_bytes(item))
        if item.get("bytes"):
            return load_rgb(item["bytes"], draft)
        if item.get("path"):
            return load_rgb(item["path"], draft)
        raise UnreadableImage("empty image cell")


def open_source(spec: str | Path, require_labels: bool = False) -> ImageSet:
    """Open any supported data source; ``require_labels`` turns an unlabelled source into a one-line error."""
    kind, target, split = _parse(str(spec))
    if kind == "hf":
        images = _from_hub(target, split)
    else:
        path = Path(target).expanduser()
        if not path.exists():
            raise FewshotError(
                f"data source '{spec}' does not exist; pass a folder of images, an ImageFolder, a CSV manifest "
                "(path,label) or hf:owner/name"
            )
        prefixed = bool(kind)
        kind = kind or _detect(path)
        if kind == "csv":
            images = _from_csv(path)
        elif kind == "hf-disk":
            images = _from_disk(path, split)
        elif kind == "hf-imagefolder":
            images = _from_hf_imagefolder(path, split)
        elif kind == "imagefolder":
            images = _from_imagefolder(path)
        else:
            images = _from_folder(path)
            hint = "" if prefixed or require_labels else unlabelled_hint(path)
            if hint:  # labels were perhaps meant: say so, without stopping commands that need none
                log.warning(f"{hint} (or folder:{path} to read it unlabelled without this warning)")
    if not images.records:
        raise FewshotError(f"no readable images in '{spec}' ({_skip_summary(images.skipped)}); point at your images")
    if require_labels and not images.labeled:
        raise FewshotError(no_labels_message(spec))
    return images


# ---------------------------------------------------------------------------------------------- detection


def _parse(spec: str) -> tuple[str, str, str | None]:
    """'csv:x.csv' -> ('csv', 'x.csv', None); 'data/hf:test' -> ('', 'data/hf', 'test') when data/hf exists."""
    kind = ""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in _PREFIXES and not Path(spec).exists():
        kind, spec = prefix, rest
    if kind == "hf":
        name, _, split = spec.partition(":")
        return kind, name, split or None
    if not Path(spec).expanduser().exists():
        head, sep, tail = spec.rpartition(":")
        if sep and head and re.fullmatch(r"[\w.\-\[\]%+]+", tail) and Path(head).expanduser().exists():
            return kind, head, tail
    return kind, spec, None


def _detect(path: Path) -> str:
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "csv"
        raise FewshotError(f"'{path}' is a single file; pass a folder of images or a CSV manifest (path,label)")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "hf-disk"
    if (path / "metadata.csv").is_file() or (path / "metadata.jsonl").is_file():
        return "hf-imagefolder"
    entries = [e for e in _scandir(path) if not e.name.startswith(".")]
    if any(is_image_name(e.name) and _is_file(e) for e in entries):
        return "folder"
    return "imagefolder" if any(e.is_dir() for e in entries) else "folder"


def no_labels_message(spec: str | Path) -> str:
    """The one-line error for a source that has no labels where labels are needed."""
    hint = unlabelled_hint(spec)
    return f"'{spec}' has no labels; " + (
        hint or "use an ImageFolder (one subfolder per class) or a CSV with a label column"
    )


def unlabelled_hint(spec: str | Path) -> str:
    """Why a folder meant as an ImageFolder read as unlabelled: images beside its class subfolders ('' if not).

    A folder with images at its top level is a plain (recursive, unlabelled) folder; one stray image at the root
    of an ImageFolder therefore drops every label, and this names the strays and the two ways out.
    """
    kind, target, _ = _parse(str(spec))
    path = Path(target).expanduser()
    if kind or not path.is_dir():
        return ""
    entries = [e for e in _scandir(path) if not e.name.startswith(".")]
    strays = [e.name for e in entries if is_image_name(e.name) and _is_file(e)]
    # real subfolders only: a symlinked one may point back up the tree (walks never follow them either)
    classes = [e.name for e in entries if e.is_dir(follow_symlinks=False) and _holds_images(Path(e.path))]
    if not (strays and classes):
        return ""
    shown = ", ".join(strays[:3]) + (", ..." if len(strays) > 3 else "")
    return (
        f"'{path}' has class subfolders ({', '.join(classes[:3])}{', ...' if len(classes) > 3 else ''}) but also "
        f"{len(strays)} image(s) beside them ({shown}), so it was read as one unlabelled folder: move those images "
        f"into a class folder, or pass imagefolder:{path} to take the labels and skip them"
    )


def _is_file(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file()
    except OSError:  # a symlink loop: listed as a skip when the folder is read
        return False


def _holds_images(folder: Path) -> bool:
    """True at the first image file found under ``folder`` (hidden entries ignored)."""
    for _, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(not f.startswith(".") and is_image_name(f) for f in filenames):
            return True
    return False


def _scandir(path: Path) -> list[os.DirEntry[str]]:
    try:
        return sorted(os.scandir(path), key=lambda e: e.name)
    except PermissionError:
        raise FewshotError(f"cannot read folder '{path}' (permission denied); fix its permissions") from None


# ---------------------------------------------------------------------------------------------- local files


def _walk(root: Path, skipped: list[dict[str, str]]) -> list[Path]:
    """Image files under ``root``, sorted, recursively; skips are appended with their reason."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=None):
        rel_dir = Path(dirpath).relative_to(root)
        for d in list(dirnames):
            if d.startswith("."):
                skipped.append({"path": str(rel_dir / d) + "/", "reason": "hidden folder (ignored)"})
                dirnames.remove(d)
        dirnames.sort()
        for name in sorted(filenames):
            file = Path(dirpath) / name
            reason = _file_problem(file, name)
            if reason:
                skipped.append({"path": str(rel_dir / name), "reason": reason})
            else:
                found.append(file)
    return found


def _file_problem(file: Path, name: str) -> str:
    """A reason to skip ``file`` that is cheap to find without decoding it, or ''."""
    if name.startswith("."):
        return "hidden file (ignored)"
    if not is_image_name(name):
        return f"not an image file (extension '{Path(name).suffix or 'none'}')"
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        return "broken symlink"
    except OSError as exc:  # ELOOP for a symlink loop, EACCES, ...
        return f"cannot read ({exc.strerror or exc})"
    if size == 0:
        return "empty file (0 bytes)"
    if not os.access(file, os.R_OK):
        return "permission denied"
    return ""


def _from_folder(root: Path) -> ImageSet:
    skipped: list[dict[str, str]] = []
    files = _walk(root, skipped)
    records = [Record(name=str(f.relative_to(root)), file=f) for f in files]
    return ImageSet(str(root), records, [], skipped, _fingerprint(records, [], skipped))


def _from_imagefolder(root: Path) -> ImageSet:
    skipped: list[dict[str, str]] = []
    class_dirs = []
    for entry in _scandir(root):
        if entry.name.startswith("."):
            skipped.append({"path": entry.name, "reason": "hidden (ignored)"})
        elif entry.is_dir():
            class_dirs.append(entry.name)
        else:
            skipped.append({"path": entry.name, "reason": "file outside the class folders (ignored)"})
    per_class: dict[str, list[Path]] = {}
    for name in class_dirs:
        inner: list[dict[str, str]] = []
        per_class[name] = _walk(root / name, inner)
        skipped += [{"path": f"{name}/{s['path']}", "reason": s["reason"]} for s in inner]
        if not per_class[name]:
            skipped.append({"path": name + "/", "reason": "class folder has no images (class dropped)"})
    classes = natural_sorted(name for name, files in per_class.items() if files)
    records: list[Record] = []
    for label, name in enumerate(classes):
        records += [Record(str(f.relative_to(root)), label, f) for f in per_class[name]]
    return ImageSet(str(root), records, classes, skipped, _fingerprint(records, classes, skipped))


def _from_csv(path: Path) -> ImageSet:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FewshotError(f"cannot read CSV manifest '{path}' ({exc}); save it as UTF-8 CSV") from None
    if "path" not in columns:
        raise FewshotError(
            f"CSV manifest '{path}' has columns {columns} but no 'path' column; "
            "the header must be path,label (paths relative to the CSV)"
        )
    base = path.parent
    skipped: list[dict[str, str]] = []
    kept: list[tuple[Path, str, str]] = []
    seen: dict[Path, int] = {}  # file -> the line that listed it first
    blank: list[int] = []  # lines with an empty label
    for line, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        rel = row.get("path", "")
        if not rel:
            skipped.append({"path": f"{path.name}:{line}", "reason": "empty path"})
            continue
        file = base / rel
        key = Path(os.path.normpath(file))
        if key in seen:  # the same image twice would count twice as a shot, or in TEST
            skipped.append({"path": rel, "reason": f"listed again on line {line} (first on line {seen[key]}; ignored)"})
            continue
        seen[key] = line
        reason = _file_problem(file, file.name) if file.exists() or file.is_symlink() else "file not found"
        if reason:
            skipped.append({"path": rel, "reason": reason})
        else:
            kept.append((file, rel, row.get("label", "")))
            blank += [line] if not row.get("label") else []
    labels = [lab for _, _, lab in kept]
    if blank and len(blank) < len(kept):
        shown = ", ".join(map(str, blank[:8])) + (", ..." if len(blank) > 8 else "")
        raise FewshotError(
            f"CSV manifest '{path}' labels some images but leaves {len(blank)} blank (line(s) {shown}); give every "
            "row a label, or list unlabeled images in a manifest of their own"
        )
    classes = natural_sorted({lab for lab in labels if lab})
    index = {c: i for i, c in enumerate(classes)}
    records = [Record(rel, index[lab] if lab else UNLABELED, file) for file, rel, lab in kept]
    return ImageSet(str(path), records, classes, skipped, _fingerprint(records, classes, skipped))


def _fingerprint(records: Iterable[Record], classes: list[str], skipped: list[dict[str, str]]) -> str:
    """What defines a source's features: each file's identity and content stamp (name, inode, size, mtime), its
    label *text* (class names, not only their indices) and the skipped-file list. Any change is a cache miss."""
    h = hashlib.sha256(json.dumps([classes, skipped], ensure_ascii=False).encode("utf-8", "surrogateescape"))
    for rec in records:
        st = rec.file.stat() if rec.file is not None else None
        stamp = f"{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}" if st else "\0\0"
        h.update(f"\n{rec.name}\0{rec.label}\0{stamp}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- Hugging Face
# datasets raises OSError for missing files and network/auth failures (hub HTTP errors are OSErrors), ValueError for
# bad names and formats, and its own DatasetsError for the rest: each ends as one line for the user.


def _from_hub(name: str, split: str | None) -> ImageSet:
    import datasets
    from datasets.exceptions import DatasetsError

    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except (OSError, ValueError, DatasetsError) as exc:
        raise FewshotError(f"cannot load Hugging Face dataset '{name}' ({type(exc).__name__}: {exc})") from None
    return _from_dataset(ds, f"hf:{name}:{split or 'train'}")


def _from_disk(path: Path, split: str | None) -> ImageSet:
    import datasets
    from datasets.exceptions import DatasetsError

    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError, DatasetsError) as exc:
        raise FewshotError(f"cannot load the saved dataset in '{path}' ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = split or ("train" if "train" in ds else next(iter(ds)))
        if split not in ds:
            raise FewshotError(f"'{path}' has splits {list(ds)}, not '{split}'; append :SPLIT to the path")
        ds = ds[split]
    return _from_dataset(ds, f"{path}:{split or ''}".rstrip(":"))


def _from_hf_imagefolder(path: Path, split: str | None) -> ImageSet:
    import datasets
    from datasets.exceptions import DatasetsError

    try:
        ds = datasets.load_dataset("imagefolder", data_dir=str(path), split=split or "train")
    except (OSError, ValueError, DatasetsError) as exc:
        raise FewshotError(f"cannot load '{path}' as a Hugging Face imagefolder ({exc})") from None
    return _from_dataset(ds, str(path))


def _from_dataset(ds: Any, source: str) -> ImageSet:
    import datasets

    features = ds.features
    image_cols = [k for k, v in features.items() if isinstance(v, datasets.Image)]
    if not image_cols:
        raise FewshotError(f"dataset '{source}' has no image column (columns: {list(features)})")
    image_col = image_cols[0]
    label_col = next((k for k, v in features.items() if isinstance(v, datasets.ClassLabel)), None)
    if label_col is None:
        label_col = next((k for k in ("label", "labels") if k in features), None)
    ds = ds.cast_column(image_col, datasets.Image(decode=False))  # we decode, so bad images become skips
    if label_col is None:
        raw: list[Any] = [None] * len(ds)
        classes: list[str] = []
    elif isinstance(features[label_col], datasets.ClassLabel):
        raw = ds[label_col]
        classes = list(features[label_col].names)
    else:
        raw = [None if v is None or v == "" else str(v) for v in ds[label_col]]
        classes = natural_sorted({v for v in raw if v is not None})
        index = {c: i for i, c in enumerate(classes)}
        raw = [None if v is None else index[v] for v in raw]
    split = str(ds.split) if ds.split is not None else "rows"
    records = [
        Record(f"{split}[{i}]", UNLABELED if lab is None or lab < 0 else int(lab), None, i) for i, lab in enumerate(raw)
    ]
    fingerprint = hashlib.sha256(json.dumps([ds._fingerprint, label_col, classes]).encode()).hexdigest()
    return ImageSet(source, records, classes, [], fingerprint, ds, image_col)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- helpers


def natural_sorted(names: Iterable[str]) -> list[str]:
    """Sort class names so '2' < '10' and 'cls2' < 'cls10' (labels that are numbers keep their order)."""

    def key(name: str) -> list[tuple[int, Any]]:
        return [(0, int(t)) if t.isdigit() else (1, t.lower()) for t in re.split(r"(\d+)", name) if t]

    return sorted(names, key=key)


def _skip_summary(skipped: list[dict[str, str]]) -> str:
    if not skipped:
        return "the folder is empty"
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    return "skipped: " + "; ".join(f"{n} {r}" for r, n in counts.items())


def summarize_skips(skipped: list[dict[str, str]], limit: int = 10) -> str:
    """A few lines for the terminal: count, then up to ``limit`` listed files."""
    lines = [f"skipped {len(skipped)} file(s):"]
    lines += [f"  {s['path']}: {s['reason']}" for s in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more (all listed in the report)")
    return "\n".join(lines)
