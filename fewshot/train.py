"""The self-supervised pretraining loop behind ``fewshot pretrain``, shared by every method in
:mod:`fewshot.methods` (DINO, Caron et al. 2021; MAE, He et al. 2022): AdamW with DINO's schedules (lr linear
warm-up then cosine, cosine weight decay, per-parameter gradient clipping), the method's hooks, a resumable run
folder (:mod:`fewshot.runs`), a progress bar, a guard against a non-finite loss, and data parallelism under
torchrun (:mod:`fewshot.distributed`). A run may start from any backbone spec (``--init``, :mod:`fewshot.inits`);
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
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fewshot import adapt, budget, distributed
from fewshot.config import from_dict, save_config, to_dict
from fewshot.errors import FewshotError
from fewshot.image_store import Batches, ImageStore, open_store
from fewshot.methods import get_method
from fewshot.methods.base import Method, RunPlan
from fewshot.optimisation import build_optimizer, optimise
from fewshot.pretrain_config import PretrainConfig
from fewshot.progress import bar as progress_bar
from fewshot.runs import RunFolder, load_run_checkpoint, restore_rng, save_backbone, save_run_checkpoint
from fewshot.schedules import capped_steps, cosine
from fewshot.start_point import StartPoint

__all__ = ["load_run_config", "pretrain"]

# settings that may change when a run is resumed; anything else must match the run's config.json
RESUMABLE_CHANGES = ("device", "precision", "compile", "monitor", "monitor_test", "monitor_pool", "log_every",
                     "checkpoint_every", "adapt.warn_margin", "data.cache_dir", "data.workers",
                     "data.memory_gb")  # fmt: skip


def pretrain(
    images: Any, cfg: Any, out: Path, progress: bool = True, notes: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Pretrain a backbone on unlabelled ``images`` and write the run folder ``out``; resume it if it exists.

    ``images``: an object with ``__len__`` and ``load(i) -> PIL.Image`` (a :class:`fewshot.sources.ImageSet`),
    a sequence of objects with ``.load()``, a sequence of PIL images, or a ``(N, 3, H, W)`` uint8 tensor.
    ``cfg``: a :class:`PretrainConfig` (or a root config with a ``.pretrain`` section); values it leaves unset are
    resolved here, the same for the Python API and the CLI (:func:`fewshot.inits.resolve_pretrain`: the method's
    optimiser, the init's architecture and normalisation). ``notes``: facts saved in ``config.json`` beside the
    config (e.g. what ``--recipe auto`` chose and why). Returns a summary dict (``backbone`` path, ``steps``, final
    logs, ``monitor``: start/best/end). Raises :class:`FewshotError` for bad input or a diverged run.
    Under ``torchrun`` every process calls this; they train one model together (:mod:`fewshot.distributed`).
    """
    from fewshot.inits import resolve_pretrain

    started = budget.clock()  # a --minutes budget counts from here
    cfg, init = resolve_pretrain(getattr(cfg, "pretrain", cfg))
    device, autocast = _device(cfg)
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
    images: Any,
    cfg: PretrainConfig,
    init: Any,
    run: RunFolder,
    progress: bool,
    device: torch.device,
    autocast: bool,
    ranks: distributed.Dist,
    started: float,
    notes: dict[str, Any],
) -> dict[str, Any]:
    out = run.root
    assert cfg.img_size is not None  # resolved (fewshot.inits.resolve_pretrain), as every optim value
    o: Any = cfg.optim
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
            tqdm.write(plan_budget.line(), file=sys.stderr)
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
            tqdm.write(f"warning: the newest checkpoint is unreadable; resuming from {path.name}", file=sys.stderr)
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
            tqdm.write(f"init weights loaded with {method.init_report}", file=sys.stderr)
        if adapt.describe(guard) and progress:
            tqdm.write(adapt.describe(guard), file=sys.stderr)
    record = init.record() if init is not None else None
    loop = _Loop(cfg, run, method, opt, store, plan, lr, wd, device, autocast, progress, ranks, monitor, guard, record)
    return loop.run(start)


def _plan(cfg: PretrainConfig, n: int) -> RunPlan:
    per_epoch = n // cfg.batch_size
    if per_epoch < 1:
        raise FewshotError(f"{n} readable image(s), fewer than --batch-size {cfg.batch_size}; lower --batch-size")
    return RunPlan(n, cfg.batch_size, per_epoch, cfg.steps or cfg.epochs * per_epoch)


def _build(cfg: PretrainConfig, plan: RunPlan, init: Any) -> Method:
    torch.manual_seed(cfg.seed)  # model initialisation, the same on every rank
    return get_method(cfg.method).build(cfg, plan, init)


def _report_store(store: ImageStore, cached: Any) -> None:
    """Rank 0's lines about the images: unreadable ones skipped (as when listing), and the cache entry used."""
    if store.skipped:
        first = f"{store.skipped[0]['path']}: {store.skipped[0]['reason']}"
        tqdm.write(f"skipped {len(store.skipped)} unreadable image(s), e.g. {first}", file=sys.stderr)
    if cached is not None:
        how = f"decoded in {cached.seconds:.0f} s into" if cached.built else "reused from"
        tqdm.write(f"{len(store)} images at {store.side} px {how} the image cache {cached.path}", file=sys.stderr)


class _Loop:
    def __init__(
        self, cfg, run, method, opt, store, plan, lr, wd, device, autocast, progress, ranks, monitor, guard, init
    ):
        self.cfg, self.folder, self.method, self.opt, self.store, self.plan = cfg, run, method, opt, store, plan
        self.lr, self.wd, self.device, self.autocast, self.progress = lr, wd, device, autocast, progress
        self.ranks: distributed.Dist = ranks
        self.monitor = monitor
        self.params = [p for g in opt.param_groups for p in g["params"]]
        self.writer = _tensorboard(run.tensorboard) if ranks.main else None
        self.guard = adapt.Guard(method, guard)
        self.init: dict[str, Any] | None = init  # what the run records of its --init weights
        self.start_point = StartPoint(run.best, cfg.adapt.warn_margin, self.guard.advice, self._export)
        if ranks.world > 1 and _has_batchnorm(method):
            if device.type != "cuda":
                raise FewshotError(
                    "this backbone has BatchNorm, whose statistics several processes must share (SyncBatchNorm, "
                    "as DINO does), and PyTorch syncs them on GPUs only; train it in one process or on GPUs"
                )
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)  # in place below the root; same parameters
        if cfg.compile:
            method.compile_blocks()
        self.model: torch.nn.Module = method

    def _wrap(self) -> None:
        """Under torchrun: DistributedDataParallel over the parameters that train now (rebuilt when the guard
        freezes or unfreezes the backbone; DDP registers the trainable parameters when it is built)."""
        if self.ranks.world > 1:  # gradients all-reduced (averaged) by DDP during backward
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # the method's own buffers (DINO's centre) are averaged by the method; no broadcast each forward
            self.model = DistributedDataParallel(self.method, device_ids=ids, broadcast_buffers=False)

    def run(self, start: int) -> dict[str, Any]:
        cfg, plan, method = self.cfg, self.plan, self.method
        total, per_epoch, b = plan.total_steps, plan.steps_per_epoch, cfg.batch_size
        gen = torch.Generator(device=self.device)
        epochs = math.ceil(total / per_epoch)
        t_start = time.perf_counter()
        ranks, main = self.ranks, self.ranks.main
        rows = ranks.rows(b)  # this process's rows of every global batch
        feed = Batches(self.store, b, rows, cfg.seed, per_epoch, total, self.device)
        bar = progress_bar(total=total, initial=start, unit="step", desc=cfg.method, disable=not self.progress)
        method.train()
        self.guard.apply(start)  # the head warm-up freezes the backbone before DDP registers what trains
        self._wrap()
        if main and self.monitor is not None:
            self._start(start, bar)
        acc: dict[str, torch.Tensor] = {}
        epoch_acc: dict[str, float] = {}
        n_acc = n_epoch = 0
        bad = torch.full((), -1, dtype=torch.long, device=self.device)  # first step with a non-finite loss
        t_log = t_epoch = time.perf_counter()
        logs: dict[str, float] = {}
        for step in range(start, total):
            epoch = step // per_epoch
            images, sizes = feed(step)  # (B / world, 3, S, S) uint8 canvases, (B / world, 2): this rank's share
            gen.manual_seed(cfg.seed * 1_000_003 + step)  # augmentations are a function of (seed, step): resumable
            # the global RNG (drop path): a function of (seed, step, rank), so resumable and different per rank
            torch.manual_seed(cfg.seed * 1_000_003 + step * 4099 + ranks.rank + 1)
            if self.guard.apply(step):  # the head warm-up ends here
                self._wrap()
            for group in self.opt.param_groups:
                group["lr"] = self.lr[step] * self.guard.lr_factor(group, step)
                group["weight_decay"] = self.wd[step] if group["apply_wd"] else 0.0
            batch = method.augment(images, gen, rows, b, sizes)
            out = optimise(self.model, method, self.opt, self.params, batch, step, cfg.optim.clip_grad, self.autocast)
            bad = torch.where((bad < 0) & ~torch.isfinite(out["loss"].detach()), step, bad)
            for k, value in out.items():
                acc[k] = acc[k] + value.detach().float() if k in acc else value.detach().float()
            n_acc += 1
            bar.update(1)  # disabled on ranks other than 0
            done = step + 1
            end_of_epoch = done % per_epoch == 0 or done == total
            if self.device.type == "cpu" or done % cfg.log_every == 0 or end_of_epoch:
                # A host sync: free on the CPU, so a diverged run stops after the step that diverged; on a GPU only
                # at log steps (the loop has no other sync), and always before a checkpoint could save NaNs.
                self._check_finite(bad, per_epoch)
            if done % cfg.log_every == 0 or end_of_epoch:
                now = time.perf_counter()
                logs = self._mean_logs(acc, n_acc)
                for k, v in logs.items():
                    epoch_acc[k] = epoch_acc.get(k, 0.0) + v * n_acc
                n_epoch += n_acc
                record = {"kind": "step", "step": done, "epoch": epoch, **self._sched(step), **logs}
                record["images_per_s"] = n_acc * b / max(now - t_log, 1e-9)
                if main:
                    self.folder.append_metrics(record)
                    self._tensorboard(record, done)
                bar.set_postfix_str(
                    f"epoch {epoch + 1}/{epochs} loss {logs['loss']:.3f} lr {self.lr[step]:.2e} "
                    f"{record['images_per_s']:.0f} img/s"
                )
                acc, n_acc, t_log = {}, 0, now
            if end_of_epoch:
                now = time.perf_counter()
                ep = {k: v / max(n_epoch, 1) for k, v in epoch_acc.items()}
                ep["images_per_s"] = n_epoch * b / max(now - t_epoch, 1e-9)
                epoch_acc, n_epoch, t_epoch = {}, 0, now
                if main:  # the other ranks wait for it at the next step's all-reduce
                    warnings = method.diagnose({**ep, "step": done})
                    record = {"kind": "epoch", "step": done, "epoch": epoch, **self._sched(step), **ep}
                    if self.monitor is not None:
                        record.update(self.monitor(method.export_backbone(), self.device, self.autocast))
                        bar.write(f"epoch {epoch + 1}: k-NN top-1 {record['knn_top1']:.3f}", file=sys.stderr)
                        warnings += self.start_point.observe(done, record["knn_top1"], self.cfg.monitor)
                    for w in warnings:
                        tqdm.write(f"warning: {w}", file=sys.stderr)
                    record["warnings"] = warnings
                    self.folder.append_metrics(record)
                    self._tensorboard(record, done, "epoch")
                    method.on_epoch_end(epoch, self.folder.root, self.store, done == total)
                    if (epoch + 1) % cfg.checkpoint_every == 0 or done == total:
                        self._save(done)
        feed.close()
        bar.close()
        distributed.barrier()  # every process returns once rank 0 has written the final files
        return self._summary(logs, start, time.perf_counter() - t_start)

    def _start(self, start: int, bar: Any) -> None:
        """Step 0 of a new run: the monitored accuracy of the starting backbone; a resumed run picks it up."""
        if start > 0:
            self.start_point.resume(self.folder.read_metrics(), self.cfg.monitor)
            return
        acc = self.monitor(self.method.export_backbone(), self.device, self.autocast)["knn_top1"]
        self.start_point.observe(0, acc, self.cfg.monitor)
        what = "the --init weights" if self.init else "the random initialisation"
        bar.write(f"step 0 ({what}): k-NN top-1 {acc:.3f}", file=sys.stderr)
        self.folder.append_metrics({"kind": "start", "step": 0, "knn_top1": acc, "monitor": self.cfg.monitor})

    def _mean_logs(self, acc: dict[str, torch.Tensor], n: int) -> dict[str, float]:
        """The logged values averaged over the steps since the last log and over the ranks (one all-reduce)."""
        if not acc:
            return {}
        names = sorted(acc)
        values = distributed.mean_(torch.stack([acc[k] for k in names]) / n)  # (len(names),)
        return dict(zip(names, values.tolist(), strict=True))

    def _sched(self, step: int) -> dict[str, float]:
        return {"lr": float(self.lr[step]), "weight_decay": float(self.wd[step]), **self.method.schedules(step)}

    def _check_finite(self, bad: torch.Tensor, per_epoch: int) -> None:
        step = int(distributed.max_(bad.clone()))  # every rank stops together
        if step >= 0:
            raise FewshotError(
                f"the loss became non-finite at step {step} (epoch {step // per_epoch + 1}); the run stopped and its "
                f"last checkpoint in {self.folder.root} is intact. Try a lower learning rate "
                f"(--set pretrain.optim.lr={self.cfg.optim.lr / 4:g}), fp32 (--set pretrain.precision=fp32), a longer "
                "warm-up, or check the data for broken or constant images"
            )

    def _save(self, done: int) -> None:
        # the backbone first: a run killed between the two resumes from the previous checkpoint and rewrites it,
        # whereas a final checkpoint written first would make the resume skip a backbone that was never saved
        self._export(self.folder.backbone, {"step": done})
        state = {"step": done, "n_images": self.plan.n_images, "total_steps": self.plan.total_steps}
        save_run_checkpoint(self.folder, self.method, self.opt, state)

    def _export(self, path: Path, extra: dict[str, Any]) -> None:
        """The exported backbone with its metadata: architecture, normalisation and eval transform, the init."""
        from fewshot.inits import eval_transform

        m = self.method
        meta = {"method": self.cfg.method, "total_steps": self.plan.total_steps, **extra}
        if self.init is not None:
            meta |= {"init": self.init["spec"], "init_sha256": self.init["sha256"]}
        save_backbone(path, m.export_backbone(), m.architecture, m.model_kwargs, self.cfg.mean, self.cfg.std,
                      self.cfg.img_size, meta, **eval_transform(self.init and self.init["data"]))  # fmt: skip

    def _tensorboard(self, record: dict[str, Any], step: int, group: str = "pretrain") -> None:
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, float):
                    self.writer.add_scalar(f"{group}/{k}", v, step)

    def _summary(self, logs: dict[str, float], start: int, seconds: float) -> dict[str, Any]:
        if self.writer is not None:
            self.writer.close()
        total = self.plan.total_steps
        extra = ", ".join(f"{k} {v:.3g}" for k, v in logs.items() if k != "loss")
        minutes, secs = divmod(round(seconds), 60)
        line = f"{self.cfg.method}: {total} steps ({self.plan.n_images} images) in {minutes}m{secs:02d}s"
        if logs:
            line += f"; last loss {logs['loss']:.4f} ({extra})"
        else:
            line += f"; already finished (resumed at step {start})"
        if self.start_point.summary():
            line += f"; {self.start_point.summary()}"
        if self.ranks.main:
            tqdm.write(f"{line}; backbone → {self.folder.backbone}", file=sys.stderr)
            for w in self.start_point.final_warnings():
                tqdm.write(f"warning: {w}", file=sys.stderr)
        summary = {"backbone": self.folder.backbone, "steps": total, "seconds": seconds, "logs": logs}
        return summary | ({"monitor": self.start_point.as_dict()} if self.monitor is not None else {})


def _monitor(cfg: PretrainConfig, init: Any, progress: bool) -> Any:
    """The k-NN monitor of ``--monitor`` (images decoded once, now, as evaluate decodes them), or None."""
    if cfg.monitor is None:
        if cfg.monitor_test is not None:
            raise FewshotError("pretrain.monitor_test is scored against --monitor's labelled images; pass --monitor")
        return None
    from fewshot.inits import eval_transform
    from fewshot.monitor import KnnMonitor

    assert cfg.img_size is not None and cfg.mean is not None and cfg.std is not None  # resolved
    pool = cfg.monitor_pool or get_method(cfg.method).feature_pool
    monitor = KnnMonitor.from_source(cfg.monitor, cfg.img_size, cfg.mean, cfg.std, pool=pool, progress=progress,
                                     test=cfg.monitor_test, **eval_transform(init and init.data))  # fmt: skip
    if monitor.note:
        tqdm.write(f"--monitor: {monitor.note}", file=sys.stderr)
    return monitor


def _warmup_steps(optim: Any, per_epoch: int, total: int) -> int:
    """Explicit steps, else explicit epochs, else 10 epochs capped at 10% of the run (small data: short runs)."""
    if optim.warmup_steps is not None:
        return min(int(optim.warmup_steps), total)
    if optim.warmup_epochs is not None:
        return min(round(optim.warmup_epochs * per_epoch), total)
    return capped_steps(10, per_epoch, total, 0.1)


def _device(cfg: PretrainConfig) -> tuple[torch.device, bool]:
    """The device and whether to use bf16 autocast (CUDA only: CPUs without bf16 units run it 7–100× slower)."""
    from fewshot.features import pick_device

    device = pick_device(cfg.device)
    if cfg.precision == "bf16" and device.type != "cuda":
        raise FewshotError("bf16 autocast is only used on CUDA (CPUs here run it far slower); use precision fp32")
    return device, device.type == "cuda" and cfg.precision != "fp32"


def _has_batchnorm(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _check_resumable(run: RunFolder, cfg: PretrainConfig) -> None:
    import json

    try:
        saved = from_dict(PretrainConfig, json.loads(run.config.read_text(encoding="utf-8"))["config"])
    except (OSError, ValueError, KeyError, FewshotError):
        raise FewshotError(f"{run.root} has a checkpoint but no readable config.json; choose another --out") from None
    old, new = _flat(to_dict(saved)), _flat(to_dict(cfg))
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES]
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)} → {new.get(k)}" for k in diff[:4])
        raise FewshotError(
            f"run folder {run.root} was started with other settings ({shown}); resume it with the same settings, "
            f"or pick a new --out (and start from its weights with --init {run.root})"
        )


def load_run_config(out: Path) -> PretrainConfig:
    """The PretrainConfig a run folder was started with (for ``fewshot pretrain --resume RUN``)."""
    import json

    path = RunFolder(Path(out)).config
    if not path.is_file():
        raise FewshotError(f"{out} is not a pretraining run folder (no config.json); pass the --out of a run")
    return from_dict(PretrainConfig, json.loads(path.read_text(encoding="utf-8"))["config"])


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _tensorboard(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))
