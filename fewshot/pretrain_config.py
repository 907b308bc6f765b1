"""Configuration of ``fewshot pretrain``: frozen dataclasses, pure Python (no torch), hung into the root
config as ``cfg.pretrain``.

Defaults follow DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers") for
ViT-S/16, except where a ``None`` means "derived from the dataset size and run length": DINO's ImageNet values
collapse or barely move on a few thousand images. The rule is :func:`fewshot.methods.dino.resolve`; the
resolved values are written to ``config.json`` under ``resolved``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from fewshot.config_rules import (
    ConfigValueError,
    above,
    at_least,
    check,
    check_across_now,
    each,
    fraction,
    one_of,
    scale_range,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with DINO's schedules: linear lr warm-up then cosine, cosine weight decay, per-parameter clipping.

    ``None`` = the method's own value (:data:`METHOD_OPTIM`), filled in by :func:`resolve_optim` inside
    ``fewshot.train.pretrain``, so the Python API and the CLI train a method with the same optimiser.
    """

    lr: float | None = None  # at batch 256; the run uses lr × batch_size / 256 (linear scaling rule)
    min_lr: float | None = None  # end of the cosine
    warmup_steps: int | None = None  # linear lr warm-up; None: warmup_epochs, else 10 epochs capped at 10% of the run
    warmup_epochs: float | None = None  # used when warmup_steps is None (e.g. MAE's 40)
    weight_decay: float | None = None  # cosine from this ...
    weight_decay_end: float | None = None  # ... to this; biases and 1-D (norm) parameters never decay
    clip_grad: float | None = None  # max L2 norm of each parameter's gradient (DINO's clip_gradients); 0 disables
    betas: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check(self, lr=above(0), min_lr=at_least(0), warmup_steps=at_least(0), warmup_epochs=at_least(0),
              weight_decay=at_least(0), weight_decay_end=at_least(0), clip_grad=at_least(0),
              betas=each(fraction(closed_high=False), length=2))  # fmt: skip


# Each method's AdamW, the values an OptimConfig left at None takes: DINO (Caron et al. 2021, main_dino.py): lr 5e-4
# per 256 images, weight decay cosine 0.04 -> 0.4, clipping 3.0, betas (0.9, 0.999); MAE (He et al. 2022): lr
# 1.5e-4 per 256 images, betas (0.9, 0.95), constant weight decay 0.05, no gradient clipping.
METHOD_OPTIM: dict[str, OptimConfig] = {
    "dino": OptimConfig(
        lr=5e-4, min_lr=1e-6, weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0, betas=(0.9, 0.999)
    ),
    "mae": OptimConfig(
        lr=1.5e-4, min_lr=0.0, weight_decay=0.05, weight_decay_end=0.05, clip_grad=0.0, betas=(0.9, 0.95)
    ),
}


def resolve_optim(method: str, optim: OptimConfig) -> OptimConfig:
    """``optim`` with every value left at None taken from ``method``'s AdamW (:data:`METHOD_OPTIM`); the warm-up
    stays None (derived from the run length by the loop)."""
    own = METHOD_OPTIM.get(method, METHOD_OPTIM["dino"])
    keep = ("warmup_steps", "warmup_epochs")
    filled = {k: getattr(own, k) for k in vars(optim) if getattr(optim, k) is None and k not in keep}
    return replace(optim, **filled)


@dataclass(frozen=True)
class AdaptConfig:
    """Guarded adaptation of the weights ``--init`` starts from (:mod:`fewshot.adapt`): the new DINO head / MAE
    decoder first trains alone on the frozen backbone, then the backbone trains at a lower, layer-wise decayed
    learning rate. ``None`` = derived: the guard with ``--init``, nothing (plain training) without."""

    head_warmup_steps: int | None = None  # backbone frozen for the first steps; None: 10% of the run with --init, or 0
    backbone_lr_scale: float = 1.0  # backbone lr = lr × this (× layer decay); 0.1 held the start but barely moved it in
    # benchmarks/adapt.py, so by default layer decay alone lowers the backbone's rate
    layer_decay: float | None = None  # block i of D: × decay^(D - i) (BEiT/MAE); None: 0.75 with --init, else 1
    backbone_warmup_steps: int | None = None  # the backbone's lr ramps from 0 over these steps after the warm-up;
    # None: as long as the lr warm-up (optim.warmup_steps) with --init, else 0
    warn_margin: float = 0.02  # warn when the monitored k-NN top-1 falls this far (absolute) below the start

    def __post_init__(self) -> None:
        check(self, head_warmup_steps=at_least(0), backbone_lr_scale=above(0), layer_decay=(
            lambda v: 0 < v <= 1, "in (0, 1]"), backbone_warmup_steps=at_least(0), warn_margin=at_least(0))  # fmt: skip


@dataclass(frozen=True)
class DinoConfig:
    """DINO head, loss, teacher and multi-crop augmentation (``None`` = derived, see ``methods.dino.resolve``)."""

    # head: 3-layer MLP -> L2 normalisation -> weight-normalised linear layer of out_dim prototypes
    out_dim: int | None = None  # None: next power of two ≥ #images / 8, clamped to [1024, 65536]
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True  # fix the weight-norm gain at 1 (more stable; False can be better but unstable)
    freeze_last_layer_steps: int | None = None  # None: 1 epoch, at most 10% of the run
    drop_path_rate: float = 0.1  # stochastic depth, student only
    # loss and teacher
    student_temp: float = 0.1
    teacher_temp: float | None = None  # final teacher temperature; None: 0.04 (0.07 from 100k images on)
    warmup_teacher_temp: float = 0.04  # linear warm-up start
    warmup_teacher_temp_steps: int | None = None  # None: 30 epochs, at most 30% of the run
    center_momentum: float = 0.9
    momentum_teacher: float | None = None  # EMA start, cosine to 1; None: 1 - 20/T in [0.99, 0.996] (T steps),
    # with --init 1 - 5/T in [0.996, 0.9995]: the teacher starts good, so it moves slowly
    # multi-crop (scales are fractions of the image's own area)
    global_crop_scale: tuple[float, ...] = (0.4, 1.0)
    local_crops: int = 8
    local_crop_size: int | None = None  # None: img_size × 96/224, rounded to a multiple of the patch size
    local_crop_scale: tuple[float, ...] = (0.05, 0.4)
    # photometric augmentation (DINO / BYOL values)
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_probs: tuple[float, ...] = (1.0, 0.1, 0.5)  # global view 1, global view 2, local views
    blur_sigma: tuple[float, ...] = (0.1, 2.0)  # in pixels of a 224-px crop; scaled with img_size
    solarize_prob: float = 0.2  # global view 2 only

    def __post_init__(self) -> None:
        prob = fraction()
        check(self, out_dim=at_least(1), hidden_dim=at_least(1), bottleneck_dim=at_least(1),
              freeze_last_layer_steps=at_least(0), drop_path_rate=fraction(closed_high=False),
              student_temp=above(0), teacher_temp=above(0), warmup_teacher_temp=above(0),
              warmup_teacher_temp_steps=at_least(0), center_momentum=prob, momentum_teacher=prob,
              global_crop_scale=scale_range(), local_crops=at_least(0), local_crop_size=at_least(1),
              local_crop_scale=scale_range(), flip_prob=prob, jitter_prob=prob, brightness=at_least(0),
              contrast=at_least(0), saturation=at_least(0), hue=(lambda v: 0 <= v <= 0.5, "in [0, 0.5]"),
              grayscale_prob=prob, blur_probs=each(prob, length=3), blur_sigma=each(above(0), length=2),
              solarize_prob=prob)  # fmt: skip


@dataclass(frozen=True)
class MaeConfig:
    """MAE (He et al. 2022) model and augmentation; the defaults are the paper's (ViT-B/16, 800 epochs)."""

    mask_ratio: float = 0.75
    crop_scale: tuple[float, ...] = (0.2, 1.0)  # RandomResizedCrop area range
    flip_prob: float = 0.5
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    norm_pix_loss: bool = True  # targets normalised per patch
    fixed_pos_embed: bool = True  # 2-D sin-cos position embeddings in the encoder, as the paper's code
    drop_path_rate: float = 0.0
    reconstruct_every: int = 10  # epochs between RUN/reconstructions/epoch_NNNN.png grids (+ one at the end; 0: only)
    reconstruct_images: int = 8  # images per grid; 0 disables

    def __post_init__(self) -> None:
        check(self, mask_ratio=(lambda v: 0 < v < 1, "in (0, 1) (the paper: 0.75)"), crop_scale=scale_range(),
              flip_prob=fraction(), decoder_dim=at_least(4), decoder_depth=at_least(1), decoder_heads=at_least(1),
              decoder_mlp_ratio=above(0), drop_path_rate=fraction(closed_high=False), reconstruct_every=at_least(0),
              reconstruct_images=at_least(0))  # fmt: skip
        check_across_now(self)

    def check_across(self) -> None:
        if self.decoder_dim % self.decoder_heads or self.decoder_dim % 4:
            raise ConfigValueError("decoder_dim", self.decoder_dim, f"divisible by 4 and by decoder_heads "
                                   f"({self.decoder_heads})")  # fmt: skip


@dataclass(frozen=True)
class DataConfig:
    """Where the decoded images live (:mod:`fewshot.image_cache`, :mod:`fewshot.image_store`) and how they are made.

    None of these change what is trained (``draft`` changes the decoded pixels slightly; it is part of the cache
    key), so all but ``draft`` may differ when a run is resumed."""

    cache_dir: str | None = None  # folder of the decoded-image cache; None: $FEWSHOT_CACHE/images (~/.cache/fewshot)
    workers: int = 0  # decoding processes per node; 0: every core (shared among a node's torchrun processes)
    draft: bool = True  # decode large JPEGs at 1/2, 1/4 or 1/8 scale (DCT) when still ≥ the stored resolution
    memory_gb: float | None = None  # GiB of images a process may copy into RAM, else it reads the memory-mapped
    # cache (as fast per step); None: 1 GiB, at most RAM / 4 / processes on the node (GPUs: see image_store)


@dataclass(frozen=True)
class PretrainConfig:
    """What ``fewshot pretrain`` trains, for how long, and where."""

    method: str = "dino"  # a key of fewshot.methods.METHODS: dino | mae
    model: str | None = None  # timm architecture (num_classes=0); None: the init's, else vit_small_patch16_224
    img_size: int | None = None  # global crop size (= the exported backbone's input); None: the init's, else 224
    patch_size: int | None = None  # None: the init's, else the architecture's own
    depth: int | None = None  # None: the init's, else the architecture's own
    init: str | None = None  # start from these weights: any backbone spec (hf-hub:, run folder, file); None: random
    epochs: int = 100
    steps: int | None = None  # total optimiser steps; overrides epochs when set
    minutes: float | None = None  # time budget: the steps that fit, from a timed probe of the step (fewshot.budget)
    batch_size: int = 64  # images per step, over all processes under torchrun (each gives 2 global + L local views)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N (torchrun: each process its LOCAL_RANK GPU)
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 (CUDA only)
    compile: bool = False  # torch.compile the ViT blocks (worth it on GPUs for long runs; the first steps compile)
    seed: int = 0
    store_size: int | None = None  # longer side of each stored image (aspect kept, on a canvas); None: 2×img_size
    mean: tuple[float, ...] | None = None  # input normalisation; None: the init's, else ImageNet's
    std: tuple[float, ...] | None = None
    monitor: str | None = None  # labelled images: k-NN top-1 of the exported backbone at step 0 and every epoch
    monitor_test: str | None = None  # score these labelled images against --monitor's (evaluate's full-label k-NN)
    # instead of leave-one-out; best.safetensors is then chosen on them, so do not report them as held out
    monitor_pool: str | None = None  # token pooling of the monitor; None: the method's (DINO cls, MAE avg)
    log_every: int = 10  # steps between metrics.jsonl lines (and the only host syncs on CUDA)
    checkpoint_every: int = 1  # epochs between checkpoints (one is always written at the end)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    mae: MaeConfig = field(default_factory=MaeConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        from fewshot.methods import METHODS  # names only: imports nothing heavy

        check(self, method=one_of(*METHODS), img_size=at_least(1), patch_size=at_least(1), depth=at_least(1),
              epochs=at_least(1), steps=at_least(1), batch_size=at_least(1), precision=one_of("auto", "fp32", "bf16"),
              store_size=at_least(1), mean=each(fraction(), length=3), std=each(above(0), length=3),
              log_every=at_least(1), checkpoint_every=at_least(1))  # fmt: skip
        check_across_now(self)

    def resolved_input(self) -> tuple[str, int, tuple[float, ...], tuple[float, ...]]:
        """``(model, img_size, mean, std)`` of a resolved config (:func:`fewshot.inits.resolve_pretrain` fills in
        those left None: from ``--init``, else the scratch defaults and ImageNet's normalisation)."""
        if self.model is None or self.img_size is None or self.mean is None or self.std is None:
            raise ValueError("this PretrainConfig is not resolved yet; pass it through fewshot.inits.resolve_pretrain")
        return self.model, self.img_size, self.mean, self.std

    def check_across(self) -> None:
        if self.patch_size is not None and self.img_size is not None and self.img_size % self.patch_size:
            raise ConfigValueError("img_size", self.img_size, f"a multiple of patch_size {self.patch_size}")


def scratch_architecture(cfg: PretrainConfig) -> tuple[str, int]:
    """The architecture and image size of a run without ``--init`` that leaves them unset (today's defaults)."""
    return cfg.model or "vit_small_patch16_224", cfg.img_size or 224
