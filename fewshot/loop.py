"""The step loop of ``fewshot pretrain``, the same for every method (:mod:`fewshot.methods`): each step draws this
process's rows of the global batch, augments them on the device, takes one AdamW step (:mod:`fewshot.optimisation`)
with the scheduled learning rate and weight decay (DINO's schedules, Caron et al. 2021), and at log steps and epoch
ends writes ``metrics.jsonl``, the progress line, the k-NN monitor, the method's diagnostics and the checkpoint.

A non-finite loss stops the run with the step it happened at; the adaptation guard (:mod:`fewshot.adapt`) freezes
and ramps the backbone of a run that started from weights; under torchrun the model is wrapped in
DistributedDataParallel and every logged value is averaged over the processes.

A little past the project's 300 lines: the loop, its log and epoch-end pieces and the run's summary share one
object's state (the schedules, the tallies, the monitor, the run folder), and read best together.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fewshot import adapt, distributed
from fewshot.errors import FewshotError
from fewshot.image_store import Batches
from fewshot.optimisation import optimise
from fewshot.progress import bar as progress_bar
from fewshot.runs import save_backbone, save_run_checkpoint
from fewshot.start_point import StartPoint

if TYPE_CHECKING:
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from fewshot.image_store import ImageStore
    from fewshot.methods.base import Method, RunPlan
    from fewshot.monitor import KnnMonitor
    from fewshot.pretrain_config import PretrainConfig
    from fewshot.runs import RunFolder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainResult:
    """What :func:`fewshot.pretrain` returns."""

    backbone: Path  # the exported backbone.safetensors
    steps: int  # the run's planned (and reached) last step
    seconds: float  # this call's training time
    logs: dict[str, float]  # the last logged means (loss, ...); empty when the run was already finished
    monitor: dict[str, Any] | None = None  # with --monitor: k-NN at the start, best and end (fewshot.start_point)


@dataclass
class _Tally:
    """Sums of the logged values since the last log step and since the epoch began, with their clocks."""

    acc: dict[str, torch.Tensor] = field(default_factory=dict)  # on the device: no host sync per step
    n: int = 0
    epoch: dict[str, float] = field(default_factory=dict)
    n_epoch: int = 0
    t_log: float = field(default_factory=time.perf_counter)
    t_epoch: float = field(default_factory=time.perf_counter)

    def add(self, out: dict[str, torch.Tensor]) -> None:
        for k, value in out.items():
            self.acc[k] = self.acc[k] + value.detach().float() if k in self.acc else value.detach().float()
        self.n += 1


class TrainingLoop:
    """Trains ``method`` from step ``start`` to ``plan.total_steps`` (:meth:`run`); see the module docstring."""

    def __init__(
        self,
        *,
        cfg: PretrainConfig,
        run: RunFolder,
        method: Method,
        opt: torch.optim.Optimizer,
        store: ImageStore,
        plan: RunPlan,
        lr: np.ndarray,  # (total_steps,) the scheduled learning rate, before the guard's per-group factors
        wd: np.ndarray,  # (total_steps,)
        device: torch.device,
        autocast: bool,
        progress: bool,
        ranks: distributed.Dist,
        monitor: KnnMonitor | None,
        guard: adapt.GuardPlan,
        init: dict[str, Any] | None,  # what the run records of its --init weights
    ) -> None:
        self.cfg, self.folder, self.method, self.opt, self.store, self.plan = cfg, run, method, opt, store, plan
        self.lr, self.wd, self.device, self.autocast, self.progress = lr, wd, device, autocast, progress
        self.ranks, self.monitor, self.init = ranks, monitor, init
        o = cfg.optim  # values the config leaves None are resolved before the loop (fewshot.inits.resolve_pretrain)
        assert o.clip_grad is not None and o.lr is not None
        self.clip_grad, self.base_lr = o.clip_grad, o.lr
        _, self.img_size, self.mean, self.std = cfg.resolved_input()
        self.params = [p for g in opt.param_groups for p in g["params"]]
        self.writer = _tensorboard(run.tensorboard) if ranks.main else None
        self.guard = adapt.Guard(method, guard)
        advice = self.guard.advice if init is not None else scratch_advice
        self.start_point = StartPoint(run.best, cfg.adapt.warn_margin, advice, self._export)
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
        self.epochs = math.ceil(plan.total_steps / plan.steps_per_epoch)
        self.rows = ranks.rows(cfg.batch_size)  # this process's rows of every global batch
        self.logs: dict[str, float] = {}  # the last logged means
        self.warned: set[str] = set()  # kinds of the method's epoch warnings already shown

    def run(self, start: int) -> PretrainResult:
        """Train from ``start`` to the planned last step."""
        cfg, plan = self.cfg, self.plan
        total, per_epoch = plan.total_steps, plan.steps_per_epoch
        t_start = time.perf_counter()
        feed = Batches(self.store, cfg.batch_size, self.rows, cfg.seed, per_epoch, total, self.device)
        bar = progress_bar(total=total, initial=start, unit="step", desc=cfg.method, disable=not self.progress)
        gen = torch.Generator(device=self.device)
        self.method.train()
        self.guard.apply(start)  # the head warm-up freezes the backbone before DDP registers what trains
        self._wrap()
        if self.ranks.main and self.monitor is not None:
            self._start(start)
        tally = _Tally()
        bad = torch.full((), -1, dtype=torch.long, device=self.device)  # first step with a non-finite loss
        for step in range(start, total):
            out = self._step(step, feed, gen)
            bad = torch.where((bad < 0) & ~torch.isfinite(out["loss"].detach()), step, bad)
            tally.add(out)
            bar.update(1)  # disabled on ranks other than 0
            done = step + 1
            end_of_epoch = done % per_epoch == 0 or done == total
            if self.device.type == "cpu" or done % cfg.log_every == 0 or end_of_epoch:
                # A host sync: free on the CPU, so a diverged run stops after the step that diverged; on a GPU only
                # at log steps (the loop has no other sync), and always before a checkpoint could save NaNs.
                self._check_finite(bad)
            if done % cfg.log_every == 0 or end_of_epoch:
                self._log(step, tally, bar)
            if end_of_epoch:
                self._end_epoch(step, tally)
        feed.close()
        bar.close()
        distributed.barrier()  # every process returns once rank 0 has written the final files
        return self._summary(start, time.perf_counter() - t_start)

    def _step(self, step: int, feed: Batches, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """One optimiser step; the method's outputs (``loss`` and its logs)."""
        cfg = self.cfg
        images, sizes = feed(step)  # (B / world, 3, S, S) uint8 canvases, (B / world, 2): this rank's share
        gen.manual_seed(cfg.seed * 1_000_003 + step)  # augmentations are a function of (seed, step): resumable
        # the global RNG (drop path): a function of (seed, step, rank), so resumable and different per rank
        torch.manual_seed(cfg.seed * 1_000_003 + step * 4099 + self.ranks.rank + 1)
        if self.guard.apply(step):  # the head warm-up ends here
            self._wrap()
        for group in self.opt.param_groups:
            group["lr"] = self.lr[step] * self.guard.lr_factor(group, step)
            group["weight_decay"] = self.wd[step] if group["apply_wd"] else 0.0
        batch = self.method.augment(images, gen, self.rows, cfg.batch_size, sizes)
        return optimise(self.model, self.method, self.opt, self.params, batch, step, self.clip_grad, self.autocast)

    def _log(self, step: int, tally: _Tally, bar: tqdm) -> None:
        """A log step: the means since the last one (over the ranks) to metrics.jsonl, TensorBoard and the bar."""
        now, done = time.perf_counter(), step + 1
        self.logs = self._mean_logs(tally.acc, tally.n)
        for k, v in self.logs.items():
            tally.epoch[k] = tally.epoch.get(k, 0.0) + v * tally.n
        tally.n_epoch += tally.n
        epoch = step // self.plan.steps_per_epoch
        record = {"kind": "step", "step": done, "epoch": epoch, **self._sched(step), **self.logs}
        record["images_per_s"] = tally.n * self.cfg.batch_size / max(now - tally.t_log, 1e-9)
        if self.ranks.main:
            self.folder.append_metrics(record)
            self._tensorboard(record, done)
        bar.set_postfix_str(
            f"epoch {epoch + 1}/{self.epochs} loss {self.logs['loss']:.3f} lr {self.lr[step]:.2e} "
            f"{record['images_per_s']:.0f} img/s"
        )
        tally.acc, tally.n, tally.t_log = {}, 0, now

    def _end_epoch(self, step: int, tally: _Tally) -> None:
        """An epoch end: its means, the method's diagnostics, the monitor, the epoch hook and the checkpoint."""
        now, done, epoch = time.perf_counter(), step + 1, step // self.plan.steps_per_epoch
        means = {k: v / max(tally.n_epoch, 1) for k, v in tally.epoch.items()}
        means["images_per_s"] = tally.n_epoch * self.cfg.batch_size / max(now - tally.t_epoch, 1e-9)
        tally.epoch, tally.n_epoch, tally.t_epoch = {}, 0, now
        if not self.ranks.main:  # the other ranks wait for rank 0 at the next step's all-reduce
            return
        method, final = self.method, done == self.plan.total_steps
        warnings = method.diagnose({**means, "step": done})
        record = {"kind": "epoch", "step": done, "epoch": epoch, **self._sched(step), **means}
        if self.monitor is not None:
            scores = self.monitor(method.export_backbone(), self.device, self.autocast)
            record.update(scores)
            log.info(f"epoch {epoch + 1}: k-NN top-1 {scores['knn_top1']:.3f}")
            warnings += self.start_point.observe(done, scores["knn_top1"], self.cfg.monitor)
        for w in warnings:  # all in metrics.jsonl; on screen each kind once, and again at the end if it holds
            kind = w.split("(")[0]
            if kind not in self.warned or final:
                log.warning(w)
            self.warned.add(kind)
        record["warnings"] = warnings
        self.folder.append_metrics(record)
        self._tensorboard(record, done, "epoch")
        method.on_epoch_end(epoch, self.folder.root, self.store, final)
        if (epoch + 1) % self.cfg.checkpoint_every == 0 or final:
            self._save(done)

    def _wrap(self) -> None:
        """Under torchrun: DistributedDataParallel over the parameters that train now (rebuilt when the guard
        freezes or unfreezes the backbone; DDP registers the trainable parameters when it is built)."""
        if self.ranks.world > 1:  # gradients all-reduced (averaged) by DDP during backward
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # the method's own buffers (DINO's centre) are averaged by the method; no broadcast each forward
            self.model = DistributedDataParallel(self.method, device_ids=ids, broadcast_buffers=False)

    def _start(self, start: int) -> None:
        """Step 0 of a new run: the monitored accuracy of the starting backbone; a resumed run picks it up."""
        assert self.monitor is not None
        if start > 0:
            self.start_point.resume(self.folder.read_metrics(), self.cfg.monitor)
            return
        acc = self.monitor(self.method.export_backbone(), self.device, self.autocast)["knn_top1"]
        self.start_point.observe(0, acc, self.cfg.monitor)
        what = "the --init weights" if self.init else "the random initialisation"
        log.info(f"step 0 ({what}): k-NN top-1 {acc:.3f}")
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

    def _check_finite(self, bad: torch.Tensor) -> None:
        step = int(distributed.max_(bad.clone()))  # every rank stops together
        if step >= 0:
            raise FewshotError(
                f"the loss became non-finite at step {step} (epoch {step // self.plan.steps_per_epoch + 1}); the run "
                f"stopped and its last checkpoint in {self.folder.root} is intact. Try a lower learning rate "
                f"(--set pretrain.optim.lr={self.base_lr / 4:g}), fp32 (--set pretrain.precision=fp32), a longer "
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

        m, cfg = self.method, self.cfg
        meta = {"method": cfg.method, "total_steps": self.plan.total_steps, **extra}
        if self.init is not None:
            meta |= {"init": self.init["spec"], "init_sha256": self.init["sha256"]}
        save_backbone(path, m.export_backbone(), m.architecture, m.model_kwargs, self.mean, self.std, self.img_size,
                      meta, **eval_transform(self.init and self.init["data"]))  # fmt: skip

    def _tensorboard(self, record: dict[str, Any], step: int, group: str = "pretrain") -> None:
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, float):
                    self.writer.add_scalar(f"{group}/{k}", v, step)

    def _summary(self, start: int, seconds: float) -> PretrainResult:
        if self.writer is not None:
            self.writer.close()
        total, logs = self.plan.total_steps, self.logs
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
            log.info(f"{line}; backbone → {self.folder.backbone}")
            for w in self.start_point.final_warnings():
                log.warning(w)
        monitor = self.start_point.as_dict() if self.monitor is not None else None
        return PretrainResult(self.folder.backbone, total, seconds, logs, monitor)


def scratch_advice() -> str:
    """What to do when a run from random weights falls below them (no guard to tune: there was nothing to keep)."""
    return (
        "the run started from random weights, so no adapt.* setting applies: the method is not learning features "
        "that help the k-NN on these images; see its collapse warnings, try a lower pretrain.optim.lr or a longer "
        "run, or --method mae (it learns more per CPU-minute)"
    )


def _has_batchnorm(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _tensorboard(folder: Path) -> SummaryWriter | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))
