"""Online k-NN monitor for pretraining: leave-one-out k-NN accuracy of the backbone on a small labelled set.

This is DINO's ``eval_knn`` (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers",
``eval_knn.py``): L2-normalised class-token features, cosine similarity, the k nearest neighbours vote for their
label with weight ``exp(similarity / T)`` (k=20, T=0.07), top-1 accuracy. DINO scores a test split against a
train split; a monitor has one labelled set, so every image is scored against all the *others* (leave-one-out).

With a second labelled set (``test``) the monitor instead scores those images against the first set's labels:
``evaluate``'s k-NN with every TRAIN label.

The images are decoded once, at construction, into ``(N, 3, S, S)`` uint8 tensors through timm's eval transform
(resize to S / crop_pct, centre crop; bicubic unless told) with the exported backbone's settings: exactly the
pixels ``extract`` and ``evaluate`` feed the run folder (and, with ``--init``, the weights it started from).
Each call only runs the forward passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fewshot.errors import FewshotError

if TYPE_CHECKING:
    from PIL import Image

    from fewshot.sources import ImageSet


def knn_vote(
    support: torch.Tensor,
    labels: torch.Tensor,
    queries: torch.Tensor | None = None,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """DINO's weighted k-NN vote: the ``k`` most cosine-similar ``support`` rows (N, D) vote for their ``labels``
    (N,) with weight ``exp(sim / temperature)``; the class with the largest total wins (ties: the lowest class
    index). ``queries`` (Q, D) are scored against the support; without them the support is scored leave-one-out,
    each row against all the *other* rows. Features need not be normalised; rows are scored ``chunk`` at a time so
    the similarity matrix never exceeds (chunk, N). Returns the predicted labels (Q,) or (N,) int64."""
    n = support.shape[0]
    leave_one_out = queries is None
    if leave_one_out and not 1 <= k < n:
        raise ValueError(f"k={k} must be between 1 and N-1={n - 1} for a leave-one-out vote")
    k = min(k, n)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    sup = torch.nn.functional.normalize(support.float(), dim=1)  # (N, D), unit rows: dot product = cosine
    qry = sup if queries is None else torch.nn.functional.normalize(queries.float(), dim=1)  # (Q, D)
    labels = labels.to(sup.device, torch.long)  # (N,)
    preds = torch.empty(qry.shape[0], dtype=torch.long, device=sup.device)  # (Q,)
    for start in range(0, qry.shape[0], chunk):
        rows = torch.arange(start, min(start + chunk, qry.shape[0]), device=sup.device)  # (C,)
        sim = qry[rows] @ sup.T  # (C, N)
        if leave_one_out:
            sim[torch.arange(len(rows), device=sup.device), rows] = -float("inf")  # not its own neighbour
        top_sim, top_idx = sim.topk(k, dim=1)  # (C, k), (C, k)
        weights = ((top_sim - 1) / temperature).exp()  # (C, k): exp(sim/T) / exp(1/T), same vote, no overflow
        votes = torch.zeros(len(rows), num_classes, device=sup.device)  # (C, K)
        votes.scatter_add_(1, labels[top_idx], weights)  # (C, K): summed weight per class
        preds[rows] = votes.argmax(dim=1)  # (C,)
    return preds


@dataclass
class KnnMonitor:
    """k-NN top-1 accuracy of a backbone on labelled images held in memory: leave-one-out on one set, or a second
    set scored against the first.

    Build it once with :meth:`from_source`, then call ``monitor(backbone, device)`` (e.g. each epoch) to get
    ``{"knn_top1": fraction in [0, 1]}``. ``note`` is a line worth showing the user ('' when there is nothing to
    say): unreadable images skipped, or ``k`` lowered because the set is small.
    """

    images: torch.Tensor  # (N, 3, S, S) uint8, on the CPU
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    mean: tuple[float, ...]  # the backbone's normalisation
    std: tuple[float, ...]
    k: int = 20
    temperature: float = 0.07
    pool: str = "cls"
    batch_size: int = 128
    note: str = ""
    test: tuple[torch.Tensor, torch.Tensor] | None = None  # (M, 3, S, S) uint8 and (M,) labels, or None: leave-one-out

    @classmethod
    def from_source(
        cls,
        source: str,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        test: str | None = None,
        crop_pct: float = 1.0,
        interpolation: str = "bicubic",
        progress: bool = True,
        k: int = 20,
        temperature: float = 0.07,
        pool: str = "cls",
        batch_size: int = 128,
    ) -> KnnMonitor:
        """Open the labelled ``source`` (anything :func:`fewshot.sources.open_source` accepts with labels) and
        decode its labelled images once at ``img_size`` (``crop_pct``, ``interpolation``: the eval transform);
        likewise ``test``, scored against ``source`` instead of leave-one-out. ``k`` larger than the support allows
        is lowered (see ``note``). Raises :class:`FewshotError` when a source is missing, unlabelled, has fewer than
        2 classes, or ``test`` has classes ``source`` lacks."""
        from fewshot.pooling import check_pool

        check_pool(pool)
        if k < 1 or temperature <= 0:
            raise FewshotError(f"k-NN monitor: k={k}, temperature={temperature}; use k ≥ 1 and a temperature > 0")
        decode = _decoder(img_size, crop_pct, interpolation)
        store, labels, classes, skipped = _labelled(source, decode, progress, "--monitor")
        present = labels.unique().numel()
        if present < 2:
            raise FewshotError(
                f"--monitor {source}: {len(labels)} readable labelled image(s) in {present} class(es); k-NN accuracy "
                "needs at least 2 classes: pass an ImageFolder with one subfolder per class"
            )
        held_out = None
        if test is not None:
            t_store, t_labels, t_classes, t_skipped = _labelled(test, decode, progress, "pretrain.monitor_test")
            index = {name: i for i, name in enumerate(classes)}
            unknown = sorted({t_classes[c] for c in t_labels.tolist()} - set(index))
            if unknown:
                raise FewshotError(f"pretrain.monitor_test {test}: class(es) {', '.join(unknown)} not in --monitor")
            held_out = (t_store, torch.tensor([index[t_classes[c]] for c in t_labels.tolist()], dtype=torch.long))
            skipped += t_skipped
        notes = [f"skipped {skipped} unreadable image(s)"] if skipped else []
        most = len(labels) if test is not None else len(labels) - 1  # leave-one-out: the others only
        if k > most:
            notes.append(f"k lowered from {k} to {most} (only {len(labels)} images)")
            k = most
        note = f"k-NN monitor on {source}: " + "; ".join(notes) if notes else ""
        return cls(store, labels, classes, tuple(mean), tuple(std), k, temperature, pool, batch_size, note, held_out)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def __call__(
        self, backbone: torch.nn.Module, device: torch.device, autocast: bool | None = None
    ) -> dict[str, float]:
        """``{"knn_top1": ...}`` for ``backbone`` (run in eval mode, no gradients; its modes are restored).
        ``autocast``: bf16 forward passes; None = on CUDA only, as :mod:`fewshot.features` extracts."""
        use_bf16 = device.type == "cuda" if autocast is None else autocast
        modes = [(m, m.training) for m in backbone.modules()]  # every submodule's own mode, not just the root's
        backbone.eval()
        try:
            with torch.no_grad():
                feats = self._embed(backbone, self.images, device, use_bf16)  # (N, D)
                queries, truth = None, self.labels  # leave-one-out
                if self.test is not None:
                    queries, truth = self._embed(backbone, self.test[0], device, use_bf16), self.test[1]  # (M, D)
                preds = knn_vote(  # (N,) or (M,)
                    feats, self.labels, queries, k=self.k, temperature=self.temperature, num_classes=len(self.classes)
                )
        finally:
            for module, training in modes:
                module.training = training
        return {"knn_top1": int((preds.cpu() == truth).sum()) / len(truth)}  # exact, as evaluate counts

    def _embed(self, backbone: torch.nn.Module, images: torch.Tensor, device: torch.device, bf16: bool) -> torch.Tensor:
        from fewshot.pooling import embed

        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)  # (1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)  # (1, 3, 1, 1)
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start : start + self.batch_size].to(device, non_blocking=True)  # (B, 3, S, S) uint8
            x = (x.float() / 255 - mean) / std  # (B, 3, S, S): as ToTensor + Normalize
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                chunks.append(embed(backbone, x, self.pool).float())  # (B, D)
        return torch.cat(chunks)  # (N, D)


def _decoder(img_size: int, crop_pct: float, interpolation: str) -> Callable[[Image.Image], torch.Tensor]:
    """timm's eval transform without its normalisation: PIL image -> (3, S, S) uint8."""
    import timm.data

    return timm.data.create_transform(
        input_size=(3, img_size, img_size), interpolation=interpolation, crop_pct=crop_pct, is_training=False,
        use_prefetcher=True,  # stops before ToTensor/Normalize: uint8 pixels, normalised per batch in __call__
    )  # fmt: skip


def _labelled(
    source: str, decode: Callable[[Image.Image], torch.Tensor], progress: bool, flag: str
) -> tuple[torch.Tensor, torch.Tensor, list, int]:
    """The labelled images of ``source`` decoded once: ``(N, 3, S, S)`` uint8, labels (N,), classes, #skipped."""
    from fewshot.images import UnreadableImage
    from fewshot.progress import bar as progress_bar
    from fewshot.sources import open_source

    try:
        images = open_source(source, require_labels=True)
    except FewshotError as exc:
        raise FewshotError(f"{flag} {source}: {exc}") from None
    subset = _Labeled(images)
    kept: list[torch.Tensor] = []
    labels: list[int] = []
    skipped = 0
    for i in progress_bar(range(len(subset)), desc="decoding", unit="img", disable=not progress or len(subset) < 500):
        try:
            kept.append(decode(subset.load(i)))  # (3, S, S) uint8
        except (UnreadableImage, OSError):
            skipped += 1
            continue
        labels.append(subset.records[i].label)
    if not kept:
        raise FewshotError(f"{flag} {source}: none of its labelled images could be read")
    return torch.stack(kept), torch.tensor(labels, dtype=torch.long), list(images.classes), skipped


class _Labeled:
    """The labelled records of an ImageSet (a CSV may leave some unlabelled)."""

    def __init__(self, images: ImageSet) -> None:
        self.images = images
        self.index = [i for i, r in enumerate(images.records) if r.label >= 0]  # a CSV may leave some unlabelled
        self.records = [images.records[i] for i in self.index]

    def __len__(self) -> int:
        return len(self.index)

    def load(self, i: int) -> Image.Image:
        return self.images.load(self.index[i])
