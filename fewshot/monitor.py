"""Online k-NN monitor for pretraining: leave-one-out k-NN accuracy of the backbone on a small labelled set.

This is DINO's ``eval_knn`` (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers",
``eval_knn.py``): L2-normalised class-token features, cosine similarity, the k nearest neighbours vote for their
label with weight ``exp(similarity / T)`` (k=20, T=0.07), top-1 accuracy. DINO scores a test split against a
train split; a monitor has one labelled set, so every image is scored against all the *others* (leave-one-out).

The images are decoded once, at construction, into a ``(N, 3, S, S)`` uint8 tensor as the exported backbone's
eval transform sees them (:func:`fewshot.decoding.decode_squares`: shorter side resized to S, bicubic, centre
square; crop_pct 1.0). Each call only runs the forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fewshot.errors import FewshotError


def knn_vote(
    features: torch.Tensor,
    labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Leave-one-out weighted k-NN predictions, DINO's vote: each row's ``k`` most cosine-similar *other* rows
    vote for their label with weight ``exp(sim / temperature)``; the class with the largest total wins (ties: the
    lowest class index). ``features`` (N, D) need not be normalised; rows are scored ``chunk`` at a time so the
    similarity matrix never exceeds (chunk, N). Returns the predicted labels (N,) int64."""
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k={k} must be between 1 and N-1={n - 1} for a leave-one-out vote")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    feats = torch.nn.functional.normalize(features.float(), dim=1)  # (N, D), unit rows: dot product = cosine
    labels = labels.to(feats.device, torch.long)  # (N,)
    preds = torch.empty(n, dtype=torch.long, device=feats.device)  # (N,)
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n), device=feats.device)  # (C,)
        sim = feats[rows] @ feats.T  # (C, N)
        own = torch.arange(len(rows), device=feats.device)  # (C,): row j of the chunk is image rows[j]
        sim[own, rows] = -float("inf")  # leave one out: an image is not its own neighbour
        top_sim, top_idx = sim.topk(k, dim=1)  # (C, k), (C, k)
        weights = ((top_sim - 1) / temperature).exp()  # (C, k): exp(sim/T) / exp(1/T), same vote, no overflow
        votes = torch.zeros(len(rows), num_classes, device=feats.device)  # (C, K)
        votes.scatter_add_(1, labels[top_idx], weights)  # (C, K): summed weight per class
        preds[rows] = votes.argmax(dim=1)  # (C,)
    return preds


class KnnMonitor:
    """Leave-one-out k-NN top-1 accuracy of a backbone on a labelled set held in memory.

    Build it once with :meth:`from_source`, then call ``monitor(backbone, device)`` (e.g. each epoch) to get
    ``{"knn_top1": fraction in [0, 1]}``. ``note`` is a line worth showing the user ('' when there is nothing to
    say): unreadable images skipped, or ``k`` lowered because the set is small.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        k: int = 20,
        temperature: float = 0.07,
        pool: str = "cls",
        batch_size: int = 128,
        note: str = "",
    ) -> None:
        self.images = images  # (N, 3, S, S) uint8, on the CPU
        self.labels = labels  # (N,) int64
        self.classes = list(classes)
        self.mean = torch.tensor([float(m) for m in mean]).view(1, 3, 1, 1)  # (1, 3, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(1, 3, 1, 1)  # (1, 3, 1, 1)
        self.k, self.temperature, self.pool, self.batch_size, self.note = k, temperature, pool, batch_size, note

    @classmethod
    def from_source(
        cls,
        source: str,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        k: int = 20,
        temperature: float = 0.07,
        pool: str = "cls",
        batch_size: int = 128,
        progress: bool = True,
    ) -> KnnMonitor:
        """Open the labelled ``source`` (anything :func:`fewshot.sources.open_source` accepts with labels) and
        decode its labelled images once at ``img_size``. ``k`` larger than N-1 is lowered to N-1 (see ``note``).
        Raises :class:`FewshotError` when the source is missing, unlabelled, or has fewer than 2 classes."""
        from fewshot.decoding import decode_squares
        from fewshot.features import check_pool
        from fewshot.sources import open_source

        check_pool(pool)
        if k < 1 or temperature <= 0:
            raise FewshotError(f"k-NN monitor: k={k}, temperature={temperature}; use k ≥ 1 and a temperature > 0")
        try:
            images = open_source(source, require_labels=True)
            subset = _Labeled(images)
            squares, skipped = decode_squares(subset, img_size, progress)  # a bar from 500 images on
        except FewshotError as exc:
            raise FewshotError(f"--monitor {source}: {exc}") from None
        bad = {s["path"] for s in skipped}
        labels = torch.tensor([r.label for r in subset.records if r.name not in bad], dtype=torch.long)  # (N,)
        present = labels.unique().numel()
        if present < 2:
            raise FewshotError(
                f"--monitor {source}: {len(labels)} readable labelled image(s) in {present} class(es); k-NN accuracy "
                "needs at least 2 classes: pass an ImageFolder with one subfolder per class"
            )
        notes = [f"skipped {len(skipped)} unreadable image(s)"] if skipped else []
        if k > len(labels) - 1:
            notes.append(f"k lowered from {k} to {len(labels) - 1} (only {len(labels)} images)")
            k = len(labels) - 1
        note = f"k-NN monitor on {source}: " + "; ".join(notes) if notes else ""
        store = torch.from_numpy(squares)  # (N, 3, S, S) uint8
        return cls(store, labels, images.classes, mean, std, k, temperature, pool, batch_size, note)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def __call__(
        self, backbone: torch.nn.Module, device: torch.device, autocast: bool | None = None
    ) -> dict[str, float]:
        """``{"knn_top1": ...}`` for ``backbone`` (run in eval mode, no gradients; its modes are restored).
        ``autocast``: bf16 forward passes; None = on CUDA only, as :mod:`fewshot.features` extracts."""
        from fewshot.features import embed

        use_bf16 = device.type == "cuda" if autocast is None else autocast
        modes = [(m, m.training) for m in backbone.modules()]  # every submodule's own mode, not just the root's
        backbone.eval()
        try:
            mean, std = self.mean.to(device), self.std.to(device)
            chunks = []
            with torch.no_grad():
                for start in range(0, len(self), self.batch_size):
                    x = self.images[start : start + self.batch_size].to(device, non_blocking=True)  # (B, 3, S, S)
                    x = (x.float() / 255 - mean) / std  # (B, 3, S, S) normalised
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        chunks.append(embed(backbone, x, self.pool).float())  # (B, D)
                feats = torch.cat(chunks)  # (N, D)
                preds = knn_vote(feats, self.labels, self.k, self.temperature, len(self.classes))  # (N,)
        finally:
            for module, training in modes:
                module.training = training
        return {"knn_top1": float((preds.cpu() == self.labels).float().mean())}


class _Labeled:
    """The labelled records of an ImageSet, in the shape :func:`fewshot.decoding.decode_squares` reads."""

    def __init__(self, images: Any) -> None:
        self.images = images
        self.index = [i for i, r in enumerate(images.records) if r.label >= 0]  # a CSV may leave some unlabelled
        self.records = [images.records[i] for i in self.index]

    def __len__(self) -> int:
        return len(self.index)

    def load(self, i: int) -> Any:
        return self.images.load(self.index[i])
