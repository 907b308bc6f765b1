"""Leakage guard: no TEST image may also sit in TRAIN or in the unlabeled pool, whatever its name.

Images are compared by content: the SHA-256 of each file's bytes (of the stored bytes for a Hugging Face row), so
a copy under another name or in another folder is caught; a re-encoded or resized copy is not (that needs a
perceptual hash). Hashes are cached per data source under the feature cache (``hashes/<fingerprint>.json``), keyed
by the source's fingerprint (names, sizes, modification times), so a re-run does not read the files again.

An overlap is a one-line error naming the files; with ``allow_overlap`` it becomes a counted warning that is kept
in the run's report.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fewshot.errors import FewshotError
from fewshot.weights import file_sha256

if TYPE_CHECKING:
    from fewshot.sources import ImageSet

SHOWN = 5  # files named in an error message


def content_hashes(images: ImageSet) -> list[str]:
    """SHA-256 of every record of an :class:`fewshot.sources.ImageSet` ('' when the bytes cannot be read)."""
    from fewshot.features import cache_dir

    cached = cache_dir().parent / "hashes" / f"{images.fingerprint}.json" if images.fingerprint else None
    if cached is not None and cached.is_file():
        try:
            hashes = json.loads(cached.read_text(encoding="utf-8"))
            if isinstance(hashes, list) and len(hashes) == len(images.records):
                return hashes
        except (OSError, ValueError):
            pass  # a damaged cache entry is recomputed
    hashes = [_digest(images, i) for i in range(len(images.records))]
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(hashes), encoding="utf-8")
        os.replace(tmp, cached)
    return hashes


def _digest(images: ImageSet, i: int) -> str:
    rec = images.records[i]
    try:
        if rec.file is not None:
            return file_sha256(rec.file)
        item = images._hf[rec.row][images._hf_image]  # an undecoded image cell: {"bytes", "path"}
        if isinstance(item, dict) and item.get("bytes"):
            return hashlib.sha256(item["bytes"]).hexdigest()
        if isinstance(item, dict) and item.get("path"):
            return file_sha256(Path(item["path"]))
    except OSError:
        pass
    return ""  # unreadable: it is skipped (and listed) when features are extracted


def overlap(a: ImageSet, b: ImageSet) -> list[tuple[str, str]]:
    """(name in ``a``, name in ``b``) for every pair of records with the same content."""
    index: dict[str, list[str]] = {}
    for rec, digest in zip(a.records, content_hashes(a), strict=True):
        if digest:
            index.setdefault(digest, []).append(rec.name)
    pairs = []
    for rec, digest in zip(b.records, content_hashes(b), strict=True):
        pairs += [(name, rec.name) for name in index.get(digest, [])]
    return pairs


def check_overlap(test: Any, others: dict[str, Any], allow: bool, flag: str = "--allow-overlap") -> list[dict]:
    """Raise if a TEST image is also in one of ``others`` (e.g. {"TRAIN": train, "the pool": pool}); with
    ``allow``, return the overlaps as ``{"with", "test", "other"}`` dicts for the report instead."""
    found: list[dict[str, str]] = []
    for what, images in others.items():
        if images is None:
            continue
        pairs = overlap(images, test)
        if pairs and not allow:
            shown = ", ".join(f"{t} = {o}" for o, t in pairs[:SHOWN]) + (" ..." if len(pairs) > SHOWN else "")
            raise FewshotError(
                f"{len(pairs)} TEST image(s) are also in {what} (same file content): {shown}; remove them from "
                f"one side, or pass {flag} to report them as a warning"
            )
        found += [{"with": what, "test": t, "other": o} for o, t in pairs]
    return found


def check_sources(test: Any, others: dict[str, Any], allow: bool) -> list[dict]:
    """:func:`check_overlap` on data source specs: ``test`` and ``others`` values are opened with
    :func:`fewshot.sources.open_source` (a None value is skipped)."""
    from fewshot.sources import open_source

    opened = {what: open_source(spec) if spec is not None else None for what, spec in others.items()}
    return check_overlap(open_source(test), opened, allow=allow)
