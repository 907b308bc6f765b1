"""The self-supervised pretraining loop behind ``fewshot pretrain``, shared by every method in
:mod:`fewshot.methods` (DINO, Caron et al. 2021; MAE, He et al. 2022): AdamW with DINO's schedules (lr linear
warm-up then cosine, cosine weight decay, per-parameter gradient clipping), the method's hooks, a resumable run
folder (:mod:`fewshot.runs`), a progress bar, a guard against a non-finite loss, and data parallelism under
torchrun (:mod:`fewshot.distributed`).

Images are decoded once into memory (:mod:`fewshot.store`) as a ``(N, 3, S, S)`` uint8 tensor and each step
augments a whole batch with tensor ops on the training device.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fewshot import budget, distributed
from fewshot.config import from_dict, save_config, to_dict
from fewshot.errors import FewshotError
from fewshot.methods import get_method
from fewshot.methods.base import Method, RunPlan
from fewshot.pretrain_config import PretrainConfig
from fewshot.runs import RunFolder, load_run_checkpoint, restore_rng, save_backbone, save_run_checkpoint
from fewshot.schedules import capped_steps, cosine
from fewshot.store import check_memory, decode_images, place

__all__ = ["decode_images", "load_run_config", "pretrain"]  # decode_images: where users found it before

# settings that may change when a run is resumed; anything else must match the run's config.json
RESUMABLE_CHANGES = ("device", "precision", "compile", "monitor", "log_every", "checkpoint_every")


def pretrain(
    images: Any, cfg: Any, out: Path, progress: bool = True, notes: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Pretrain a backbone on unlabelled ``images`` and write the run folder ``out``; resume it if it exists.

    ``images``: an object with ``__len__`` and ``load(i) -> PIL.Image`` (a :class:`fewshot.sources.ImageSet`),
    a sequence of objects with ``.load()``, a sequence of PIL images, or a ``(N, 3, H, W)`` uint8 tensor.
    ``cfg``: a :class:`PretrainConfig` (or a root config with a ``.pretrain`` section). Returns a summary dict
    (``backbone`` path, ``steps``, final logs). ``notes``: facts saved in ``config.json`` beside the config (e.g.
    what ``--recipe auto`` chose and why). Raises :class:`FewshotError` for bad input or a diverged run.
    Under ``torchrun`` every process calls this; they train one model together (:mod:`fewshot.distributed`).
    """
    started = budget.clock()  # a --minutes budget counts from here
    cfg = getattr(cfg, "pretrain", cfg)
    device, autocast = _device(cfg)
    ranks = distributed.setup(device)
    device = ranks.device(device)  # under torchrun on GPUs: cuda:LOCAL_RANK
    run = RunFolder(Path(out))
    if not ranks.main:  # rank 0 alone creates, locks and writes the run folder
        return _pretrain(images, cfg, run, False, device, autocast, ranks, started, notes or {})
    run.create()
    with run.lock():  # one writer per run folder, for the whole run
        return _pretrain(images, cfg, run, progress, device, autocast, ranks, started, notes or {})


def _pretrain(
    images: Any,
    cfg: PretrainConfig,
    run: RunFolder,
    progress: bool,
    device: torch.device,
    autocast: bool,
    ranks: distributed.Dist,
    started: float,
    notes: dict[str, Any],
) -> dict[str, Any]:
    out = run.root
    resume = run.has_checkpoint()
    if resume:
        _check_resumable(run, cfg)
    if cfg.batch_size % ranks.world:
        raise FewshotError(
            f"--batch-size {cfg.batch_size} is the global batch and must divide among {ranks.world} processes; "
            f"use a multiple of {ranks.world}"
        )
    if cfg.minutes is not None:
        budget.check_minutes(cfg.minutes, cfg.steps)  # before decoding: a bad budget fails at once
    monitor = _monitor(cfg, progress) if ranks.main else None  # before training: a bad --monitor fails at once
    store_size = cfg.store_size or math.ceil(cfg.img_size * 8 / 7)
    check_memory(len(images), store_size)
    store, skipped = decode_images(images, store_size, progress)
    if skipped and ranks.main:
        first = f"{skipped[0]['path']}: {skipped[0]['reason']}"
        tqdm.write(f"skipped {len(skipped)} unreadable image(s), e.g. {first}", file=sys.stderr)
    store = place(store, device)
    n = store.shape[0]
    per_epoch = n // cfg.batch_size
    if per_epoch < 1:
        raise FewshotError(f"{n} readable image(s), fewer than --batch-size {cfg.batch_size}; lower --batch-size")
    total = cfg.steps or cfg.epochs * per_epoch
    plan_budget = None
    if cfg.minutes is not None:  # --minutes: the length comes from a timed probe of this run's own step
        plan_budget = _budget_plan(cfg, run, resume, store, per_epoch, device, autocast, ranks, monitor, started)
        total = plan_budget.total_steps
        if ranks.main and progress:
            tqdm.write(plan_budget.line(), file=sys.stderr)
    plan = RunPlan(n, cfg.batch_size, per_epoch, total)
    torch.manual_seed(cfg.seed)  # model initialisation, the same on every rank
    method: Method = get_method(cfg.method).build(cfg, plan)
    method.to(device)
    opt = _optimizer(method, cfg, device)
    warmup = _warmup_steps(cfg.optim, per_epoch, total)
    lr = cosine(cfg.optim.lr * cfg.batch_size / 256, cfg.optim.min_lr, total, warmup)  # the global batch
    wd = cosine(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total)
    resolved = {"lr_peak": float(lr.max()), "warmup_steps": int(warmup), **method.resolved()}
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
        save_config(
            cfg, run.config, method=cfg.method, n_images=n, skipped=len(skipped), plan=vars(plan), resolved=resolved,
            processes=ranks.world, **({"budget": dataclasses.asdict(plan_budget)} if plan_budget else {}), **notes,
        )  # fmt: skip
        if getattr(method, "init_report", ""):
            tqdm.write(f"init weights loaded with {method.init_report}", file=sys.stderr)
    loop = _Loop(cfg, run, method, opt, store, plan, lr, wd, device, autocast, progress, ranks, monitor)
    return loop.run(start)


class _Loop:
    def __init__(self, cfg, run, method, opt, store, plan, lr, wd, device, autocast, progress, ranks, monitor):
        self.cfg, self.folder, self.method, self.opt, self.store, self.plan = cfg, run, method, opt, store, plan
        self.lr, self.wd, self.device, self.autocast, self.progress = lr, wd, device, autocast, progress
        self.ranks: distributed.Dist = ranks
        self.monitor = monitor
        self.params = [p for g in opt.param_groups for p in g["params"]]
        self.writer = _tensorboard(run.tensorboard) if ranks.main else None
        if cfg.compile:
            method.compile_blocks()
        self.model: torch.nn.Module = method
        if ranks.world > 1:  # gradients all-reduced (averaged) by DDP during backward
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            # the method's own buffers (DINO's centre) are averaged by the method; no broadcast each forward
            self.model = DistributedDataParallel(method, device_ids=ids, broadcast_buffers=False)

    def run(self, start: int) -> dict[str, Any]:
        cfg, plan, method = self.cfg, self.plan, self.method
        total, per_epoch, b = plan.total_steps, plan.steps_per_epoch, cfg.batch_size
        gen = torch.Generator(device=self.device)
        epochs = math.ceil(total / per_epoch)
        t_start = time.perf_counter()
        ranks, main = self.ranks, self.ranks.main
        rows = ranks.rows(b)  # this process's rows of every global batch
        bar = tqdm(total=total, initial=start, unit="step", desc=cfg.method, disable=not self.progress, file=sys.stderr)
        method.train()
        acc: dict[str, torch.Tensor] = {}
        epoch_acc: dict[str, float] = {}
        n_acc = n_epoch = 0
        bad = torch.full((), -1, dtype=torch.long, device=self.device)  # first step with a non-finite loss
        t_log = t_epoch = time.perf_counter()
        logs: dict[str, float] = {}
        perm = torch.empty(0, dtype=torch.long)
        for step in range(start, total):
            epoch, i = divmod(step, per_epoch)
            if i == 0 or step == start:
                order = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # a function of the epoch: resumable
                perm = torch.randperm(plan.n_images, generator=order).to(self.store.device)
            batch_ids = perm[i * b : (i + 1) * b][rows]  # (B / world,) this rank's share of the global batch
            images = self.store[batch_ids].to(self.device, non_blocking=True)  # (B / world, 3, S, S) uint8
            gen.manual_seed(cfg.seed * 1_000_003 + step)  # augmentations are a function of (seed, step): resumable
            # the global RNG (drop path): a function of (seed, step, rank), so resumable and different per rank
            torch.manual_seed(cfg.seed * 1_000_003 + step * 4099 + ranks.rank + 1)
            for group in self.opt.param_groups:
                group["lr"] = self.lr[step]
                group["weight_decay"] = self.wd[step] if group["apply_wd"] else 0.0
            batch = method.augment(images, gen, rows, b)
            out = _optimise(self.model, method, self.opt, self.params, batch, step, cfg.optim.clip_grad, self.autocast)
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
                    for w in warnings:
                        tqdm.write(f"warning: {w}", file=sys.stderr)
                    record = {"kind": "epoch", "step": done, "epoch": epoch, **self._sched(step), **ep}
                    record["warnings"] = warnings
                    if self.monitor is not None:
                        record.update(self.monitor(method.export_backbone(), self.device, self.autocast))
                        bar.write(f"epoch {epoch + 1}: k-NN top-1 {record['knn_top1']:.3f}", file=sys.stderr)
                    self.folder.append_metrics(record)
                    self._tensorboard(record, done, "epoch")
                    method.on_epoch_end(epoch, self.folder.root, self.store, done == total)
                    if (epoch + 1) % cfg.checkpoint_every == 0 or done == total:
                        self._save(done)
        bar.close()
        distributed.barrier()  # every process returns once rank 0 has written the final files
        return self._summary(logs, start, time.perf_counter() - t_start)

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
        m = self.method
        extra = {"method": self.cfg.method, "step": done, "total_steps": self.plan.total_steps}
        # the backbone first: a run killed between the two resumes from the previous checkpoint and rewrites it,
        # whereas a final checkpoint written first would make the resume skip a backbone that was never saved
        save_backbone(self.folder.backbone, m.export_backbone(), m.architecture, m.model_kwargs, self.cfg.mean,
                      self.cfg.std, self.cfg.img_size, extra)  # fmt: skip
        state = {"step": done, "n_images": self.plan.n_images, "total_steps": self.plan.total_steps}
        save_run_checkpoint(self.folder, m, self.opt, state)

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
        if self.ranks.main:
            tqdm.write(f"{line}; backbone → {self.folder.backbone}", file=sys.stderr)
        return {"backbone": self.folder.backbone, "steps": total, "seconds": seconds, "logs": logs}


def _optimise(
    model: torch.nn.Module,
    method: Method,
    opt: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    batch: dict[str, torch.Tensor],
    step: int,
    clip_grad: float,
    autocast: bool,
) -> dict[str, torch.Tensor]:
    """One optimiser step on an augmented batch (``model`` is ``method`` or its DDP wrapper); the method's logs."""
    device_type = params[0].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        out = model(batch, step)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    if clip_grad > 0:
        _clip_per_parameter(params, clip_grad)
    method.before_optimizer_step(step)
    opt.step()
    method.after_step(step)
    return out


def _budget_plan(
    cfg: PretrainConfig,
    run: RunFolder,
    resume: bool,
    store: torch.Tensor,
    per_epoch: int,
    device: torch.device,
    autocast: bool,
    ranks: distributed.Dist,
    monitor: Any,
    started: float,
) -> budget.BudgetPlan:
    """The length of a ``--minutes`` run: the saved plan when resuming, else timed on a throwaway copy of the
    model (:mod:`fewshot.budget`): its optimiser steps on this data and device, and one epoch end."""
    import tempfile

    minutes = budget.check_minutes(cfg.minutes, cfg.steps)
    if resume:
        saved = budget.saved_plan(run.config)
        if saved is None:
            raise FewshotError(f"{run.root} has a checkpoint but no --minutes plan in config.json; use another --out")
        return saved
    method, opt, step = probe_step(cfg, store, per_epoch, device, autocast, ranks.rows(cfg.batch_size))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = budget.time_steps(step, sync)
    epoch_end = 0.0
    if ranks.main:  # the other ranks wait for rank 0's epoch ends
        t0 = budget.clock()
        with tempfile.TemporaryDirectory(prefix=".probe-", dir=run.root) as tmp:
            probe_run = RunFolder(Path(tmp))
            save_backbone(probe_run.backbone, method.export_backbone(), method.architecture, method.model_kwargs,
                          cfg.mean, cfg.std, cfg.img_size, {})  # fmt: skip
            save_run_checkpoint(probe_run, method, opt, {"step": 0})
        epoch_end = (budget.clock() - t0) / cfg.checkpoint_every
        if monitor is not None:
            t0 = budget.clock()
            monitor(method.export_backbone(), device, autocast)
            epoch_end += budget.clock() - t0
    # the slowest process sets the pace (the all-reduce of gradients itself is not timed)
    timed = distributed.max_(torch.tensor([*seconds, epoch_end], dtype=torch.float64, device=device)).tolist()
    return budget.plan_steps(minutes, started, timed[:-1], per_epoch, epoch_seconds=timed[-1])


def probe_step(
    cfg: PretrainConfig,
    store: torch.Tensor,
    per_epoch: int,
    device: torch.device,
    autocast: bool = False,
    rows: slice = slice(None),
) -> tuple[Method, torch.optim.Optimizer, Callable[[int], None]]:
    """A throwaway copy of the run's model and optimiser, and ``step(i)``: one optimiser step on a random batch of
    the ``(N, 3, S, S)`` uint8 ``store``, augmentation included (what ``--minutes`` times; benchmarks use it too).

    The model is built from ``cfg.seed``, as the run's is, so the run after a probe starts from the same weights.
    """
    b = cfg.batch_size
    torch.manual_seed(cfg.seed)
    method: Method = get_method(cfg.method).build(cfg, RunPlan(store.shape[0], b, per_epoch, per_epoch))
    method.to(device).train()
    opt = _optimizer(method, cfg, device)
    params = [p for g in opt.param_groups for p in g["params"]]
    gen = torch.Generator(device=device)
    order = torch.Generator().manual_seed(cfg.seed)

    def step(i: int) -> None:
        ids = torch.randint(store.shape[0], (b,), generator=order)[rows].to(store.device)
        images = store[ids].to(device, non_blocking=True)  # (B / world, 3, S, S) uint8
        gen.manual_seed(cfg.seed * 1_000_003 + i)
        batch = method.augment(images, gen, rows, b)
        _optimise(method, method, opt, params, batch, i, cfg.optim.clip_grad, autocast)

    return method, opt, step


def _monitor(cfg: PretrainConfig, progress: bool) -> Any:
    """The k-NN monitor of ``--monitor`` (images decoded once, now), or None."""
    if cfg.monitor is None:
        return None
    from fewshot.monitor import KnnMonitor

    monitor = KnnMonitor.from_source(cfg.monitor, cfg.img_size, cfg.mean, cfg.std, progress=progress)
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
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise FewshotError(f"precision '{cfg.precision}' is not one of auto, fp32, bf16")
    if cfg.precision == "bf16" and device.type != "cuda":
        raise FewshotError("bf16 autocast is only used on CUDA (CPUs here run it far slower); use precision fp32")
    return device, device.type == "cuda" and cfg.precision != "fp32"


def _optimizer(method: Method, cfg: PretrainConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = [g for g in method.param_groups() if g["params"]]
    betas = tuple(cfg.optim.betas)
    if len(betas) != 2:
        raise FewshotError(f"optim.betas must be two numbers, got {cfg.optim.betas}")
    # lr and weight decay are set from the schedules before every step; the fused kernel is ~10× faster than
    # foreach on CPU (and than the for-loop default, ~100×)
    try:
        return torch.optim.AdamW(groups, lr=0.0, betas=(betas[0], betas[1]), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=0.0, betas=(betas[0], betas[1]), foreach=True)


def _clip_per_parameter(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """DINO's clip_gradients: scale each parameter's gradient to L2 norm ≤ ``max_norm``, without a host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))  # (P,)
    scales = (max_norm / (norms + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(grads, list(scales.unbind()))


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
