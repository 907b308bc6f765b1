"""Data parallelism under ``torchrun``: PyTorch's DistributedDataParallel (Li et al. 2020, "PyTorch
Distributed: Experiences on Accelerating Data Parallel Training") set up from torchrun's environment.

``torchrun --nproc_per_node=N [--nnodes M ...] -m fewshot pretrain ...`` starts one process per device. Each reads
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` from its environment; :func:`setup` joins the process group (NCCL on
GPUs, gloo on CPUs) once per process. Without torchrun (or with one process) nothing here does anything, so the
single-process path has no distributed code in it.

The scheme, the same as DINO's and MAE's reference scripts:

- ``--batch-size`` is the *global* batch; every rank takes ``batch / world`` images of it, and the learning rate
  scales with the global batch (``lr × batch / 256``), so changing the number of processes does not change the
  recipe;
- the sampler is DistributedSampler's: one permutation of the data per epoch (a function of seed and epoch), each
  rank taking its share of every global batch; augmentations are drawn for the whole global batch from
  ``(seed, step)`` and each rank keeps its rows, so ranks never repeat each other's crops and the trajectory does
  not depend on the number of processes (what the 2-process test checks);
- gradients are averaged by DDP's all-reduce during the backward pass; DINO's centre is averaged across ranks;
- only rank 0 writes files, logs and the progress bar; every rank reads the checkpoint to resume (put the run
  folder on a shared filesystem for several nodes), and the checkpoint does not depend on the number of
  processes, so a run started on 8 GPUs resumes on 1.

Leaving in step: a check that can fail on one rank only (a lock only rank 0 takes, a file one node cannot see) runs
inside :func:`together`, so every rank raises the same error at the same point instead of some waiting forever in a
collective; and a command ends with :func:`shutdown` on every rank (a barrier, then the process group destroyed
while the interpreter is fully alive). Tearing gloo down in an atexit hook without that barrier let a rank exit
while its peer was still finishing, and the peer occasionally aborted at exit (SIGABRT, "terminate called without
an active exception") after a good run.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fewshot.errors import FewshotError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    def rows(self, batch: int) -> slice:
        """This rank's rows of a global batch of ``batch`` items."""
        share = batch // self.world
        return slice(self.rank * share, (self.rank + 1) * share)

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process: ``cuda`` becomes ``cuda:LOCAL_RANK`` when several processes share a node."""
        if device.type == "cuda" and self.world > 1:
            return torch.device("cuda", self.local_rank)
        return device


def setup(device: torch.device) -> Dist:
    """Join torchrun's process group (once per process) and return this process's :class:`Dist`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_available():
        raise FewshotError("this PyTorch build has no torch.distributed; run without torchrun")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise FewshotError(
                    f"local rank {local_rank} but only {torch.cuda.device_count()} GPU(s) on this node; "
                    "pass --nproc_per_node at most the number of GPUs"
                )
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
        atexit.register(shutdown, synchronise=False)  # a last resort only: commands call shutdown() themselves
    return Dist(rank, world, local_rank)


def local_world() -> int:
    """Processes on this node (1 outside torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def shutdown(synchronise: bool = True) -> None:
    """Leave the process group, every rank in step: wait for all ranks (``synchronise``), then destroy the group.
    Call it on every rank at the end of the work, or after an error every rank raised together (:func:`together`);
    without ``synchronise`` after an error only this rank saw (the others may be inside another collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if synchronise and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


class SharedError(FewshotError):
    """A :class:`FewshotError` raised on every rank by :func:`together` (so rank 0 alone needs to print it)."""

    every_rank = True


@contextlib.contextmanager
def together() -> Iterator[None]:
    """Run a block whose checks may fail on some ranks only; afterwards, if any rank raised a
    :class:`FewshotError` inside it, every rank raises the first such error (as :class:`SharedError`), so no rank
    is left waiting in a collective for one that gave up. A no-op outside torchrun."""
    if not active():
        yield
        return
    error = ""
    try:
        yield
    except FewshotError as exc:
        error = str(exc) or type(exc).__name__
    errors = gather_objects([error] if error else [])  # every rank takes part, failed or not
    if errors:
        raise SharedError(errors[0])


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """True outside torchrun and on rank 0."""
    return not active() or dist.get_rank() == 0


def mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` across ranks in place (a no-op in a single process); returns it."""
    if active():
        dist.all_reduce(tensor)
        tensor.div_(dist.get_world_size())
    return tensor


def max_(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum across ranks, in place (a no-op in a single process); returns it."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    if active():
        dist.barrier()


def gather_rows(values: torch.Tensor, index: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reassemble rows computed by different ranks: this rank holds ``values[j]`` for item ``index[j]``. Every
    rank gets back all ranks' rows and indices, sorted by index (indices lie in ``[0, total)``)."""
    if active():
        world = dist.get_world_size()
        count = torch.tensor([len(index)], device=values.device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        pad = int(max(int(c) for c in counts)) - len(index)  # all_gather needs equal shapes
        padded = torch.cat([values, values.new_zeros((pad, *values.shape[1:]))])  # (most, ...)
        padded_index = torch.cat([index, index.new_full((pad,), total)])  # padding is marked by index == total
        rows = [torch.empty_like(padded) for _ in range(world)]
        indices = [torch.empty_like(padded_index) for _ in range(world)]
        dist.all_gather(rows, padded)
        dist.all_gather(indices, padded_index)
        values, index = torch.cat(rows), torch.cat(indices)
        real = index < total
        values, index = values[real], index[real]
    order = index.argsort()
    return values[order], index[order]


def gather_objects(items: list[Any]) -> list[Any]:
    """Concatenate a small list (e.g. skipped-file records) across ranks, in rank order."""
    if not active():
        return list(items)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)  # pickled between our own processes only, never read from a file
    return [x for part in parts for x in part]
