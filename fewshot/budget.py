"""Time budgets for ``fewshot pretrain --minutes M``: size the run from a timed probe of its own step.

A run's schedules are functions of its length (the cosine learning rate and weight decay, the warm-ups, DINO's
teacher momentum and temperature; Caron et al. 2021, He et al. 2022), so a time budget cannot simply stop a run
when the clock runs out: the learning rate would still be high and the warm-ups mis-sized. Instead the run times a
few real optimiser steps of its own model, data, batch and device (``PROBE_WARMUP`` untimed, then ``PROBE_STEPS``
timed; the probe model is discarded and the run starts from the same seeded initialisation), and fixes the number
of steps that fits the minutes left, keeping ``MARGIN`` for what happens between steps (checkpoints, logs,
reconstructions). Every schedule is then built for that many steps, exactly as for ``--steps``; the plan is written
to the run folder's ``config.json`` under ``budget`` and a resumed run keeps it.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fewshot.errors import FewshotError

if TYPE_CHECKING:
    from fewshot.distributed import Dist
    from fewshot.image_store import ImageStore
    from fewshot.inits import InitWeights
    from fewshot.methods.base import Method
    from fewshot.monitor import KnnMonitor
    from fewshot.pretrain_config import PretrainConfig
    from fewshot.runs import RunFolder

PROBE_WARMUP = 3  # untimed steps first: allocator, kernel selection, caches
PROBE_STEPS = 10  # timed steps; the plan uses their median (robust to a stall on a shared machine)
MARGIN = 0.05  # share of the time left for the work between steps (checkpoints, logs, epoch ends)

# The clock of the probe and of the budget; a module attribute so tests can replace it with a fake one.
clock: Callable[[], float] = time.perf_counter


@dataclass(frozen=True)
class BudgetPlan:
    """The length of a ``--minutes`` run and the measurements behind it (saved in ``config.json``)."""

    minutes: float  # the budget, for the whole command from the start of pretraining
    startup_seconds: float  # spent before the first step: decoding, set-up and the probe itself
    probe_steps: int  # timed probe steps (after PROBE_WARMUP untimed ones)
    seconds_per_step: float  # median of the timed probe steps
    epoch_end_seconds: float  # one epoch end as measured: a checkpoint (÷ checkpoint_every) and the k-NN monitor
    margin: float  # share of the remaining time kept for the work between steps
    total_steps: int  # the run's length: every schedule ends at this step
    epochs: float  # total_steps over steps per epoch
    expected_minutes: float  # start-up + steps + epoch ends, in minutes

    def line(self) -> str:
        """One line for the progress output."""
        return (
            f"budget {self.minutes:g} min: {self.seconds_per_step:.3g} s/step (median of {self.probe_steps} timed "
            f"steps) → {self.total_steps} steps ({self.epochs:.1f} epochs), ≈{self.expected_minutes:.1f} min "
            f"including {self.startup_seconds:.0f} s of start-up"
        )


def check_minutes(minutes: float | None, steps: int | None = None) -> float:
    """``minutes`` if it is a usable budget (and ``--steps`` is not set too), else a one-line :class:`FewshotError`."""
    if minutes is None or not minutes > 0 or not math.isfinite(minutes):
        raise FewshotError(f"--minutes must be a positive number of minutes, got {minutes}")
    if steps is not None:
        raise FewshotError(f"--minutes {minutes:g} and --steps {steps} both set the run's length; give one")
    return minutes


def time_steps(step: Callable[[int], None], sync: Callable[[], None] = lambda: None) -> list[float]:
    """Run ``step(i)`` for ``PROBE_WARMUP`` untimed then ``PROBE_STEPS`` timed steps; seconds of each timed one.

    ``sync`` waits for the device (``torch.cuda.synchronize`` on a GPU, whose kernels run asynchronously).
    """
    times = []
    for i in range(PROBE_WARMUP + PROBE_STEPS):
        t0 = clock()
        step(i)
        sync()
        if i >= PROBE_WARMUP:
            times.append(clock() - t0)
    return times


def plan_steps(
    minutes: float,
    started: float,
    step_seconds: list[float],
    steps_per_epoch: int,
    epoch_seconds: float = 0.0,
    margin: float = MARGIN,
) -> BudgetPlan:
    """The number of steps that fit ``minutes`` counted from ``started`` (a :data:`clock` reading), given the
    probe's ``step_seconds`` and the measured cost of an epoch end (checkpoint, monitor); raises
    :class:`FewshotError` when not even one step fits."""
    check_minutes(minutes)
    per_step = max(statistics.median(step_seconds), 1e-9)
    startup = clock() - started
    left = minutes * 60 - startup
    # an epoch end every steps_per_epoch steps: spread its cost over the epoch's steps
    total = math.floor(left * (1 - margin) / (per_step + epoch_seconds / steps_per_epoch))
    if total < 1:
        raise FewshotError(
            f"--minutes {minutes:g} leaves no time to train: start-up took {startup:.0f} s and one step takes "
            f"{per_step:.2f} s; give more minutes, or a smaller model, batch or --img-size"
        )
    return BudgetPlan(
        minutes=minutes,
        startup_seconds=round(startup, 3),
        probe_steps=len(step_seconds),
        seconds_per_step=per_step,
        epoch_end_seconds=epoch_seconds,
        margin=margin,
        total_steps=total,
        epochs=round(total / steps_per_epoch, 2),
        expected_minutes=round((startup + total * per_step + total / steps_per_epoch * epoch_seconds) / 60, 3),
    )


def saved_plan(config_json: Path) -> BudgetPlan | None:
    """The plan a run folder was started with (a resumed ``--minutes`` run keeps its length), or None."""
    try:
        saved = json.loads(Path(config_json).read_text(encoding="utf-8")).get("budget")
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict):
        return None
    try:
        return BudgetPlan(**saved)
    except TypeError:
        return None


# ---------------------------------------------------------------------------------------------- the probe


def measure(
    cfg: PretrainConfig,
    run: RunFolder,
    resume: bool,
    store: ImageStore,
    per_epoch: int,
    device: torch.device,
    autocast: bool,
    ranks: Dist,
    monitor: KnnMonitor | None,
    started: float,
    init: InitWeights | None = None,
) -> BudgetPlan:
    """The length of a ``--minutes`` run: the saved plan when resuming, else timed on a throwaway copy of the
    model: its optimiser steps on this data and device, and one epoch end (a checkpoint, the k-NN monitor)."""
    import tempfile

    from fewshot import distributed
    from fewshot.runs import RunFolder, save_backbone, save_run_checkpoint

    minutes = check_minutes(cfg.minutes, cfg.steps)
    if resume:
        saved = saved_plan(run.config)
        if saved is None:
            raise FewshotError(f"{run.root} has a checkpoint but no --minutes plan in config.json; use another --out")
        return saved
    method, opt, step = probe_step(cfg, store, per_epoch, device, autocast, ranks.rows(cfg.batch_size), init)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = time_steps(step, sync)
    epoch_end = 0.0
    if ranks.main:  # the other ranks wait for rank 0's epoch ends
        t0 = clock()
        with tempfile.TemporaryDirectory(prefix=".probe-", dir=run.root) as tmp:
            probe_run = RunFolder(Path(tmp))
            _, img_size, mean, std = cfg.resolved_input()
            save_backbone(probe_run.backbone, method.export_backbone(), method.architecture, method.model_kwargs,
                          mean, std, img_size, {})  # fmt: skip
            save_run_checkpoint(probe_run, method, opt, {"step": 0})
        epoch_end = (clock() - t0) / cfg.checkpoint_every
        if monitor is not None:
            t0 = clock()
            monitor(method.export_backbone(), device, autocast)
            epoch_end += clock() - t0
    # the slowest process sets the pace (the all-reduce of gradients itself is not timed)
    timed = distributed.max_(torch.tensor([*seconds, epoch_end], dtype=torch.float64, device=device)).tolist()
    return plan_steps(minutes, started, timed[:-1], per_epoch, epoch_seconds=timed[-1])


def probe_step(
    cfg: PretrainConfig,
    store: ImageStore,
    per_epoch: int,
    device: torch.device,
    autocast: bool = False,
    rows: slice = slice(None),
    init: InitWeights | None = None,
) -> tuple[Method, torch.optim.Optimizer, Callable[[int], None]]:
    """A throwaway copy of the run's model and optimiser, and ``step(i)``: one optimiser step on a random batch of
    ``store`` (a :class:`fewshot.image_store.ImageStore`), augmentation included (what ``--minutes`` times;
    benchmarks use it too). Every parameter trains, as after an adaptation's head warm-up: the slower step.

    The model is built from ``cfg.seed``, as the run's is, so the run after a probe starts from the same weights.
    """
    from fewshot.methods import get_method
    from fewshot.methods.base import RunPlan
    from fewshot.optimisation import build_optimizer, optimise

    b = cfg.batch_size
    torch.manual_seed(cfg.seed)
    method = get_method(cfg.method).build(cfg, RunPlan(len(store), b, per_epoch, per_epoch), init)
    method.to(device).train()
    opt = build_optimizer(method, cfg)
    params = [p for g in opt.param_groups for p in g["params"]]
    gen = torch.Generator(device=device)
    order = torch.Generator().manual_seed(cfg.seed)

    def step(i: int) -> None:
        ids = torch.randint(len(store), (b,), generator=order)[rows]
        images, sizes = store.gather(ids)  # (B / world, 3, S, S) uint8 canvases, (B / world, 2)
        gen.manual_seed(cfg.seed * 1_000_003 + i)
        batch = method.augment(images.to(device, non_blocking=True), gen, rows, b, sizes.to(device))
        optimise(method, method, opt, params, batch, i, cfg.optim.clip_grad or 0.0, autocast)

    return method, opt, step
