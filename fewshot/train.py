"""``fewshot pretrain``: self-supervised pretraining of a timm backbone with any method in :mod:`fewshot.methods`
(DINO, Caron et al. 2021; MAE, He et al. 2022). This module sets a run up: it resolves the config, checks every
setting, opens the images, plans the run's length (steps, epochs or a ``--minutes`` budget, :mod:`fewshot.budget`),
builds the model, AdamW and DINO's schedules (lr linear warm-up then cosine, cosine weight decay), resumes a run
folder (:mod:`fewshot.runs`) and hands over to the step loop (:mod:`fewshot.loop`), under torchrun in every process
(:mod:`fewshot.distributed`). A run may start from any backbone spec (``--init``, :mod:`fewshot.inits`);
the guard of :mod:`fewshot.adapt` then keeps it from destroying those weights, and with ``--monitor`` the k-NN
accuracy is accounted from the start (:mod:`fewshot.start_point`).

Every setting is checked before any image is read (the method and its model are built on the listed number of
images first). Images are decoded once, whole, into canvases of the on-disk cache (:mod:`fewshot.image_cache`),
read from memory, the memory map or the GPU (:mod:`fewshot.image_store`), and each step augments a whole batch
with tensor ops on the training device, cropping inside each image's own box.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fewshot import adapt, budget, distributed
from fewshot.config import Config, from_dict, save_config, to_dict
from fewshot.devices import training_device
from fewshot.errors import FewshotError
from fewshot.image_store import ImageStore, open_store
from fewshot.loop import PretrainResult, TrainingLoop
from fewshot.methods import get_method
from fewshot.methods.base import Method, RunPlan
from fewshot.optimisation import build_optimizer
from fewshot.pretrain_config import PretrainConfig
from fewshot.runs import RunFolder, flat_keys, load_run_checkpoint, load_run_config, restore_rng
from fewshot.schedules import capped_steps, cosine

if TYPE_CHECKING:
    from fewshot.image_cache import Cached
    from fewshot.inits import InitWeights
    from fewshot.monitor import KnnMonitor
    from fewshot.pretrain_config import OptimConfig
    from fewshot.sources import Images

__all__ = ["PretrainResult", "load_run_config", "pretrain"]  # PretrainResult and load_run_config: defined in loop, runs

log = logging.getLogger(__name__)

# settings that may change when a run is resumed; anything else must match the run's config.json
RESUMABLE_CHANGES = ("device", "precision", "compile", "monitor", "monitor_test", "monitor_pool", "log_every",
                     "checkpoint_every", "adapt.warn_margin", "data.cache_dir", "data.workers",
                     "data.memory_gb")  # fmt: skip


def pretrain(
    images: Images | str | Path,
    out: str | Path,
    cfg: PretrainConfig | Config | None = None,
    *,
    progress: bool = True,
    notes: dict[str, Any] | None = None,
) -> PretrainResult:
    """Pretrain a backbone on unlabelled ``images`` and write the run folder ``out``; resume it if it exists.

    Parameters
    ----------
    images : a data source as ``fewshot pretrain`` takes it (a folder, a CSV, ``imagefolder:``/``hf:`` names:
        :func:`fewshot.sources.open_source`), an object with ``__len__`` and ``load(i) -> PIL.Image`` (a
        :class:`fewshot.sources.ImageSet`), a sequence of objects with ``.load()``, a sequence of PIL images, or a
        ``(N, 3, H, W)`` uint8 tensor.
    out : the run folder; a backbone spec for every other command once written.
    cfg : a :class:`PretrainConfig` (or a root :class:`Config`, whose ``.pretrain`` is used); None: the defaults.
        Values it leaves unset are resolved here, the same for the Python API and the CLI
        (:func:`fewshot.inits.resolve_pretrain`: the method's optimiser, the init's architecture and normalisation).
    progress : show a progress bar (rank 0 only).
    notes : facts saved in ``config.json`` beside the config (e.g. what ``--recipe auto`` chose and why).

    Returns
    -------
    PretrainResult : the backbone's path, steps, final logs, the monitor's start/best/end.

    Raises :class:`FewshotError` for bad input or a diverged run. Under ``torchrun`` every process calls this; they
    train one model together (:mod:`fewshot.distributed`).
    """
    from fewshot.inits import resolve_pretrain
    from fewshot.sources import open_source

    started = budget.clock()  # a --minutes budget counts from here
    if isinstance(images, (str, Path)):
        images = open_source(images)
    cfg, init = resolve_pretrain(cfg.pretrain if isinstance(cfg, Config) else cfg or PretrainConfig())
    device, autocast = training_device(cfg.device, cfg.precision)
    ranks = distributed.setup(device)
    device = ranks.device(device)  # under torchrun on GPUs: cuda:LOCAL_RANK
    run = RunFolder(Path(out))
    with contextlib.ExitStack() as held:
        with distributed.together():  # a folder in use fails rank 0 only: every rank stops
            if ranks.main:  # rank 0 alone creates, locks and writes the run folder
                run.create()
                held.enter_context(run.lock())  # one writer per run folder, for the whole run
        return _pretrain(images, cfg, init, run, progress and ranks.main, device, autocast, ranks, started, notes or {})


def _pretrain(
    images: Images,
    cfg: PretrainConfig,
    init: InitWeights | None,
    run: RunFolder,
    progress: bool,
    device: torch.device,
    autocast: bool,
    ranks: distributed.Dist,
    started: float,
    notes: dict[str, Any],
) -> PretrainResult:
    out = run.root
    o = cfg.optim  # resolved (fewshot.inits.resolve_pretrain): the method's values where the config left None
    assert o.lr is not None and o.min_lr is not None and o.weight_decay is not None and o.weight_decay_end is not None
    with distributed.together():  # every setting is checked before any image is read
        resume = run.has_checkpoint()
        if resume:
            _check_resumable(run, cfg)
        if cfg.batch_size % ranks.world:
            raise FewshotError(
                f"--batch-size {cfg.batch_size} is the global batch and must divide among {ranks.world} processes; "
                f"use a multiple of {ranks.world}"
            )
        if cfg.minutes is not None:
            budget.check_minutes(cfg.minutes, cfg.steps)
        # the method and its model (method name, architecture, sizes, --init) on the listed number of images; rebuilt
        # below only if unreadable images or a --minutes budget change the plan
        plan = _plan(cfg, len(images))
        method: Method = _build(cfg, plan, init)
        # before training: a bad --monitor fails at once
        monitor = _monitor(cfg, init, progress) if ranks.main else None
    store, cached = open_store(images, cfg, ranks, progress)
    if ranks.main:
        _report_store(store, cached)
    store = store.place(device, cfg.data.memory_gb)
    n = len(store)
    built = plan
    if n != plan.n_images:
        plan = _plan(cfg, n)
    plan_budget = None
    if cfg.minutes is not None:  # --minutes: the length comes from a timed probe of this run's own step
        per = plan.steps_per_epoch
        plan_budget = budget.measure(cfg, run, resume, store, per, device, autocast, ranks, monitor, started, init)
        plan = dataclasses.replace(plan, total_steps=plan_budget.total_steps)
        if ranks.main and progress:
            log.info(plan_budget.line())
    if plan != built:
        del method  # one model in memory at a time
        method = _build(cfg, plan, init)
    method.to(device)
    per_epoch, total = plan.steps_per_epoch, plan.total_steps
    warmup = _warmup_steps(cfg.optim, per_epoch, total)
    guard = adapt.resolve(cfg.adapt, init is not None, total, warmup)
    opt = build_optimizer(method, cfg, adapt.lr_scales(method, guard))
    lr = cosine(o.lr * cfg.batch_size / 256, o.min_lr, total, warmup)  # the global batch
    wd = cosine(o.weight_decay, o.weight_decay_end, total)
    resolved = {"lr_peak": float(lr.max()), "warmup_steps": int(warmup), **vars(guard), **method.resolved()}
    start = 0
    if resume:
        model_state, opt_state, rng, state, path = load_run_checkpoint(run)
        newest = run.checkpoints()
        if newest and path != newest[0][1] and ranks.main:
            log.warning(f"the newest checkpoint is unreadable; resuming from {path.name}")
        if state.get("n_images") != n:
            raise FewshotError(
                f"run {out} was trained on {state.get('n_images')} images, now {n}; pass the same data to resume it"
            )
        method.load_state_dict(model_state)
        opt.load_state_dict(opt_state)
        restore_rng(rng)
        start = int(state["step"])
        if ranks.main:
            run.truncate_metrics(start)
    elif ranks.main:
        run.metrics.unlink(missing_ok=True)
    if ranks.main:
        images_info = {"stored_side": store.side, "where": store.where, "cache": str(store.file or "")}
        save_config(
            cfg, run.config, method=cfg.method, n_images=n, skipped=len(store.skipped), plan=vars(plan),
            resolved=resolved, processes=ranks.world, images=images_info,
            init=init.record() if init is not None else None,
            **({"budget": dataclasses.asdict(plan_budget)} if plan_budget else {}), **notes,
        )  # fmt: skip
        if method.init_report:
            log.info(f"init weights loaded with {method.init_report}")
        if adapt.describe(guard) and progress:
            log.info(adapt.describe(guard))
    record = init.record() if init is not None else None
    loop = TrainingLoop(
        cfg=cfg,
        run=run,
        method=method,
        opt=opt,
        store=store,
        plan=plan,
        lr=lr,
        wd=wd,
        device=device,
        autocast=autocast,
        progress=progress,
        ranks=ranks,
        monitor=monitor,
        guard=guard,
        init=record,
    )
    return loop.run(start)


def _plan(cfg: PretrainConfig, n: int) -> RunPlan:
    per_epoch = n // cfg.batch_size
    if per_epoch < 1:
        raise FewshotError(f"{n} readable image(s), fewer than --batch-size {cfg.batch_size}; lower --batch-size")
    return RunPlan(n, cfg.batch_size, per_epoch, cfg.steps or cfg.epochs * per_epoch)


def _build(cfg: PretrainConfig, plan: RunPlan, init: InitWeights | None) -> Method:
    torch.manual_seed(cfg.seed)  # model initialisation, the same on every rank
    return get_method(cfg.method).build(cfg, plan, init)


def _report_store(store: ImageStore, cached: Cached | None) -> None:
    """Rank 0's lines about the images: unreadable ones skipped (as when listing), and the cache entry used."""
    if store.skipped:
        first = f"{store.skipped[0]['path']}: {store.skipped[0]['reason']}"
        log.info(f"skipped {len(store.skipped)} unreadable image(s), e.g. {first}")
    if cached is not None:
        how = f"decoded in {cached.seconds:.0f} s into" if cached.built else "reused from"
        log.info(f"{len(store)} images at {store.side} px {how} the image cache {cached.path}")


def _monitor(cfg: PretrainConfig, init: InitWeights | None, progress: bool) -> KnnMonitor | None:
    """The k-NN monitor of ``--monitor`` (images decoded once, now, as evaluate decodes them), or None."""
    if cfg.monitor is None:
        if cfg.monitor_test is not None:
            raise FewshotError("pretrain.monitor_test is scored against --monitor's labelled images; pass --monitor")
        return None
    from fewshot.inits import eval_transform
    from fewshot.monitor import KnnMonitor

    _, img_size, mean, std = cfg.resolved_input()
    pool = cfg.monitor_pool or get_method(cfg.method).feature_pool
    transform = eval_transform(init.data if init is not None else None)  # the init's, so step 0 reads it as evaluate
    monitor = KnnMonitor.from_source(cfg.monitor, img_size, mean, std, pool=pool, progress=progress,
                                     test=cfg.monitor_test, **transform)  # fmt: skip
    if monitor.note:
        log.info(f"--monitor: {monitor.note}")
    return monitor


def _warmup_steps(optim: OptimConfig, per_epoch: int, total: int) -> int:
    """Explicit steps, else explicit epochs, else 10 epochs capped at 10% of the run (small data: short runs)."""
    if optim.warmup_steps is not None:
        return min(int(optim.warmup_steps), total)
    if optim.warmup_epochs is not None:
        return min(round(optim.warmup_epochs * per_epoch), total)
    return capped_steps(10, per_epoch, total, 0.1)


def _check_resumable(run: RunFolder, cfg: PretrainConfig) -> None:
    try:
        saved = from_dict(PretrainConfig, json.loads(run.config.read_text(encoding="utf-8"))["config"])
    except (OSError, ValueError, KeyError, FewshotError):
        raise FewshotError(f"{run.root} has a checkpoint but no readable config.json; choose another --out") from None
    old, new = flat_keys(to_dict(saved)), flat_keys(to_dict(cfg))
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES]
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)} → {new.get(k)}" for k in diff[:4])
        raise FewshotError(
            f"run folder {run.root} was started with other settings ({shown}); resume it with the same settings, "
            f"or pick a new --out (and start from its weights with --init {run.root})"
        )
