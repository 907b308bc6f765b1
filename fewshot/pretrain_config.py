"""Configuration of ``fewshot pretrain``: frozen dataclasses, pure Python (no torch), hung into the root
config as ``cfg.pretrain``.

Defaults follow DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers") for
ViT-S/16, except where a ``None`` means "derived from the dataset size and run length": DINO's ImageNet values
collapse or barely move on a few thousand images. The rule is :func:`fewshot.methods.dino.resolve`; the
resolved values are written to ``config.json`` under ``resolved``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with DINO's schedules: linear lr warm-up then cosine, cosine weight decay, per-parameter clipping."""

    lr: float = 5e-4  # at batch 256; the run uses lr × batch_size / 256 (linear scaling rule)
    min_lr: float = 1e-6  # end of the cosine
    warmup_steps: int | None = None  # linear lr warm-up; None: warmup_epochs, else 10 epochs capped at 10% of the run
    warmup_epochs: float | None = None  # used when warmup_steps is None (e.g. MAE's 40)
    weight_decay: float = 0.04  # cosine from this ...
    weight_decay_end: float = 0.4  # ... to this; biases and 1-D (norm) parameters never decay
    clip_grad: float = 3.0  # max L2 norm of each parameter's gradient (DINO's clip_gradients); 0 disables
    betas: tuple[float, ...] = (0.9, 0.999)


# The optimiser each method starts from when the recipe, --set and flags leave a value unset (a layer between
# the defaults above, which are DINO's, and the recipe): MAE's AdamW (He et al. 2022): base lr 1.5e-4 per 256
# images, betas (0.9, 0.95), constant weight decay 0.05, no gradient clipping.
METHOD_OPTIM: dict[str, OptimConfig] = {
    "mae": OptimConfig(
        lr=1.5e-4, min_lr=0.0, weight_decay=0.05, weight_decay_end=0.05, clip_grad=0.0, betas=(0.9, 0.95)
    ),
}


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
    momentum_teacher: float | None = None  # EMA start, cosine to 1; None: 1 - 20/steps clamped to [0.99, 0.996]
    # multi-crop (scales are fractions of the stored image's area)
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
    reconstruct_every: int = 10  # epochs between RUN/reconstructions/epoch_NNNN.png grids (one always at the end)
    reconstruct_images: int = 8  # images per grid; 0 disables


@dataclass(frozen=True)
class PretrainConfig:
    """What ``fewshot pretrain`` trains, for how long, and where."""

    method: str = "dino"  # a key of fewshot.methods.METHODS: dino | mae
    model: str = "vit_small_patch16_224"  # timm architecture, built with num_classes=0
    img_size: int = 224  # global crop size (= the exported backbone's input size)
    patch_size: int | None = None  # None: the architecture's own
    depth: int | None = None  # None: the architecture's own
    init: str | None = None  # start from these weights (a .safetensors/.pth file or a run folder); None: random
    epochs: int = 100
    steps: int | None = None  # total optimiser steps; overrides epochs when set
    minutes: float | None = None  # time budget: the steps that fit, from a timed probe of the step (fewshot.budget)
    batch_size: int = 64  # images per step, over all processes under torchrun (each gives 2 global + L local views)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N (torchrun: each process its LOCAL_RANK GPU)
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 (CUDA only)
    compile: bool = False  # torch.compile the ViT blocks (worth it on GPUs for long runs; the first steps compile)
    seed: int = 0
    store_size: int | None = None  # side of the decoded square images kept in memory; None: img_size × 8/7
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    monitor: str | None = None  # labelled images: k-NN top-1 of the exported backbone logged every epoch
    log_every: int = 10  # steps between metrics.jsonl lines (and the only host syncs on CUDA)
    checkpoint_every: int = 1  # epochs between checkpoints (one is always written at the end)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    mae: MaeConfig = field(default_factory=MaeConfig)
