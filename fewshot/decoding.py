"""Decoding images for pretraining: every image once, whole, aspect ratio kept, by parallel worker processes.

Each image is resized (bicubic, antialiased) so that its longer side is the stored resolution ``S`` and placed at
the top-left of an ``S × S`` canvas of zeros, stored channels-first as ``(3, S, S)`` uint8; its ``(height, width)``
inside the canvas is recorded, and the augmentations crop inside that box only (:mod:`fewshot.augment`). A 4:3
photo keeps all of its area, where a centre square loses a quarter of it.

:func:`decode_to_file` writes the canvases of a set of images straight into their slots of one file (slot ``i`` at
byte ``i · 3 · S · S``, ``os.pwrite``), from worker processes that each decode a chunk of images at a time, so no
pixels pass through pipes and throughput grows with the cores. Large JPEGs are decoded in draft mode when asked
(libjpeg's DCT scaling to 1/2, 1/4 or 1/8 while the longer side stays ≥ ``S``). This module imports no torch, so
the workers (started with ``spawn``: forking a process that runs torch or gloo threads can deadlock) start in a
fraction of a second. Unreadable files are skipped and listed, with the same reasons as everywhere else
(:mod:`fewshot.images`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from fewshot.sources import Decodable, ImageSet, Record

log = logging.getLogger(__name__)

CHUNK = 64  # images per task handed to a worker; sets of at most one chunk per worker are decoded in-process


def fit(img: Image.Image, side: int) -> np.ndarray:
    """``img`` (RGB) resized so that its longer side is ``side`` px, aspect ratio kept: ``(h, w, 3)`` uint8."""
    w, h = img.size
    scale = side / max(w, h)
    size = (max(1, min(side, round(w * scale))), max(1, min(side, round(h * scale))))
    if size != (w, h):
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8)


def canvas(pixels: np.ndarray, side: int, out: np.ndarray | None = None) -> np.ndarray:
    """The ``(3, side, side)`` uint8 canvas with ``pixels (h, w, 3)`` at its top-left and zeros elsewhere."""
    out = np.zeros((3, side, side), dtype=np.uint8) if out is None else out
    h, w = pixels.shape[:2]
    out.fill(0)
    out[:, :h, :w] = pixels.transpose(2, 0, 1)
    return out


def record_name(images: Decodable, i: int) -> str:
    """What a skip lists for image ``i``: the record's name (path relative to the source), else its index."""
    records = images if isinstance(images, Sequence) else getattr(images, "records", None)  # an ImageSet's
    return str(getattr(records[i], "name", i)) if records is not None else str(i)


def load(images: Decodable, i: int) -> Image.Image:
    """Image ``i`` of an image set (``load(i)``), a sequence of PIL images or of objects with ``load()``."""
    if not isinstance(images, Sequence):
        return images.load(i)
    item = images[i]
    return item if isinstance(item, Image.Image) else item.load()


class SlotWriter:
    """Decodes images of an image set into their slots of the canvas file ``path`` (which must exist at full size).

    ``writer(items)`` takes ``(index, record)`` pairs (records of ``images``, a :class:`fewshot.sources.ImageSet`
    that may come without its record list: worker processes get only their tasks' records) and returns
    ``(index, height, width, reason)`` per image: its size inside the canvas, or ``reason`` (non-empty) when it
    could not be read and its slot was left as it was."""

    def __init__(self, images: ImageSet, path: str | Path, side: int, draft: bool) -> None:
        self.images, self.side, self.draft = images, side, side if draft else None
        self.fd = os.open(path, os.O_WRONLY)
        self.buffer = np.zeros((3, side, side), dtype=np.uint8)

    def __call__(self, items: Sequence[tuple[int, Any]]) -> list[tuple[int, int, int, str]]:
        from fewshot.images import UnreadableImage

        done = []
        slot = self.buffer.nbytes
        for i, record in items:
            try:
                pixels = fit(self.images.load_record(record, self.draft), self.side)  # (h, w, 3)
            except (UnreadableImage, OSError) as exc:
                done.append((i, 0, 0, str(exc) or type(exc).__name__))
                continue
            view = memoryview(canvas(pixels, self.side, self.buffer).reshape(-1))  # type: ignore[arg-type]
            written = 0
            while written < slot:  # pwrite may write less than asked (signals); never past the slot
                written += os.pwrite(self.fd, view[written:], i * slot + written)
            done.append((i, pixels.shape[0], pixels.shape[1], ""))
        return done

    def close(self) -> None:
        os.close(self.fd)


_WORKER: SlotWriter | None = None  # the worker process's writer, made once by _start_worker


def _start_worker(images: ImageSet, path: str, side: int, draft: bool) -> None:
    global _WORKER
    _WORKER = SlotWriter(images, path, side, draft)


def _run_chunk(items: list[tuple[int, Any]]) -> list[tuple[int, int, int, str]]:
    assert _WORKER is not None, "worker not started"
    return _WORKER(items)


def default_workers(processes_on_node: int = 1) -> int:
    """All the cores this process may use, shared among the ``processes_on_node`` processes of a node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, processes_on_node))


def decode_to_file(
    images: ImageSet,
    indices: Sequence[int],
    path: str | Path,
    side: int,
    draft: bool = True,
    workers: int = 1,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Decode ``images[i]`` (a :class:`fewshot.sources.ImageSet`) for every ``i`` in ``indices`` into slot ``i``
    of the canvas file ``path``.

    ``workers`` processes (spawned; in-process when 1 or when the share is at most one chunk per worker) each take
    :data:`CHUNK` images at a time. Returns ``sizes`` ``(len(indices), 3)`` int64 rows ``(index, height, width)``
    of the images read, in the order of ``indices``, and the skipped images as ``{"path", "reason", "index"}``.
    ``on_progress(n)`` is called as images are done. If worker processes cannot start (e.g. the main script is not
    importable), the images are decoded in this process, with a warning."""
    records = images.records
    chunks = [[(i, records[i]) for i in indices[k : k + CHUNK]] for k in range(0, len(indices), CHUNK)]
    workers = max(1, min(workers, len(chunks)))
    results: list[tuple[int, int, int, str]] = []
    if workers > 1:
        try:
            results = _in_workers(images, chunks, path, side, draft, workers, on_progress)
        except BrokenProcessPool as exc:
            log.warning(f"decoding worker processes failed ({exc}); decoding in this process")
            workers = 1
    if workers == 1:
        writer = SlotWriter(images, path, side, draft)
        try:
            for chunk in chunks:
                results += writer(chunk)
                if on_progress:
                    on_progress(len(chunk))
        finally:
            writer.close()
    order = {i: k for k, i in enumerate(indices)}
    results.sort(key=lambda r: order[r[0]])
    sizes = np.array([(i, h, w) for i, h, w, reason in results if not reason], dtype=np.int64).reshape(-1, 3)
    skipped = [{"path": records[i].name, "reason": reason, "index": i} for i, _, _, reason in results if reason]
    return sizes, skipped


def _in_workers(
    images: ImageSet, chunks: list[list[tuple[int, Record]]], path: str | Path, side: int, draft: bool, workers: int,
    on_progress: Callable[[int], None] | None,
) -> list[tuple[int, int, int, str]]:  # fmt: skip
    """The chunks decoded by ``workers`` spawned processes, each holding the image set without its record list (a
    task carries its own records: 64 of them pickle in microseconds, a million in seconds per worker)."""
    from dataclasses import replace

    bare = replace(images, records=[])
    results: list[tuple[int, int, int, str]] = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, _start_worker, (bare, str(path), side, draft)) as pool:
        for job in as_completed([pool.submit(_run_chunk, chunk) for chunk in chunks]):
            done = job.result()
            results += done
            if on_progress:
                on_progress(len(done))
    return results
