"""The decoded-image cache: the pretraining counterpart of the feature cache. A data set is decoded once
(:mod:`fewshot.decoding`: whole images, aspect ratio kept, in canvases of ``S × S`` px) into one uint8 file that
later runs, and every process of a run, memory-map. Processes on one machine map the same file, so the page cache
holds one copy per node whatever their number, and sets larger than RAM still train (the OS pages them in).

An entry is named after what defines its pixels: the data source and its fingerprint (file names, sizes and
modification times: a changed file gives a new entry, and the entries of older versions of the same source are
deleted), the stored resolution, JPEG draft mode and the format version. Files of an entry ``NAME`` in the cache
folder (``$FEWSHOT_CACHE/images``, ``~/.cache/fewshot/images`` by default; ``pretrain.data.cache_dir`` moves it):

- ``NAME.u8``: ``M`` canvases of ``3 × S × S`` bytes, the readable images (``NAME.u8.partial`` while written);
- ``NAME.index.safetensors``: ``sizes`` ``(M, 2)`` (height, width of each image inside its canvas) and ``order``
  ``(M,)`` (the image's position in the source's listing), with the skipped files in its metadata. It is written
  last, after the pixels are on disk: an entry without it is unfinished and is rebuilt.

Building: free space is checked first (a clear error, not a full disk halfway) and the file allocated at full size.
Under torchrun the images are shared out among the ranks (rank ``r`` decodes images ``r, r + world, ...`` with
its own worker processes), every rank writing its slots of the same file; rank 0 then fills the slots of
unreadable images with the last readable ones, writes the index and renames the file, while the others wait. The
folder must therefore be one every process sees (a shared filesystem for several nodes); this is checked. One
build per entry at a time on a machine (a lock); another run wanting the same entry waits for it and reuses it.
The entry's naming, building, locking and reading are one file format's code: one module, just past 300 lines.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fewshot import distributed
from fewshot.decoding import decode_to_file
from fewshot.errors import FewshotError
from fewshot.progress import bar

if TYPE_CHECKING:
    from fewshot.sources import ImageSet

log = logging.getLogger(__name__)

CACHE_VERSION = "1"
SPARE_BYTES = 1 << 30  # left free on the cache's disk after an entry is allocated


@dataclass
class Cached:
    """A cache entry, memory-mapped: ``pixels`` ``(M, 3, S, S)`` uint8 (copy-on-write, the file is never changed),
    ``sizes`` ``(M, 2)`` int64, the skipped images, the entry's pixel file and what opening it took."""

    pixels: torch.Tensor
    sizes: torch.Tensor
    skipped: list[dict[str, str]]
    path: Path
    built: bool = False  # decoded by this call (False: reused)
    seconds: float = 0.0
    decoded_by: list[int] = field(default_factory=list)  # images decoded by each rank (when built)


def cache_folder(configured: str | None = None) -> Path:
    """``pretrain.data.cache_dir`` if set, else ``images/`` beside the feature cache (``FEWSHOT_CACHE``)."""
    if configured:
        return Path(configured).expanduser()
    from fewshot.features import cache_dir

    return cache_dir().parent / "images"


def entry_name(images: ImageSet, side: int, draft: bool) -> str:
    """``SOURCE-DATA-sS[-draft]-vV``: hashes of the source's location and of its fingerprint, and the settings."""
    where = Path(str(images.source)).expanduser()
    source = str(where.resolve()) if where.exists() else str(images.source)
    src = hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    data = hashlib.sha256(str(images.fingerprint).encode()).hexdigest()[:16]
    return f"{src}-{data}-s{side}{'-draft' if draft else ''}-v{CACHE_VERSION}"


class Entry:
    """The file names of one cache entry."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        self.pixels = folder / f"{name}.u8"
        self.partial = folder / f"{name}.u8.partial"
        self.index = folder / f"{name}.index.safetensors"
        self.token = folder / f"{name}.token"
        self.lock = folder / f"{name}.lock"


def open_cache(
    images: ImageSet,
    side: int,
    draft: bool = True,
    workers: int = 1,
    folder: Path | None = None,
    ranks: distributed.Dist | None = None,
    progress: bool = False,
) -> Cached:
    """The cache entry of ``images`` (a :class:`fewshot.sources.ImageSet`) at ``side`` px, built if missing (by
    ``workers`` decoding processes per rank, the ranks sharing the images under torchrun). Every rank calls it."""
    ranks = ranks or distributed.Dist()
    entry = Entry(folder or cache_folder(), entry_name(images, side, draft))
    start = time.perf_counter()
    decoded_by: list[int] = []
    with _build_lock(entry, ranks.main) as lock:
        with distributed.together():
            token = ""
            if ranks.main:
                lock()  # waits while another run builds this entry
                if _read_index(entry, side) is None:
                    token = _allocate(entry, len(images), side)
        token = distributed.gather_objects([token] if ranks.main else [])[0]  # rank 0's decision, on every rank
        if token:
            with distributed.together():
                _check_visible(entry, token, ranks)
            shard = range(ranks.rank, len(images), ranks.world)
            with bar(total=len(shard), desc="decoding", unit="img", disable=not progress or len(shard) < 500) as b:
                sizes, skipped = decode_to_file(images, shard, entry.partial, side, draft, workers, b.update)
            parts = distributed.gather_objects([sizes])  # (index, height, width) rows of every rank
            skipped = distributed.gather_objects(skipped)
            decoded_by = [len(p) for p in parts]
            with distributed.together():
                if ranks.main:
                    _finalise(entry, images, np.concatenate(parts), skipped, side, draft, decoded_by)
    with distributed.together():
        cached = _open(entry, side)
    cached.built, cached.seconds, cached.decoded_by = bool(token), time.perf_counter() - start, decoded_by
    return cached


# ---------------------------------------------------------------------------------------------- building


@contextlib.contextmanager
def _build_lock(entry: Entry, main: bool) -> Iterator[Any]:
    """Yields ``acquire()``: an exclusive ``flock`` on ``NAME.lock`` for the block (rank 0 only), waiting (and
    saying so) while another run holds it. The OS drops it if the holder dies."""
    fd = -1

    def acquire() -> None:
        nonlocal fd
        entry.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(entry.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            log.info(f"waiting for another run (pid {holder}) that is building the image cache {entry.pixels}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    try:
        yield acquire if main else (lambda: None)
    finally:
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _allocate(entry: Entry, n: int, side: int) -> str:
    """Create ``NAME.u8.partial`` at full size (after checking the disk has room) and a fresh ``NAME.token``;
    returns the token the other ranks look for to prove they see the same folder."""
    entry.partial.unlink(missing_ok=True)  # an unfinished build's file: its space counts as free
    need = n * 3 * side * side
    free = shutil.disk_usage(entry.folder).free
    if need + SPARE_BYTES > free:
        raise FewshotError(
            f"the decoded-image cache needs {need / 2**30:.1f} GiB for {n} images at {side} px in {entry.folder}, "
            f"which has {free / 2**30:.1f} GiB free; free some space, point --set pretrain.data.cache_dir=DIR at a "
            f"larger disk, or lower --set pretrain.store_size (now {side})"
        )
    fd = os.open(entry.partial, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, max(need, 1))  # reserves the blocks: no full disk (or SIGBUS) halfway
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise FewshotError(f"no space left in {entry.folder} for the image cache ({need / 2**30:.1f} GiB)") from exc
        os.ftruncate(fd, need)  # a filesystem without fallocate
    finally:
        os.close(fd)
    token = secrets.token_hex(16)
    entry.token.write_text(token)
    return token


def _check_visible(entry: Entry, token: str, ranks: distributed.Dist) -> None:
    try:
        seen = entry.token.read_text().strip()
    except OSError:
        seen = ""
    if seen != token:
        raise FewshotError(
            f"rank {ranks.rank} does not see the image cache being built in {entry.folder} by rank 0; under torchrun "
            "on several machines set --set pretrain.data.cache_dir=DIR to a folder on a filesystem they all share"
        )


def _finalise(
    entry: Entry, images: ImageSet, sizes: np.ndarray, skipped: list[dict[str, Any]], side: int, draft: bool,
    decoded_by: list[int],
) -> None:  # fmt: skip
    """Rank 0, once every slot is written: move the last readable canvases into the slots of unreadable images
    (so the file holds the ``M`` readable ones in ``M`` slots), put the pixels on disk, then write the index."""
    if len(sizes) == 0:
        entry.partial.unlink(missing_ok=True)
        reasons = "; ".join(sorted({s["reason"] for s in skipped}))[:200]
        raise FewshotError(f"none of the {len(images)} images could be read ({reasons}); check the data source")
    sizes = sizes[np.argsort(sizes[:, 0], kind="stable")]
    m, slot = len(sizes), 3 * side * side
    order = sizes[:, 0].copy()  # listing index of the image in each slot
    holes = sorted(set(range(m)) - set(order.tolist()))
    movers = np.flatnonzero(order >= m)  # as many as there are holes below m
    fd = os.open(entry.partial, os.O_RDWR)
    try:
        for hole, k in zip(holes, movers, strict=True):
            os.pwrite(fd, os.pread(fd, slot, int(order[k]) * slot), hole * slot)
            sizes[k, 0] = hole
        os.ftruncate(fd, m * slot)
        os.fsync(fd)  # the pixels are on disk before an index can say the entry is complete
    finally:
        os.close(fd)
    rows = np.argsort(sizes[:, 0])  # by slot
    meta = {
        "version": CACHE_VERSION, "source": str(images.source), "fingerprint": str(images.fingerprint),
        "side": str(side), "draft": str(draft), "listed": str(len(images)), "decoded_by": json.dumps(decoded_by),
        "skipped": json.dumps([{"path": s["path"], "reason": s["reason"]} for s in sorted(skipped, key=_index)]),
    }  # fmt: skip
    tensors = {"sizes": torch.from_numpy(sizes[rows, 1:].astype(np.int32)), "order": torch.from_numpy(order[rows])}
    os.replace(entry.partial, entry.pixels)
    from safetensors.torch import save_file

    tmp = entry.index.with_name(entry.index.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)  # readable like the pixel file (safetensors writes 0600)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, entry.index)
    entry.token.unlink(missing_ok=True)
    _remove_stale(entry)


def _index(record: dict[str, Any]) -> int:
    return int(record.get("index", 0))


def _remove_stale(entry: Entry) -> None:
    """Delete the entries of older versions of the same source (same first part of the name, another fingerprint):
    no run can hit them again. Entries someone is building (their lock is held) are left alone."""
    source, data = entry.name.split("-")[:2]
    stale: dict[str, list[Path]] = {}
    for path in entry.folder.glob(f"{source}-*"):
        name = path.name.split(".")[0]
        if name.split("-")[1] != data:
            stale.setdefault(name, []).append(path)
    for name, files in stale.items():
        lock = entry.folder / f"{name}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        finally:
            os.close(fd)  # closing drops the lock (it was only a test)
        for path in files:
            path.unlink(missing_ok=True)
        lock.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- reading


def _read_index(entry: Entry, side: int) -> tuple[np.ndarray, list[dict[str, str]]] | None:
    """``(sizes (M, 2), skipped)`` of a complete entry, or None when it is missing, unfinished or damaged."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(entry.index), framework="numpy") as f:
            meta = f.metadata() or {}
            sizes = f.get_tensor("sizes").astype(np.int64)
        skipped = json.loads(meta["skipped"])
        complete = meta.get("version") == CACHE_VERSION and int(meta["side"]) == side and sizes.ndim == 2
        complete = complete and entry.pixels.stat().st_size == len(sizes) * 3 * side * side
    except (SafetensorError, OSError, KeyError, ValueError):
        return None
    return (sizes, skipped) if complete else None


def _open(entry: Entry, side: int) -> Cached:
    found = _read_index(entry, side)
    if found is None:
        raise FewshotError(
            f"the image cache {entry.pixels} is missing or damaged on this machine; under torchrun on several "
            "machines put --set pretrain.data.cache_dir=DIR on a filesystem they all share"
        )
    sizes, skipped = found
    # copy-on-write private mapping: pages are shared with the page cache (one copy per node) and never written
    pixels = np.memmap(entry.pixels, dtype=np.uint8, mode="c", shape=(len(sizes), 3, side, side))
    return Cached(torch.from_numpy(pixels), torch.from_numpy(sizes), skipped, entry.pixels)
