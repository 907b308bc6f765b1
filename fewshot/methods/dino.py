"""DINO: self-distillation with no labels (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
Transformers", https://arxiv.org/abs/2104.14294), following the authors' main_dino.py.

A student ViT sees 2 global and L local crops; a momentum (EMA) teacher of the same architecture sees only the
global crops. Both end in a projection head (3-layer MLP, L2 normalisation, weight-normalised linear layer of
``out_dim`` prototypes). The loss is the cross-entropy between the teacher's centred, sharpened softmax and the
student's softmax over every pair of different views; the centre is an EMA of the teacher's batch mean.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from fewshot import distributed
from fewshot.augment import MultiCrop
from fewshot.methods.base import Method, RunPlan, create_vit, load_init, patch_size_of, prepare
from fewshot.pretrain_config import DinoConfig
from fewshot.schedules import capped_steps, cosine, linear_warmup

if TYPE_CHECKING:
    from fewshot.inits import InitWeights
    from fewshot.pretrain_config import PretrainConfig


class DINOHead(nn.Module):
    """Linear-GELU-Linear-GELU-Linear to ``bottleneck_dim``, L2 normalisation, weight-normalised linear layer."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        hidden_dim: int = DinoConfig.hidden_dim,
        bottleneck_dim: int = DinoConfig.bottleneck_dim,
        norm_last_layer: bool = DinoConfig.norm_last_layer,
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0  # (out_dim, 1), DINO's weight_g
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)  # fixed gain: every prototype is a unit vector

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1)  # (N, bottleneck)
        return self.last_layer(x)  # (N, out_dim)


class DINOLoss(nn.Module):
    """Cross-entropy between teacher and student views, same-view pairs skipped; owns the centre.

    ``forward(student_out (S, B, K), teacher_out (T, B, K), teacher_temp)``: view ``i < T`` of the student is the
    same crop as teacher view ``i``. Same numbers as lightly's ``DINOLoss`` and DINO's ``DINOLoss``.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center: Tensor
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: Tensor, teacher_out: Tensor, teacher_temp: float) -> tuple[Tensor, Tensor]:
        """Return the loss and the teacher's log-probabilities (T, B, K) (for diagnostics); update the centre."""
        n_t, batch, _ = teacher_out.shape
        n_s = student_out.shape[0]
        if student_out.shape[1:] != teacher_out.shape[1:] or n_s < n_t or n_s * n_t == n_t:
            raise ValueError(
                f"student views {tuple(student_out.shape)} do not fit teacher views {tuple(teacher_out.shape)}"
            )
        teacher_out = teacher_out.detach().float()
        t_log = F.log_softmax((teacher_out - self.center) / teacher_temp, dim=-1)  # (T, B, K)
        s_log = F.log_softmax(student_out.float() / self.student_temp, dim=-1)  # (S, B, K)
        t_prob = t_log.exp()
        # Σ_{t≠s} <p_t, log q_s> = <Σ_t p_t, Σ_s log q_s> - Σ_{i<T} <p_i, log q_i>
        cross = (t_prob.sum(0) * s_log.sum(0)).sum() - (t_prob * s_log[:n_t]).sum()
        loss = -cross / ((n_t * n_s - n_t) * batch)  # mean over pairs of views and images
        self.update_center(teacher_out.flatten(0, 1))
        return loss, t_log

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        batch_center = distributed.mean_(teacher_out.mean(0, keepdim=True))  # (1, K), over every rank's batch
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


def resolve(cfg: DinoConfig, plan: RunPlan, adapting: bool = False) -> dict[str, Any]:
    """DINO hyperparameters for this data size and run length (explicit config values always win).

    DINO's ImageNet recipe assumes 1.28M images and ~1250 steps per epoch. On a few thousand images the same
    numbers misfire: 65536 prototypes for 3000 images leave most of them unused and the centring/sharpening
    balance tips towards collapse; warm-ups of 10 or 30 *epochs* become most of a short run; and a teacher
    momentum of 0.996 averages over ~250 steps, so in a run of a few hundred steps the teacher never leaves
    its random initialisation. The rule (N images, T optimiser steps, E steps per epoch):

    - ``out_dim`` = the power of two ≥ N/8, clamped to [1024, 65536]: one prototype per ~4–16 images, the range
      of published recipes (DINO: 65536 for 1.28M images; lightly's Imagenette: 2048 for 9.5k; solo-learn's
      CIFAR: 4096 for 50k);
    - ``teacher_temp`` = 0.04 below 100k images (DINO's stable default); 0.07 from 100k on (the ViT-S/16 recipe),
      reached by a linear warm-up from ``warmup_teacher_temp`` over min(30 epochs, 30% of T) steps;
    - ``momentum_teacher`` = 1 - 20/T clamped to [0.99, 0.996]: the teacher's EMA horizon 1/(1-m) stays within
      1/20 of the run where it can (DINO's 0.996 from T = 5000 steps on), then a cosine to 1; never below 0.99
      (as BYOL finds, a faster teacher destabilises: at 0.96 our 500-step runs oscillated); when ``adapting``
      (``--init``: the teacher starts from good weights) 1 - 5/T clamped to [0.996, 0.9995], a horizon of a fifth
      of the run, so the teacher keeps the init's features while the student adapts;
    - the last layer is frozen for min(1 epoch, 10% of T) steps; the lr warm-up (optim.warmup_steps) is
      min(10 epochs, 10% of T) steps.
    """
    n, total, per_epoch = plan.n_images, plan.total_steps, plan.steps_per_epoch
    out_dim = cfg.out_dim or int(min(65536, max(1024, 2 ** math.ceil(math.log2(max(n / 8, 1))))))
    teacher_temp = cfg.teacher_temp if cfg.teacher_temp is not None else (0.04 if n < 100_000 else 0.07)
    temp_warmup = cfg.warmup_teacher_temp_steps
    if temp_warmup is None:
        temp_warmup = capped_steps(30, per_epoch, total, 0.3) if teacher_temp != cfg.warmup_teacher_temp else 0
    momentum = cfg.momentum_teacher
    if momentum is None:
        low, high, steps = (0.996, 0.9995, 5.0) if adapting else (0.99, 0.996, 20.0)
        momentum = float(min(high, max(low, 1.0 - steps / total)))
    freeze = cfg.freeze_last_layer_steps
    if freeze is None:
        freeze = max(1, capped_steps(1, per_epoch, total, 0.1))
    return {
        "out_dim": out_dim,
        "teacher_temp": teacher_temp,
        "warmup_teacher_temp_steps": int(temp_warmup),
        "momentum_teacher": momentum,
        "freeze_last_layer_steps": int(freeze),
    }


class Encoder(nn.Module):
    """Backbone + DINO head; global and local crops go through the backbone in one call per resolution."""

    def __init__(self, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[Tensor]) -> tuple[Tensor, Tensor]:
        feats = [self.backbone(c) for c in crops]  # [(n_i, D)]
        return feats[0], self.head(torch.cat(feats))  # (n_0, D), (Σ n_i, K)


class DINO(Method):
    """Student, EMA teacher, loss and multi-crop augmentation; see :func:`resolve` for the derived values."""

    def __init__(self, cfg: PretrainConfig, plan: RunPlan, init: InitWeights | None = None) -> None:
        super().__init__()
        d = cfg.dino
        arch, img_size, mean, std = cfg.resolved_input()
        self.plan, self._resolved = plan, resolve(d, plan, adapting=init is not None)
        r = self._resolved
        student_backbone, self.model_kwargs = create_vit(cfg, drop_path_rate=d.drop_path_rate, init=init)
        teacher_backbone, _ = create_vit(cfg, drop_path_rate=0.0, init=init)  # drop path on the student only
        self.init_report = load_init(student_backbone, init) if init is not None else ""
        self.architecture = arch
        dim = int(getattr(student_backbone, "num_features"))  # noqa: B009 (timm attribute)
        heads = [
            DINOHead(dim, r["out_dim"], hidden_dim=d.hidden_dim, bottleneck_dim=d.bottleneck_dim,
                     norm_last_layer=d.norm_last_layer)
            for _ in range(2)
        ]  # fmt: skip
        self.student = Encoder(student_backbone, heads[0])
        self.teacher = Encoder(teacher_backbone, heads[1])
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.loss_fn = DINOLoss(r["out_dim"], d.student_temp, d.center_momentum)
        total = plan.total_steps
        self.momentum = cosine(r["momentum_teacher"], 1.0, total)
        self.teacher_temp = linear_warmup(d.warmup_teacher_temp, r["teacher_temp"], total,
                                          r["warmup_teacher_temp_steps"])  # fmt: skip
        self.freeze_steps = r["freeze_last_layer_steps"]
        patch = patch_size_of(student_backbone)
        local = d.local_crop_size or max(patch, round(img_size * 96 / 224 / patch) * patch)
        self._resolved["local_crop_size"] = local
        self.multicrop = MultiCrop(
            img_size, local, d.local_crops, global_scale=d.global_crop_scale, local_scale=d.local_crop_scale,
            flip_prob=d.flip_prob, jitter_prob=d.jitter_prob, brightness=d.brightness, contrast=d.contrast,
            saturation=d.saturation, hue=d.hue, grayscale_prob=d.grayscale_prob, blur_probs=d.blur_probs,
            blur_sigma=d.blur_sigma, solarize_prob=d.solarize_prob, mean=mean, std=std,
        )  # fmt: skip

    @classmethod
    def build(cls, cfg: PretrainConfig, plan: RunPlan, init: InitWeights | None = None) -> DINO:
        cfg, init = prepare(cfg, init)
        return cls(cfg, plan, init)

    # The teacher follows the module's mode, as in DINO's main_dino.py: a ViT teacher (no dropout, no drop path)
    # computes the same in both, and a teacher with BatchNorm normalises with its batch statistics and tracks its
    # own running statistics in training (the EMA below copies parameters only), so it exports real ones.

    def backbone_modules(self) -> dict[str, nn.Module]:
        return {"student.backbone": self.student.backbone, "teacher.backbone": self.teacher.backbone}

    def guard_advice(self) -> str:
        return f"raise dino.momentum_teacher (now {self._resolved['momentum_teacher']:.4g})"

    def augment(
        self, images: Tensor, generator: torch.Generator, rows: slice = slice(None), batch: int | None = None,
        sizes: Tensor | None = None,
    ) -> dict[str, Tensor]:  # fmt: skip
        return self.multicrop(images, generator, rows, batch, sizes)

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        globals_ = batch["global"]  # (2B, 3, G, G)
        crops = [globals_] + ([batch["local"]] if "local" in batch else [])  # + (LB, 3, l, l)
        with torch.no_grad():
            t_feat, t_out = self.teacher([globals_])  # (2B, D), (2B, K)
        _, s_out = self.student(crops)  # ((2 + L)·B, K)
        temp = float(self.teacher_temp[min(step, len(self.teacher_temp) - 1)])
        b = globals_.shape[0] // 2
        loss, t_log = self.loss_fn(s_out.view(-1, b, s_out.shape[-1]), t_out.view(2, b, -1), temp)
        with torch.no_grad():
            k = t_log.shape[-1]
            p = t_log.exp()  # (2, B, K)
            entropy = -(p * t_log).sum(-1).mean()  # per view; ln K = uniform, 0 = one-hot
            p_mean = p.flatten(0, 1).mean(0)  # (K,) over the batch
            batch_entropy = -(p_mean * p_mean.clamp_min(1e-12).log()).sum()  # low = one prototype for all
            f = F.normalize(t_feat.float(), dim=-1)  # (2B, D)
            feature_std = f.std(0).mean() * math.sqrt(f.shape[1])  # ≈ 1 spread out, → 0 collapsed
        return {
            "loss": loss,
            "teacher_entropy": entropy,
            "teacher_entropy_max": torch.full((), math.log(k), device=loss.device),
            "teacher_batch_entropy": batch_entropy,
            "feature_std": feature_std,
        }

    def before_optimizer_step(self, step: int) -> None:
        if step < self.freeze_steps:  # DINO's cancel_gradients_last_layer: no update at all (Adam skips None)
            for p in self.student.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        m = float(self.momentum[min(step, len(self.momentum) - 1)])
        # parameters that do not train (a frozen gain, a backbone in the head warm-up) keep the teacher's copy
        # bitwise: m·θ + (1 - m)·θ need not round back to θ
        pairs = [(t, s) for t, s in zip(self.teacher.parameters(), self.student.parameters(), strict=True)
                 if s.requires_grad]  # fmt: skip
        teacher: list[Tensor] = [t for t, _ in pairs]
        student: list[Tensor] = [s for _, s in pairs]
        torch._foreach_mul_(teacher, m)  # θ_t ← m θ_t + (1 - m) θ_s
        torch._foreach_add_(teacher, student, alpha=1.0 - m)

    def export_backbone(self) -> nn.Module:
        return self.teacher.backbone

    def schedules(self, step: int) -> dict[str, float]:
        i = min(step, len(self.momentum) - 1)
        return {"momentum": float(self.momentum[i]), "teacher_temp": float(self.teacher_temp[i])}

    def resolved(self) -> dict[str, Any]:
        return dict(self._resolved)

    def diagnose(self, logs: dict[str, float]) -> list[str]:
        if logs.get("step", 0) < max(self.freeze_steps, 0.1 * self.plan.total_steps):
            return []  # too early to tell
        out = []
        ent, ent_max = logs.get("teacher_entropy", 0.0), logs.get("teacher_entropy_max", 1.0)
        if ent > 0.9 * ent_max:
            out.append(
                f"DINO is collapsing to uniform: the teacher's entropy {ent:.2f} is near its maximum ln(out_dim) = "
                f"{ent_max:.2f}; lower dino.teacher_temp (e.g. 0.03) or dino.out_dim, or raise dino.momentum_teacher"
            )
        used = math.exp(logs.get("teacher_batch_entropy", ent_max))
        if used < 4:
            out.append(
                f"DINO is collapsing to one prototype: the teacher spreads the whole batch over ≈{used:.1f} of "
                f"{math.exp(ent_max):.0f} outputs; lower optim.lr, raise dino.momentum_teacher or dino.teacher_temp"
            )
        std = logs.get("feature_std", 1.0)
        if std < 0.1:
            out.append(
                f"backbone features have collapsed (std of normalised features ×√D = {std:.3f}, healthy ≈ 0.3–1); "
                "lower optim.lr, raise dino.momentum_teacher, check the images are not near-identical"
            )
        return out
